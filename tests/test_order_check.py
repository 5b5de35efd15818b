"""`retrace order-check`: the index maps over a raw corpus against a preshuffled stream, item for item.

The synthetic preshuffled streams are made from the raw ones the way NeoX does (retrace.data.synthetic
writes dataset items 0..n-1 of the raw variant through the v1.0 index maps). Expected first mismatches are
computed by comparing the two streams' tokens directly, and the check's reader is compared with the
definition of a sample (tokens [s*L, s*L + L] of the documents concatenated in doc_idx order).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from retrace.cli import main
from retrace.data import order
from retrace.data.indexed import IndexedDataset
from retrace.data.preshuffle_check import check_order, raw_item
from retrace.data.synthetic import SynthConfig, preshuffle, variant_entry, write_synthetic
from retrace.data.tokenize import tokenize_corpus
from retrace.errors import RetraceError

L = 32
SMALL = SynthConfig(seed=7, tokens=60_000, seq_length=L)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, SMALL)
    return out


def _variant(synth, data, kind):
    entry, prefix = variant_entry(synth, data, kind)
    return entry, prefix


def _stream_items(prefix, n, w=L + 1) -> np.ndarray:
    with IndexedDataset(prefix) as ds:
        return np.asarray(ds.stream()[: n * w], dtype=np.int64).reshape(n, w)


def _first_difference(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    rows = np.flatnonzero((a != b).any(axis=1))
    j = int(rows[0])
    return j, int(np.flatnonzero(a[j] != b[j])[0])


@pytest.mark.parametrize("data", ["standard", "deduped"])
def test_synthetic_preshuffled_stream_matches_its_raw_corpus(synth, data):
    entry, raw = _variant(synth, data, "raw")
    _, pre = _variant(synth, data, "preshuffled")
    res = check_order(raw=raw, preshuffled=pre, seq_length=L, seed=1234, num_samples=entry["num_samples"],
                      items=entry["items"])
    assert res.ok and res.first_mismatch is None and res.items == entry["items"] and res.maps == "built"
    assert res.epochs == SMALL.epochs and res.raw_documents == entry["documents"]
    want = hashlib.sha256(_stream_items(pre, entry["items"]).astype("<u4").tobytes()).hexdigest()
    assert res.items_sha256 == want


def test_reader_gives_the_samples_of_the_shuffled_document_stream(synth):
    """Item j = tokens [s*L, s*L + L] (s = shuffle_idx[j]) of the documents concatenated in doc_idx order."""
    entry, raw = _variant(synth, "standard", "raw")
    with IndexedDataset(raw) as ds:
        doc_idx, sample_idx, shuffle_idx = order.build_index_mappings(np.asarray(ds.sizes), L, 1234,
                                                                      entry["num_samples"])
        docs = [np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))]
        stream = np.concatenate([docs[d] for d in doc_idx])
        for j in range(entry["items"]):
            s = int(shuffle_idx[j])
            got = raw_item(ds, doc_idx, sample_idx, shuffle_idx, j, L)
            assert np.array_equal(got, stream[s * L: s * L + L + 1]), j


def test_stream_made_with_another_seed_is_named(synth, tmp_path):
    entry, raw = _variant(synth, "standard", "raw")
    _, pre = _variant(synth, "standard", "preshuffled")
    other = tmp_path / "seed99" / "document"
    preshuffle(raw, other, seq_length=L, seed=99, num_samples=entry["num_samples"], dtype=np.uint16)
    n = entry["items"]
    good, bad = _stream_items(pre, n), _stream_items(other, n)
    j, p = _first_difference(good, bad)
    res = check_order(raw=raw, preshuffled=other, seq_length=L, seed=1234, num_samples=entry["num_samples"], items=n)
    m = res.first_mismatch
    assert res.status == "mismatch" and res.items_sha256 is None and res.items == j + 1
    assert (m.item, m.first_position) == (j, p)
    assert m.differing_tokens == int((good[j] != bad[j]).sum())
    assert m.raw_window == good[j][m.window_start: m.window_start + len(m.raw_window)].tolist()
    assert m.preshuffled_window == bad[j][m.window_start: m.window_start + len(m.preshuffled_window)].tolist()
    assert m.raw_head == good[j][:8].tolist() and m.preshuffled_head == bad[j][:8].tolist()
    assert f"item {j} " in res.describe() and "mismatch" in res.describe()
    # and the same check with the seed the stream was made with passes
    assert check_order(raw=raw, preshuffled=other, seq_length=L, seed=99, num_samples=entry["num_samples"],
                       items=n).ok


def test_deduped_stream_against_the_standard_corpus_is_named(synth):
    entry, raw = _variant(synth, "standard", "raw")
    _, pre_std = _variant(synth, "standard", "preshuffled")
    dentry, pre_ded = _variant(synth, "deduped", "preshuffled")
    n = min(entry["items"], dentry["items"])
    j, p = _first_difference(_stream_items(pre_std, n), _stream_items(pre_ded, n))
    res = check_order(raw=raw, preshuffled=pre_ded, seq_length=L, seed=1234, num_samples=entry["num_samples"], items=n)
    assert not res.ok and (res.first_mismatch.item, res.first_mismatch.first_position) == (j, p)


def test_one_changed_token_is_found_exactly(synth, tmp_path):
    entry, raw = _variant(synth, "standard", "raw")
    _, pre = _variant(synth, "standard", "preshuffled")
    bad = tmp_path / "document"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{pre}{suffix}", f"{bad}{suffix}")
    k, pos = 37, 5
    with open(f"{bad}.bin", "r+b") as fh:  # uint16 tokens: item k, token pos
        off = 2 * (k * (L + 1) + pos)
        fh.seek(off)
        old = int.from_bytes(fh.read(2), "little")
        fh.seek(off)
        fh.write(((old + 1) % SMALL.vocab_size).to_bytes(2, "little"))
    ns = entry["num_samples"]
    res = check_order(raw=raw, preshuffled=bad, seq_length=L, seed=1234, num_samples=ns, items=entry["items"])
    m = res.first_mismatch
    assert (m.item, m.first_position, m.differing_tokens) == (k, pos, 1)
    assert m.raw_window[pos - m.window_start] == old
    assert m.preshuffled_window[pos - m.window_start] == (old + 1) % SMALL.vocab_size
    assert check_order(raw=raw, preshuffled=bad, seq_length=L, seed=1234, num_samples=ns, items=k).ok
    assert check_order(raw=raw, preshuffled=bad, seq_length=L, seed=1234, num_samples=ns, start=k + 1,
                       items=entry["items"] - k - 1).ok


def test_cached_maps_are_used_when_asked(synth, tmp_path):
    entry, raw = _variant(synth, "standard", "raw")
    _, pre = _variant(synth, "standard", "preshuffled")
    ns = entry["num_samples"]
    with IndexedDataset(raw) as ds:
        order.load_or_build_index_mappings(raw, np.asarray(ds.sizes), L, 1234, ns, cache_dir=tmp_path)
    res = check_order(raw=raw, preshuffled=pre, seq_length=L, seed=1234, num_samples=ns, items=100, maps_dir=tmp_path)
    assert res.ok and res.maps == str(tmp_path)
    res = check_order(raw=raw, preshuffled=pre, seq_length=L, seed=1234, num_samples=ns, items=100,
                      maps_dir=tmp_path / "empty")
    assert res.ok and res.maps == "built"


def test_too_many_items_or_wrong_length(synth):
    entry, raw = _variant(synth, "standard", "raw")
    _, pre = _variant(synth, "standard", "preshuffled")
    ns = entry["num_samples"]
    with pytest.raises(RetraceError, match="preshuffled stream has"):
        check_order(raw=raw, preshuffled=pre, seq_length=L, seed=1234, num_samples=ns, items=entry["items"] + 1)
    with pytest.raises(RetraceError, match="every item has 33 tokens"):
        check_order(raw=raw, preshuffled=pre, seq_length=64, seed=1234, num_samples=ns, items=1)
    with pytest.raises(RetraceError, match="index maps hold"):
        check_order(raw=raw, preshuffled=pre, seq_length=L, seed=1234, num_samples=10, items=entry["items"])


# -- end to end: text -> retrace tokenize -> NeoX-made preshuffled stream -> retrace order-check --------

def test_tokenized_text_corpus_end_to_end(tmp_path, capsys):
    words = [f"w{i}" for i in range(300)]
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    rng = random.Random(4)
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(1, 40)))}) + "\n"
                           for _ in range(600)))
    raw = tmp_path / "raw" / "pile_text_document"
    tokenize_corpus(inputs=[src], tokenizer=tok_path, output=raw, workers=1, shard_bytes=4000)
    seq = 16
    with IndexedDataset(raw) as ds:
        ns = order.num_samples_in(2, ds.num_tokens, seq)  # two epochs, as the deduped Pile needs
    pre = tmp_path / "pre" / "document"
    n = len(preshuffle(raw, pre, seq_length=seq, seed=1234, num_samples=ns, dtype=np.uint16))
    out = tmp_path / "gate" / "order_check.json"
    args = ["order-check", "--raw", str(raw), "--preshuffled", str(pre), "--seq-length", str(seq),
            "--num-samples", str(ns), "--items", str(n)]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["status"] == "match" and summary["items"] == n and summary["epochs"] == 2
    assert summary["items_sha256"] == hashlib.sha256(_stream_items(pre, n, seq + 1).astype("<u4").tobytes()).hexdigest()
    assert "match:" in capsys.readouterr().out

    out.unlink()
    assert main([*args, "--seed", "99", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "retrace order-check: error: mismatch:" in err and "item 0 " in err
    assert not out.exists()
