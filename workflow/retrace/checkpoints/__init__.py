"""Published checkpoints (Hugging Face files, GPT-NeoX native, the Hub) as canonical parameters.

    open_params(source)      a ParamReader over a file, a directory or org/repo@revision
    load_params(source)      the same, all in memory
    open_config(source)      the config.json beside the weights
    check_fits(reader, cfg)  every parameter of a ModelConfig present with its shape
    save_params(params, p)   a canonical parameter-only safetensors file, written atomically
    publish_to_hub_cache     put local files into a huggingface_hub cache as a repo branch

Canonical names are the Hugging Face ``GPTNeoXForCausalLM`` keys; buffers are dropped by suffix.
Pickles are only ever read with ``torch.load(weights_only=True)``.
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
from retrace.checkpoints.save import save_params
from retrace.checkpoints.sources import (
    Source,
    check_fits,
    load_params,
    open_config,
    open_local,
    open_params,
    parse_source,
)
from retrace.checkpoints.torchload import OpaqueObject, safe_torch_load
from retrace.hubenv import hub_cache_dir, hub_offline

__all__ = [
    "BUFFER_SUFFIXES",
    "DictReader",
    "HubSnapshot",
    "NeoXReader",
    "OpaqueObject",
    "ParamReader",
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
    "resolve_hub",
    "safe_torch_load",
    "save_params",
    "zero_optimizer_files",
]
