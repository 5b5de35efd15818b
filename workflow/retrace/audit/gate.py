"""The reference hygiene gate: a published step the audit flags is never trained from nor compared with.

The audit (``retrace.audit.core``) is run once per repo, from metadata alone (the Hub's, or the local hub
cache's: one listing of refs and one file list per distinct commit, no weights), and its verdict per
branch is written to one findings file (``findings_for``/``write_findings``) that every cell of that
repo reads. Then:

* ``check_start``: a cell whose start step is flagged fails before training with one message naming
  the repo, the branch, the finding and the study key that overrides it (``models.<name>.accept``);
* ``flagged_steps``: the steps a comparison leaves out (the report lists them).

What flags a branch: an incident that says its weights are not what its name says (``BLOCKING``):
a clone of the final model (pythia-2.8b: step0 is one of the branches serving late weights), a clone
of another step (pythia #83/#198: step0 = step2), a shard that is another revision's (pythia-12b
step50000), a twin of another repo, safetensors and .bin that disagree, weights that do not move or
move backwards (audit with weights), no weights at all. For ``identical`` and ``all-identical``
groups every member is flagged, the group's reference too: which of two equal steps is the right one
the bytes cannot say. Expected duplicates are notes, not incidents, and flag nothing: ``step1`` =
``step0`` (the first update has LR 0 — the healthy control) and ``main`` = the final step.
Missing branches, formats that change and branches off the schedule do not flag: a missing step cannot
be fetched anyway, and the other two do not say the weights are wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from retrace.errors import RetraceError
from retrace.io import write_json
from retrace.pythia.schedule import revision_of, step_of

#: Incident kinds that flag the revisions they list.
BLOCKING = (
    "formats-disagree",
    "clone-of-final",
    "all-identical",
    "identical",
    "cross-repo",
    "shard-clone",
    "not-moving",
    "backwards",
    "no-weights",
    "main-not-final",
)
#: Kinds whose group reference is flagged with its members (equal steps: either may be the wrong one).
_REFERENCE_TOO = ("identical", "all-identical")
FORMAT = "retrace-findings/1"


def findings_from_report(report, repo: str) -> dict[str, Any]:
    """One repo's findings from an ``AuditReport``: flagged branch → its findings, and the notes."""
    flagged: dict[str, list[dict[str, str]]] = {}
    for inc in report.incidents_of(repo=repo):
        if inc.kind not in BLOCKING:
            continue
        revisions = list(inc.revisions)
        if inc.kind in _REFERENCE_TOO and inc.reference and inc.reference not in revisions:
            revisions.append(inc.reference)
        for rev in revisions:
            flagged.setdefault(rev, []).append(
                {"kind": inc.kind, "detail": inc.detail, "reference": inc.reference or ""}
            )
    notes = [{"kind": n.kind, "revisions": list(n.revisions), "reference": n.reference or ""}
             for n in report.notes if n.repo == repo]
    branches = sorted({r["revision"] for r in report.rows if r["repo"] == repo and r["status"] != "missing"})
    return {"format": FORMAT, "repo": repo, "source": report.source, "branches": branches,
            "flagged": dict(sorted(flagged.items())), "notes": notes}


def findings_for(repo: str, source, *, max_step: int | None = None) -> dict[str, Any]:
    """Audit ``repo`` from ``source`` (a ``MetadataSource``) by metadata alone; its findings."""
    from retrace.audit.core import audit
    from retrace.pythia.schedule import FINAL_STEP

    report = audit([repo], source, max_step=FINAL_STEP if max_step is None else max_step, workers=4)
    return findings_from_report(report, repo)


def write_findings(path: str | Path, findings: Mapping[str, Any]) -> None:
    write_json(path, dict(findings))


def read_findings(path: str | Path) -> dict[str, Any]:
    import json

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise RetraceError(f"{path}: not a findings file ({FORMAT})")
    return data


def flagged_steps(findings: Mapping[str, Any], accept: Iterable[str] = ()) -> dict[int, list[dict[str, str]]]:
    """Step → its findings, for every flagged step branch not in ``accept`` (branch names)."""
    accepted = set(accept)
    out = {}
    for rev, found in findings["flagged"].items():
        step = step_of(rev)
        if step is not None and rev not in accepted:
            out[step] = found
    return dict(sorted(out.items()))


def describe(found: list[dict[str, str]]) -> str:
    """``kind (detail)``, for each finding of one branch."""
    return "; ".join(f"{f['kind']} ({f['detail']})" if f.get("detail") else f["kind"] for f in found)


def refusal(repo: str, branch: str, found: list[dict[str, str]], override: str) -> str:
    """The one message a refused start gives."""
    return (f"refusing to start from {repo}@{branch}: the audit flags it: {describe(found)}. Its weights "
            f"are not what the branch name says; start from another step, or set {override}: [{branch}] "
            "in the study to use it anyway")


def check_start(findings: Mapping[str, Any], step: int, *, accept: Iterable[str] = (),
                override: str = "models.<name>.accept") -> None:
    """Raise ``RetraceError`` (``refusal``) if the start ``step`` is flagged and not accepted."""
    flagged = flagged_steps(findings, accept)
    if step in flagged:
        raise RetraceError(refusal(findings["repo"], revision_of(step), flagged[step], override))
