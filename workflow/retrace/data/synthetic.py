"""A small synthetic corpus written as the four Pile variants, for the embedded (CPU, offline) study.

Documents come from two random sparse Markov chains over a small vocabulary (token 0 is EOD and ends
every document, as ``preprocess_data.py --append-eod`` does):

* the *common* chain runs over every content token with a few successors per token;
* the *planted* chain runs over the upper half of the vocabulary only, with fewer successors: a
  distinct, more predictable part of the distribution.

``standard`` holds the common documents once and every planted document ``dup_copies`` times (by
default planted copies make up about half of its tokens), all in one seeded random order.
``deduped`` is ``standard`` with every repeat after a document's first occurrence removed (order kept),
so the planted share drops to about a fifth: a tiny model trained on each ends measurably apart.

Each is also written *preshuffled*, the way EleutherAI's ``*-pythia-preshuffled`` repos were made: the
GPT-NeoX index maps (``index_seed`` 1234, ``seq_length``, ``epochs`` epochs) applied to the raw variant, one
``seq_length+1``-token item per sample, so item i of the preshuffled stream is dataset item i of the raw
variant opened with any ``num_samples`` that needs the same number of epochs.

Everything is deterministic from ``seed`` (numpy's frozen ``RandomState``). Layout under ``out``::

    standard/raw/document.{bin,idx}         deduped/raw/document.{bin,idx}
    standard/preshuffled/document.{bin,idx} deduped/preshuffled/document.{bin,idx}
    manifest.json                           written last: prefixes, counts, seeds, sha256 of every file
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retrace.data import order
from retrace.data.indexed import IndexedDatasetBuilder, best_fitting_dtype
from retrace.data.training import TrainingData, open_training_data
from retrace.errors import RetraceError
from retrace.io import sha256_file, write_json
from retrace.pythia.constants import SEED

EOD = 0
NAME = "document"
MANIFEST = "manifest.json"
FORMAT = "retrace-synthetic/1"


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 1234
    tokens: int = 400_000  # approximate tokens of the standard variant
    vocab_size: int = 512
    seq_length: int = 128
    epochs: int = 2  # epochs of the index maps behind the preshuffled streams
    index_seed: int = SEED
    dup_copies: int = 4  # occurrences of each planted document in standard
    planted_share: float = 0.5  # share of standard's tokens that are planted documents (all copies)
    common_successors: int = 6
    planted_successors: int = 3
    mean_doc_tokens: int = 80

    def check(self) -> None:
        if not 8 <= self.vocab_size <= 65_000:
            raise RetraceError(f"synth: vocab_size must be in [8, 65000], got {self.vocab_size}")
        if self.tokens < 1000:
            raise RetraceError(f"synth: tokens must be >= 1000, got {self.tokens}")
        if self.seq_length < 2 or self.epochs < 1 or self.dup_copies < 2:
            raise RetraceError("synth: need seq_length >= 2, epochs >= 1 and dup_copies >= 2")
        if not 0.0 < self.planted_share < 1.0:
            raise RetraceError(f"synth: planted_share must be in (0, 1), got {self.planted_share}")
        half = self.vocab_size // 2
        if self.common_successors > self.vocab_size - 1 or self.planted_successors > self.vocab_size - half:
            raise RetraceError("synth: more successors than tokens to choose from")


@dataclass
class Corpus:
    """Both raw variants in memory: documents (EOD-terminated uint arrays) in corpus order."""

    standard: list[np.ndarray]
    deduped: list[np.ndarray]
    standard_planted: np.ndarray  # bool per standard document: drawn from the planted chain
    deduped_planted: np.ndarray
    planted_unique: int  # distinct planted documents


def _chain(rng: np.random.RandomState, n_states: int, lo: int, hi: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse transition table: each state gets k distinct successors in [lo, hi) with Dirichlet weights."""
    succ = np.argsort(rng.random_sample((n_states, hi - lo)), axis=1)[:, :k] + lo
    probs = rng.dirichlet(np.full(k, 0.7), size=n_states)
    return succ.astype(np.int64), np.cumsum(probs, axis=1)


