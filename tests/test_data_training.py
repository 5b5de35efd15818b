"""TrainingData: the items the trainer reads, for raw and preshuffled data."""

from __future__ import annotations

import numpy as np
import pytest

from retrace.data import neox_num_samples, open_training_data, write_indexed
from retrace.data import order as order_mod
from retrace.data.training import preshuffled_perm_path
from retrace.errors import RetraceError


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.RandomState(11)
    docs = [np.append(rng.randint(1, 500, int(n)), 0).astype(np.uint16) for n in rng.randint(0, 60, 80)]
    prefix = write_indexed(tmp_path / "raw" / "document", docs)
    return prefix, docs


def test_raw_items_are_windows_of_the_shuffled_stream(corpus, tmp_path):
    prefix, docs = corpus
    L, ns = 16, 500
    data = open_training_data(prefix, kind="raw", seq_length=L, seed=1234, num_samples=ns,
                              cache_dir=tmp_path / "order")
    sizes = np.array([len(d) for d in docs], np.int32)
    doc_idx, sample_idx, shuffle_idx = order_mod.build_index_mappings(sizes, L, 1234, ns)
    stream = np.concatenate([docs[i] for i in doc_idx]).astype(np.int64)
    assert len(data) == sample_idx.shape[0] - 2  # GPT-NeoX: S - 1 items
    for j in list(range(20)) + [len(data) - 1]:
        k = int(shuffle_idx[j])
        want = stream[k * L:k * L + L + 1]
        got = data.sample(j)
        assert got.dtype == np.int64 and got.shape == (L + 1,)
        np.testing.assert_array_equal(got, want)
    ids = np.array([5, 0, 3, 3])
    np.testing.assert_array_equal(data.samples(ids), np.stack([data.sample(i) for i in ids]))
    # maps cached in the cache directory under GPT-NeoX's names, nothing written beside the data
    assert data.map_paths.exist() and data.map_paths.doc_idx.parent == tmp_path / "order"
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["document.bin", "document.idx"]


def test_raw_cache_dir_and_no_write(corpus, tmp_path):
    prefix, _ = corpus
    cache = tmp_path / "cache"
    a = open_training_data(prefix, seq_length=8, num_samples=100, cache_dir=cache)
    assert a.map_paths.doc_idx.parent == cache and a.map_paths.exist()
    b = open_training_data(prefix, seq_length=8, num_samples=100, cache_dir=tmp_path / "nowhere", write_cache=False)
    assert not (tmp_path / "nowhere").exists()
    c = open_training_data(prefix, seq_length=8, num_samples=100)  # no cache: built in memory
    assert c.map_paths is None and c.describe()["items"] == len(a)
    np.testing.assert_array_equal(a.samples(range(10)), b.samples(range(10)))
    np.testing.assert_array_equal(a.samples(range(10)), c.samples(range(10)))


def test_raw_shuffle_samples_flag_changes_nothing(corpus):
    prefix, _ = corpus
    a = open_training_data(prefix, seq_length=8, num_samples=100, shuffle_samples=False)
    b = open_training_data(prefix, seq_length=8, num_samples=100, shuffle_samples=True)
    np.testing.assert_array_equal(a.samples(range(len(a))), b.samples(range(len(b))))


