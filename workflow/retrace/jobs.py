"""The workflow's small local jobs (its ``run:`` blocks), as functions of the study: each writes its
output atomically and a line to its log, so a rule stays one call.

    write_cells_table          results/cells.parquet, one row per cell
    write_reference_steps      the record that a run's published checkpoints are fetched
    prepare_pile_variant       download (or check a copy of) one Pile variant; its record last
    cross_generation_entries   the study's ``cross_generation`` with default steps filled in
    write_cross_generation     ``retrace cross-compare`` per entry, concatenated into one table
    audit_repos, audit_cache, audit_options   what the audit target reads, and from where

Torch-free: the workflow imports it while building the DAG.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrace.errors import RetraceError
from retrace.io import write_json, write_parquet

if TYPE_CHECKING:
    from retrace.grid import Model, Study

#: The package directory of this checkout: what subprocesses put first on PYTHONPATH.
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def write_cells_table(study: Study, path: str, log_path: str) -> None:
    frame = study.cells_frame()
    write_parquet(path, frame)
    Path(log_path).write_text(f"{len(frame)} cells of study {study.name} -> {path}\n")


def write_reference_steps(files: list[str], path: str, log_path: str) -> None:
    """One record per (repo, first, last): the fetched checkpoints a compare job reads, with their sizes.
    A compare job depends on it instead of on each of its (up to 154) checkpoints: the same ordering and
    rerun triggers, with 150× fewer edges in the DAG."""
    write_json(path, {"files": {f: Path(f).stat().st_size for f in files}})
    Path(log_path).write_text(f"{len(files)} checkpoints -> {path}\n")


def pile_needs(study: Study, variant_name: str) -> dict[str, Any]:
    """What the study's cells read of a Pile variant: for a preshuffled stream the item range [first_item,
    max_items) (fetch only the shards covering it), for raw data the whole corpus (max_items None: the
    index maps need every document). A param of the pile_data rule, so a study that trains further
    fetches the missing shards."""
    variant = study.data[variant_name]
    cells = [c for c in study.cells() if c.data.name == variant_name]
    seq = {c.model.recipe_values().seq_length for c in cells} or {None}
    if len(seq) > 1:
        raise RetraceError(f"data.{variant_name}: its cells train on sequence lengths {sorted(seq)}; a Pile "
                           "variant has one item length")
    from retrace.rebuilt import preshuffled_items_needed

    checked = preshuffled_items_needed(study, variant_name) if variant.format == "preshuffled" else None
    if variant.format == "raw" or not (cells or checked):
        return {"max_items": None, "first_item": 0, "seq_length": seq.pop()}
    if not cells:  # read only by an order check (retrace.rebuilt): its first items
        return {"max_items": checked, "first_item": 0, "seq_length": seq.pop()}
    return {"max_items": max([c.steps * c.model.global_batch for c in cells] + [checked or 0]),
            "first_item": 0 if checked else min(c.model.start_step * c.model.global_batch for c in cells),
            "seq_length": seq.pop()}


def prepare_pile_variant(study: Study, variant_name: str, dest: str, record: str, log_path: str) -> None:
    """Fetch (only what the cells read) and verify, or check a copy of, one Pile variant; its record last."""
    from retrace.data.variants import plan_variant_fetch, prepare_variant
    from retrace.pythia.constants import SEQ_LENGTH

    variant = study.data[variant_name]
    needs = pile_needs(study, variant_name)
    seq_length = needs["seq_length"] or SEQ_LENGTH
    with open(log_path, "w") as fh:
        say = lambda msg: print(msg, file=fh, flush=True)  # noqa: E731
        plan = None
        if variant.path is None:
            plan = plan_variant_fetch(variant.corpus, variant.format, max_items=needs["max_items"],
                                      first_item=needs["first_item"], seq_length=seq_length,
                                      shuffle_samples=variant.shuffle_samples)
            say(plan.describe())
        prefix = prepare_variant(variant.corpus, variant.format, dest, path=variant.path,
                                 max_items=needs["max_items"], first_item=needs["first_item"], seq_length=seq_length,
                                 shuffle_samples=variant.shuffle_samples, log=say)
        say(f"{variant_name}: {prefix}")
    write_json(record, {"variant": variant_name, "prefix": str(prefix), "needs": needs,
                        "plan": plan.as_dict() if plan is not None else None})


def cross_generation_entries(study: Study) -> list[dict[str, Any]]:
    """The ``cross_generation`` entries with their steps filled in (default: the study's compared steps)."""
    default = sorted({s for cell in study.cells() for s in cell.checkpoint_steps()})
    return [
        {"model": e["model"], "against": list(e["against"]), "steps": sorted(set(e.get("steps") or default))}
        for e in study.config.get("cross_generation") or []
    ]


def cross_generation_models(study: Study, entry: dict[str, Any]) -> list[Model]:
    """The study's models whose reference is one of the entry's repos (for their hub caches)."""
    repos = {entry["model"], *entry["against"]}
    return [m for m in study.models.values() if m.reference in repos]


def write_cross_generation(study: Study, path: str, log_path: str) -> None:
    """``retrace cross-compare`` for every entry (offline from a local reference's hub cache), concatenated
    into ``path``; a subprocess per entry, so its hub settings never touch this process."""
    import pandas as pd

    frames = []
    with open(log_path, "w") as log, \
            tempfile.TemporaryDirectory(prefix=".cross_generation.", dir=Path(path).parent) as tmp:
        for i, entry in enumerate(cross_generation_entries(study)):
            caches = sorted({m.hub_cache for m in cross_generation_models(study, entry) if m.is_local})
            if len(caches) > 1:
                raise RetraceError(f"cross_generation[{i}]: repos in several local hub caches ({', '.join(caches)})")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_DIR), os.environ.get("PYTHONPATH", "")])}
            if caches:
                env.update(HF_HUB_CACHE=caches[0], HF_HUB_OFFLINE="1")
            part = Path(tmp) / f"{i}.parquet"
            argv = [sys.executable, "-m", "retrace", "cross-compare", entry["model"], "--against", *entry["against"],
                    "--steps", ",".join(map(str, entry["steps"])), "--out", str(part)]
            print(f"$ {shlex.join(argv)}", file=log, flush=True)
            done = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
            if done.returncode != 0:
                raise RetraceError(f"cross_generation[{i}]: retrace cross-compare failed (status "
                                   f"{done.returncode}); see {log_path}")
            frames.append(pd.read_parquet(part))
    write_parquet(path, pd.concat(frames, ignore_index=True))