def _lengths(rng: np.random.RandomState, total: int, mean: int) -> np.ndarray:
    """Lognormal content lengths (>= 4) until they add up to about ``total`` tokens."""
    sigma = 0.8
    mu = np.log(mean) - sigma**2 / 2
    out: list[np.ndarray] = []
    got = 0
    while got < total:
        draw = np.clip(rng.lognormal(mu, sigma, size=max(16, total // mean)), 4, 16 * mean).astype(np.int64)
        cum = np.cumsum(draw) + got
        cut = int(np.searchsorted(cum, total)) + 1
        out.append(draw[:cut])
        got = int(cum[min(cut, len(cum)) - 1])
    return np.concatenate(out)


def _generate(rng: np.random.RandomState, table, lo: int, hi: int, lengths: np.ndarray) -> list[np.ndarray]:
    """Run the chain for every document at once; each document ends with EOD."""
    succ, cum = table
    n, m = len(lengths), int(lengths.max())
    toks = np.zeros((n, m), dtype=np.int64)
    state = rng.randint(lo, hi, size=n)
    toks[:, 0] = state
    for t in range(1, m):
        u = rng.random_sample(n)
        choice = (u[:, None] > cum[state]).sum(axis=1)
        np.minimum(choice, succ.shape[1] - 1, out=choice)
        state = succ[state, choice]
        toks[:, t] = state
    return [np.append(toks[i, :lengths[i]], EOD) for i in range(n)]


def generate_corpus(cfg: SynthConfig) -> Corpus:
    """The two raw variants (deterministic from ``cfg.seed``)."""
    cfg.check()
    rng = np.random.RandomState(seed=cfg.seed)
    v, half = cfg.vocab_size, cfg.vocab_size // 2
    common = _chain(rng, v, 1, v, cfg.common_successors)
    planted = _chain(rng, v, half, v, cfg.planted_successors)
    planted_tokens = int(cfg.tokens * cfg.planted_share / cfg.dup_copies)
    common_tokens = cfg.tokens - planted_tokens * cfg.dup_copies
    docs_c = _generate(rng, common, 1, v, _lengths(rng, common_tokens, cfg.mean_doc_tokens))
    docs_p = _generate(rng, planted, half, v, _lengths(rng, planted_tokens, cfg.mean_doc_tokens))

    # distinct documents only (a collision is unlikely but would break "deduped has no duplicates")
    unique: list[np.ndarray] = []
    is_planted: list[bool] = []
    seen: set[bytes] = set()
    for doc, p in [(d, False) for d in docs_c] + [(d, True) for d in docs_p]:
        key = doc.astype(np.uint16).tobytes()
        if key not in seen:
            seen.add(key)
            unique.append(doc)
            is_planted.append(p)
    is_planted_a = np.array(is_planted)
    copies = np.where(is_planted_a, cfg.dup_copies, 1)
    ids = np.repeat(np.arange(len(unique)), copies)
    rng.shuffle(ids)
    first = np.zeros(len(ids), dtype=bool)
    _, first_pos = np.unique(ids, return_index=True)
    first[first_pos] = True
    return Corpus(
        standard=[unique[i] for i in ids],
        deduped=[unique[i] for i in ids[first]],
        standard_planted=is_planted_a[ids],
        deduped_planted=is_planted_a[ids[first]],
        planted_unique=int(is_planted_a.sum()),
    )


def _files(prefix: Path, root: Path) -> dict[str, str]:
    return {str(Path(f"{prefix}{s}").relative_to(root)): sha256_file(Path(f"{prefix}{s}")) for s in (".bin", ".idx")}


def preshuffle(raw_prefix: str | os.PathLike, out_prefix: str | os.PathLike, *, seq_length: int, seed: int,
               num_samples: int, dtype) -> TrainingData:
    """Write dataset items 0..len-1 of a raw variant (GPT-NeoX order) as a preshuffled stream."""
    data = open_training_data(raw_prefix, kind="raw", seq_length=seq_length, seed=seed, num_samples=num_samples,
                              write_cache=False)
    with IndexedDatasetBuilder(out_prefix, dtype) as builder:
        step = 4096
        for a in range(0, len(data), step):
            block = data.samples(np.arange(a, min(len(data), a + step)))
            for row in block:
                builder.add_document(row)
    return data


def write_synthetic(out: str | os.PathLike, cfg: SynthConfig | None = None, *, log=None) -> dict:
    """Generate the corpus and write the four variants and ``manifest.json`` under ``out``."""
    cfg = cfg or SynthConfig()
    say = log or (lambda _msg: None)
    out = Path(out)
    corpus = generate_corpus(cfg)
    dtype = best_fitting_dtype(cfg.vocab_size)
    variants: dict[str, dict] = {}
    for data, docs, planted in (("standard", corpus.standard, corpus.standard_planted),
                                ("deduped", corpus.deduped, corpus.deduped_planted)):
        raw = out / data / "raw" / NAME
        with IndexedDatasetBuilder(raw, dtype) as builder:
            for doc in docs:
                builder.add_document(doc)
        tokens = int(sum(len(d) for d in docs))
        # the largest num_samples that needs cfg.epochs epochs: the maps (hence the order) are the same
        # for every num_samples with that epoch count
        ns = order.num_samples_in(cfg.epochs, tokens, cfg.seq_length)
        pre = out / data / "preshuffled" / NAME
        td = preshuffle(raw, pre, seq_length=cfg.seq_length, seed=cfg.index_seed, num_samples=ns, dtype=dtype)
        planted_tokens = int(sum(len(d) for d, p in zip(docs, planted, strict=True) if p))
        common = {"data": data, "seq_length": cfg.seq_length, "seed": cfg.index_seed, "epochs": cfg.epochs,
                  "num_samples": ns, "items": len(td)}
        variants[f"{data}/raw"] = {
            **common, "kind": "raw", "prefix": str(raw.relative_to(out)), "documents": len(docs), "tokens": tokens,
            "planted_documents": int(planted.sum()), "planted_tokens": planted_tokens,
            "duplicate_documents": len(docs) - len({d.tobytes() for d in docs}),
            "files": _files(raw, out)}
        variants[f"{data}/preshuffled"] = {
            **common, "kind": "preshuffled", "prefix": str(pre.relative_to(out)), "documents": len(td),
            "tokens": len(td) * (cfg.seq_length + 1), "source": f"{data}/raw", "files": _files(pre, out)}
        say(f"synth: {data}: {len(docs)} documents, {tokens} tokens ({planted_tokens / tokens:.0%} planted), "
            f"{len(td)} preshuffled items of {cfg.seq_length + 1} tokens")
    manifest = {"format": FORMAT, "config": asdict(cfg), "eod_id": EOD, "dtype": str(np.dtype(dtype)),
                "planted_unique_documents": corpus.planted_unique, "variants": variants}
    write_json(out / MANIFEST, manifest)
    return manifest


def read_manifest(path: str | os.PathLike) -> tuple[dict, Path]:
    """(manifest, its directory); ``path`` is the manifest or the directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RetraceError(f"{path}: cannot read the synthetic data manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "variants" not in manifest:
        raise RetraceError(f"{path}: not a retrace synthetic data manifest (format {FORMAT})")
    return manifest, path.parent


def variant_entry(manifest_path: str | os.PathLike, data: str, kind: str) -> tuple[dict, Path]:
    """The manifest entry of ``data``/``kind`` and its absolute prefix."""
    manifest, root = read_manifest(manifest_path)
    key = f"{data}/{kind}"
    if key not in manifest["variants"]:
        raise RetraceError(f"{manifest_path}: no variant {key!r} (has {', '.join(manifest['variants'])})")
    entry = manifest["variants"][key]
    return entry, root / entry["prefix"]


def open_variant(manifest_path: str | os.PathLike, data: str, kind: str, **kwargs) -> TrainingData:
    """Open a synthetic variant with the seq_length/seed/num_samples its manifest records."""
    entry, prefix = variant_entry(manifest_path, data, kind)
    opts = {"seq_length": entry["seq_length"], "seed": entry["seed"]}
    if kind == "raw":
        opts["num_samples"] = entry["num_samples"]
    opts.update(kwargs)
    return open_training_data(prefix, kind=kind, **opts)
