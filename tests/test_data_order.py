"""GPT-NeoX v1.0's index maps and sample assignment.

Three independent checks of ``build_index_mappings``:
* small cases worked out by hand;
* a straightforward reference written here that follows GPT-NeoX's C++ ``build_sample_idx`` literally
  (walk the shuffled documents, count tokens per sample), compared on random inputs;
* digests of the maps GPT-NeoX v1.0's own code produced (its ``gpt2_dataset.py`` helpers and the compiled
  ``helpers.cpp`` at tag v1.0, 71df4d5) for three fixed inputs.
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from retrace.data import order
from retrace.errors import RetraceError

# -- the literal reference -------------------------------------------------------------------------


def reference_num_epochs(tokens_per_epoch, seq_length, num_samples):
    epochs, total = 0, 0
    while True:
        epochs += 1
        total += tokens_per_epoch
        if (total - 1) // seq_length >= num_samples:
            return epochs


def reference_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    """One sample at a time: take seq_length+1 tokens walking the documents; the next sample starts on
    the last token taken (samples overlap by one token)."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    out = np.zeros((num_samples + 1, 2), dtype=np.int32)
    doc_pos, doc_offset = 0, 0
    out[0] = (doc_pos, doc_offset)
    for s in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining != 0:
            left_in_doc = int(sizes[doc_idx[doc_pos]]) - doc_offset
            remaining -= left_in_doc
            if remaining <= 0:
                doc_offset += remaining + left_in_doc - 1
                remaining = 0
            else:
                doc_pos += 1
                doc_offset = 0
        out[s] = (doc_pos, doc_offset)
    return out


def reference_index_mappings(sizes, seq_length, seed, num_samples):
    sizes = np.asarray(sizes, dtype=np.int32)
    tokens = int(sizes.astype(np.int64).sum())
    epochs = reference_num_epochs(tokens, seq_length, num_samples)
    rng = np.random.RandomState(seed=seed)
    doc_idx = np.array([d for _ in range(epochs) for d in range(len(sizes))], dtype=np.int32)
    rng.shuffle(doc_idx)
    sample_idx = reference_sample_idx(sizes, doc_idx, seq_length, epochs, tokens)
    n = sample_idx.shape[0] - 1
    shuffle_idx = np.arange(n, dtype=np.uint32 if n < 2**32 - 2 else np.int64)
    rng.shuffle(shuffle_idx)
    return doc_idx, sample_idx, shuffle_idx


def _assert_same(got, want):
    for g, w, name in zip(got, want, ("doc_idx", "sample_idx", "shuffle_idx"), strict=True):
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        np.testing.assert_array_equal(g, w, err_msg=name)


# -- hand-worked cases -------------------------------------------------------------------------------

def _sample(sizes, doc_idx, L, epochs):
    sizes = np.asarray(sizes, dtype=np.int32)
    doc_idx = np.asarray(doc_idx, dtype=np.int32)
    return order.build_sample_idx(sizes, doc_idx, L, epochs, int(sizes.sum())).tolist()


def test_hand_single_epoch_exact_boundaries():
    # stream: doc0 = positions 0..2, doc1 = 3..4, doc2 = 5..8; L = 2 -> S = (9-1)//2 = 4
    # boundaries at 0, 2 (last token of doc0), 4 (doc1 offset 1), 6 (doc2 offset 1), 8 (doc2 offset 3)
    assert _sample([3, 2, 4], [0, 1, 2], 2, 1) == [[0, 0], [0, 2], [1, 1], [2, 1], [2, 3]]


def test_hand_multi_epoch():
    # sizes [3, 2], 2 epochs, shuffled order doc1 doc0 doc0 doc1: positions (0,1) (2,3,4) (5,6,7) (8,9)
    # L = 4 -> S = (10-1)//4 = 2; boundary 4 is doc_idx[1] offset 2, boundary 8 starts doc_idx[3]
    assert _sample([3, 2], [1, 0, 0, 1], 4, 2) == [[0, 0], [1, 2], [3, 0]]


def test_hand_document_longer_than_samples():
    # one 10-token document, L = 3 -> S = 3, every sample inside it
    assert _sample([10], [0], 3, 1) == [[0, 0], [0, 3], [0, 6], [0, 9]]


