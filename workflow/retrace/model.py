"""The GPT-NeoX network as Pythia was trained (GPT-NeoX v1.0), its initialisation and its loss.

One block: ``x ← x + (Attn(LN₁(x)) + MLP(LN₂(x)))`` (GPT-J parallel residual, two LayerNorms, eps 1e-5).
Attention: one fused QKV linear ``[3h, h]`` laid out per head as ``[head, (q, k, v), d_head]``, rotary
on the first ``rotary_dims`` of each q/k head (half-split ``rotate_half`` layout, base 10000), scale
1/√d_head, causal, and an output ``dense`` with bias. MLP ``h → 4h → h`` with biases and GELU (tanh
approximation as trained, or exact erf as Hugging Face runs it). Final LayerNorm, untied bias-free
head ``embed_out``, padded vocabulary, no dropout, no positional embedding.

Parameter names are exactly Hugging Face ``GPTNeoXForCausalLM``'s (``gpt_neox.layers.0.attention.
query_key_value.weight``, ``embed_out.weight``, ...) and the module has no buffers at all, so
``model.state_dict()`` *is* the canonical parameter dict that checkpoints are read and written as.

Attention backends (``ModelConfig.attention``, or ``set_attention``):

``flash``
    ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``; on CUDA restricted to the
    FlashAttention and memory-efficient kernels (Pythia's v1.0 runs used FlashAttention 0.2.2).
``global``
    GPT-NeoX v1.0's ``global`` attention written out: ``scores = baddbmm(q, kᵀ, alpha=1/√d)`` in the
    compute dtype (one rounding, like NeoX's ``baddbmm``), causal mask, softmax, ``probs @ v`` in the
    compute dtype. NeoX ran the softmax through its fused ``scaled_upper_triang_masked_softmax``
    kernel, which reads fp16, computes in fp32 and writes fp16 probabilities; PyTorch's fp16/bf16
    softmax does the same (fp32 accumulation, output in the input dtype), so that is what is used,
    with no fp32 copy of the score matrix.

Rotary tables: by default (``rotary_angles="fp32"``) angles and cos/sin are computed in float32 and
rounded to the compute dtype, as Hugging Face does. ``rotary_angles="neox"`` reproduces GPT-NeoX v1.0
under DeepSpeed, where ``module.half()`` also cast the ``inv_freq`` buffer: positions, ``inv_freq`` and
their products are in the half type (an fp16 angle near position 2000 is rounded to a whole radian),
cos/sin of those rounded angles. In float32 both are identical. The tables are cached per
(length, device, dtype) in a plain dict, never as buffers.

Bias arithmetic (``ModelConfig.arithmetic_kind``, reference/pythia-neox.md §7 item 6): ``"neox"`` is what
``retrace train`` builds (tanh GELU): ``attention.dense``, ``dense_h_to_4h`` and ``dense_4h_to_h`` run
their GEMM without bias (rounded to the compute dtype) and add the bias afterwards in the compute dtype,
the ``dense_h_to_4h`` bias going into NeoX's ``bias_gelu`` with its hand-written backward; QKV keeps its
bias in the GEMM. ``"hf"`` (erf GELU, Hugging Face configs) puts every bias in the GEMM and runs
``F.gelu``, as transformers does. Parameter names are the same in both.

Not reproduced (inferred from the source, GPU only): the original ``bias_gelu``/``bias_gelu_back`` are
``@torch.jit.script`` functions run by the legacy TorchScript fuser (activations.py sets
``_jit_override_can_fuse_on_gpu(True)``), which as far as can be read computes the whole elementwise
chain in float32 and rounds to fp16 once; here (PyTorch eager, on every device) each operation rounds to
the compute dtype, as NeoX's unfused path would. Pythia ran ``bias_dropout_add`` unfused
(``bias_dropout_fusion`` defaults to false), so the bias additions round per operation there too.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from retrace.errors import RetraceError
from retrace.pythia.sizes import (  # noqa: F401 - re-exported: retrace.model is the public home of these
    ATTENTION_KINDS,
    GELU_KINDS,
    INIT_KINDS,
    INIT_METHOD_STD,
    PYTHIA_SIZES,
    ModelConfig,
    config_from_hf,
    config_to_hf,
    pythia_config,
    pythia_size,
)

__all__ = [
    "GPTNeoX",
    "ModelConfig",
    "PYTHIA_SIZES",
    "config_from_hf",
    "config_to_hf",
    "init_plan",
    "init_weights",
    "lm_loss",
    "pythia_config",
    "pythia_size",
]


# -- rotary ---------------------------------------------------------------------------------------------
class RotaryTables:
    """cos/sin tables ``[T, rotary_dims]`` for one config, computed lazily and cached (not buffers)."""

    def __init__(self, cfg: ModelConfig):
        self.dims = cfg.rotary_dims
        self.base = cfg.rotary_base
        self.mode = cfg.rotary_angles
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def inv_freq(self) -> torch.Tensor:
        """``1 / base^(2i/r)`` in float32, written as GPT-NeoX v1.0 and transformers write it."""
        return 1.0 / (self.base ** (torch.arange(0, self.dims, 2, dtype=torch.int64).float() / self.dims))

    def get(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (length, device, dtype)
        tables = self._cache.get(key)
        if tables is None:
            # Plain (non-inference) tensors even under inference_mode, so a later training forward
            # can save them for backward.
            with torch.inference_mode(False), torch.no_grad():
                tables = self._compute(length, device, dtype)
            self._cache[key] = tables
        return tables

    def _compute(
        self, length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq().to(device)
        if self.mode == "neox" and dtype in (torch.float16, torch.bfloat16):
            # DeepSpeed cast the inv_freq buffer to the half type; positions are cast with type_as.
            inv_freq = inv_freq.to(dtype)
            positions = torch.arange(length, device=device).to(dtype)
            angles = positions[:, None] * inv_freq[None, :]  # rounded to the half type
            angles = torch.cat((angles, angles), dim=-1).float()
        else:
            positions = torch.arange(length, device=device).float()
            angles = positions[:, None] * inv_freq[None, :]
            angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x₁, x₂) → (−x₂, x₁) over the two halves of the last dim (GPT-NeoX's half-split layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# -- layers ---------------------------------------------------------------------------------------------
def _gpu_sdpa_context():
    """Only the FlashAttention and memory-efficient SDPA kernels (never the O(T²)-memory math one)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # torch >= 2.3
    except ImportError:  # pragma: no cover - older torch
        return torch.backends.cuda.sdp_kernel(enable_flash=True, enable_mem_efficient=True, enable_math=False)
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    if q.is_cuda:
        with _gpu_sdpa_context():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """GPT-NeoX v1.0 ``global`` attention: baddbmm with alpha, causal masked softmax, bmm (see module doc)."""
    B, H, T, D = q.shape
    q3 = q.reshape(B * H, T, D)
    k3 = k.reshape(B * H, T, D)
    scores = torch.baddbmm(
        torch.empty(B * H, T, T, dtype=q.dtype, device=q.device),
        q3,
        k3.transpose(1, 2),
        beta=0.0,
        alpha=scale,
    )
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
    scores = scores.masked_fill_(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # fp32 accumulation, output in the compute dtype
    return torch.bmm(probs, v.reshape(B * H, T, D)).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.heads, self.head_dim, self.rotary_dims = cfg.heads, cfg.head_dim, cfg.rotary_dims
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.backend = cfg.attention
        self.neox = cfg.arithmetic_kind == "neox"
        self.query_key_value = nn.Linear(cfg.hidden, 3 * cfg.hidden, device=device, dtype=dtype)
        self.dense = nn.Linear(cfg.hidden, cfg.hidden, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, D, r = self.heads, self.head_dim, self.rotary_dims
        # [B, T, H·3·D] → [3, B, H, T, D] (a view): per head, (q, k, v) blocks of d_head rows.
        # split (not slicing) everywhere: its backward is one cat, not a zero-fill per slice.
        qkv = self.query_key_value(x).view(B, T, H, 3, D).permute(3, 0, 2, 1, 4)
        qk, v = qkv.split((2, 1))
        if r:  # q and k rotated together; the cat leaves them contiguous [B, H, T, D]
            rot, keep = qk.split((r, D - r), dim=-1)
            rot = rot * cos + rotate_half(rot) * sin  # cos/sin [T, r] broadcast
            qk = torch.cat((rot, keep), dim=-1)
        q, k = qk.unbind(0)
        v = v.squeeze(0)
        if self.backend == "flash":
            y = _flash_attention(q, k, v, self.scale)
        else:
            y = _global_attention(q, k, v, self.scale)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return linear_then_bias(y, self.dense) if self.neox else self.dense(y)


# -- GPT-NeoX v1.0's bias arithmetic (ModelConfig.arithmetic == "neox") -----------------------------
# megatron/model/activations.py ~62-96 (gpt-neox 71df4d50): the constants and the order of operations are
# NeoX's; every op rounds to the tensor's dtype (PyTorch eager; see the module docstring for the fused
# TorchScript kernels the original ran on GPU).
def neox_bias_gelu(bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """NeoX ``bias_gelu``: ``x = bias + y; x·0.5·(1 + tanh(0.79788456·x·(1 + 0.044715·x·x)))``."""
    x = bias + y
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def neox_bias_gelu_back(g: torch.Tensor, bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """NeoX ``bias_gelu_back``: the hand-written derivative of ``bias_gelu`` times ``g``
    (0.1070322243 = √(2/π)·3·0.044715)."""
    x = bias + y
    tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    ff = 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)
    return ff * g


class NeoXBiasGeLU(torch.autograd.Function):
    """NeoX ``GeLUFunction`` (activations.py ~85-96): saves the GEMM output and the bias, and returns
    ``bias_gelu_back`` for both; autograd sums the bias's copy over the broadcast (token) dims."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(y, bias)
        return neox_bias_gelu(bias, y)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: D102
        y, bias = ctx.saved_tensors
        tmp = neox_bias_gelu_back(grad_output, bias, y)
        return tmp, tmp


def linear_then_bias(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``skip_bias_add=True`` (megatron/mpu/layers.py ~458-466, ~589-601): the GEMM without bias, rounded
    to the compute dtype, then ``+ bias`` in the compute dtype (fused_bias_dropout.py ~31-33, dropout 0)."""
    return F.linear(x, layer.weight) + layer.bias


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.approximate = "tanh" if cfg.gelu == "tanh" else "none"
        self.neox = cfg.arithmetic_kind == "neox"
        self.dense_h_to_4h = nn.Linear(cfg.hidden, cfg.intermediate, device=device, dtype=dtype)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate, cfg.hidden, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.neox:  # transformer.py ~116-134 with bias_gelu_fusion: h→4h GEMM, bias_gelu, 4h→h GEMM + bias
            h = NeoXBiasGeLU.apply(F.linear(x, self.dense_h_to_4h.weight), self.dense_h_to_4h.bias)
            return linear_then_bias(h, self.dense_4h_to_h)
        # tanh: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (PyTorch's tanh GELU); erf: x·Φ(x).
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.attention = Attention(cfg, device=device, dtype=dtype)
        self.mlp = MLP(cfg, device=device, dtype=dtype)

    #: GPT-NeoX's registration order (transformer.py ParallelTransformerLayer: attention before
    #: post_attention_layernorm). The optimizer groups walk the layer in this order, which fixes the
    #: order of the clip-norm sums; the state dict keeps Hugging Face's order.
    neox_module_order = ("input_layernorm", "attention", "post_attention_layernorm", "mlp")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), cos, sin)
        mlp = self.mlp(self.post_attention_layernorm(x))
        # NeoX v1.0 order (transformer.py ~655-702): residual + (attn_out + mlp_out), biases already added
        return x + (attn + mlp)


class GPTNeoXModel(nn.Module):
    """The trunk, ``gpt_neox.*``: embedding, layers, final LayerNorm."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        # nn.Embedding's own init (normal_) on the meta device imports torch._dynamo (1.4 s of CPU in every
        # rank process): the weight is made here, and initialised as nn.Embedding would where it has memory
        weight = torch.empty(cfg.vocab, cfg.hidden, device=device, dtype=dtype)
        self.embed_in = nn.Embedding(cfg.vocab, cfg.hidden, _weight=weight)
        if weight.device.type != "meta":
            nn.init.normal_(self.embed_in.weight)
        self.layers = nn.ModuleList(Layer(cfg, device=device, dtype=dtype) for _ in range(cfg.n_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, device=device, dtype=dtype)


class GPTNeoX(nn.Module):
    """A Pythia network: ``model(input_ids [B, T]) -> logits [B, T, vocab]``.

    ``checkpoint_activations=True`` recomputes each layer in backward (as Pythia ≥70m trained with
    ``checkpoint-num-layers 1``); it only acts in training mode with gradients enabled.
    ``device="meta"`` builds without memory (then ``empty_on`` and load or ``init_weights``).
    Weights after construction are PyTorch's defaults, not Pythia's: call ``init_weights`` or load.
    """

    def __init__(self, cfg: ModelConfig, *, checkpoint_activations: bool = False, device=None, dtype=None):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise RetraceError(f"GPTNeoX needs a ModelConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.checkpoint_activations = checkpoint_activations
        self.gpt_neox = GPTNeoXModel(cfg, device=device, dtype=dtype)
        self.embed_out = nn.Linear(cfg.hidden, cfg.vocab, bias=False, device=device, dtype=dtype)
        self.rotary = RotaryTables(cfg)

    @property
    def attention(self) -> str:
        return (
            self.gpt_neox.layers[0].attention.backend if len(self.gpt_neox.layers) else self.config.attention
        )

    def set_attention(self, kind: str) -> GPTNeoX:
        """Switch every layer to ``flash`` or ``global`` attention (the weights are the same)."""
        self.config = self.config.replace(attention=kind)  # validates
        for layer in self.gpt_neox.layers:
            layer.attention.backend = kind
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise RetraceError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if T > self.config.seq_len:
            raise RetraceError(f"sequence length {T} exceeds the model's seq_len {self.config.seq_len}")
        x = self.gpt_neox.embed_in(input_ids)
        cos, sin = self.rotary.get(T, x.device, self._compute_dtype(x))  # [T, rotary_dims]
        ckpt = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        for layer in self.gpt_neox.layers:
            x = checkpoint(layer, x, cos, sin, use_reentrant=False) if ckpt else layer(x, cos, sin)
        return self.embed_out(self.gpt_neox.final_layer_norm(x))

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        """The dtype q/k will have: the autocast dtype when autocast is on, else the weights'."""
        device = x.device.type
        try:
            if torch.is_autocast_enabled(device):  # torch >= 2.4
                return torch.get_autocast_dtype(device)
        except TypeError:  # pragma: no cover - older torch
            if device == "cuda" and torch.is_autocast_enabled():
                return torch.get_autocast_gpu_dtype()
            if device == "cpu" and torch.is_autocast_cpu_enabled():
                return torch.get_autocast_cpu_dtype()
        return x.dtype


# -- loss -----------------------------------------------------------------------------------------------
def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in float32 (GPT-NeoX with ``fp16_lm_cross_entropy`` false, loss mask all ones).

    ``labels`` are already shifted (``labels[b, t]`` is the target for position t), as in GPT-NeoX.
    """
    if logits.shape[:-1] != labels.shape:
        raise RetraceError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).long())


# -- initialisation -------------------------------------------------------------------------------------
def init_plan(cfg: ModelConfig) -> dict[str, tuple[str, float]]:
    """How GPT-NeoX v1.0 initialises each parameter: name → ("normal", σ) | ("ones", 1) | ("zeros", 0).

    small_wang: small_init σ=√(2/(5d)) for embed_in, query_key_value, dense_h_to_4h and embed_out
    (``init_method``); wang_init σ=2/(L√d) for attention.dense and dense_4h_to_h
    (``output_layer_init_method``). normal_scaled (6.9b/12b): normal σ=0.02 and scaled_normal
    σ=0.02/√(2L) in the same places. Biases 0, LayerNorm weight 1 and bias 0.
    """
    d, L = cfg.hidden, cfg.n_layers
    if cfg.init == "small_wang":
        std_in, std_out = math.sqrt(2 / (5 * d)), 2 / L / math.sqrt(d)
    else:
        std_in, std_out = INIT_METHOD_STD, INIT_METHOD_STD / math.sqrt(2.0 * L)
    plan: dict[str, tuple[str, float]] = {}
    for name in cfg.param_shapes():
        if name.endswith(".bias"):
            plan[name] = ("zeros", 0.0)
        elif "layernorm" in name or "layer_norm" in name:
            plan[name] = ("ones", 1.0)
        elif name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
            plan[name] = ("normal", std_out)
        else:  # embed_in, query_key_value, dense_h_to_4h, embed_out
            plan[name] = ("normal", std_in)
    return plan


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"retrace-init:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def empty_on(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model.to_empty(device=device)`` for a model built on the meta device: each parameter and buffer
    becomes an uninitialised tensor of its shape and dtype on ``device``. ``to_empty`` makes them with
    ``empty_like`` of a meta tensor, a Python reference op whose first call imports torch._dynamo (1.4 s of
    CPU in every rank process); ``torch.empty`` of a shape does not."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                        requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    return model


@torch.no_grad()
def init_weights(model: GPTNeoX, seed: int) -> GPTNeoX:
    """Initialise ``model`` in place as GPT-NeoX v1.0 does (``init_plan``), deterministically.

    Each tensor is drawn in float32 on the CPU from a ``torch.Generator`` seeded from (seed, name), so
    the result is the same on every device and dtype, and independent of the other tensors' shapes.
    (GPT-NeoX drew on the GPU per rank; its exact random streams are not reproduced, only the laws.)
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise RetraceError(f"init seed must be a non-negative integer, got {seed!r}")
    plan = init_plan(model.config)
    params = dict(model.named_parameters())
    if set(params) != set(plan):
        raise RetraceError("model parameters do not match its config's parameter names")
    generator = torch.Generator(device="cpu")
    for name, (kind, value) in plan.items():
        p = params[name]
        if kind == "normal":
            generator.manual_seed(_tensor_seed(seed, name))
            p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, value, generator=generator))
        else:
            p.fill_(value)
    return model
