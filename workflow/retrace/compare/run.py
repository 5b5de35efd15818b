"""One cell's checkpoints against the published checkpoints at the same steps.

For every checkpoint listed in ``<run>/checkpoints/manifest.json`` (written last by ``retrace train``,
so a run without it is not finished), the reproduction's parameters are compared with the published
ones of the same step by ``retrace.compare.similarity.compare_sources`` (float64, streamed tensor by tensor;
two local safetensors files memory-mapped and summed without torch).
The published step is read from ``<reference_dir>/step{N}.safetensors`` when a reference directory is
given (the workflow fetches each (repo, step) once into resources/references/<repo>/ and every cell
shares it), else opened as ``<reference>@step{N}`` through ``retrace.checkpoints.open_params``.

Outputs: one row per step (``STEP_COLUMNS``) and one row per step and tensor (``step``, ``tensor``, then
the columns of ``SimilarityResult.tensor_frame()``), each written atomically; the per-tensor table
first, so that the per-step table (which marks the cell compared) never exists without it.

``skip``: published steps the audit flags (``retrace.audit.gate.flagged_steps``) are left out: a
distance to weights that are not what their step says measures nothing. The report lists them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd

from retrace.compare import METRICS
from retrace.errors import RetraceError
from retrace.io import write_parquet
from retrace.pythia.schedule import hub_spec
from retrace.rundir import RunDir, checkpoint_name

#: Columns of ``similarity.parquet``.
STEP_COLUMNS = ["step", *METRICS]


def load_manifest(run: str | Path) -> list[tuple[int, Path]]:
    """(step, checkpoint path) for every checkpoint of a finished run, in step order."""
    return [(step, ckpt) for step, ckpt, _ in load_manifest_hashes(run)]


def load_manifest_hashes(run: str | Path) -> list[tuple[int, Path, str | None]]:
    """(step, checkpoint path, its sha256 as the manifest records it, or None) for every checkpoint."""
    path = RunDir(run).manifest
    if not path.is_file():
        raise RetraceError(f"{path}: not found (the run has not finished training)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = [(int(e["step"]), path.parent / str(e["file"]), e.get("sha256")) for e in manifest["files"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RetraceError(f"{path}: not a checkpoint manifest (expected files: [{{step, file}}]): {exc}") from exc
    if not entries:
        raise RetraceError(f"{path}: lists no checkpoint")
    missing = [str(p) for _, p, _ in entries if not p.is_file()]
    if missing:
        raise RetraceError(f"{path}: listed checkpoint(s) missing: {', '.join(missing[:3])}")
    return sorted(entries)


def reference_source(reference: str, reference_dir: str | Path | None, step: int) -> str:
    """Where the published step lives: the shared fetched file, or ``reference@step{N}``."""
    if reference_dir is None:
        return hub_spec(reference, step)
    path = Path(reference_dir) / checkpoint_name(step)
    if not path.is_file():
        raise RetraceError(f"{path}: published step {step} of {reference} not fetched")
    return str(path)


def check_checkpoint(checkpoint: Path, sha256: str | None) -> None:
    """The run's checkpoint still hashes to what its manifest recorded. A manifest entry without a sha256
    (or with a placeholder) is used as it is.

    Raises:
        RetraceError: naming the file.
    """
    from retrace.io import sha256_file

    want = str(sha256 or "").removeprefix("sha256:").lower()
    if re.fullmatch(r"[0-9a-f]{64}", want):  # anything else: no hash recorded
        got = sha256_file(checkpoint)
        if got != want:
            raise RetraceError(f"{checkpoint}: does not hash to the sha256 its manifest recorded "
                               f"({sha256[:19]}…): the checkpoint was changed or damaged after training; "
                               "retrain the cell (delete its checkpoints/manifest.json)")


def compare_checked(checkpoint: Path, sha256: str | None, reference: str, reference_file: str | Path | None):
    """``compare_sources(checkpoint, reference)``, returned only once both files verified: the checkpoint
    against its manifest's sha256 (``check_checkpoint``), a fetched reference against its seal
    (``check_sealed``; an unsealed one is used as it is). The two hashes run on their own threads while
    the comparison runs (hashlib releases the GIL), so a step costs the slowest of the three passes, not
    their sum (sha256 runs at ~1.8 GB/s here, the comparison faster). A damaged file's error, naming it,
    wins over whatever the comparison made of the same bytes: never a distance from a damaged file.

    Raises:
        RetraceError: naming the damaged file, or the comparison's own error.
    """
    from concurrent.futures import ThreadPoolExecutor

    from retrace.checkpoints.seal import check_sealed
    from retrace.compare.similarity import compare_sources

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="retrace-verify") as pool:
        checks = [pool.submit(check_checkpoint, checkpoint, sha256)]
        if reference_file is not None:
            checks.append(pool.submit(check_sealed, reference_file))
        try:
            result, failure = compare_sources(str(checkpoint), reference), None  # two local files: the torch-free path
        except Exception as exc:  # reported after the checks: a damaged file explains it best
            result, failure = None, exc
        for check in checks:
            check.result()  # raises RetraceError naming the file
    if failure is not None:
        raise failure
    return result


def compare_run(
    run: str | Path,
    reference: str,
    reference_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    skip: Mapping[int, str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compare every checkpoint of ``run`` with the published one, but the ``skip`` steps (step → why);
    returns (per-step, per-tensor) frames."""
    entries = load_manifest_hashes(run)
    for step, why in sorted((skip or {}).items()):
        if any(s == step for s, _, _ in entries):
            log(f"compare-run: step {step} left out: the published step is flagged: {why}")
    entries = [(s, p, sha) for s, p, sha in entries if s not in (skip or {})]
    sources = [(step, ckpt, sha, reference_source(reference, reference_dir, step)) for step, ckpt, sha in entries]
    rows, tensor_frames = [], []
    for i, (step, ckpt, sha, ref) in enumerate(sources, 1):
        t0 = time.perf_counter()
        result = compare_checked(ckpt, sha, ref, ref if reference_dir is not None else None)
        rows.append({"step": step, **{m: getattr(result, m) for m in METRICS}})
        tf = result.tensor_frame().rename(columns={"name": "tensor"})
        tf.insert(0, "step", step)
        tensor_frames.append(tf)
        log(
            f"compare-run: step {step} ({i}/{len(sources)}): 1-cos {result.one_minus_cos:.6e} "
            f"L2 {result.l2:.6g} over {result.n_params:,} parameters [{time.perf_counter() - t0:.1f}s]"
        )
    steps = pd.DataFrame(rows, columns=STEP_COLUMNS)
    steps["step"] = steps["step"].astype("int64")
    steps["n_params"] = steps["n_params"].astype("int64")
    tensors = pd.concat(tensor_frames, ignore_index=True) if tensor_frames else pd.DataFrame(
        {"step": pd.Series(dtype="int64"), "tensor": pd.Series(dtype="object")})
    tensors.attrs = {}
    return steps, tensors


def write_compare_run(
    run: str | Path,
    reference: str,
    out: str | Path,
    tensors_out: str | Path,
    reference_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    skip: Mapping[int, str] | None = None,
) -> None:
    steps, tensors = compare_run(run, reference, reference_dir, log, skip=skip)
    write_parquet(tensors_out, tensors)
    write_parquet(out, steps)
    log(f"compare-run: {out} ({len(steps)} steps), {tensors_out} ({len(tensors)} tensor rows)")