def test_hand_single_document_stream_over_epochs():
    # one 5-token document seen 3 times: positions 0-4, 5-9, 10-14; L = 4 -> S = 14//4 = 3
    assert _sample([5], [0, 0, 0], 4, 3) == [[0, 0], [0, 4], [1, 3], [2, 2]]
    d, s, sh = order.build_index_mappings(np.array([5], np.int32), 4, 1234, 3)
    assert d.tolist() == [0, 0, 0] and s.tolist() == [[0, 0], [0, 4], [1, 3], [2, 2]]
    assert sorted(sh.tolist()) == [0, 1, 2] and sh.dtype == np.uint32


def test_hand_empty_documents():
    # an empty first document: row 0 is still (0, 0) as in the C++ helper; empty docs are skipped
    assert _sample([0, 4], [0, 1], 2, 1) == [[0, 0], [1, 2]]
    assert _sample([2, 0, 0, 3], [0, 1, 2, 3], 2, 1) == [[0, 0], [3, 0], [3, 2]]


def test_hand_num_epochs():
    # T = 9, L = 2: (E*9 - 1)//2 >= n
    assert [order.num_epochs(9, 2, n) for n in (0, 4, 5, 8, 9, 13, 14)] == [1, 1, 2, 2, 3, 3, 4]
    with pytest.raises(RetraceError):
        order.num_epochs(1, 2, 3)


# -- the literal reference on random inputs ----------------------------------------------------------