# -- the audit target: which repos, from the Hub or one local hub cache ---------------------------------
def audit_repos(study: Study) -> list[str]:
    """The references the cells train and compare against, then ``audit.repos``, each once."""
    return list(dict.fromkeys([m.reference for m in study.used_models()] + list(study.audit["repos"])))


def audit_cache(study: Study) -> str | None:
    """The hub cache an all-local study is audited from (offline), or None when every reference is on the Hub.

    Raises:
        RetraceError: the study mixes Hub and local references, or several local caches
            (``retrace audit`` reads one source).
    """
    used = study.used_models()
    local = sorted({m.hub_cache for m in used if m.is_local})
    remote = [m.name for m in used if not m.is_local]
    if not local:
        return None
    if remote or len(local) > 1:
        raise RetraceError(
            f"audit: study {study.name} mixes references from the Hub ({', '.join(remote) or 'none'}) and "
            f"local hub caches ({', '.join(local)}); `retrace audit` reads one source, so audit them "
            "separately (retrace audit REPO… [--offline --cache-dir DIR])"
        )
    return local[0]


def audit_options(study: Study) -> list[str]:
    """--offline --cache-dir and the last published step for local references; --weights if asked."""
    from retrace.grid import local_reference_steps

    flags = []
    cache = audit_cache(study)
    if cache is not None:
        last = 0
        for m in study.used_models():
            steps = m.build.saved_steps() if m.build is not None else local_reference_steps(m.hub_cache, m.reference)
            last = max([last, *steps])
        flags += ["--offline", "--cache-dir", cache, "--max-step", str(last)]
    if study.audit["weights"]:
        flags.append("--weights")
    return flags


# -- the reference hygiene gate (retrace.audit.gate): findings once per repo, then per model ------------
def write_reference_findings(study: Study, repo: str, path: str, log_path: str) -> None:
    """Audit one reference repo from metadata (its hub cache offline for a local reference, else the Hub)."""
    from retrace.audit.core import make_source
    from retrace.audit.gate import findings_for, write_findings
    from retrace.audit.metadata import CacheMetadata
    from retrace.grid import local_reference_steps

    model = next(m for m in study.used_models() if m.reference_key == repo)
    if model.is_local:
        source = CacheMetadata(model.hub_cache)
        steps = model.build.saved_steps() if model.build is not None else local_reference_steps(
            model.hub_cache, model.reference)
        max_step = max(steps, default=0)
    else:
        source, max_step = make_source(), None
    found = findings_for(model.reference, source, max_step=max_step)
    write_findings(path, found)
    flagged = ", ".join(f"{b} ({'+'.join(f['kind'] for f in fs)})" for b, fs in found["flagged"].items())
    Path(log_path).write_text(f"{repo}: {len(found['branches'])} branches from {found['source']}; "
                              f"flagged: {flagged or 'none'} -> {path}\n")


def accepted_branches(study: Study, model: Model) -> list[str]:
    """Flagged branches the study uses anyway: ``models.<name>.accept``."""
    return list(model.accept)


def check_start_gate(study: Study, model_name: str, findings_path: str, path: str, log_path: str) -> None:
    """Fail (one message: repo, branch, finding, the key that overrides it) if the model's start step
    is flagged; else record that it passed."""
    from retrace.audit.gate import check_start, read_findings

    model = study.used_model(model_name)  # a models key, or a segment <key>-from<N>
    findings = read_findings(findings_path)
    try:
        check_start(findings, model.start_step, accept=accepted_branches(study, model),
                    override=f"models.{model.segment_of or model.name}.accept")
    except RetraceError as exc:
        Path(log_path).write_text(f"{exc}\n")
        print(f"retrace: start_gate: {exc}", file=sys.stderr)  # shown beside Snakemake's "Error in rule"
        raise
    write_json(path, {"repo": model.reference, "start_step": model.start_step, "accept": list(model.accept),
                      "findings": findings_path})
    Path(log_path).write_text(f"{model.reference}@step{model.start_step}: not flagged -> {path}\n")


def write_provenance_tables(study: Study, divergence_path: str, flagged_path: str, log_path: str) -> None:
    """results/tables/divergence.parquet and flagged_steps.parquet (retrace.report.provenance)."""
    from retrace.report.provenance import divergence_frame, flagged_frame

    div = divergence_frame(study)
    flagged = flagged_frame(study)
    write_parquet(flagged_path, flagged)
    write_parquet(divergence_path, div)
    Path(log_path).write_text(f"{len(div)} cells' first divergent steps -> {divergence_path}; "
                              f"{len(flagged)} flagged published steps -> {flagged_path}\n")
