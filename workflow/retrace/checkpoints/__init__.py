"""Published checkpoints (Hugging Face files, GPT-NeoX native, the Hub) as canonical parameters.

    open_params(source)      a ParamReader over a file, a directory or org/repo@revision
    load_params(source)      the same, all in memory
    open_config(source)      the config.json beside the weights
    check_fits(reader, cfg)  every parameter of a ModelConfig present with its shape
    save_params(params, p)   a canonical parameter-only safetensors file, written atomically
    publish_to_hub_cache     put local files into a huggingface_hub cache as a repo branch
    start_source(ref, step)  the checkpoint a run starting at ``step`` of ``ref`` opens
    read_reference_record    where a fetched reference came from, and whether it was verified

Canonical names are the Hugging Face ``GPTNeoXForCausalLM`` keys; buffers are dropped by suffix.
Hub files are verified against their recorded hashes, failing closed (``trust``). Pickles are only
ever read with ``torch.load(weights_only=True)``, and not at all under a torch with a known bypass.
"""

from retrace.checkpoints.base import BUFFER_SUFFIXES, DictReader, ParamReader, is_buffer_name
from retrace.checkpoints.hf import SafetensorsReader, TorchBinReader
from retrace.checkpoints.hub import HubSnapshot, resolve_hub
from retrace.checkpoints.hubcache import publish_dir_to_hub_cache, publish_to_hub_cache
from retrace.checkpoints.names import canonical_hf_name, canonical_order
from retrace.checkpoints.neox import (
    NeoXReader,
    hf_config_from_neox,
    load_client_state,
    load_neox_yaml,
    load_zero_optimizer_state,
    zero_optimizer_files,
)
from retrace.checkpoints.record import ReferenceRecord, read_reference_record, reference_metadata
from retrace.checkpoints.save import save_params
from retrace.checkpoints.sources import (
    Source,
    check_fits,
    load_params,
    open_config,
    open_local,
    open_params,
    parse_source,
    start_source,
)
from retrace.checkpoints.torchload import OpaqueObject, safe_torch_load
from retrace.checkpoints.trust import ALLOW_UNSAFE_PICKLE_ENV, ALLOW_UNVERIFIED_ENV, verify_mode
from retrace.hubenv import hub_cache_dir, hub_offline

__all__ = [
    "ALLOW_UNSAFE_PICKLE_ENV",
    "ALLOW_UNVERIFIED_ENV",
    "BUFFER_SUFFIXES",
    "DictReader",
    "HubSnapshot",
    "NeoXReader",
    "OpaqueObject",
    "ParamReader",
    "ReferenceRecord",
    "SafetensorsReader",
    "Source",
    "TorchBinReader",
    "canonical_hf_name",
    "canonical_order",
    "check_fits",
    "hf_config_from_neox",
    "hub_cache_dir",
    "hub_offline",
    "is_buffer_name",
    "load_client_state",
    "load_neox_yaml",
    "load_params",
    "load_zero_optimizer_state",
    "open_config",
    "open_local",
    "open_params",
    "parse_source",
    "publish_dir_to_hub_cache",
    "publish_to_hub_cache",
    "read_reference_record",
    "reference_metadata",
    "resolve_hub",
    "safe_torch_load",
    "save_params",
    "start_source",
    "verify_mode",
    "zero_optimizer_files",
]