@pytest.mark.parametrize("trial", range(60))
def test_matches_literal_reference_on_random_inputs(trial):
    rng = np.random.RandomState(1000 + trial)
    n = int(rng.randint(1, 40))
    shape = trial % 4
    if shape == 0:
        sizes = rng.randint(0, 30, n)  # empty documents too
    elif shape == 1:
        sizes = rng.randint(1, 3000, n)  # documents longer than samples
    elif shape == 2:
        sizes = np.full(n, rng.randint(1, 9))  # many exact boundaries
    else:
        sizes = rng.lognormal(3, 1.5, n).astype(int)
    sizes = sizes.astype(np.int32)
    if sizes.sum() < 2:
        sizes[0] = 2
    L = int(rng.choice([2, 3, 7, 16, 128]))
    ns = int(rng.randint(0, 3 * int(sizes.sum()) // L + 5))
    seed = int(rng.randint(0, 2**31))
    got = order.build_index_mappings(sizes, L, seed, ns, max_bytes=None)
    _assert_same(got, reference_index_mappings(sizes, L, seed, ns))
    assert order.num_epochs(int(sizes.sum()), L, ns) == reference_num_epochs(int(sizes.sum()), L, ns)


def test_small_chunks_give_the_same_sample_idx():
    rng = np.random.RandomState(5)
    sizes = rng.randint(0, 50, 300).astype(np.int32)
    doc_idx = np.tile(np.arange(300, dtype=np.int32), 3)
    rng.shuffle(doc_idx)
    T = int(sizes.sum())
    want = reference_sample_idx(sizes, doc_idx, 11, 3, T)
    for chunk in (1, 2, 7, 64, 10_000):
        np.testing.assert_array_equal(order.build_sample_idx(sizes, doc_idx, 11, 3, T, chunk=chunk), want)


GOLDEN = [
    # (sizes seed, docs, low, high, seq_length, num_samples, seed) -> epochs, rows, sha256(doc+sample+shuffle)
    ((0, 50, 0, 300, 16, 2000, 1234), 5, 2435, "42720d7bccdb75eb171294009351f25f317f3aa2b3ed78eb28e6f91158e492f4"),
    ((1, 200, 1, 5000, 2048, 700, 1234), 4, 926, "b0f21b6934257d557efa14875b76a0713182e3d80ae0b4c1d16de2676a488720"),
    ((2, 7, 1, 40, 8, 100, 42), 7, 107, "7636d129226c0bbff0177a6900c01e785c414abce08122ff790fe02390434321"),
]


@pytest.mark.parametrize(("case", "epochs", "rows", "digest"), GOLDEN)
def test_matches_digests_of_gpt_neox_v1_0(case, epochs, rows, digest):
    ss, n, lo, hi, L, ns, seed = case
    sizes = np.random.RandomState(ss).randint(lo, hi, n).astype(np.int32)
    d, s, sh = order.build_index_mappings(sizes, L, seed, ns)
    assert d.shape == (epochs * n,) and s.shape == (rows, 2) and sh.shape == (rows - 1,)
    assert (d.dtype, s.dtype, sh.dtype) == (np.int32, np.int32, np.uint32)
    assert hashlib.sha256(d.tobytes() + s.tobytes() + sh.tobytes()).hexdigest() == digest


def test_samples_are_overlapping_windows_of_the_shuffled_stream():
    """Sample k is stream tokens [k*L, k*L + L] of the documents concatenated in doc_idx order."""
    rng = np.random.RandomState(3)
    sizes = rng.randint(0, 40, 25).astype(np.int32)
    L = 8
    d, s, _ = order.build_index_mappings(sizes, L, 7, 200)
    starts = np.concatenate([[0], np.cumsum(sizes[d].astype(np.int64))])
    for k in range(1, s.shape[0]):
        j, off = s[k]
        assert starts[j] + off == k * L
        assert off < sizes[d[j]]


# -- other rules -------------------------------------------------------------------------------------

def test_pythia_num_samples():
    assert order.pythia_num_samples() == 147_164_160
    assert order.neox_num_samples(143_000, 1024) == 147_164_160
    assert order.neox_num_samples(200, 32) == 6432


def test_shuffle_dtype_rule():
    assert order.shuffle_dtype(10) == np.uint32
    assert order.shuffle_dtype(2**32 - 3) == np.uint32
    assert order.shuffle_dtype(2**32 - 2) == np.int64
    assert order.shuffle_dtype(2**33) == np.int64


def test_guard_against_absurd_maps():
    with pytest.raises(RetraceError, match="pass the num_samples your run really uses"):
        order.build_index_mappings(np.full(10, 100, np.int32), 2048, 1234, order.pythia_num_samples())


# -- cache under GPT-NeoX's names --------------------------------------------------------------------

def test_cache_file_names(tmp_path):
    p = order.index_map_paths("/data/pile_0.87_deduped_text_document", 147164160, 2048, 1234)
    assert str(p.doc_idx) == "/data/pile_0.87_deduped_text_document_train_0_indexmap_147164160ns_2048sl_1234s_doc_idx.npy"
    assert p.sample_idx.name.endswith("_147164160ns_2048sl_1234s_sample_idx.npy")
    assert p.shuffle_idx.name.endswith("_147164160ns_2048sl_1234s_shuffle_idx.npy")
    q = order.index_map_paths("/data/doc", 5, 16, 3, cache_dir=tmp_path)
    assert q.doc_idx == tmp_path / "doc_train_0_indexmap_5ns_16sl_3s_doc_idx.npy"


def test_cache_build_then_reuse_and_drop_in(tmp_path):
    sizes = np.random.RandomState(0).randint(1, 60, 40).astype(np.int32)
    prefix = tmp_path / "corpus"
    cache = tmp_path / "order"
    maps, paths = order.load_or_build_index_mappings(prefix, sizes, 16, 1234, 100, cache_dir=cache)
    assert paths.exist() and paths.doc_idx.parent == cache
    assert not list(cache.glob(".*"))  # no temporaries left
    again, _ = order.load_or_build_index_mappings(prefix, sizes, 16, 1234, 100, cache_dir=cache)
    _assert_same(again, maps)
    assert isinstance(again[0], np.memmap)  # loaded, not rebuilt
    # maps written the way GPT-NeoX writes them (np.save, allow_pickle=True) load the same
    ref = reference_index_mappings(sizes, 16, 1234, 100)
    other = order.index_map_paths(prefix, 100, 16, 99, cache_dir=tmp_path / "neox")
    (tmp_path / "neox").mkdir()
    for path, arr in zip(other.all(), ref, strict=True):
        np.save(path, arr, allow_pickle=True)
    got, _ = order.load_or_build_index_mappings(prefix, sizes, 16, 99, 100, cache_dir=tmp_path / "neox")
    _assert_same(got, ref)  # seed 99 in the name, seed-1234 content: it trusts GPT-NeoX's file as NeoX would
    # ours are plain .npy files GPT-NeoX's np.load(allow_pickle=True, mmap_mode="r") reads
    for path, arr in zip(paths.all(), maps, strict=True):
        np.testing.assert_array_equal(np.load(path, allow_pickle=True, mmap_mode="r"), arr)


def test_cache_for_other_data_is_refused(tmp_path):
    sizes = np.full(30, 10, np.int32)
    kw = {"cache_dir": tmp_path}
    order.load_or_build_index_mappings(tmp_path / "c", sizes, 4, 1, 50, **kw)
    with pytest.raises(RetraceError, match=r"sample_idx\.npy: index map has shape"):
        order.load_or_build_index_mappings(tmp_path / "c", np.full(30, 11, np.int32), 4, 1, 50, **kw)
    p = order.index_map_paths(tmp_path / "c", 50, 4, 1, **kw)
    p.shuffle_idx.write_bytes(p.shuffle_idx.read_bytes()[:40])
    with pytest.raises(RetraceError, match=r"shuffle_idx\.npy: unreadable index map"):
        order.load_or_build_index_mappings(tmp_path / "c", sizes, 4, 1, 50, **kw)


def test_maps_beside_the_data_are_never_trusted(tmp_path):
    """Maps planted beside an external data prefix, under GPT-NeoX's names, are neither read nor written:
    without a cache directory the maps are built in memory (security: order maps live under resources/)."""
    sizes = np.random.RandomState(3).randint(1, 60, 40).astype(np.int32)
    prefix = tmp_path / "data" / "corpus"
    prefix.parent.mkdir()
    true = reference_index_mappings(sizes, 16, 1234, 100)
    planted = order.index_map_paths(prefix, 100, 16, 1234)  # beside the data
    for path, arr in zip(planted.all(), true, strict=True):
        np.save(path, arr[::-1].copy() if arr.ndim == 1 else arr, allow_pickle=False)  # reversed order
    got, paths = order.load_or_build_index_mappings(prefix, sizes, 16, 1234, 100)
    _assert_same(got, true)
    assert paths is None
    assert sorted(p.name for p in prefix.parent.iterdir()) == sorted(p.name for p in planted.all())


# -- who reads what ----------------------------------------------------------------------------------

def test_batch_items_neox_formula():
    # B = 16 = 2 gpus x 4 pdbs x 2 gas: micro 1, rank 1 of step 3 -> 48 + 1*8 + 1*4 + [0, 4)
    assert order.batch_items(3, micro=1, rank=1, pdbs=4, gpus=2, global_batch=16).tolist() == [60, 61, 62, 63]
    assert order.batch_items(2, global_batch=16).tolist() == list(range(32, 48))
    assert order.batch_items(0, pdbs=2, gpus=1).tolist() == [0, 1]  # default global batch 1024
    assert order.batch_items(143_000 - 1, pdbs=None)[0] == 1024 * 142_999


@pytest.mark.parametrize("global_batch", [1024, 48])
def test_every_layout_sees_the_same_samples_per_step(global_batch):
    layouts = [(g, p) for g, p in itertools.product([1, 2, 3, 4, 8, 16], [1, 2, 3, 4, 8])
               if global_batch % (g * p) == 0]
    for step in (0, 1, 7):
        want = set(range(global_batch * step, global_batch * (step + 1)))
        for gpus, pdbs in layouts:
            gas = global_batch // (gpus * pdbs)
            seen = [order.batch_items(step, micro=k, rank=r, pdbs=pdbs, gpus=gpus, global_batch=global_batch)
                    for k in range(gas) for r in range(gpus)]
            flat = np.concatenate(seen)
            assert len(flat) == global_batch and set(flat.tolist()) == want


def test_batch_items_rejects_bad_layouts():
    with pytest.raises(RetraceError, match="not a multiple"):
        order.batch_items(0, pdbs=3, gpus=2, global_batch=16)
    with pytest.raises(RetraceError, match="micro-step 2 out of range"):
        order.batch_items(0, micro=2, pdbs=4, gpus=2, global_batch=16)
    with pytest.raises(RetraceError, match="rank 2 out of range"):
        order.batch_items(0, rank=2, pdbs=4, gpus=2, global_batch=16)
    with pytest.raises(RetraceError, match="step must be"):
        order.batch_items(-1, global_batch=16)
