"""``engine: neox``: run a cell with GPT-NeoX v1.0 itself, from the published Pythia configs.

    published_config(size, deduped)      the published yml, from a facts table (published.py)
    neox_config(size, gpus=, pdbs=, ...) the cell's GPT-NeoX v1.0 config: NeoXConfig (.text(), .corrections)
    write_neox_config(cfg, path)         written atomically (yaml, or json for DeeperSpeed's SlurmRunner)
    NeoXEnv / launch_plan                the `python ./deepy.py train.py <config>` command, pure
    prepare_load                         a load directory whose `latest` names the start step
    run_cell / finish_cell               run it, then convert (below) and parse its log
    convert_run                          global_stepN dirs -> checkpoints/step{N}.safetensors + manifest.json
    export_neox_checkpoint               HF/canonical weights -> a NeoX load dir (global_stepN + latest), mp 1

No GPT-NeoX code is part of retrace; only its published configs (data) are.
"""

from __future__ import annotations

import importlib
from typing import Any

# Exports resolve on first use, so that `retrace neox-config` does not import torch (convert does).
_EXPORTS = {
    "NeoXConfig": "config", "Override": "config", "neox_config": "config", "write_neox_config": "config",
    "CastReader": "convert", "convert_run": "convert", "parse_neox_log": "convert", "write_train_log": "convert",
    "export_neox_checkpoint": "export",
    "Correction": "published", "PublishedConfig": "published", "published_config": "published",
    "LaunchPlan": "runner", "NeoXEnv": "runner", "finish_cell": "runner", "launch_plan": "runner",
    "prepare_load": "runner", "run_cell": "runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"retrace.neox.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'retrace.neox' has no attribute {name!r}")
