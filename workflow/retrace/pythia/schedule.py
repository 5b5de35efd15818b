"""The Pythia checkpoint schedule and revision names (reference/pythia-neox.md §5).

154 step branches: ``step0``, the powers of two ``step1`` … ``step512`` (GPT-NeoX ``extra-save-iters``),
then ``step1000`` … ``step143000`` every 1000 (``checkpoint-factor`` 1000 and the final save); ``main``
holds the final step. A published checkpoint is named ``org/repo@step{N}`` everywhere (``hub_spec``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from retrace.errors import RetraceError
from retrace.pythia.constants import TRAIN_ITERS

#: The last published step of every Pythia run.
FINAL_STEP = TRAIN_ITERS
MAIN = "main"
#: GPT-NeoX ``extra-save-iters``: 0 and the powers of two up to 512.
EXTRA_SAVE_STEPS = (0, *(2**k for k in range(10)))
#: GPT-NeoX ``checkpoint-factor``.
CHECKPOINT_FACTOR = 1000

_STEP_RE = re.compile(r"step(\d+)")


def pythia_steps(max_step: int = FINAL_STEP) -> list[int]:
    """The Pythia checkpoint steps up to ``max_step`` (all 154 by default)."""
    steps = [*EXTRA_SAVE_STEPS, *range(CHECKPOINT_FACTOR, FINAL_STEP + 1, CHECKPOINT_FACTOR)]
    return [s for s in steps if s <= max_step]


def save_steps(start: int, end: int) -> list[int]:
    """Steps saved by a run from ``start`` to ``end``: the start, the Pythia schedule inside (start, end]
    (1, 2, 4 … 512, then every 1000, continued past 143000 for longer runs), and ``end``."""
    sched = {*EXTRA_SAVE_STEPS, *range(CHECKPOINT_FACTOR, end + 1, CHECKPOINT_FACTOR)}
    return sorted({start, end} | {s for s in sched if start < s <= end})


def hub_spec(repo: str, step: int) -> str:
    """The source spec of a published checkpoint: ``org/repo@step{N}``."""
    return f"{repo}@{revision_of(step)}"


PYTHIA_STEPS = tuple(pythia_steps())


def step_of(revision: str) -> int | None:
    """``stepN`` → N; anything else (``main``, other branches) → None."""
    m = _STEP_RE.fullmatch(revision)
    return int(m.group(1)) if m else None


def revision_of(step: int) -> str:
    return f"step{step}"


def revision_order(revision: str) -> tuple:
    """Sort key: step branches by step, then ``main``, then other branches by name."""
    step = step_of(revision)
    if step is not None:
        return (0, step, "")
    return (1, 0, "") if revision == MAIN else (2, 0, revision)


def parse_steps(spec: str | Iterable[str] | None) -> set[int] | None:
    """``"0,1,2,1000-5000"`` (or a list of such items) → the set of steps; None → None (all).

    ``A-B`` is an inclusive range, filtered to the Pythia schedule; single numbers are taken as given
    (``step`` prefixes are accepted: ``step1000``).
    """
    if spec is None:
        return None
    items = [spec] if isinstance(spec, str) else list(spec)
    out: set[int] = set()
    for item in items:
        for part in str(item).split(","):
            part = part.strip().removeprefix("step")
            if not part:
                continue
            try:
                if "-" in part:
                    lo, hi = (int(x.strip().removeprefix("step")) for x in part.split("-", 1))
                    if lo > hi:
                        raise ValueError
                    out.update(s for s in PYTHIA_STEPS if lo <= s <= hi)
                else:
                    out.add(int(part))
            except ValueError:
                raise RetraceError(
                    f"--steps: {part!r} is not a step or an inclusive range A-B (e.g. 0,1,2,1000-5000)"
                ) from None
    if not out:
        raise RetraceError(f"--steps {spec!r} selects no step")
    return out


def format_revisions(
    revisions: Iterable[str], schedule: Iterable[int] = PYTHIA_STEPS, limit: int = 12
) -> str:
    """Compact list: runs of revisions adjacent in the schedule collapse to ``stepA–stepB (n)``."""
    index = {revision_of(s): i for i, s in enumerate(schedule)}
    revs = sorted(set(revisions), key=revision_order)
    parts: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if not run:
            return
        parts.append(run[0] if len(run) == 1 else f"{run[0]}–{run[-1]} ({len(run)})")
        run.clear()

    for rev in revs:
        if run and rev in index and run[-1] in index and index[rev] == index[run[-1]] + 1:
            run.append(rev)
            continue
        flush()
        run.append(rev)
    flush()
    if len(parts) > limit:
        parts = [*parts[:limit], f"… (+{len(parts) - limit} more groups)"]
    return ", ".join(parts)
