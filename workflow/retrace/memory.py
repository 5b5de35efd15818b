"""Per-GPU memory of one training cell, from the model's numbers (no torch: planning and the grid use it).

``cell_memory(...)`` adds up, for one data-parallel rank of the builtin engine:

* model states — weights and gradients in the compute dtype (2 + 2 B/param in fp16/bf16; 4 + 4 in
  fp32), the fp32 master (4 B/param; none in fp32, where the weights are the master) and Adam's two
  fp32 moments (8 B/param); master and moments divided by dp under ZeRO-1 (plus the padding to a
  multiple of dp per weight-decay group);
* the optimizer step's float32 workspace (retrace.train.optim: two Adam chunks of the largest shard, or
  one norm piece if larger) — the step allocates nothing else of note;
* activations of one micro-batch, per layer, from Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models" (arXiv:2205.05198), eq. 2 without tensor/sequence
  parallelism: ``s·b·h·(34 + 5·a·s/h)`` bytes in 16-bit (doubled in fp32). The ``5·a·s/h`` term is the
  attention score/softmax/dropout storage, which FlashAttention does not keep (``flash_attention``);
  the 34 keeps the paper's two dropout masks although Pythia's dropout is 0 (a small margin). The
  backward adds one layer's working set — the gradients of the layer it is in, about the size of its
  activations — so without recomputation ``(L + 1)·A`` with ``A`` the per-layer figure. With full
  activation checkpointing (GPT-NeoX ``checkpoint-num-layers 1``, the paper's "full recomputation") each
  layer keeps only its input, ``2·s·b·h`` bytes, and the backward re-creates one layer at a time and
  holds its gradients: ``2·s·b·h·L + 2·A``;
* the head and loss: ``12·s·b·V`` bytes — retrace's loss runs the cross-entropy in fp32 over the
  padded vocabulary, so the float32 log-softmax is kept (4·sbV) and the backward holds its incoming and
  outgoing float32 gradients (4 + 4·sbV) at its peak (GPT-NeoX's vocab-parallel cross-entropy likewise
  keeps an fp32 softmax);
* ``context_bytes`` (CUDA context, cuBLAS/cuDNN workspaces; 1 GiB by default) and a fragmentation
  allowance (``fragmentation`` × everything else; 10 % by default).

An estimate, not a measurement: allocator behaviour and kernel workspaces vary with the stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from retrace.errors import RetraceError
from retrace.pythia.sizes import ModelConfig

#: Elements per chunk of the builtin engine's Adam update (retrace.train.optim uses this value).
ADAM_CHUNK_ELEMS = 1 << 22
#: Elements per piece of a gradient tensor's norm (retrace.train.optim uses this value).
NORM_PIECE_ELEMS = 1 << 22
GIB = 1 << 30

_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU of one training cell, by kind; ``total`` is their sum."""

    weights: int
    gradients: int
    master: int
    moments: int
    workspace: int
    activations: int
    logits: int
    context: int
    fragmentation: int

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.master + self.moments

    @property
    def total(self) -> int:
        return (self.model_states + self.workspace + self.activations + self.logits + self.context
                + self.fragmentation)

    def fits(self, gpu_bytes: int) -> bool:
        return self.total <= gpu_bytes

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "model_states": self.model_states, "total": self.total}


def activation_bytes_per_layer(*, seq_len: int, pdbs: int, hidden: int, heads: int, precision: str = "fp16",
                               flash_attention: bool = True) -> int:
    """One layer's stored activations without recomputation: ``s·b·h·(34 + 5·a·s/h)`` (16-bit; the
    attention term dropped with FlashAttention), doubled in fp32."""
    s, b, h, a = seq_len, pdbs, hidden, heads
    per = 34 * s * b * h + (0 if flash_attention else 5 * a * s * s * b)
    return per * _BYTES[precision] // 2


def _group_sizes(model: ModelConfig) -> list[int]:
    """Elements of the two weight-decay groups (decay: matrices and embeddings; no decay: biases, norms)."""
    decay = no_decay = 0
    for name, shape in model.param_shapes().items():
        n = 1
        for d in shape:
            n *= d
        if name.endswith(".bias") or "layernorm" in name or "layer_norm" in name:
            no_decay += n
        else:
            decay += n
    return [decay, no_decay]


def cell_memory(*, model: ModelConfig, pdbs: int, seq_len: int, dp: int, precision: str = "fp16",
                zero1: bool = True, checkpoint_activations: bool = True, flash_attention: bool = True,
                chunk_elems: int = ADAM_CHUNK_ELEMS, context_bytes: int = GIB,
                fragmentation: float = 0.10) -> MemoryBreakdown:
    """Estimated per-GPU memory of one training cell of the builtin engine (see the module docstring).

    Args:
        model: the network's shape (padded vocabulary included).
        pdbs: micro-batch size per GPU.
        seq_len: tokens per sample.
        dp: data-parallel ranks (ZeRO-1 divides the master and moments by it).
        precision: "fp16", "bf16" or "fp32".
        zero1: partition the optimizer state (else every rank holds all of it).
        checkpoint_activations: full activation checkpointing, one layer per checkpoint.
        flash_attention: no stored attention scores.
        chunk_elems: the engine's Adam chunk.
        context_bytes: CUDA context and library workspaces.
        fragmentation: allowance, as a fraction of everything else.

    Returns:
        A ``MemoryBreakdown`` (bytes); ``.total`` and ``.fits(gpu_bytes)``.

    Raises:
        RetraceError: on an unknown precision or a non-positive size.
    """
    if precision not in _BYTES:
        raise RetraceError(f"precision must be one of {', '.join(_BYTES)}, got {precision!r}")
    for key, value in (("pdbs", pdbs), ("seq_len", seq_len), ("dp", dp), ("chunk_elems", chunk_elems)):
        if not isinstance(value, int) or value < 1:
            raise RetraceError(f"cell_memory: {key} must be a positive integer, got {value!r}")
    width = _BYTES[precision]
    shards = dp if zero1 else 1
    groups = _group_sizes(model)
    shard = [-(-n // shards) for n in groups]
    n_params = sum(groups)
    state_elems = sum(shard)
    weights = gradients = width * n_params
    master = 0 if precision == "fp32" else 4 * state_elems
    moments = 8 * state_elems
    largest_tensor = max(_numel(shape) for shape in model.param_shapes().values())
    workspace = 4 * max(2 * min(chunk_elems, max(shard)), min(NORM_PIECE_ELEMS, largest_tensor))
    layer = activation_bytes_per_layer(seq_len=seq_len, pdbs=pdbs, hidden=model.hidden, heads=model.heads,
                                       precision=precision, flash_attention=flash_attention)
    if checkpoint_activations:
        activations = width * seq_len * pdbs * model.hidden * model.n_layers + 2 * layer
    else:
        activations = layer * (model.n_layers + 1)
    logits = 12 * seq_len * pdbs * model.vocab
    base = weights + gradients + master + moments + workspace + activations + logits + context_bytes
    return MemoryBreakdown(weights=weights, gradients=gradients, master=master, moments=moments,
                           workspace=workspace, activations=activations, logits=logits, context=context_bytes,
                           fragmentation=int(fragmentation * base))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
