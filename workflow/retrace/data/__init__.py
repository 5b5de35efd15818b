"""GPT-NeoX indexed datasets, GPT-NeoX v1.0's training order, and the Pile variants.

The trainer uses ONE interface (names below are stable)::

    from retrace.data import open_training_data, neox_num_samples

    data = open_training_data(prefix, kind="raw" | "preshuffled", seq_length=2048, seed=1234,
                              num_samples=neox_num_samples(train_iters, global_batch),  # raw: order depends on it
                              shuffle_samples=False, cache_dir=None)
    len(data)                              # number of training items (GPT-NeoX: S - 1 for raw)
    data.sample(i)                         # np.int64 (seq_length+1,)   tokens = s[:-1], labels = s[1:]
    data.samples(ids)                      # np.int64 [n, seq_length+1]
    data.batch_items(step, micro=k, rank=r, pdbs=m, gpus=D, global_batch=B)
                                           # item ids B*step + k*m*D + r*m + [0, m)   (pdbs=None: whole step)
    data.batch(step, ...)                  # data.samples(data.batch_items(step, ...))
    data.check_enough(steps, global_batch) # RetraceError if steps*global_batch > len(data)

``prefix`` is the path without ``.bin``/``.idx``; a prefix with a shard manifest ``<prefix>.shards.json``
is read in place from its shards. ``kind="raw"``: tokenized documents read through the GPT-NeoX index
maps (doc/sample/shuffle idx, cached under GPT-NeoX's own file names in ``cache_dir``, never beside the
data; without ``cache_dir`` they are built in memory); ``shuffle_samples`` changes nothing there.
``kind="preshuffled"``: item i is stream tokens ``[(L+1)i, (L+1)(i+1))``; ``shuffle_samples=True``
permutes the items with ``RandomState(seed)``. Resuming at step N continues at item ``B*N`` whatever the
(gpus, pdbs, gas) split.

Modules:
    indexed     MMapIndexedDataset .bin/.idx: IndexedDataset (validating reader), IndexedDatasetBuilder
    shards      ShardedBin (one .bin read from its shards in place) and the shard manifest
    integrity   sha256 checked once per file and re-checked whenever its stamp changes
    order       build_index_mappings, the NeoX cache file names, batch_items, neox_num_samples
    training    TrainingData / open_training_data (the interface above)
    variants    the registry of standard/deduped × raw/preshuffled sources (pinned revisions, shard
                layout), plan_variant_fetch (which shards a study needs, bytes, disk), prepare_variant
    hubfetch    one file of a pinned dataset commit from the Hugging Face Hub / cache, with its LFS sha256
    prepare     fetch + verify + write the shard manifest (Hub variants) or record a copy on disk (path=)
    synthetic   the small synthetic corpus in the four variants (``retrace synth``); open_variant
"""

from retrace.data.indexed import (
    DTYPES,
    IndexedDataset,
    IndexedDatasetBuilder,
    best_fitting_dtype,
    open_indexed,
    write_indexed,
)
from retrace.data.order import (
    batch_items,
    build_index_mappings,
    index_map_paths,
    load_or_build_index_mappings,
    neox_num_samples,
    pythia_num_samples,
)
from retrace.data.training import KINDS, TrainingData, open_training_data

__all__ = [
    "DTYPES",
    "KINDS",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "TrainingData",
    "batch_items",
    "best_fitting_dtype",
    "build_index_mappings",
    "index_map_paths",
    "load_or_build_index_mappings",
    "neox_num_samples",
    "open_indexed",
    "open_training_data",
    "pythia_num_samples",
    "write_indexed",
]
