"""After a GPT-NeoX run: native checkpoints → the canonical per-step files retrace compares, and the log.

``convert_run`` turns the ``global_step{N}`` directories a GPT-NeoX v1.0 run saved into exactly what
``retrace train`` writes: ``OUT/checkpoints/step{N}.safetensors`` (canonical Hugging Face names,
parameters only, fp16 as v1.0's ``tools/convert_to_hf.py`` casts them) and, last,
``OUT/checkpoints/manifest.json`` (steps, files with sha256, final_step, start_step, reference, dtype,
final_loss, written; plus ``producer``, ``sources`` and ``checks``). Tensor-parallel shards are merged
by ``retrace.checkpoints.NeoXReader`` (v1.0's converter rules). The start step, which GPT-NeoX does not
save again when it resumes at start > 0, is converted from the loaded checkpoint.

Check made here: with start 0, step 1 must equal step 0 (the first update has LR 0 in v1.0). If not,
the likely cause is DeeperSpeed keeping the fp32 master weights of its own initialisation after a
weights-only load (see ``retrace.neox.config``); the manifest records ``checks.step1_equals_step0``.

``parse_neox_log`` reads v1.0's per-iteration log lines (``training_log``, with ``log_interval`` 1)
into ``train_log.parquet`` rows with ``retrace train``'s columns. GPT-NeoX logs the learning rate and
loss scale *after* the update (those of the next update), so row k takes them from line k-1; the
first row's are known only for start 0 (LR 0, scale 2^initial_scale_power). grad_norm is not logged by
v1.0 (NaN); lr_iter/adam_steps are -1 when the start is not 0 (unknown skipped updates before it).

Tested on tiny hand-built NeoX directories and log text; not run on a real GPT-NeoX run.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from retrace.checkpoints.base import ParamReader
from retrace.errors import RetraceError
from retrace.io import write_json, write_parquet
from retrace.rundir import RunDir, timestamp

LOG_COLUMNS = ("step", "loss", "lr", "loss_scale", "grad_norm", "skipped", "tokens_per_s", "step_time_s",
               "lr_iter", "adam_steps")
_LOG_DTYPES = {"step": "int64", "loss": "float64", "lr": "float64", "loss_scale": "float64",
               "grad_norm": "float64", "skipped": "bool", "tokens_per_s": "float64", "step_time_s": "float64",
               "lr_iter": "int64", "adam_steps": "int64"}


class CastReader(ParamReader):
    """Another reader's parameters cast to ``dtype`` on the fly (v1.0's converter ends with ``.half()``)."""

    def __init__(self, reader: ParamReader, dtype: torch.dtype):
        self.reader, self.cast_to, self.source = reader, dtype, reader.source

    def names(self) -> list[str]:
        return self.reader.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.cast_to

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(name).to(self.cast_to)

    def location(self, name: str) -> str:
        return self.reader.location(name)

    def close(self) -> None:
        self.reader.close()


def step_dir(root: str | Path, step: int) -> Path | None:
    """``root/global_step{step}`` (or ``root`` itself if it is that directory) when it holds model files."""
    from retrace.checkpoints.neox import _has_neox_files

    root = Path(root)
    if root.name == f"global_step{step}" and _has_neox_files(root):
        return root
    d = root / f"global_step{step}"
    return d if d.is_dir() and _has_neox_files(d) else None


def available_steps(root: str | Path) -> list[int]:
    from retrace.checkpoints.neox import _step_dirs

    return [int(p.name[len("global_step"):]) for p in _step_dirs(Path(root))]


def convert_run(
    save_dir: str | Path,
    out: str | Path,
    *,
    start_step: int,
    steps: int,
    save_steps: Iterable[int] | None = None,
    load_dir: str | Path | None = None,
    reference: str = "",
    final_loss: float | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Convert ``save_dir/global_step{N}`` for every step of the run into ``out/checkpoints``; returns the manifest.

    ``save_steps`` defaults to the Pythia schedule from ``start_step`` to ``steps`` (what ``retrace
    train`` saves). The start step may come from ``load_dir`` instead. Every missing step is named in
    one ``RetraceError`` before anything is written.
    """
    from retrace.checkpoints import NeoXReader, save_params
    from retrace.io import sha256_file
    from retrace.pythia.schedule import save_steps as schedule

    wanted = sorted(set(save_steps) if save_steps is not None else schedule(start_step, steps))
    sources: dict[int, Path] = {}
    missing = []
    for s in wanted:
        d = step_dir(save_dir, s)
        if d is None and s == start_step and load_dir is not None:
            d = step_dir(load_dir, s)
        if d is None:
            missing.append(s)
        else:
            sources[s] = d
    if missing:
        have = available_steps(save_dir)
        raise RetraceError(
            f"{save_dir}: no GPT-NeoX checkpoint for step(s) {', '.join(map(str, missing))} "
            f"(found: {', '.join(map(str, have)) or 'none'}"
            + (f"; start step looked up in {load_dir} too" if load_dir is not None else "") + ")"
        )
    run = RunDir(out)
    files = []
    for s in wanted:
        path = run.checkpoint(s)
        with NeoXReader(sources[s]) as reader:
            save_params(CastReader(reader, dtype), path, metadata={
                "step": str(s), "reference": reference, "producer": "gpt-neox v1.0 via retrace.neox",
                "source": str(sources[s])})
        files.append({"step": s, "file": path.name, "sha256": sha256_file(path)})
    checks: dict[str, object] = {}
    if start_step == 0 and 0 in sources and 1 in sources:
        same = same_params(run.checkpoint(0), run.checkpoint(1))
        checks["step1_equals_step0"] = same
        if not same:
            print("retrace neox: WARNING step 1 differs from step 0 although v1.0's first update has LR 0; "
                  "DeeperSpeed may have kept the fp32 master weights of its own initialisation "
                  "(weights-only load under ZeRO-1)", file=sys.stderr)
    manifest = run.manifest
    write_json(manifest, {
        "steps": wanted, "files": files, "final_step": steps, "start_step": start_step, "reference": reference,
        "dtype": str(dtype).removeprefix("torch."), "final_loss": final_loss,
        "written": timestamp(), "producer": "gpt-neox",
        "sources": {str(s): str(d) for s, d in sources.items()}, "checks": checks,
    })
    return manifest


