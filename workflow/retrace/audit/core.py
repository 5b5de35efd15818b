"""Audit published checkpoint repos: clones, missing revisions, format changes, and (optionally) weights.

From metadata alone (``retrace.audit.metadata``: per-revision file lists with LFS sha256, no download):

* **clones** — revisions whose weight bytes are identical (same sha256 for every file of one weight
  family) form a group. Within a repo a group is reported as

  - ``clone-of-final``: the group holds ``main`` (or, in a repo without ``main``, its latest step):
    earlier branches serve the final weights (pythia-2.8b, issue #195: 76 branches equal ``main``);
  - ``all-identical``: one weight set on every step branch of the repo, not ``main``'s;
  - ``identical``: any other group; the reference is its latest step.

  Expected duplicates are not incidents: ``main`` = the final step (README), and ``step1`` = ``step0``
  (the first update has LR 0). Groups spanning repos give ``cross-repo`` incidents (e.g. a "standard"
  repo whose every checkpoint is byte-identical to a "deduped" one).
* ``shard-clone``: one weight file (a shard) identical to another revision's while the sets differ
  (pythia-12b #206: step50000 shard 1 is the final model's).
* ``missing`` (against the Pythia schedule, 154 step branches), ``unexpected`` step branches.
* ``format-change``: weight file kinds differ between revisions (single vs sharded .bin, safetensors);
  ``two-formats``: a revision holds both safetensors and .bin weights — "verify" (with ``weights``:
  the two are compared, ``formats-disagree`` when their parameters differ).
* ``main-not-final``: ``main`` and the final step branch hold different bytes.

With ``weights=True`` (downloads/reads the weights): θ Cos between consecutive steps
(``retrace.compare.similarity.compare_params``) flags ``not-moving`` checkpoints (parameters equal to the previous
step's, or 1 − cos ≤ ``still_threshold``, although the files differ) and ``backwards`` ones (closer to
the anchor — the first non-clone checkpoint, normally step0 — than the previous checkpoint was; training
moves weights away from their initialisation). Byte-identical pairs are not loaded (they are clones).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from retrace.audit.metadata import (
    FAMILIES,
    PARAM_FAMILIES,
    CacheMetadata,
    HubMetadata,
    MetadataSource,
    RevisionMeta,
    family_entry,
)
from retrace.errors import RetraceError
from retrace.pythia.schedule import (
    FINAL_STEP,
    MAIN,
    PYTHIA_STEPS,
    format_revisions,
    revision_of,
    revision_order,
    step_of,
)

#: Incident kinds, in the order the summary lists them, with their headings.
INCIDENT_KINDS = {
    "formats-disagree": "safetensors and .bin weights of one revision differ",
    "clone-of-final": "earlier revisions serve the final weights",
    "all-identical": "all checkpoints identical",
    "identical": "revisions with identical weights",
    "cross-repo": "weights identical to another repo's",
    "shard-clone": "weight files (shards) identical to another revision's",
    "main-not-final": "main differs from the final step",
    "missing": "missing revisions",
    "not-moving": "checkpoints that do not move",
    "backwards": "checkpoints that move backwards",
    "two-formats": "two weight formats: verify",
    "format-change": "weight formats differ between revisions",
    "unexpected": "step branches outside the schedule",
    "no-weights": "revisions without weights",
    "weights-unavailable": "weights that could not be read",
}
#: Expected findings (``AuditReport.notes``), with their headings.
NOTE_KINDS = {
    "step1-alias": "step1 = step0 byte for byte (the first update has LR 0)",
    "main-alias": "main = the final step byte for byte",
    "main-alias-latest": "main = the latest step present (the final step is missing)",
    "main-same-params": "main and the final step: different bytes, same parameters",
    "formats-agree": "safetensors and .bin hold the same parameters",
}
#: Row status: the first of these in a revision's issues (else "ok" or "alias").
STATUS_ORDER = (
    "missing",
    "no-weights",
    "formats-disagree",
    "clone",
    "cross-repo",
    "shard-clone",
    "backwards",
    "not-moving",
    "main-not-final",
    "two-formats",
    "format-change",
    "unexpected",
    "weights-unavailable",
    "alias",
)
ROW_COLUMNS = [
    "repo",
    "revision",
    "commit",
    "step",
    "file",
    "kind",
    "size",
    "sha256",
    "clone_of",
    "status",
    "issues",
    "prev_revision",
    "one_minus_cos_prev",
    "l2_prev",
    "l2_anchor",
    "formats_one_minus_cos",
    "formats_max_abs_diff",
]
_WEIGHT_COLUMNS = ROW_COLUMNS[-6:]


@dataclasses.dataclass
class Incident:
    kind: str
    repo: str
    revisions: list[str]
    detail: str
    reference: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Node:
    repo: str
    rev: RevisionMeta
    issues: set[str] = dataclasses.field(default_factory=set)
    clone_of: str | None = None
    file_issues: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # file → (issue, other)
    weights: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return self.repo, self.rev.revision


@dataclasses.dataclass
class AuditReport:
    repos: list[str]
    source: str
    incidents: list[Incident]
    notes: list[Incident]  # expected findings, not incidents (kinds in NOTE_KINDS)
    rows: list[dict[str, Any]]
    weights: bool
    missing: dict[str, list[str]]

    def incidents_of(self, kind: str | None = None, repo: str | None = None) -> list[Incident]:
        return [
            i for i in self.incidents if (kind is None or i.kind == kind) and (repo is None or i.repo == repo)
        ]

    def kinds(self, repo: str) -> set[str]:
        """The incident kinds found in ``repo`` (empty for a clean repo)."""
        return {i.kind for i in self.incidents if i.repo == repo}

    def status(self, repo: str, revision: str) -> str:
        """The status of a revision's rows (the worst, if its files differ)."""
        found = [r["status"] for r in self.rows if r["repo"] == repo and r["revision"] == revision]
        if not found:
            raise KeyError(f"{repo}@{revision}")
        return min(found, key=lambda s: STATUS_ORDER.index(s) if s in STATUS_ORDER else len(STATUS_ORDER))

    def frame(self):
        """One row per repo × revision × weight file (missing revisions: one row, file None)."""
        import pandas as pd

        frame = pd.DataFrame(self.rows, columns=ROW_COLUMNS)
        for col in ("step", "size"):
            frame[col] = frame[col].astype("Int64")
        for col in _WEIGHT_COLUMNS:
            if col != "prev_revision":
                frame[col] = frame[col].astype("float64")
        frame.attrs = {"audit": {"repos": self.repos, "source": self.source, "weights": self.weights}}
        return frame

    def to_dict(self) -> dict[str, Any]:
        return {
            "repos": self.repos,
            "source": self.source,
            "weights": self.weights,
            "incidents": [i.to_dict() for i in self.incidents],
            "notes": [n.to_dict() for n in self.notes],
            "missing": self.missing,
        }

    def render(self) -> str:
        n_revs = len({(r["repo"], r["revision"]) for r in self.rows if r["status"] != "missing"})
        n_files = sum(1 for r in self.rows if r["file"] is not None)
        n_missing = sum(len(v) for v in self.missing.values())
        lines = [
            f"retrace audit: {len(self.repos)} repo(s), {n_revs} revisions present, {n_missing} missing, "
            f"{n_files} weight files",
            f"metadata: {self.source}; weights {'compared' if self.weights else 'not read (metadata only)'}",
            "",
        ]
        if not self.incidents:
            lines.append("no incidents")
        for kind, title in INCIDENT_KINDS.items():
            found = self.incidents_of(kind)
            if not found:
                continue
            lines.append(f"{kind}: {title}")
            for inc in found:
                lines.append(f"  {inc.repo}: {inc.detail}")
            lines.append("")
        clean = [r for r in self.repos if not self.kinds(r)]
        if clean:
            lines.append("clean: " + ", ".join(clean))
        if self.notes:
            lines.append("")
            lines.append("expected (not incidents):")
            for kind, title in NOTE_KINDS.items():
                revs: dict[str, list[str]] = {}
                for n in self.notes:
                    if n.kind == kind:
                        revs.setdefault(n.repo, []).extend(n.revisions)
                if revs:
                    show = kind in ("formats-agree", "main-alias-latest")
                    where = "; ".join(
                        repo + (f" ({format_revisions(r, limit=4)})" if show else "")
                        for repo, r in revs.items()
                    )
                    lines.append(f"  {title}: {where}")
        return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _label(repo: str, revision: str, here: str) -> str:
    return revision if repo == here else f"{repo}@{revision}"


