"""Benchmark: `retrace tokenize` throughput with 1 and 2 worker processes, against a direct loop.

    .venv/bin/python benchmarks/tokenize_throughput.py               # ~8 MB generated corpus, 8k-token byte-level BPE
    .venv/bin/python benchmarks/tokenize_throughput.py --mb 2 --smoke  # what the test suite runs (tiny, seconds)

The corpus is generated: documents of Zipf-distributed pseudo-words with punctuation and newlines, one
``{"text": ..., "meta": {}}`` per line. The tokenizer is a byte-level BPE (as the 20B tokenizer is)
trained on a slice of it, ``<|endoftext|>`` = 0. The baseline, measured in the same run, is the plain
single-process loop v1.0's ``preprocess_data.py`` runs per document (``json.loads`` + ``Tokenizer.encode``),
writing nothing. `retrace tokenize` is timed end to end (process start of its workers, shards, fsyncs,
merge, index) with ``--shard-bytes 1 MiB`` so that a few MB split into enough shards for two workers; the
outputs of 1 and 2 workers are checked to be byte-identical. Prints docs/s, tokens/s, MB/s and the
ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from retrace.data.tokenize import tokenize_corpus  # noqa: E402


def make_corpus(path: Path, mb: float, seed: int) -> int:
    """Write about ``mb`` MB of jsonl; returns the number of documents."""
    rng = np.random.RandomState(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    words = ["".join(rng.choice(letters, size=rng.randint(1, 11))) for _ in range(20_000)]
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    p /= p.sum()
    target = int(mb * 1e6)
    n = size = 0
    with open(path, "w", encoding="utf-8") as fh:
        while size < target:
            k = int(np.clip(rng.lognormal(5.0, 1.0), 5, 20_000))
            ws = [words[i] for i in rng.choice(len(words), size=k, p=p)]
            for i in range(0, k, 12):
                ws[i] = ws[i].capitalize()
            text = " ".join(ws).replace(" X", ". X") + ".\n\n" + "(" + " ".join(ws[:5]) + ")"
            line = json.dumps({"text": text, "meta": {"n": n}}) + "\n"
            fh.write(line)
            size += len(line)
            n += 1
    return n


def make_tokenizer(corpus: Path, path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    with open(corpus, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for _, line in zip(range(3000), fh, strict=False)]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))


def baseline(corpus: Path, tokenizer: Path) -> tuple[float, int, int]:
    """(seconds, docs, tokens) of the direct single-process loop."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    t0 = time.perf_counter()
    docs = tokens = 0
    with open(corpus, "rb") as fh:
        for line in fh:
            text = json.loads(line)["text"]
            if text:
                tokens += len(tok.encode(text).ids) + 1
                docs += 1
    return time.perf_counter() - t0, docs, tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=8.0, help="corpus size in MB (default: 8)")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary (default: 8192)")
    ap.add_argument("--shard-bytes", type=int, default=1 << 20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    args = ap.parse_args(argv)
    if args.smoke:
        args.mb, args.vocab, args.shard_bytes = min(args.mb, 0.3), 600, 32 << 10
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus, tokenizer = tmp / "corpus.jsonl", tmp / "tokenizer.json"
        n = make_corpus(corpus, args.mb, args.seed)
        make_tokenizer(corpus, tokenizer, args.vocab)
        mb = corpus.stat().st_size / 1e6
        print(f"corpus: {n:,} documents, {mb:.1f} MB; byte-level BPE, {args.vocab} tokens; "
              f"shards of {args.shard_bytes:,} bytes")
        secs, docs, tokens = baseline(corpus, tokenizer)
        rows = [("direct loop (json.loads + encode), 1 process", secs)]
        outputs = {}
        for workers in (1, 2):
            out = tmp / f"w{workers}" / "doc"
            t0 = time.perf_counter()
            res = tokenize_corpus(inputs=[corpus], tokenizer=tokenizer, output=out, workers=workers,
                                  shard_bytes=args.shard_bytes, log=lambda _m: None)
            rows.append((f"retrace tokenize --workers {workers}", time.perf_counter() - t0))
            assert (res.documents, res.tokens) == (docs, tokens), "retrace tokenize disagrees with the direct loop"
            outputs[workers] = (Path(f"{out}.bin").read_bytes(), Path(f"{out}.idx").read_bytes())
        assert outputs[1] == outputs[2], "1 and 2 workers wrote different bytes"
        print(f"{'':48s} {'seconds':>8s} {'docs/s':>9s} {'tokens/s':>11s} {'MB/s':>6s} {'vs loop':>8s}")
        for name, s in rows:
            print(f"{name:48s} {s:8.2f} {docs / s:9,.0f} {tokens / s:11,.0f} {mb / s:6.2f} {secs / s:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
