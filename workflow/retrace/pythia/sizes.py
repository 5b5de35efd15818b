"""Model shapes: ``ModelConfig``, the Pythia size registry and Hugging Face ``config.json`` conversion.

This module needs no torch, so config validation and the grid can use it cheaply; ``retrace.model``
re-exports everything here. Facts are from GPT-NeoX v1.0 and the Pythia ymls (reference/pythia-neox.md
§1, §3). The per-size training recipe (learning rate, batch layout) is retrace.pythia.recipes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from retrace.errors import RetraceError
from retrace.pythia.constants import SEQ_LENGTH

GELU_KINDS = ("tanh", "erf")
ATTENTION_KINDS = ("flash", "global")
INIT_KINDS = ("small_wang", "normal_scaled")
ROTARY_ANGLE_KINDS = ("fp32", "neox")
ARITHMETIC_KINDS = ("neox", "hf")

#: ``init_method_std`` of GPT-NeoX v1.0 (the ``normal``/``scaled_normal`` branch).
INIT_METHOD_STD = 0.02


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shape and numerics of one GPT-NeoX/Pythia network.

    ``vocab`` is the padded vocabulary (the embedding's row count). ``gelu`` is ``"tanh"`` (the fused
    tanh approximation Pythia was trained with) or ``"erf"`` (exact, what Hugging Face runs for
    ``hidden_act: gelu``). ``attention`` is ``"flash"`` (PyTorch SDPA) or ``"global"`` (explicit softmax,
    as GPT-NeoX's global attention). ``init`` is ``"small_wang"`` (small_init + wang_init, every Pythia
    size but 6.9b/12b) or ``"normal_scaled"`` (normal 0.02 + scaled_normal, 6.9b and 12b).

    ``rotary_angles`` says how the rotary cos/sin tables are computed when the network runs in fp16 or
    bf16: ``"fp32"`` (default; angles and cos/sin in float32, then rounded, as Hugging Face does) or
    ``"neox"`` (GPT-NeoX v1.0 under DeepSpeed: ``inv_freq`` and the positions are in the half type, so
    the angles are rounded to it before cos/sin). Both are identical in float32.

    ``arithmetic`` says where the linear layers' biases are added and which GELU code runs:
    ``"neox"`` (GPT-NeoX v1.0 as Pythia trained: ``attention.dense``, ``dense_h_to_4h`` and
    ``dense_4h_to_h`` are GEMMs without bias, rounded to the compute dtype, then ``+ bias`` in the
    compute dtype; the ``dense_h_to_4h`` bias inside NeoX's tanh ``bias_gelu`` with its hand-written
    backward; QKV keeps its bias in the GEMM) or ``"hf"`` (every bias inside the GEMM and
    ``F.gelu``, as transformers runs the network). ``None`` (default) means ``"neox"`` with the tanh
    GELU and ``"hf"`` with erf, so the training config (``gelu="tanh"``) gets NeoX's arithmetic and a
    Hugging Face config (``hidden_act: gelu``) gets transformers'. ``"neox"`` needs ``gelu="tanh"``.
    Use ``arithmetic_kind`` for the resolved value.
    """

    n_layers: int
    hidden: int
    heads: int
    vocab: int
    seq_len: int = SEQ_LENGTH
    rotary_pct: float = 0.25
    rotary_base: float = 10000
    norm_eps: float = 1e-5
    gelu: str = "tanh"
    attention: str = "flash"
    init: str = "small_wang"
    rotary_angles: str = "fp32"
    arithmetic: str | None = None

    def __post_init__(self) -> None:
        for key in ("n_layers", "hidden", "heads", "vocab", "seq_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise RetraceError(f"model config: {key} must be a positive integer, got {value!r}")
        for key in ("rotary_pct", "rotary_base", "norm_eps"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise RetraceError(f"model config: {key} must be a number, got {value!r}")
        if self.hidden % self.heads:
            raise RetraceError(
                f"model config: hidden ({self.hidden}) must be divisible by heads ({self.heads})"
            )
        if not 0 <= self.rotary_pct <= 1:
            raise RetraceError(f"model config: rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if self.rotary_dims % 2:
            raise RetraceError(
                f"model config: rotary dims int(head_dim·rotary_pct) = int({self.head_dim}·{self.rotary_pct}) "
                f"= {self.rotary_dims} must be even"
            )
        if self.rotary_base <= 0:
            raise RetraceError(f"model config: rotary_base must be positive, got {self.rotary_base}")
        if self.norm_eps <= 0:
            raise RetraceError(f"model config: norm_eps must be positive, got {self.norm_eps}")
        for key, allowed in (
            ("gelu", GELU_KINDS),
            ("attention", ATTENTION_KINDS),
            ("init", INIT_KINDS),
            ("rotary_angles", ROTARY_ANGLE_KINDS),
        ):
            if getattr(self, key) not in allowed:
                raise RetraceError(
                    f"model config: {key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}"
                )
        if self.arithmetic is not None and self.arithmetic not in ARITHMETIC_KINDS:
            raise RetraceError(
                f"model config: arithmetic must be one of {', '.join(ARITHMETIC_KINDS)} or None; "
                f"got {self.arithmetic!r}"
            )
        if self.arithmetic == "neox" and self.gelu != "tanh":
            raise RetraceError("model config: arithmetic 'neox' runs NeoX's tanh bias_gelu; it needs gelu='tanh'")

    @property
    def arithmetic_kind(self) -> str:
        """The resolved ``arithmetic``: "neox" or "hf" (see the class docstring)."""
        if self.arithmetic is not None:
            return self.arithmetic
        return "neox" if self.gelu == "tanh" else "hf"

    # -- derived shapes ------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def rotary_dims(self) -> int:
        """Rotated dims per head: ``int(head_dim · rotary_pct)`` as GPT-NeoX and transformers compute it."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def intermediate(self) -> int:
        return 4 * self.hidden

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical parameter names (HF ``GPTNeoXForCausalLM`` keys) and shapes, in module order."""
        h, v, f = self.hidden, self.vocab, self.intermediate
        shapes: dict[str, tuple[int, ...]] = {"gpt_neox.embed_in.weight": (v, h)}
        for i in range(self.n_layers):
            p = f"gpt_neox.layers.{i}."
            shapes.update(
                {
                    p + "input_layernorm.weight": (h,),
                    p + "input_layernorm.bias": (h,),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "post_attention_layernorm.bias": (h,),
                    p + "attention.query_key_value.weight": (3 * h, h),
                    p + "attention.query_key_value.bias": (3 * h,),
                    p + "attention.dense.weight": (h, h),
                    p + "attention.dense.bias": (h,),
                    p + "mlp.dense_h_to_4h.weight": (f, h),
                    p + "mlp.dense_h_to_4h.bias": (f,),
                    p + "mlp.dense_4h_to_h.weight": (h, f),
                    p + "mlp.dense_4h_to_h.bias": (h,),
                }
            )
        shapes["gpt_neox.final_layer_norm.weight"] = (h,)
        shapes["gpt_neox.final_layer_norm.bias"] = (h,)
        shapes["embed_out.weight"] = (v, h)
        return shapes

    @functools.cached_property
    def n_params(self) -> int:
        """All parameters (computed once per config: a 5,000-cell study's placements ask for it per cell)."""
        return sum(math.prod(shape) for shape in self.param_shapes().values())

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# -- the Pythia suite ---------------------------------------------------------------------------------
# name: (layers, hidden, heads, padded vocab, init). Vocab is padded to a multiple of 128·mp:
# 50304 (mp 1), 50432 (mp 2, 6.9b), 50688 (mp 4, 12b). 6.9b/12b used v1.0's default init (erratum).
_PYTHIA_TABLE: dict[str, tuple[int, int, int, int, str]] = {
    "14m": (6, 128, 4, 50304, "small_wang"),
    "31m": (6, 256, 8, 50304, "small_wang"),
    "70m": (6, 512, 8, 50304, "small_wang"),
    "160m": (12, 768, 12, 50304, "small_wang"),
    "410m": (24, 1024, 16, 50304, "small_wang"),
    "1b": (16, 2048, 8, 50304, "small_wang"),
    "1.4b": (24, 2048, 16, 50304, "small_wang"),
    "2.8b": (32, 2560, 32, 50304, "small_wang"),
    "6.9b": (32, 4096, 32, 50432, "normal_scaled"),
    "12b": (36, 5120, 40, 50688, "normal_scaled"),
}

#: Every Pythia size, by short name ("70m", "1.4b", ...), as trained (tanh GELU, flash attention).
PYTHIA_SIZES: Mapping[str, ModelConfig] = MappingProxyType(
    {
        name: ModelConfig(n_layers=L, hidden=h, heads=a, vocab=v, init=init)
        for name, (L, h, a, v, init) in _PYTHIA_TABLE.items()
    }
)

_NAME_RE = re.compile(r"^(?:pythia-)?(?P<size>\d+(?:\.\d+)?[mb])(?P<rest>(?:-[a-z0-9.]+)*)$")
_SUFFIX_RE = re.compile(r"^(deduped|v0|v1|seed\d+)$")


def pythia_size(name: str) -> str:
    """The registry key for a Pythia name: "70m", "pythia-70m", "EleutherAI/pythia-1.4b-deduped-v0"..."""
    raw = name
    name = name.strip().lower()
    name = name.split("/")[-1]
    if name.startswith("neox-ckpt-"):
        name = name[len("neox-ckpt-") :]
    m = _NAME_RE.fullmatch(name)
    if m and all(_SUFFIX_RE.fullmatch(s) for s in m["rest"].split("-")[1:]) and m["size"] in _PYTHIA_TABLE:
        return m["size"]
    raise RetraceError(f"unknown Pythia size {raw!r}; known sizes: {', '.join(_PYTHIA_TABLE)}")


def pythia_config(name: str, **overrides: Any) -> ModelConfig:
    """The ``ModelConfig`` of a Pythia size ("70m", "pythia-410m-deduped", ...), fields optionally overridden."""
    cfg = PYTHIA_SIZES[pythia_size(name)]
    return cfg.replace(**overrides) if overrides else cfg


def _registry_init(n_layers: int, hidden: int, heads: int, vocab: int) -> str:
    for cfg in PYTHIA_SIZES.values():
        if (cfg.n_layers, cfg.hidden, cfg.heads, cfg.vocab) == (n_layers, hidden, heads, vocab):
            return cfg.init
    return "small_wang"


# -- Hugging Face config.json ---------------------------------------------------------------------------
_HF_GELU = {
    "gelu": "erf",
    "gelu_pytorch_tanh": "tanh",
    "gelu_new": "tanh",
    "gelu_fast": "tanh",
    "gelu_python_tanh": "tanh",
}


def config_from_hf(
    config: Mapping[str, Any] | str | os.PathLike,
    *,
    gelu: str | None = None,
    attention: str = "flash",
    init: str | None = None,
    rotary_angles: str = "fp32",
    arithmetic: str | None = None,
) -> ModelConfig:
    """A ``ModelConfig`` from a Hugging Face ``GPTNeoXForCausalLM`` ``config.json`` (a dict or a path).

    ``hidden_act: "gelu"`` means exact erf GELU, which is what transformers runs; Pythia was *trained*
    with the tanh approximation, so pass ``gelu="tanh"`` to train (which also selects GPT-NeoX's bias
    arithmetic, ``arithmetic`` None → "neox"; see ModelConfig). ``init`` defaults to the registry's
    for a Pythia shape, else ``small_wang`` (HF configs do not record it). Both the old keys
    (``rotary_pct``, ``rotary_emb_base``) and ``rope_parameters`` (transformers 5) are read.
    """
    source = "config"
    if not isinstance(config, Mapping):
        source = os.fspath(config)
        try:
            with open(source, encoding="utf-8") as fh:
                config = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise RetraceError(f"{source}: cannot read a HF config.json: {exc}") from exc
        if not isinstance(config, Mapping):
            raise RetraceError(f"{source}: not a JSON object")

    def need(key: str) -> Any:
        if key not in config:
            raise RetraceError(f"{source}: missing key {key!r}")
        return config[key]

    model_type = config.get("model_type", "gpt_neox")
    if model_type != "gpt_neox":
        raise RetraceError(f"{source}: model_type is {model_type!r}, expected 'gpt_neox'")
    if config.get("use_parallel_residual", True) is not True:
        raise RetraceError(f"{source}: use_parallel_residual must be true (Pythia's GPT-J residual)")
    if config.get("tie_word_embeddings", False) is not False:
        raise RetraceError(f"{source}: tie_word_embeddings must be false (Pythia's head is untied)")
    if config.get("attention_bias", True) is not True:
        raise RetraceError(f"{source}: attention_bias must be true")
    for key in ("attention_dropout", "hidden_dropout"):
        if config.get(key, 0) not in (0, 0.0, None):
            raise RetraceError(
                f"{source}: {key} must be 0 (Pythia trains without dropout), got {config[key]!r}"
            )

    hidden = need("hidden_size")
    if "intermediate_size" in config and config["intermediate_size"] != 4 * hidden:
        raise RetraceError(
            f"{source}: intermediate_size {config['intermediate_size']} is not 4·hidden_size = {4 * hidden}"
        )

    rope = config.get("rope_parameters") or {}
    if config.get("rope_scaling"):
        raise RetraceError(f"{source}: rope_scaling {config['rope_scaling']!r} is not supported")
    if rope.get("rope_type", "default") != "default":
        raise RetraceError(f"{source}: rope_type {rope['rope_type']!r} is not supported (only 'default')")
    rotary_pct = rope.get(
        "partial_rotary_factor", config.get("rotary_pct", config.get("partial_rotary_factor", 0.25))
    )
    rotary_base = rope.get("rope_theta", config.get("rotary_emb_base", config.get("rope_theta", 10000)))

    act = config.get("hidden_act", "gelu")
    if act not in _HF_GELU:
        raise RetraceError(
            f"{source}: hidden_act {act!r} is not a GELU this model supports ({', '.join(_HF_GELU)})"
        )
    if isinstance(rotary_base, float) and rotary_base.is_integer():
        rotary_base = int(rotary_base)

    n_layers, heads, vocab = need("num_hidden_layers"), need("num_attention_heads"), need("vocab_size")
    try:
        return ModelConfig(
            n_layers=n_layers,
            hidden=hidden,
            heads=heads,
            vocab=vocab,
            seq_len=config.get("max_position_embeddings", SEQ_LENGTH),
            rotary_pct=rotary_pct,
            rotary_base=rotary_base,
            norm_eps=config.get("layer_norm_eps", 1e-5),
            gelu=gelu if gelu is not None else _HF_GELU[act],
            attention=attention,
            init=init if init is not None else _registry_init(n_layers, hidden, heads, vocab),
            rotary_angles=rotary_angles,
            arithmetic=arithmetic,
        )
    except RetraceError as exc:
        raise RetraceError(f"{source}: {exc}") from exc


def config_to_hf(
    cfg: ModelConfig, *, dtype: str | None = None, hidden_act: str | None = None
) -> dict[str, Any]:
    """A ``config.json`` dict that transformers (4.x and 5.x) loads as ``GPTNeoXForCausalLM``.

    ``hidden_act`` follows ``cfg.gelu`` ("gelu" for erf, "gelu_pytorch_tanh" for tanh) unless given:
    pass ``hidden_act="gelu"`` to write what the published Pythia configs say. ``dtype`` (e.g.
    "float16") is written as both ``torch_dtype`` (4.x) and ``dtype`` (5.x).
    """
    base: Any = cfg.rotary_base
    out: dict[str, Any] = {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": cfg.vocab,
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.intermediate,
        "hidden_act": hidden_act or ("gelu" if cfg.gelu == "erf" else "gelu_pytorch_tanh"),
        "rotary_pct": cfg.rotary_pct,
        "rotary_emb_base": base,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": base,
            "partial_rotary_factor": cfg.rotary_pct,
        },
        "max_position_embeddings": cfg.seq_len,
        "initializer_range": INIT_METHOD_STD,
        "layer_norm_eps": cfg.norm_eps,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "use_parallel_residual": True,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
    }
    if dtype is not None:
        out["torch_dtype"] = dtype
        out["dtype"] = dtype
    return out