def make_source(*, offline: bool = False, cache_dir=None, api: Any = None) -> MetadataSource:
    """The metadata source: the local cache when ``offline`` (or ``HF_HUB_OFFLINE``), else the Hub."""
    from retrace.hubenv import hub_offline

    if offline or hub_offline():
        return CacheMetadata(cache_dir)
    return HubMetadata(api=api, cache_dir=cache_dir)


def audit(
    repos: Sequence[str],
    source: MetadataSource | None = None,
    *,
    cache_dir=None,
    offline: bool = False,
    steps: Iterable[int] | None = None,
    max_step: int = FINAL_STEP,
    schedule: str = "pythia",
    weights: bool = False,
    still_threshold: float = 0.0,
    workers: int = 8,
    log: Callable[[str], Any] | None = None,
) -> AuditReport:
    """Audit ``repos`` (see the module docstring). ``steps`` restricts the step branches looked at
    (``main`` is always kept); ``max_step`` truncates the expected schedule; ``schedule="none"`` skips
    the missing/unexpected checks (repos not on the Pythia schedule)."""
    if not repos:
        raise RetraceError("audit: no repository given")
    if len(set(repos)) != len(repos):
        raise RetraceError(f"audit: repository listed twice in {list(repos)}")
    if schedule not in ("pythia", "none"):
        raise RetraceError(f"audit: unknown schedule {schedule!r} (pythia or none)")
    if not (still_threshold >= 0 and math.isfinite(still_threshold)):
        raise RetraceError(f"audit: still threshold must be a finite number ≥ 0, got {still_threshold!r}")
    source = source or make_source(offline=offline, cache_dir=cache_dir)
    steps = set(steps) if steps is not None else None
    say = log or (lambda msg: None)

    def wanted(branch: str) -> bool:
        if branch == MAIN:
            return True
        step = step_of(branch)
        if steps is None:
            return True
        return step is not None and step in steps

    nodes: dict[tuple[str, str], _Node] = {}
    by_repo: dict[str, list[_Node]] = {}
    missing: dict[str, list[str]] = {}
    incidents: list[Incident] = []
    notes: list[Incident] = []
    expected_steps = [s for s in PYTHIA_STEPS if s <= max_step and (steps is None or s in steps)]
    final_rev = revision_of(max(s for s in PYTHIA_STEPS if s <= max_step)) if max_step >= 0 else None

    for repo in repos:
        say(f"audit: listing {repo} ({source.description})")
        revs = source.revisions(repo, wanted, workers=workers)
        repo_nodes = [_Node(repo, revs[r]) for r in sorted(revs, key=revision_order)]
        by_repo[repo] = repo_nodes
        for n in repo_nodes:
            nodes[n.key] = n
        say(f"audit: {repo}: {len(revs)} branches, {len({r.commit for r in revs.values()})} commits")
        if schedule == "pythia":
            present = {step_of(r) for r in revs} - {None}
            gone = [revision_of(s) for s in expected_steps if s not in present]
            missing[repo] = gone
            if gone:
                incidents.append(
                    Incident(
                        "missing",
                        repo,
                        gone,
                        f"{len(gone)} of {len(expected_steps)}: {format_revisions(gone)}",
                    )
                )
            extra = sorted(
                (r for r in revs if step_of(r) is not None and step_of(r) not in PYTHIA_STEPS),
                key=revision_order,
            )
            if extra:
                incidents.append(Incident("unexpected", repo, extra, format_revisions(extra)))
                for r in extra:
                    nodes[(repo, r)].issues.add("unexpected")
        else:
            missing[repo] = []
        empty = [n.rev.revision for n in repo_nodes if not any(n.rev.family_files(f) for f in PARAM_FAMILIES)]
        if empty:
            incidents.append(Incident("no-weights", repo, empty, format_revisions(empty)))
            for r in empty:
                nodes[(repo, r)].issues.add("no-weights")

    # --- clone groups over every repo ----------------------------------------------------------
    uf = _UnionFind()
    fp_members: dict[tuple, list[_Node]] = defaultdict(list)
    for n in nodes.values():
        uf.find(n.key)
        for fam in PARAM_FAMILIES:
            fp = n.rev.fingerprint(fam)
            if fp is not None:
                fp_members[(fam, fp)].append(n)
    for members in fp_members.values():
        for m in members[1:]:
            uf.union(members[0].key, m.key)
    components: dict[Any, list[_Node]] = defaultdict(list)
    for n in nodes.values():
        components[uf.find(n.key)].append(n)

    repo_index = {r: i for i, r in enumerate(repos)}
    cross: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for comp in components.values():
        if len(comp) < 2:
            continue
        parts: dict[str, list[_Node]] = defaultdict(list)
        for n in comp:
            parts[n.repo].append(n)
        refs: dict[str, _Node] = {}
        for repo, part in parts.items():
            part.sort(key=lambda n: revision_order(n.rev.revision))
            refs[repo] = _classify_part(repo, part, by_repo[repo], final_rev, incidents, notes)
        ordered = sorted(parts, key=repo_index.get)
        first = ordered[0]
        for repo in ordered[1:]:
            for n in parts[repo]:
                # the same revision name in the first repo if it is in the group, else its reference.
                same = next((m for m in parts[first] if m.rev.revision == n.rev.revision), refs[first])
                cross[(repo, first)].append((n.rev.revision, same.rev.revision))
                n.issues.add("cross-repo")
                if n.clone_of is None:
                    n.clone_of = f"{first}@{same.rev.revision}"
    for (repo, other), pairs in sorted(cross.items(), key=lambda kv: (repo_index[kv[0][0]], kv[0][1])):
        revs = [a for a, _ in pairs]
        if all(a == b for a, b in pairs):
            n_repo = len(by_repo[repo])
            scope = f"all {n_repo} revisions" if len(revs) == n_repo else f"{len(revs)} revisions"
            detail = f"{scope} byte-identical to {other} at the same revision: {format_revisions(revs)}"
        else:
            shown = ", ".join(f"{a} = {other}@{b}" for a, b in pairs[:8])
            detail = f"{len(revs)} revisions byte-identical to {other}: {shown}" + (
                " …" if len(pairs) > 8 else ""
            )
        incidents.append(Incident("cross-repo", repo, revs, detail, reference=other))

    # --- shards shared between otherwise different revisions -------------------------------------
    by_content: dict[str, list[tuple[_Node, str]]] = defaultdict(list)
    for n in nodes.values():
        for fam in PARAM_FAMILIES:
            for f in n.rev.family_files(fam):
                if f.content_id and (f.size or 0) > 0:
                    by_content[f.content_id].append((n, f.name))
    shard_incidents: dict[str, list[str]] = defaultdict(list)
    for holders in by_content.values():
        if len({uf.find(n.key) for n, _ in holders}) < 2:
            continue
        ref_node, _ = max(holders, key=lambda h: (-repo_index[h[0].repo], *_final_first(h[0].rev.revision)))
        for n, fname in holders:
            if uf.find(n.key) == uf.find(ref_node.key):
                continue
            other = _label(ref_node.repo, ref_node.rev.revision, n.repo)
            n.file_issues[fname] = ("shard-clone", other)
            n.issues.add("shard-clone")
            shard_incidents[n.repo].append(f"{n.rev.revision}:{fname} = {other}")
    for repo in repos:
        if shard_incidents.get(repo):
            items = sorted(set(shard_incidents[repo]))
            revs = sorted({i.split(":", 1)[0] for i in items}, key=revision_order)
            shown = "; ".join(items[:6]) + (" …" if len(items) > 6 else "")
            incidents.append(Incident("shard-clone", repo, revs, f"{len(items)} file(s): {shown}"))

    # --- main vs the final step, formats ---------------------------------------------------------
    main_final: dict[str, tuple[_Node, _Node]] = {}
    for repo in repos:
        main, last = nodes.get((repo, MAIN)), nodes.get((repo, final_rev)) if final_rev else None
        if main and last and uf.find(main.key) != uf.find(last.key):
            main_final[repo] = (main, last)
        kinds = {n.rev.revision: frozenset(f.kind for f in n.rev.weight_files) for n in by_repo[repo]}
        kinds = {r: k for r, k in kinds.items() if k}
        counts = Counter(kinds.values())
        if len(counts) > 1:
            common = counts.most_common(1)[0][0]

            def added_format(k: frozenset, common: frozenset = common) -> bool:
                """The usual files plus another format (reported as two-formats, not a change)."""
                return k > common and {FAMILIES[x] for x in k} >= {"safetensors", "bin"}

            odd = sorted(
                (r for r, k in kinds.items() if k != common and not added_format(k)), key=revision_order
            )
            if odd:
                desc = "; ".join(
                    f"{'+'.join(sorted(k))} ({c}"
                    + (
                        f": {format_revisions([r for r, kk in kinds.items() if kk == k], limit=6)})"
                        if k != common
                        else ")"
                    )
                    for k, c in counts.most_common()
                    if k == common or not added_format(k)
                )
                incidents.append(Incident("format-change", repo, odd, desc))
                for r in odd:
                    nodes[(repo, r)].issues.add("format-change")
        two = [n for n in by_repo[repo] if n.rev.family_files("safetensors") and n.rev.family_files("bin")]
        for n in two:
            n.issues.add("two-formats")

    if weights:
        _check_weights(source, repos, by_repo, uf, main_final, incidents, notes, still_threshold, say)

    for repo in repos:
        if repo in main_final:
            main, last = main_final[repo]
            if not main.weights.get("same_params"):
                main.issues.add("main-not-final")
                incidents.append(
                    Incident(
                        "main-not-final",
                        repo,
                        [MAIN],
                        f"main ({_families(main)}) and {last.rev.revision} ({_families(last)}) hold different bytes"
                        + (f"; {main.weights['vs_final']}" if "vs_final" in main.weights else ""),
                        reference=last.rev.revision,
                    )
                )
        two = [n.rev.revision for n in by_repo[repo] if "two-formats" in n.issues]
        if two:
            incidents.append(
                Incident(
                    "two-formats",
                    repo,
                    two,
                    f"{len(two)} revision(s) with both safetensors and .bin weights: {format_revisions(two)}"
                    + (" (run with --weights to compare them)" if not weights else ""),
                )
            )

    incidents.sort(key=lambda i: (list(INCIDENT_KINDS).index(i.kind), repo_index[i.repo]))
    rows = _rows(repos, by_repo, missing)
    return AuditReport(list(repos), source.description, incidents, notes, rows, weights, missing)


