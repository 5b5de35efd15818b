"""The synthetic corpus (`retrace synth`) and looking at batches (`retrace batch`)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from retrace.cli import main
from retrace.data import IndexedDataset, open_training_data
from retrace.data.synthetic import SynthConfig, generate_corpus, open_variant, read_manifest, write_synthetic
from retrace.errors import RetraceError

SMALL = SynthConfig(seed=7, tokens=60_000, seq_length=32)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifest = write_synthetic(out, SMALL)
    return out, manifest


def _docs(prefix):
    with IndexedDataset(prefix) as ds:
        return [ds[i].tobytes() for i in range(len(ds))]


def test_layout_and_manifest(synth):
    out, manifest = synth
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert set(manifest["variants"]) == {"standard/raw", "standard/preshuffled", "deduped/raw", "deduped/preshuffled"}
    for key, entry in manifest["variants"].items():
        data, kind = key.split("/")
        assert entry["prefix"] == f"{data}/{kind}/document" and entry["kind"] == kind
        assert (entry["seq_length"], entry["seed"]) == (32, 1234)
        for rel, sha in entry["files"].items():
            import hashlib

            assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == sha
        with IndexedDataset(out / entry["prefix"]) as ds:
            assert ds.dtype == np.uint16
            assert len(ds) == entry["documents"] and ds.num_tokens == entry["tokens"]


def test_documents_end_with_eod(synth):
    out, _ = synth
    with IndexedDataset(out / "standard/raw/document") as ds:
        for i in range(len(ds)):
            doc = ds[i]
            assert doc[-1] == 0 and 0 not in doc[:-1] and len(doc) >= 5


def test_planted_duplicates_and_deduped_twin(synth):
    out, manifest = synth
    std, ded = _docs(out / "standard/raw/document"), _docs(out / "deduped/raw/document")
    counts = Counter(std)
    assert len(set(ded)) == len(ded)  # deduped: no duplicate documents
    assert set(ded) == set(std)  # ... and nothing else lost
    # deduped is standard with every repeat removed, order kept
    seen, first = set(), []
    for d in std:
        if d not in seen:
            seen.add(d)
            first.append(d)
    assert first == ded
    repeated = [d for d, c in counts.items() if c > 1]
    assert repeated and all(counts[d] == SMALL.dup_copies for d in repeated)
    assert len(repeated) == manifest["planted_unique_documents"]
    v = manifest["variants"]
    assert v["standard/raw"]["duplicate_documents"] == len(std) - len(ded) > 0
    assert v["deduped/raw"]["duplicate_documents"] == 0
    # the planted documents are a sizeable share of standard, much less of deduped
    std_share = v["standard/raw"]["planted_tokens"] / v["standard/raw"]["tokens"]
    ded_share = v["deduped/raw"]["planted_tokens"] / v["deduped/raw"]["tokens"]
    assert std_share > 0.4 and ded_share < 0.25


def test_deterministic_from_seed():
    a, b = generate_corpus(SMALL), generate_corpus(SMALL)
    assert [d.tobytes() for d in a.standard] == [d.tobytes() for d in b.standard]
    c = generate_corpus(SynthConfig(seed=8, tokens=60_000, seq_length=32))
    assert [d.tobytes() for d in a.standard] != [d.tobytes() for d in c.standard]


def test_same_files_from_same_seed(synth, tmp_path):
    out, manifest = synth
    again = write_synthetic(tmp_path / "again", SMALL)
    assert again == manifest  # every sha256 is the same


def _conditional_entropy(tokens: np.ndarray, vocab: int) -> float:
    pairs = tokens[:-1].astype(np.int64) * vocab + tokens[1:]
    joint = np.bincount(pairs, minlength=vocab * vocab).reshape(vocab, vocab).astype(float)
    prev = joint.sum(axis=1, keepdims=True)
    p = joint[joint > 0] / joint.sum()
    cond = (joint / np.where(prev > 0, prev, 1))[joint > 0]
    return float(-(p * np.log(cond)).sum())


def test_learnable(synth):
    """A bigram model (the simplest 'tiny model') gets far below the uniform loss log(vocab)."""
    out, _ = synth
    with IndexedDataset(out / "standard/raw/document") as ds:
        stream = np.asarray(ds.stream())
    h = _conditional_entropy(stream, SMALL.vocab_size)
    assert h < 0.5 * np.log(SMALL.vocab_size)
    with IndexedDataset(out / "deduped/raw/document") as ds:
        h_ded = _conditional_entropy(np.asarray(ds.stream()), SMALL.vocab_size)
    assert h_ded < 0.5 * np.log(SMALL.vocab_size)
    assert abs(h - h_ded) > 0.05  # the two variants are measurably different distributions


def test_preshuffled_item_i_is_raw_dataset_item_i(synth):
    out, manifest = synth
    for data in ("standard", "deduped"):
        entry = manifest["variants"][f"{data}/raw"]
        raw = open_variant(out, data, "raw", write_cache=False)
        pre = open_variant(out / "manifest.json", data, "preshuffled")
        assert len(pre) == len(raw) == entry["items"]
        np.testing.assert_array_equal(pre.samples(range(len(pre))), raw.samples(range(len(raw))))
        # any num_samples needing the same number of epochs gives the same order
        fewer = open_training_data(out / entry["prefix"], seq_length=32, num_samples=entry["num_samples"] - 40,
                                   write_cache=False)
        np.testing.assert_array_equal(fewer.samples(range(50)), pre.samples(range(50)))


def test_read_manifest_errors(tmp_path):
    with pytest.raises(RetraceError, match="cannot read"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(RetraceError, match="not a retrace synthetic data manifest"):
        read_manifest(tmp_path)


# -- the commands ------------------------------------------------------------------------------------

def test_synth_command(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "s"), "--seed", "3", "--tokens", "20000", "--seq-length", "16"]) == 0
    manifest, _ = read_manifest(tmp_path / "s")
    assert manifest["config"]["seed"] == 3 and manifest["variants"]["deduped/raw"]["seq_length"] == 16
    assert capsys.readouterr().out.strip().endswith("manifest.json")


def test_batch_command_prints_and_exports(synth, tmp_path, capsys):
    out, _ = synth
    prefix = str(out / "standard/raw/document")
    common = ["--data", prefix, "--seq-length", "32", "--num-samples", "1000", "--global-batch", "8",
              "--cache-dir", str(tmp_path / "c")]
    assert main(["batch", *common, "--step", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# ") and len(lines) == 9
    data = open_training_data(prefix, seq_length=32, num_samples=1000, cache_dir=tmp_path / "c")
    item, tokens = lines[1].split("\t")
    assert int(item) == 16 and [int(t) for t in tokens.split()] == data.sample(16).tolist()

    assert main(["batch", *common, "--step", "2", "--pdbs", "2", "--gpus", "2", "--micro", "1", "--rank", "1",
                 "--npy", str(tmp_path / "b.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), data.samples([22, 23]))

    assert main(["batch", *common, "--step", "0", "--parquet", str(tmp_path / "b.parquet")]) == 0
    import pandas as pd

    frame = pd.read_parquet(tmp_path / "b.parquet")
    assert frame["item"].tolist() == list(range(8))
    np.testing.assert_array_equal(np.stack(frame["token_ids"].to_list()), data.samples(range(8)))

    assert main(["batch", *common, "--step", "1", "--ids-only"]) == 0
    assert capsys.readouterr().out.split() == [str(i) for i in range(8, 16)]


def test_batch_command_with_manifest(synth, capsys):
    out, _ = synth
    assert main(["batch", "--variant", "deduped", "--manifest", str(out), "--kind", "preshuffled", "--step", "1",
                 "--global-batch", "4", "--ids-only"]) == 0
    assert capsys.readouterr().out.split() == ["4", "5", "6", "7"]
    assert main(["batch", "--variant", "deduped", "--kind", "raw", "--step", "0"]) == 2
    assert "both --variant and --manifest" in capsys.readouterr().err


def test_order_command(synth, tmp_path, capsys):
    out, _ = synth
    marker = tmp_path / "order" / "m.json"
    assert main(["order", "--data", str(out / "deduped/raw/document"), "--seq-length", "32", "--num-samples", "500",
                 "--cache-dir", str(tmp_path / "order"), "--marker", str(marker)]) == 0
    summary = json.loads(marker.read_text())
    assert summary["items"] > 500 and len(summary["index_maps"]) == 3
    assert all((tmp_path / "order" / p.split("/")[-1]).is_file() for p in summary["index_maps"])
