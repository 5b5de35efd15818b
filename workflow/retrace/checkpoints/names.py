"""Canonical parameter names and the GPT-NeoX → Hugging Face naming and merge rules.

Canonical names are the Hugging Face ``GPTNeoXForCausalLM`` keys (reference/pythia-neox.md §5). The
only renaming a Hugging Face-format file needs is ``lm_head.weight`` → ``embed_out.weight``
(transformers 5.x calls the head ``lm_head`` in memory). GPT-NeoX native checkpoints use per-layer
keys that map as in GPT-NeoX v1.0's ``tools/convert_to_hf.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Hugging Face weight file names (here, not in checkpoints.hf, so that readers of a repo's file list need
#: no torch: the compare and audit jobs import this module).
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"

# Persistent buffers of 2023-era GPT-NeoX checkpoints: not parameters, never compared or trained.
# Matched by suffix only: a loose "bias" match would also drop real dense/query_key_value biases.
BUFFER_SUFFIXES = (".attention.bias", ".masked_bias", "inv_freq")


def is_buffer_name(name: str) -> bool:
    """True for non-parameter tensors (causal mask, masked_bias, rotary inv_freq)."""
    return name.endswith(BUFFER_SUFFIXES)

#: Hugging Face keys that are the same parameter under another name.
HF_ALIASES = {"lm_head.weight": "embed_out.weight"}

#: Per-layer parameter suffixes, in ``GPTNeoXLayer.state_dict()`` order.
LAYER_PARAMS = (
    "input_layernorm.weight",
    "input_layernorm.bias",
    "post_attention_layernorm.weight",
    "post_attention_layernorm.bias",
    "attention.query_key_value.weight",
    "attention.query_key_value.bias",
    "attention.dense.weight",
    "attention.dense.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight",
    "mlp.dense_4h_to_h.bias",
)

EMBED = "gpt_neox.embed_in.weight"
FINAL_NORM = ("gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias")
HEAD = "embed_out.weight"

_LAYER_RE = re.compile(r"gpt_neox\.layers\.(\d+)\.(.+)")


def canonical_hf_name(key: str) -> str | None:
    """The canonical name of a Hugging Face state-dict key, or ``None`` for a buffer."""
    if is_buffer_name(key):
        return None
    return HF_ALIASES.get(key, key)


def sort_key(name: str) -> tuple:
    """Module order: embedding, layers 0..L-1 (state-dict order within a layer), final norm, head."""
    if name == EMBED:
        return (0, 0, 0, "")
    m = _LAYER_RE.fullmatch(name)
    if m:
        suffix = m.group(2)
        pos = LAYER_PARAMS.index(suffix) if suffix in LAYER_PARAMS else len(LAYER_PARAMS)
        return (1, int(m.group(1)), pos, suffix)
    if name in FINAL_NORM:
        return (2, 0, FINAL_NORM.index(name), "")
    if name == HEAD:
        return (3, 0, 0, "")
    return (4, 0, 0, name)


def canonical_order(names: Iterable[str]) -> list[str]:
    return sorted(names, key=sort_key)


# --- GPT-NeoX native ------------------------------------------------------------------------------
# How tensor-parallel (model_YY / mp_rank_YY) shards of one tensor combine into the full tensor.
CAT0, CAT1, SUM, MEAN = "cat0", "cat1", "sum", "mean"

#: NeoX key inside a transformer layer → merge rule (the HF key is ``gpt_neox.layers.{i}.`` + the same key).
NEOX_LAYER_RULES = {
    "input_layernorm.weight": MEAN,
    "input_layernorm.bias": MEAN,
    "post_attention_layernorm.weight": MEAN,
    "post_attention_layernorm.bias": MEAN,
    "attention.query_key_value.weight": CAT0,
    "attention.query_key_value.bias": CAT0,
    "attention.dense.weight": CAT1,
    # GPT-J residual: every rank adds its own copy of the row-parallel bias before the all-reduce.
    "attention.dense.bias": SUM,
    "mlp.dense_h_to_4h.weight": CAT0,
    "mlp.dense_h_to_4h.bias": CAT0,
    "mlp.dense_4h_to_h.weight": CAT1,
    "mlp.dense_4h_to_h.bias": SUM,
}
NEOX_EMBED_RULES = {"word_embeddings.weight": (EMBED, CAT0)}
NEOX_NORM_RULES = {"norm.weight": (FINAL_NORM[0], MEAN), "norm.bias": (FINAL_NORM[1], MEAN)}
NEOX_HEAD_RULES = {"final_linear.weight": (HEAD, CAT0)}


def neox_rule(idx: int, key: str, n_layers: int) -> tuple[str, str] | None:
    """(canonical name, merge rule) of NeoX layer-spec index ``idx``'s ``key``; ``None`` for a buffer.

    Raises ``KeyError`` for a key with no conversion rule (the caller names the file).
    Layer-spec indices: 0 embedding, 2..L+1 transformer layer idx-2, L+3 final norm, L+4 head.
    """
    if is_buffer_name(key):
        return None
    if idx == 0:
        return NEOX_EMBED_RULES[key]
    if 2 <= idx <= n_layers + 1:
        return f"gpt_neox.layers.{idx - 2}.{key}", NEOX_LAYER_RULES[key]
    if idx == n_layers + 3:
        return NEOX_NORM_RULES[key]
    if idx == n_layers + 4:
        return NEOX_HEAD_RULES[key]
    raise KeyError(key)


def neox_expected_indices(n_layers: int) -> list[int]:
    return [0, *range(2, n_layers + 2), n_layers + 3, n_layers + 4]


def neox_layers_from_indices(indices: Iterable[int]) -> int | None:
    """L from the set of layer-spec indices present, or ``None`` if it is not a complete model."""
    idx = sorted(set(indices))
    if not idx:
        return None
    n_layers = idx[-1] - 4
    if n_layers < 1 or idx != neox_expected_indices(n_layers):
        return None
    return n_layers


def merged_shape(rule: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    first = shapes[0]
    if rule in (SUM, MEAN):
        return first
    dim = 0 if rule == CAT0 else 1
    out = list(first)
    out[dim] = sum(s[dim] for s in shapes)
    return tuple(out)