def _final_first(revision: str) -> tuple:
    """Sort key that puts main last (highest), then the latest step."""
    step = step_of(revision)
    return (2, 0) if revision == MAIN else (1, step) if step is not None else (0, 0)


def _families(n: _Node) -> str:
    return "+".join(sorted({f.kind for f in n.rev.weight_files})) or "no weights"


def _classify_part(
    repo: str,
    part: list[_Node],
    repo_nodes: list[_Node],
    final_rev: str | None,
    incidents: list[Incident],
    notes: list[Incident],
) -> _Node:
    """Label one repo's members of a clone group; returns the reference node."""
    names = [n.rev.revision for n in part]
    if len(part) == 1:
        return part[0]
    if set(names) == {"step0", "step1"}:
        ref = part[0]
        part[1].issues.add("alias")
        part[1].clone_of = "step0"
        notes.append(Incident("step1-alias", repo, ["step1"], "", reference="step0"))
        return ref
    has_main = any(n.rev.revision == MAIN for n in repo_nodes)
    steps_present = {n.rev.revision for n in repo_nodes if step_of(n.rev.revision) is not None}
    ref = max(part, key=lambda n: _final_first(n.rev.revision))
    members = [n for n in part if n is not ref]
    latest_step = max(steps_present, key=revision_order) if steps_present else None
    # main holds the final step; where the final step is missing, the latest one uploaded.
    main_alias = final_rev if final_rev in steps_present else latest_step
    if ref.rev.revision == MAIN and main_alias in names:
        alias = next(n for n in part if n.rev.revision == main_alias)
        alias.issues.add("alias")
        alias.clone_of = MAIN
        kind = "main-alias" if main_alias == final_rev else "main-alias-latest"
        notes.append(Incident(kind, repo, [main_alias], "", reference=MAIN))
        members = [n for n in members if n is not alias]
    if not members:
        return ref
    member_names = [n.rev.revision for n in members]
    if ref.rev.revision == MAIN or (not has_main and ref.rev.revision == latest_step):
        kind = "clone-of-final"
        if len(steps_present) > 1 and steps_present <= set(names):
            scope = f"every step branch ({len(steps_present)}) holds"
        else:
            scope = f"{len(members)} revision{'s hold' if len(members) > 1 else ' holds'}"
        detail = f"{scope} the same weights as {ref.rev.revision}: {format_revisions(member_names)}"
    elif len(steps_present) >= 3 and steps_present <= set(names):
        kind = "all-identical"
        other = " (main differs)" if has_main else ""
        detail = f"all {len(steps_present)} step branches hold one weight set (= {ref.rev.revision}){other}"
    else:
        kind = "identical"
        detail = (
            f"{len(members)} revision(s) identical to {ref.rev.revision}: {format_revisions(member_names)}"
        )
    for n in members:
        n.issues.add("clone")
        n.clone_of = ref.rev.revision
    incidents.append(Incident(kind, repo, member_names, detail, reference=ref.rev.revision))
    return ref


