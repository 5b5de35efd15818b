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

The names below are imported on first use (PEP 562), so that ``retrace.checkpoints.names`` and
``retrace.checkpoints.safetensors_np`` can be imported without torch (``retrace compare`` on two
safetensors files runs torch-free).
"""

from __future__ import annotations

import importlib

#: public name → the module that defines it
_WHERE = {
    "ALLOW_UNSAFE_PICKLE_ENV": "retrace.checkpoints.trust",
    "ALLOW_UNVERIFIED_ENV": "retrace.checkpoints.trust",
    "BUFFER_SUFFIXES": "retrace.checkpoints.names",
    "DictReader": "retrace.checkpoints.base",
    "HubSnapshot": "retrace.checkpoints.hub",
    "NeoXReader": "retrace.checkpoints.neox",
    "OpaqueObject": "retrace.checkpoints.torchload",
    "ParamReader": "retrace.checkpoints.base",
    "ReferenceRecord": "retrace.checkpoints.record",
    "SafetensorsReader": "retrace.checkpoints.hf",
    "Source": "retrace.checkpoints.sources",
    "TorchBinReader": "retrace.checkpoints.hf",
    "canonical_hf_name": "retrace.checkpoints.names",
    "canonical_order": "retrace.checkpoints.names",
    "check_fits": "retrace.checkpoints.sources",
    "hf_config_from_neox": "retrace.checkpoints.neox",
    "hub_cache_dir": "retrace.hubenv",
    "hub_offline": "retrace.hubenv",
    "is_buffer_name": "retrace.checkpoints.names",
    "load_client_state": "retrace.checkpoints.neox",
    "load_neox_yaml": "retrace.checkpoints.neox",
    "load_params": "retrace.checkpoints.sources",
    "load_zero_optimizer_state": "retrace.checkpoints.neox",
    "open_config": "retrace.checkpoints.sources",
    "open_local": "retrace.checkpoints.sources",
    "open_params": "retrace.checkpoints.sources",
    "parse_source": "retrace.checkpoints.sources",
    "publish_dir_to_hub_cache": "retrace.checkpoints.hubcache",
    "publish_to_hub_cache": "retrace.checkpoints.hubcache",
    "read_reference_record": "retrace.checkpoints.record",
    "reference_metadata": "retrace.checkpoints.record",
    "resolve_hub": "retrace.checkpoints.hub",
    "safe_torch_load": "retrace.checkpoints.torchload",
    "save_params": "retrace.checkpoints.save",
    "start_source": "retrace.checkpoints.sources",
    "verify_mode": "retrace.checkpoints.trust",
    "zero_optimizer_files": "retrace.checkpoints.neox",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
