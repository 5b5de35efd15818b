"""GPT-NeoX (v1.0, DeeperSpeed) native checkpoints as canonical parameters, tensor-parallel shards merged.

A checkpoint is a directory ``global_step{N}/`` (or a directory whose ``latest`` file names one) in one
of two layouts (reference/pythia-neox.md §5):

* pipeline (pp ≥ 1): ``layer_{idx:02d}-model_{mp:02d}-model_states.pt``, one file per layer-spec index
  and tensor-parallel rank: idx 0 embedding (``word_embeddings.weight``), 2..L+1 transformer layer
  idx-2, L+3 final norm (``norm.*``), L+4 head (``final_linear.weight``); 1 and L+2 are functions
  with no file;
* sequential (pp = 0, 14m/31m): ``mp_rank_{mp:02d}_model_states.pt``, whose ``["module"]`` holds
  ``sequential.{idx}.{key}`` with the same indices.

L and the tensor-parallel degree are read from the files. Shards merge as GPT-NeoX v1.0's
``tools/convert_to_hf.py`` does, in the stored dtype and in rank order: embedding, QKV, dense_h_to_4h
and head concatenated on dim 0; attention.dense and dense_4h_to_h weights on dim 1; their biases
summed (``sum([...])``); LayerNorms averaged (``sum([...]) / n``); rotary ``inv_freq`` skipped. The
converter then casts to fp16, which changes nothing for Pythia's fp16 checkpoints.

Every file is read with ``torch.load(weights_only=True)`` (see ``torchload``).

ZeRO-1 optimizer state (``zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt``), as DeeperSpeed
``eb7f5cff`` writes it (``engine._save_zero_checkpoint`` and ``zero/stage1.py``)::

    {"optimizer_state_dict": {
         "loss_scaler": DynamicLossScaler (here an OpaqueObject: cur_scale, cur_iter, last_overflow_iter,
                        scale_factor, scale_window, min_scale, delayed_shift, cur_hysteresis,
                        consecutive_hysteresis, raise_error_at_min_scale),
         "dynamic_loss_scale": bool, "overflow": bool,
         "base_optimizer_state": ...,                 # see below
         "local_sub_partitions_of_fp32_groups": [[fp32 tensor per comm interval] per param group],
         # elastic_checkpoint (DeeperSpeed's default, True) adds:
         "zero_stage": 1, "partition_count": int, "num_comm_intervals_per_group": [int per group]},
     "param_shapes": OrderedDict name → torch.Size}    # present in this DeeperSpeed version

With elastic checkpoints ``base_optimizer_state`` is ``[[{"step", "exp_avg", "exp_avg_sq"} per
sub-partition] per group]`` with the DP-alignment padding removed; without, it is the wrapped
optimizer's own ``state_dict()``. Each rank holds the flat fp32 master weights and Adam moments of its
sub-partitions of each (flattened) param group. Recovering per-parameter tensors needs the parameter
order of each group (GPT-NeoX's weight-decay groups over the pipeline module) and the partition
boundaries; ``load_zero_optimizer_state`` returns the raw dicts and does **not** do that
reassembly (not verified against a published checkpoint).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from retrace.checkpoints.base import IndexedReader
from retrace.checkpoints.names import (
    CAT0,
    CAT1,
    MEAN,
    SUM,
    canonical_order,
    merged_shape,
    neox_expected_indices,
    neox_layers_from_indices,
    neox_rule,
)
from retrace.checkpoints.torchload import safe_torch_load, safe_torch_load_mapped
from retrace.errors import RetraceError

LAYER_FILE_RE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
MP_FILE_RE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
ZERO_FILE_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
STEP_DIR_RE = re.compile(r"global_step(\d+)")
_SEQ_KEY_RE = re.compile(r"sequential\.(\d+)\.(.+)")


def _has_neox_files(path: Path) -> bool:
    try:
        return any(LAYER_FILE_RE.fullmatch(p.name) or MP_FILE_RE.fullmatch(p.name) for p in path.iterdir())
    except OSError:
        return False


def _step_dirs(path: Path) -> list[Path]:
    try:
        return sorted(
            (p for p in path.iterdir() if STEP_DIR_RE.fullmatch(p.name) and _has_neox_files(p)),
            key=lambda p: int(STEP_DIR_RE.fullmatch(p.name).group(1)),
        )
    except OSError:
        return []


def is_neox_dir(path: str | os.PathLike) -> bool:
    """True for a directory with GPT-NeoX model files, a save directory with a ``latest`` file, or a
    directory holding ``global_stepN`` checkpoint directories."""
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or _has_neox_files(path) or bool(_step_dirs(path)))


def resolve_neox_dir(path: str | os.PathLike) -> Path:
    """The ``global_stepN`` directory: ``path`` itself, the one its ``latest`` file names, or its only one."""
    path = Path(path)
    if not path.is_dir():
        raise RetraceError(f"{path}: not a directory")
    if _has_neox_files(path):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        if not tag or "/" in tag or tag in (".", ".."):
            raise RetraceError(f"{latest}: does not name a checkpoint directory ({tag!r})")
        step_dir = path / tag
        if not _has_neox_files(step_dir):
            raise RetraceError(f"{latest} names {tag}, but {step_dir} holds no GPT-NeoX model files")
        return step_dir
    steps = _step_dirs(path)
    if len(steps) == 1:
        return steps[0]
    if steps:
        names = [p.name for p in steps]
        raise RetraceError(
            f"{path}: no 'latest' file and {len(steps)} checkpoints; open one of them ({', '.join(names[:5])}"
            + (", …" if len(names) > 5 else "")
            + ")"
        )
    raise RetraceError(
        f"{path}: no GPT-NeoX checkpoint files (layer_XX-model_YY-model_states.pt or mp_rank_XX_model_states.pt)"
    )


def _merge(rule: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    if rule == CAT0:
        return torch.cat(tensors, dim=0)
    if rule == CAT1:
        return torch.cat(tensors, dim=1)
    acc = tensors[0]
    for t in tensors[1:]:  # sum([...]) in rank order, in the stored dtype, as the v1.0 converter
        acc = acc + t
    if rule == SUM:
        return acc
    if rule == MEAN:
        return acc / len(tensors)
    raise ValueError(rule)


class NeoXReader(IndexedReader):
    """A GPT-NeoX native checkpoint, tensor-parallel shards merged on the fly, one tensor at a time."""

    def __init__(self, path: str | os.PathLike):
        self.dir = resolve_neox_dir(path)
        self.source = str(self.dir)
        self._cache: tuple[int, list[Mapping[str, torch.Tensor]]] | None = None
        layer_files: dict[tuple[int, int], Path] = {}
        mp_files: dict[int, Path] = {}
        for p in self.dir.iterdir():
            if m := LAYER_FILE_RE.fullmatch(p.name):
                layer_files[int(m.group(1)), int(m.group(2))] = p
            elif m := MP_FILE_RE.fullmatch(p.name):
                mp_files[int(m.group(1))] = p
        if layer_files:
            self.layout = "pipeline"
            self._files = layer_files
            indices = {idx for idx, _ in layer_files}
            ranks = {idx: sorted(r for i, r in layer_files if i == idx) for idx in indices}
            self.mp = max(max(rs) for rs in ranks.values()) + 1
            for idx, rs in sorted(ranks.items()):
                if rs != list(range(self.mp)):
                    missing = [
                        f"layer_{idx:02d}-model_{r:02d}-model_states.pt"
                        for r in range(self.mp)
                        if r not in rs
                    ]
                    raise RetraceError(
                        f"{self.dir}: missing {', '.join(missing)} (layer-spec index {idx} has tensor-parallel "
                        f"ranks {rs}, other indices have 0..{self.mp - 1})"
                    )
            self._modules: list[dict[str, Any]] | None = None
        else:
            self.layout = "sequential"
            ranks_found = sorted(mp_files)
            self.mp = len(ranks_found)
            if ranks_found != list(range(self.mp)):
                raise RetraceError(
                    f"{self.dir}: mp_rank files for ranks {ranks_found}, expected 0..{self.mp - 1}"
                )
            self._modules = []
            for r in range(self.mp):
                state = safe_torch_load(mp_files[r], mmap=True, training_state=True)
                module = state.get("module") if isinstance(state, Mapping) else None
                if not isinstance(module, Mapping):
                    raise RetraceError(
                        f"{mp_files[r]}: no 'module' state dict (a pipeline checkpoint whose "
                        "layer_XX-model_YY-model_states.pt files are missing?)"
                    )
                self._modules.append(self._split_sequential(module, mp_files[r]))
            self._files = {(idx, r): mp_files[r] for r in range(self.mp) for idx in self._modules[r]}
            indices = set(self._modules[0])
            for r in range(1, self.mp):
                if set(self._modules[r]) != indices:
                    raise RetraceError(
                        f"{mp_files[r]}: holds layer indices {sorted(self._modules[r])}, "
                        f"rank 0 holds {sorted(indices)}"
                    )
        n_layers = neox_layers_from_indices(indices)
        if n_layers is None:
            guess = max(indices) - 4
            missing = sorted(set(neox_expected_indices(max(guess, 1))) - indices)
            extra = sorted(indices - set(neox_expected_indices(max(guess, 1))))
            raise RetraceError(
                f"{self.dir}: layer-spec indices {sorted(indices)} are not a whole GPT-NeoX model "
                f"(0, 2..L+1, L+3, L+4): missing {missing or 'none'}, unexpected {extra or 'none'}"
            )
        self.num_layers = n_layers
        self._scan()

    @staticmethod
    def _split_sequential(module: Mapping[str, Any], path: Path) -> dict[int, dict[str, torch.Tensor]]:
        out: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in module.items():
            m = _SEQ_KEY_RE.fullmatch(key)
            if not m:
                raise RetraceError(f"{path}: module key {key!r} is not sequential.{{idx}}.{{name}}")
            if not isinstance(value, torch.Tensor):
                raise RetraceError(f"{path}: {key} holds {type(value).__name__}, not a tensor")
            out.setdefault(int(m.group(1)), {})[m.group(2)] = value
        return out

    def _rank_states(self, idx: int) -> list[Mapping[str, torch.Tensor]]:
        if self._modules is not None:
            return [self._modules[r][idx] for r in range(self.mp)]
        if self._cache is not None and self._cache[0] == idx:
            return self._cache[1]
        states = []
        for r in range(self.mp):
            path = self._files[idx, r]
            obj, _ = safe_torch_load_mapped(path, mmap=True)
            if not isinstance(obj, Mapping) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
            ):
                raise RetraceError(f"{path}: expected a layer state dict (name → tensor)")
            states.append(obj)
        self._cache = (idx, states)
        return states

    def _scan(self) -> None:
        """Names, merge rules and merged shapes; checks every rank holds the same keys and compatible shapes."""
        self._spec: dict[str, tuple[int, str, str]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for idx in neox_expected_indices(self.num_layers):
            states = self._rank_states(idx)
            keys0 = set(states[0])
            for r, st in enumerate(states[1:], 1):
                if set(st) != keys0:
                    diff = sorted(set(st) ^ keys0)
                    raise RetraceError(
                        f"{self._files[idx, r]}: keys differ from rank 0's ({', '.join(diff[:5])})"
                    )
            for key in states[0]:
                try:
                    rule = neox_rule(idx, key, self.num_layers)
                except KeyError:
                    raise RetraceError(
                        f"{self._files[idx, 0]}: tensor {key!r} at layer-spec index {idx} has no known "
                        "GPT-NeoX → Hugging Face conversion rule"
                    ) from None
                if rule is None:
                    continue
                name, how = rule
                shapes = [tuple(st[key].shape) for st in states]
                dtypes = {st[key].dtype for st in states}
                if len(dtypes) > 1:
                    raise RetraceError(
                        f"{self._files[idx, 0]}: {key} has different dtypes across ranks {dtypes}"
                    )
                self._check_shapes(idx, key, how, shapes)
                self._spec[name] = (idx, key, how)
                self._shapes[name] = merged_shape(how, shapes)
                self._dtypes[name] = dtypes.pop()
        self._names = canonical_order(self._spec)

    def _check_shapes(self, idx: int, key: str, how: str, shapes: list[tuple[int, ...]]) -> None:
        first = shapes[0]
        for r, s in enumerate(shapes[1:], 1):
            if how in (SUM, MEAN):
                ok = s == first
            else:
                dim = 0 if how == CAT0 else 1
                ok = len(s) == len(first) > dim and all(
                    a == b for d, (a, b) in enumerate(zip(s, first, strict=True)) if d != dim
                )
            if not ok:
                raise RetraceError(
                    f"{self._files[idx, r]}: {key} has shape {list(s)} on rank {r} but {list(first)} on rank 0, "
                    f"which cannot be merged ({how})"
                )

    def names(self) -> list[str]:
        return list(self._names)

    def location(self, name: str) -> str:
        if name not in self._spec:
            return self.source
        idx = self._spec[name][0]
        return ", ".join(str(self._files[idx, r]) for r in range(self.mp))

    def get(self, name: str) -> torch.Tensor:
        if name not in self._spec:
            raise KeyError(f"{self.source}: no parameter {name}")
        idx, key, how = self._spec[name]
        tensors = [st[key] for st in self._rank_states(idx)]
        try:
            return _merge(how, tensors)
        except RuntimeError as exc:  # a storage cut short shows up when it is read
            raise RetraceError(f"{self.location(name)}: cannot read {key}: {exc}") from exc

    def close(self) -> None:
        self._cache = None
        self._modules = [] if self._modules is not None else None


# --- training state -------------------------------------------------------------------------------


def model_state_files(path: str | os.PathLike) -> dict[int, Path]:
    """``mp_rank_XX_model_states.pt`` by tensor-parallel rank (DeepSpeed's engine/client state)."""
    step_dir = resolve_neox_dir(path)
    return {int(m.group(1)): p for p in step_dir.iterdir() if (m := MP_FILE_RE.fullmatch(p.name))}


def load_client_state(path: str | os.PathLike, mp: int = 0, *, keep_module: bool = False) -> dict[str, Any]:
    """DeepSpeed's engine state plus GPT-NeoX's client state for one tensor-parallel rank.

    GPT-NeoX v1.0 writes ``iteration``, ``args`` (num_layers, hidden_size, …, padded_vocab_size,
    model_parallel_size), ``random_rng_state``, ``np_rng_state``, ``torch_rng_state``,
    ``cuda_rng_state``, ``rng_tracker_states``; DeeperSpeed adds ``lr_scheduler`` (AnnealingLR's
    start_lr, warmup_iter, num_iters, decay_style, end_iter, min_lr), ``skipped_steps``,
    ``global_steps``, ``global_samples``, ``dp_world_size``, ``mp_world_size``,
    ``csr_tensor_module_names``, and ``optimizer`` (None under ZeRO). ``module`` (the parameters of
    a pp = 0 model; None with pipeline parallelism) is dropped unless ``keep_module``.
    """
    files = model_state_files(path)
    if mp not in files:
        raise RetraceError(f"{resolve_neox_dir(path)}: no mp_rank_{mp:02d}_model_states.pt")
    state = safe_torch_load(files[mp], mmap=True, training_state=True)
    if not isinstance(state, Mapping):
        raise RetraceError(f"{files[mp]}: expected a dict, found {type(state).__name__}")
    return {k: v for k, v in state.items() if keep_module or k != "module"}


def zero_optimizer_files(path: str | os.PathLike) -> dict[tuple[int, int], Path]:
    """``zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt`` keyed by (dp rank, mp rank); {} if none."""
    step_dir = resolve_neox_dir(path)
    return {
        (int(m.group(1)), int(m.group(2))): p for p in step_dir.iterdir() if (m := ZERO_FILE_RE.fullmatch(p.name))
    }


def load_zero_optimizer_state(path: str | os.PathLike, dp: int = 0, mp: int = 0) -> dict[str, Any]:
    """One ZeRO-1 optimizer-state file, raw (layout in this module's docstring).

    ``path`` is the file itself or the checkpoint directory (then ``dp``/``mp`` pick the file).
    Loaded with ``weights_only=True``; DeepSpeed's loss scaler comes back as an ``OpaqueObject``.
    """
    path = Path(path)
    if path.is_dir():
        files = zero_optimizer_files(path)
        if (dp, mp) not in files:
            raise RetraceError(
                f"{resolve_neox_dir(path)}: no zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt "
                f"({len(files)} optimizer-state files present)"
            )
        path = files[dp, mp]
    state = safe_torch_load(path, mmap=True, training_state=True)
    if not isinstance(state, Mapping):
        raise RetraceError(f"{path}: expected a dict, found {type(state).__name__}")
    return dict(state)


# --- config ---------------------------------------------------------------------------------------


def load_neox_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The merged ``configs/*.yml`` saved beside a GPT-NeoX checkpoint (keys with '-' as NeoX writes them)."""
    import yaml

    step_dir = resolve_neox_dir(path)
    cfg_dir = step_dir / "configs"
    files = sorted(cfg_dir.glob("*.yml")) + sorted(cfg_dir.glob("*.yaml")) if cfg_dir.is_dir() else []
    if not files:
        raise RetraceError(f"{step_dir}: no configs/*.yml next to the checkpoint, and no config.json")
    merged: dict[str, Any] = {}
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise RetraceError(f"{f}: not readable YAML: {exc}") from exc
        if not isinstance(data, Mapping):
            raise RetraceError(f"{f}: expected a mapping at the top level")
        merged.update({str(k).replace("_", "-"): v for k, v in data.items()})
    return merged


def hf_config_from_neox(neox: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for a GPT-NeoX yml, as v1.0's ``tools/convert_to_hf.py`` builds it.

    ``vocab_size`` is the padded vocabulary (the embedding's rows; the yml does not hold it).
    """
    cfg = {str(k).replace("_", "-"): v for k, v in neox.items()}

    def need(key: str) -> Any:
        if key not in cfg:
            raise RetraceError(f"GPT-NeoX config: missing {key!r}")
        return cfg[key]

    hidden = need("hidden-size")
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "num_hidden_layers": need("num-layers"),
        "num_attention_heads": need("num-attention-heads"),
        "intermediate_size": 4 * hidden,
        "hidden_act": cfg.get("activation", "gelu"),
        "rotary_pct": cfg.get("rotary-pct", 1.0),
        "rotary_emb_base": cfg.get("rotary-emb-base", 10000),
        "max_position_embeddings": need("max-position-embeddings"),
        "initializer_range": cfg.get("init-method-std", 0.02),
        "layer_norm_eps": cfg.get("layernorm-epsilon", 1e-5),
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": not cfg.get("no-weight-tying", False),
        "use_parallel_residual": cfg.get("gpt-j-residual", False),
        "attention_bias": True,
    }