# ------------------------------------------------------------------------------------------------
# Weights


class _Readers:
    """Opens (and closes) ParamReaders for (revision, family), keeping a few open."""

    def __init__(self, source: MetadataSource, keep: int = 3):
        self.source = source
        self.keep = keep
        self.open: dict[tuple, Any] = {}

    def get(self, node: _Node, family: str):
        from retrace.checkpoints import open_local

        key = (node.repo, node.rev.revision, family)
        if key in self.open:
            reader = self.open.pop(key)
            self.open[key] = reader
            return reader
        folder = self.source.weights_folder(node.rev, family)
        entry = family_entry(family, node.rev.names())
        if entry is None:
            raise RetraceError(f"{node.repo}@{node.rev.revision}: no index file to read its {family} shards")
        reader = open_local(folder / entry if entry else folder)
        reader.source = f"{node.repo}@{node.rev.revision} ({family})"
        self.open[key] = reader
        while len(self.open) > self.keep:
            old = next(iter(self.open))
            self.open.pop(old).close()
        return reader

    def close(self) -> None:
        for r in self.open.values():
            r.close()
        self.open.clear()


def _family(node: _Node) -> str | None:
    return next((f for f in PARAM_FAMILIES if node.rev.family_files(f)), None)


def _check_weights(source, repos, by_repo, uf, main_final, incidents, notes, still_threshold, say) -> None:
    from retrace.compare.similarity import compare_params

    readers = _Readers(source)
    unavailable: dict[str, list[str]] = defaultdict(list)

    def unavailable_(n: _Node, exc: Exception) -> None:
        if "weights-unavailable" not in n.issues:
            n.issues.add("weights-unavailable")
            unavailable[n.repo].append(f"{n.rev.revision}: {str(exc).splitlines()[0]}")

    def reader(n: _Node, family: str):
        if "weights-unavailable" in n.issues:
            return None
        try:
            return readers.get(n, family)
        except RetraceError as exc:
            unavailable_(n, exc)
            return None

    def compare(a: _Node, b: _Node, fam_a: str, fam_b: str):
        ra = reader(a, fam_a)
        rb = reader(b, fam_b) if ra is not None else None
        if ra is None or rb is None:
            return None
        try:
            return compare_params(ra, rb)
        except RetraceError as exc:  # the two hold different parameter names or shapes
            unavailable_(b, exc)
            return None

    try:
        for repo in repos:
            # two formats in one revision: do they hold the same parameters?
            for n in by_repo[repo]:
                if "two-formats" not in n.issues:
                    continue
                say(f"audit: {repo}@{n.rev.revision}: safetensors vs .bin")
                res = compare(n, n, "safetensors", "bin")
                if res is None:
                    continue
                differ = [t.name for t in res.tensors if not (t.max_abs_diff == 0)]
                n.weights["formats_one_minus_cos"] = res.one_minus_cos
                n.weights["formats_max_abs_diff"] = res.max_abs_diff
                n.issues.discard("two-formats")
                if differ:
                    n.issues.add("formats-disagree")
                    incidents.append(
                        Incident(
                            "formats-disagree",
                            repo,
                            [n.rev.revision],
                            f"{n.rev.revision}: {len(differ)} of {len(res.tensors)} tensors differ between "
                            f"safetensors and .bin (1 − θ Cos {res.one_minus_cos:.3g}, max |Δ| "
                            f"{res.max_abs_diff:.3g}; first: {differ[0]})",
                        )
                    )
                else:
                    notes.append(Incident("formats-agree", repo, [n.rev.revision], ""))

            # main vs the final step when their bytes differ
            if repo in main_final:
                main, last = main_final[repo]
                fm, fl = _family(main), _family(last)
                if fm and fl:
                    res = compare(main, last, fm, fl)
                    if res is not None and res.max_abs_diff == 0:
                        main.weights["same_params"] = True
                        notes.append(Incident("main-same-params", repo, [MAIN], "", last.rev.revision))
                    elif res is not None:
                        main.weights["vs_final"] = f"1 − θ Cos {res.one_minus_cos:.3g}, L2 {res.l2:.4g}"

            # the step chain
            chain = [n for n in by_repo[repo] if step_of(n.rev.revision) is not None and _family(n)]
            anchor = next((n for n in chain if "clone" not in n.issues), None)
            still: list[str] = []
            back: list[str] = []
            prev: _Node | None = None  # the latest checkpoint that could be read
            last_d: float | None = None  # its L2 distance from the anchor
            for cur in chain:
                if "weights-unavailable" in cur.issues:
                    continue
                fc = _family(cur)
                if prev is not None:
                    cur.weights["prev_revision"] = prev.rev.revision
                    if uf.find(prev.key) == uf.find(cur.key):  # byte-identical: a clone, nothing to load
                        cur.weights.update(one_minus_cos_prev=0.0, l2_prev=0.0)
                    else:
                        say(f"audit: {repo}: {prev.rev.revision} → {cur.rev.revision}")
                        res = compare(prev, cur, _family(prev), fc)
                        if res is not None:
                            cur.weights.update(one_minus_cos_prev=res.one_minus_cos, l2_prev=res.l2)
                            expected = (prev.rev.revision, cur.rev.revision) == ("step0", "step1")
                            if not expected and (
                                res.l2 == 0 or (still_threshold > 0 and res.one_minus_cos <= still_threshold)
                            ):
                                cur.issues.add("not-moving")
                                still.append(cur.rev.revision)
                if cur is anchor:
                    last_d = 0.0
                elif anchor is not None and revision_order(cur.rev.revision) > revision_order(
                    anchor.rev.revision
                ):
                    if uf.find(anchor.key) == uf.find(cur.key):
                        d = 0.0
                    else:
                        res = compare(anchor, cur, _family(anchor), fc)
                        d = res.l2 if res is not None else math.nan
                    cur.weights["l2_anchor"] = d
                    if math.isfinite(d):
                        if last_d is not None and d < last_d and "clone" not in cur.issues:
                            cur.issues.add("backwards")
                            back.append(cur.rev.revision)
                        last_d = d
                if "weights-unavailable" not in cur.issues:
                    prev = cur
            if still:
                thr = f" or 1 − θ Cos ≤ {still_threshold:g}" if still_threshold > 0 else ""
                incidents.append(
                    Incident(
                        "not-moving",
                        repo,
                        still,
                        f"same parameters as the previous checkpoint{thr} (files differ): {format_revisions(still)}",
                    )
                )
            if back:
                incidents.append(
                    Incident(
                        "backwards",
                        repo,
                        back,
                        f"closer to {anchor.rev.revision} than the previous checkpoint (L2): {format_revisions(back)}",
                        reference=anchor.rev.revision,
                    )
                )
            if unavailable.get(repo):
                items = unavailable[repo]
                incidents.append(
                    Incident(
                        "weights-unavailable",
                        repo,
                        [i.split(":", 1)[0] for i in items],
                        "; ".join(items[:3]) + (" …" if len(items) > 3 else ""),
                    )
                )
    finally:
        readers.close()