def test_batches_and_layouts(corpus):
    prefix, _ = corpus
    data = open_training_data(prefix, seq_length=8, num_samples=neox_num_samples(10, 16))
    whole = data.batch(3, global_batch=16)
    assert whole.shape == (16, 9)
    parts = [data.batch(3, micro=k, rank=r, pdbs=2, gpus=4, global_batch=16) for k in range(2) for r in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert data.batch_items(3, micro=1, rank=2, pdbs=2, gpus=4, global_batch=16).tolist() == [60, 61]


def test_check_enough(corpus):
    prefix, _ = corpus
    data = open_training_data(prefix, seq_length=8, num_samples=100)
    data.check_enough(len(data) // 16, 16)
    with pytest.raises(RetraceError, match=r"need \d+ items but the data has"):
        data.check_enough(len(data) // 16 + 1, 16)
    with pytest.raises(RetraceError, match="out of range"):
        data.sample(len(data))
    with pytest.raises(RetraceError, match="out of range"):
        data.batch(len(data) // 16 + 1, global_batch=16)


def _preshuffled(tmp_path, n_items, L):
    rng = np.random.RandomState(2)
    items = rng.randint(0, 1000, (n_items, L + 1)).astype(np.uint16)
    prefix = write_indexed(tmp_path / "pre" / "document", list(items))
    return prefix, items.astype(np.int64)


def test_preshuffled_items_are_consecutive_slices(tmp_path):
    prefix, items = _preshuffled(tmp_path, 50, 8)
    data = open_training_data(prefix, kind="preshuffled", seq_length=8)
    assert len(data) == 50
    np.testing.assert_array_equal(data.samples(range(50)), items)
    np.testing.assert_array_equal(data.sample(7), items[7])
    np.testing.assert_array_equal(data.batch(2, global_batch=10), items[20:30])
    capped = open_training_data(prefix, kind="preshuffled", seq_length=8, num_samples=20)
    assert len(capped) == 20
    with pytest.raises(RetraceError, match="fewer than num_samples=60"):
        open_training_data(prefix, kind="preshuffled", seq_length=8, num_samples=60)


def test_preshuffled_stream_of_variable_sized_sequences(tmp_path):
    """Item i is stream tokens [(L+1)i, (L+1)(i+1)) whatever the stored sequence sizes."""
    stream = np.arange(100, dtype=np.uint16)
    prefix = write_indexed(tmp_path / "s", [stream[:13], stream[13:50], stream[50:]])
    data = open_training_data(prefix, kind="preshuffled", seq_length=9)
    assert len(data) == 10
    np.testing.assert_array_equal(data.sample(3), np.arange(30, 40))


def test_preshuffled_wrong_seq_length(tmp_path):
    prefix, _ = _preshuffled(tmp_path, 5, 8)
    with pytest.raises(RetraceError, match="every item has 9 tokens but seq_length=2048 needs 2049"):
        open_training_data(prefix, kind="preshuffled")


def test_preshuffled_sample_shuffle(tmp_path):
    prefix, items = _preshuffled(tmp_path, 40, 4)
    cache = tmp_path / "order"
    data = open_training_data(prefix, kind="preshuffled", seq_length=4, seed=7, shuffle_samples=True,
                              cache_dir=cache)
    perm = np.arange(40, dtype=np.uint32)
    np.random.RandomState(seed=7).shuffle(perm)
    np.testing.assert_array_equal(data.samples(range(40)), items[perm])
    path = preshuffled_perm_path(prefix, 40, 7, cache)
    assert path.is_file() and path.parent == cache
    again = open_training_data(prefix, kind="preshuffled", seq_length=4, seed=7, shuffle_samples=True,
                               cache_dir=cache)
    np.testing.assert_array_equal(again.samples(range(40)), items[perm])
    # a permutation planted beside the data is not read
    np.save(prefix.parent / path.name, np.arange(40, dtype=np.uint32))
    fresh = open_training_data(prefix, kind="preshuffled", seq_length=4, seed=7, shuffle_samples=True)
    np.testing.assert_array_equal(fresh.samples(range(40)), items[perm])


def test_bad_arguments(corpus):
    prefix, _ = corpus
    with pytest.raises(RetraceError, match="data kind must be one of"):
        open_training_data(prefix, kind="shuffled")
    with pytest.raises(RetraceError, match="no such file"):
        open_training_data(str(prefix) + "x")
    with pytest.raises(RetraceError, match="pass the num_samples your run really uses"):
        open_training_data(prefix, seq_length=2048)  # Pythia's 147M samples on an 80-document corpus


def test_order_command_caches_in_the_marker_directory(corpus, tmp_path, capsys):
    from retrace.cli import main

    prefix, _ = corpus
    marker = tmp_path / "resources" / "order" / "v" / "ns100_sl8_s1234.json"
    assert main(["order", "--data", str(prefix), "--seq-length", "8", "--num-samples", "100",
                 "--marker", str(marker)]) == 0
    cached = sorted(p.name for p in marker.parent.iterdir())
    assert cached == sorted([marker.name, *(p.name for p in order_mod.index_map_paths(
        prefix, 100, 8, 1234, cache_dir=marker.parent).all())])
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["document.bin", "document.idx"]
    assert main(["order", "--data", str(prefix), "--seq-length", "8", "--num-samples", "100"]) == 2
    assert "give --cache-dir" in capsys.readouterr().err
