"""Canonical (Hugging Face) parameters → a GPT-NeoX v1.0 native checkpoint that GPT-NeoX can ``load``.

The published Pythia step-0 weights exist only in Hugging Face format (``EleutherAI/pythia-*@step0``),
while GPT-NeoX v1.0 starts from them only through ``load`` (a directory whose ``latest`` names a
``global_step{N}`` directory). ``export_neox_checkpoint`` writes that directory for one tensor-parallel
rank (mp = 1), the inverse of the NeoX → HF mapping of reference/pythia-neox.md §5 for mp = 1:

    out_dir/global_step{N}/layer_00-model_00-model_states.pt        word_embeddings.weight
    out_dir/global_step{N}/layer_{i+2:02d}-model_00-model_states.pt transformer layer i: input_layernorm.*,
        attention.query_key_value.*, attention.rotary_emb.inv_freq, attention.dense.*,
        post_attention_layernorm.*, mlp.dense_h_to_4h.*, mlp.dense_4h_to_h.*
    out_dir/global_step{N}/layer_{L+3:02d}-model_00-model_states.pt norm.weight, norm.bias
    out_dir/global_step{N}/layer_{L+4:02d}-model_00-model_states.pt final_linear.weight
    out_dir/global_step{N}/mp_rank_00_model_states.pt               DeepSpeed engine + GPT-NeoX client state
    out_dir/latest                                                  "global_step{N}" (written last)

(indices 1 and L+2 are GPT-NeoX's ``_pre/_post_transformer_block`` functions and have no file). With
``layout="sequential"`` (pp = 0, as the 14m/31m configs run) the same tensors go into
``mp_rank_00_model_states.pt["module"]`` as ``sequential.{idx}.{key}`` and there are no layer files.

``inv_freq`` is the rotary buffer GPT-NeoX v1.0 registers in every layer (persistent, so a strict
``load_state_dict`` needs it): ``1 / base^(2i/r)`` computed in float32 and cast to ``dtype`` as
``module.half()`` does (the published checkpoints hold it in fp16).

The client-state file holds only plain dicts, ints, lists and None (``torch.load(weights_only=True)``
reads it): the keys DeeperSpeed's ``_load_checkpoint`` reads unconditionally (``module`` — None for a
pipeline model, whose weights come from the layer files —, ``optimizer`` None, ``lr_scheduler`` None,
``csr_tensor_module_names``, ``skipped_steps``, ``global_steps``, ``dp_world_size``, ``mp_world_size``)
plus GPT-NeoX's ``iteration`` and ``args``. v1.0's ``check_checkpoint_args`` asserts that *every*
entry of ``args`` equals the running config's value, so ``args`` holds only the shape keys it can be
sure of (num_layers, hidden_size, num_attention_heads, max_position_embeddings, padded_vocab_size,
model_parallel_size); ``neox_args`` adds or replaces entries. There is no RNG state, LR-scheduler
state or ZeRO optimizer state: the checkpoint is meant for a ``finetune: true`` start at step 0
(weights only, as the published run began); ``retrace.neox.runner.prepare_load`` refuses it for a
resume at step > 0.

Every file is written atomically (``retrace.io.atomic_path``); ``latest`` is written last and
removed first when it names the step being rewritten, so a failed export leaves no ``latest``
pointing at a partial directory.

Not run here (no GPU, no gpt-neox checkout): GPT-NeoX loading these files. What is tested: the files
read back through ``retrace.checkpoints.NeoXReader`` to the same canonical tensors, the layer-file
indices of §5, and the atomicity. The DeeperSpeed/GPT-NeoX keys above were read from their sources.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from retrace.checkpoints.base import DictReader, ParamReader
from retrace.checkpoints.names import neox_expected_indices, neox_rule
from retrace.errors import RetraceError
from retrace.io import atomic_open, atomic_path
from retrace.pythia.sizes import ModelConfig

LAYOUTS = ("pipeline", "sequential")
# Per transformer layer, in GPT-NeoX v1.0's state-dict order; the rotary buffer sits after the QKV.
_LAYER_KEYS = (
    "input_layernorm.weight", "input_layernorm.bias",
    "attention.query_key_value.weight", "attention.query_key_value.bias",
    "attention.rotary_emb.inv_freq",
    "attention.dense.weight", "attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
)
INV_FREQ = "attention.rotary_emb.inv_freq"


def layer_file(idx: int, mp: int = 0) -> str:
    """``layer_{idx:02d}-model_{mp:02d}-model_states.pt`` (DeepSpeed's PipelineModule naming)."""
    return f"layer_{idx:02d}-model_{mp:02d}-model_states.pt"


def inv_freq(cfg: ModelConfig, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """GPT-NeoX v1.0's rotary ``inv_freq`` buffer, ``1 / base^(2i/r)`` in float32, then cast to ``dtype``."""
    r = cfg.rotary_dims
    return (1.0 / (cfg.rotary_base ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r))).to(dtype)


def neox_layer_states(reader: ParamReader, cfg: ModelConfig,
                      dtype: torch.dtype = torch.float16) -> dict[int, dict[str, torch.Tensor]]:
    """Layer-spec index → GPT-NeoX key → tensor (mp = 1), every tensor cast to ``dtype`` and contiguous."""
    L = cfg.n_layers
    freq = inv_freq(cfg, dtype)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for idx in neox_expected_indices(L):
        if idx == 0:
            keys: tuple[str, ...] = ("word_embeddings.weight",)
        elif idx <= L + 1:
            keys = _LAYER_KEYS
        elif idx == L + 3:
            keys = ("norm.weight", "norm.bias")
        else:
            keys = ("final_linear.weight",)
        state: dict[str, torch.Tensor] = {}
        for key in keys:
            rule = neox_rule(idx, key, L)
            if rule is None:  # the rotary buffer
                state[key] = freq.clone()
                continue
            name = rule[0]
            state[key] = reader.get(name).detach().to("cpu", dtype).contiguous().clone()
        out[idx] = state
    return out


def client_state(step: int, cfg: ModelConfig, neox_args: Mapping[str, Any] | None = None,
                 module: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The ``mp_rank_00_model_states.pt`` dict (see the module docstring); plain types only."""
    args: dict[str, Any] = {
        "num_layers": cfg.n_layers, "hidden_size": cfg.hidden, "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.seq_len, "padded_vocab_size": cfg.vocab, "model_parallel_size": 1,
    }
    args.update(dict(neox_args or {}))
    return {
        "module": module, "optimizer": None, "lr_scheduler": None, "csr_tensor_module_names": [],
        "skipped_steps": 0, "global_steps": int(step), "dp_world_size": 1, "mp_world_size": 1,
        "iteration": int(step), "args": args,
    }


def export_neox_checkpoint(
    params_or_reader: ParamReader | Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    step: int,
    cfg: ModelConfig,
    neox_args: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
    layout: str = "pipeline",
    client: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/global_step{step}/`` and ``out_dir/latest`` (module docstring); returns the step dir.

    ``params_or_reader`` is a ``ParamReader`` or a canonical state dict (``GPTNeoX.state_dict()``); it
    must fit ``cfg`` exactly (``retrace.checkpoints.check_fits``), else one ``RetraceError`` naming the
    tensors. ``dtype`` fp16 by default (what GPT-NeoX saves under fp16); ``layout`` ``pipeline``
    (pp ≥ 1) or ``sequential`` (pp = 0). ``client`` replaces entries of the client state (a training
    checkpoint's LR-scheduler state, dp world size: ``retrace.neox.zero_export``).
    """
    from retrace.checkpoints.sources import check_fits

    if layout not in LAYOUTS:
        raise RetraceError(f"export_neox_checkpoint: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise RetraceError(f"export_neox_checkpoint: step must be an integer ≥ 0, got {step!r}")
    reader = params_or_reader if isinstance(params_or_reader, ParamReader) else DictReader(params_or_reader)
    check_fits(reader, cfg)
    out_dir = Path(out_dir)
    tag = f"global_step{step}"
    step_dir = out_dir / tag
    latest = out_dir / "latest"
    if latest.is_file() and latest.read_text(encoding="utf-8").strip() == tag:
        latest.unlink()  # the directory it names is about to change
    step_dir.mkdir(parents=True, exist_ok=True)
    states = neox_layer_states(reader, cfg, dtype)
    module = None
    if layout == "pipeline":
        for idx, state in states.items():
            _save(state, step_dir / layer_file(idx))
    else:
        module = {f"sequential.{idx}.{key}": t for idx, state in states.items() for key, t in state.items()}
    _save({**client_state(step, cfg, neox_args, module), **dict(client or {})}, step_dir / "mp_rank_00_model_states.pt")
    with atomic_open(latest, "w", encoding="utf-8") as fh:
        fh.write(tag)
    return step_dir


def _save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, str(tmp))