# ------------------------------------------------------------------------------------------------


def _rows(repos, by_repo, missing) -> list[dict[str, Any]]:
    rows = []
    empty_w = dict.fromkeys(_WEIGHT_COLUMNS)
    for repo in repos:
        for rev in missing.get(repo, []):
            rows.append(
                {
                    "repo": repo,
                    "revision": rev,
                    "commit": None,
                    "step": step_of(rev),
                    "file": None,
                    "kind": None,
                    "size": None,
                    "sha256": None,
                    "clone_of": None,
                    "status": "missing",
                    "issues": "missing",
                    **empty_w,
                }
            )
        for n in by_repo[repo]:
            files = n.rev.weight_files or [None]
            for f in files:
                issues = set(n.issues) - {"shard-clone"}
                clone_of = n.clone_of
                if f is not None and f.name in n.file_issues:
                    issue, other = n.file_issues[f.name]
                    issues.add(issue)
                    clone_of = clone_of or other
                ordered = [s for s in STATUS_ORDER if s in issues]
                rows.append(
                    {
                        "repo": repo,
                        "revision": n.rev.revision,
                        "commit": n.rev.commit,
                        "step": step_of(n.rev.revision),
                        "file": f.name if f else None,
                        "kind": f.kind if f else None,
                        "size": f.size if f else None,
                        "sha256": f.sha256 if f else None,
                        "clone_of": clone_of,
                        "status": ordered[0] if ordered else "ok",
                        "issues": ";".join(ordered),
                        **{k: n.weights.get(k) for k in _WEIGHT_COLUMNS},
                    }
                )
    rows.sort(key=lambda r: (repos.index(r["repo"]), revision_order(r["revision"]), r["file"] or ""))
    return rows