def same_params(a: str | Path, b: str | Path) -> bool:
    """Bitwise equality of two canonical safetensors files, tensor by tensor."""
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


# -- the training log ------------------------------------------------------------------------------------
_ITER_RE = re.compile(r"iteration\s+(\d+)\s*/\s*(\d+)\s*\|")
_FIELDS = {
    "samples_per_s": re.compile(r"samples/sec:\s*([0-9.eE+-]+)"),
    "ms": re.compile(r"elapsed time per iteration \(ms\):\s*([0-9.eE+-]+)"),
    "lr": re.compile(r"learning rate:\s*([0-9.eE+-]+)"),
    "loss": re.compile(r"lm_loss:\s*([0-9.eE+-]+|nan|inf)"),
    "scale": re.compile(r"loss scale:\s*([0-9.eE+-]+)"),
    "skipped": re.compile(r"number of skipped iterations:\s*(\d+)"),
}


def parse_neox_log(text: str, *, start_step: int, seq_length: int = 2048,
                   initial_scale_power: int = 12, precision: str = "fp16") -> list[dict]:
    """Rows (``LOG_COLUMNS``) from v1.0 log lines ``… iteration N/ 143000 | … lm_loss: … |`` (log_interval 1)."""
    lines: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        m = _ITER_RE.search(line)
        if not m or "lm_loss" not in line:
            continue
        got: dict[str, float] = {}
        for key, rx in _FIELDS.items():
            f = rx.search(line)
            if f:
                got[key] = float(f.group(1))
        lines[int(m.group(1))] = got  # a restarted run logs an iteration again: the last one counts
    rows = []
    cum_skipped = 0
    contiguous = start_step == 0  # every line from iteration 1 seen so far: the counters are known
    last = start_step
    for step in sorted(s for s in lines if s > start_step):
        contiguous = contiguous and step == last + 1
        last = step
        got, prev = lines[step], lines.get(step - 1)
        skipped = bool(got.get("skipped", 0))
        cum_skipped += int(skipped)
        if prev is not None:
            lr, scale = prev.get("lr", math.nan), prev.get("scale", math.nan)
        elif step == start_step + 1 and start_step == 0:
            lr, scale = 0.0, float(2**initial_scale_power) if precision == "fp16" else math.nan
        else:
            lr, scale = math.nan, math.nan
        ms = got.get("ms", math.nan)
        sps = got.get("samples_per_s", math.nan)
        known = contiguous
        rows.append({
            "step": step, "loss": math.nan if skipped else got.get("loss", math.nan), "lr": lr,
            "loss_scale": scale, "grad_norm": math.nan, "skipped": skipped, "tokens_per_s": sps * seq_length,
            "step_time_s": ms / 1000.0, "lr_iter": step - cum_skipped if known else -1,
            "adam_steps": step - cum_skipped if known else -1,
        })
    return rows


def write_train_log(rows: list[dict], path: str | Path) -> Path:
    """``rows`` as ``train_log.parquet`` with ``retrace train``'s columns and types, atomically."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(LOG_COLUMNS)).astype(_LOG_DTYPES)
    write_parquet(path, frame)
    return Path(path)
