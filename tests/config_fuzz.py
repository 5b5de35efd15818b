"""Seeded mutations of a study config, and what loading each one must end in.

A mutation picks one place in the config tree (a key of a mapping, an item of a list) and breaks it: a
value of the wrong type, a huge or negative number, unicode, an unknown key beside it, the key deleted,
a list emptied or an item repeated, a parallel layout's product broken. ``outcome`` loads the result
as the workflow does (``retrace.grid.load_study``, then each cell's placement and spec, as the Snakefile
builds them) and says whether it ended in a valid study or in a ``RetraceError`` naming a key; anything
else (another exception from inside the package, or no answer within the time limit) is a defect.
"""

from __future__ import annotations

import copy
import random
import signal
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrace.errors import RetraceError

#: Values of the wrong kind (or of the right kind, at the edges) put in place of a config value.
ODD_VALUES: tuple[Any, ...] = (
    None, "", "x", "ünïcödé-☃", "a b", "../../etc", -1, 0, 1, 2**63, 10**30, 1.5, -0.0, float("inf"),
    float("nan"), True, False, [], [None], {}, {"x": 1}, "1e400", "0x10", "1_000", "step0", "gpu",
)
#: Keys a mutation adds beside a real one.
ODD_KEYS = ("unknown", "gpus ", "ünï", "", "1", "gpu")


@dataclass
class Mutation:
    path: tuple[Any, ...]  # where in the tree
    op: str
    detail: str

    def describe(self) -> str:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in self.path) or "(top level)"
        return f"{self.op} at {where.lstrip('.')}: {self.detail}"


def _places(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _places(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _places(v, (*path, i))


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        node = node[p]
    return node


def mutate_many(config: dict[str, Any], rng: random.Random, most: int = 3) -> tuple[Any, list[Mutation]]:
    """One to ``most`` seeded mutations of (a deep copy of) ``config``, one after another."""
    cfg, done = config, []
    for _ in range(rng.randint(1, most)):
        cfg, m = mutate(cfg, rng)
        done.append(m)
    return cfg, done


def mutate(config: dict[str, Any], rng: random.Random) -> tuple[Any, Mutation]:
    """One seeded mutation of (a deep copy of) ``config``."""
    cfg = copy.deepcopy(config)
    places = list(_places(cfg))
    path = rng.choice(places[1:])  # never the whole config (covered by "not a mapping" cases)
    parent, key = _get(cfg, path[:-1]), path[-1]
    value = parent[key]
    ops = ["replace", "replace", "delete", "sibling"]
    if isinstance(value, list):
        ops += ["empty", "repeat"]
    if isinstance(value, dict) and {"gpus", "pdbs", "gas"} <= set(value):
        ops += ["batch"]
    if isinstance(value, int) and not isinstance(value, bool):
        ops += ["scale"]
    if isinstance(value, str):
        ops += ["unicode"]
    op = rng.choice(ops)
    if op == "replace":
        new = copy.deepcopy(rng.choice(ODD_VALUES))
        parent[key] = new
        detail = repr(new)
    elif op == "delete":
        del parent[key]
        detail = "removed"
    elif op == "sibling":
        if isinstance(parent, dict):
            extra = rng.choice(ODD_KEYS)
            parent[extra] = copy.deepcopy(rng.choice(ODD_VALUES))
            detail = f"key {extra!r} added"
        else:
            parent.insert(key, copy.deepcopy(rng.choice(ODD_VALUES)))
            detail = "item inserted"
    elif op == "empty":
        value.clear()
        detail = "emptied"
    elif op == "repeat":
        if value:
            value.append(copy.deepcopy(value[rng.randrange(len(value))]))
        detail = "an item repeated"
    elif op == "batch":
        axis = rng.choice(["gpus", "pdbs", "gas"])
        value[axis] = value[axis] * rng.choice([2, 3]) + rng.choice([0, 1])
        detail = f"{axis} → {value[axis]}"
    elif op == "scale":
        parent[key] = rng.choice([value * 1000003, -value, value + 1, 10**18])
        detail = f"{value} → {parent[key]}"
    else:  # unicode
        parent[key] = value + rng.choice(["é", "☃", "\u200b", "\n", " "])
        detail = repr(parent[key])
    return cfg, Mutation(path=tuple(path), op=op, detail=detail)


@dataclass
class Outcome:
    kind: str  # "valid", "clear" (a RetraceError naming a key), "unclear" (one that names none), "defect"
    message: str


#: What a clear config error says before the key it names (retrace.grid's messages).
NAMES_A_KEY = ("config key ", "unknown key ", "missing key ", "must be a mapping", "not valid YAML")


class _Hung(Exception):
    pass


def _alarm(signum, frame):
    raise _Hung()


def outcome(cfg: Any, *, root: Path, time_limit_s: int = 20, max_cells: int = 64) -> Outcome:
    """Load ``cfg`` as the workflow does and classify the result (see the module doc)."""
    from retrace.grid import load_study
    from retrace.launch import train_spec
    from retrace.placement import train_placement

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(time_limit_s)
    try:
        study = load_study(cfg, root=root)
        for cell in study.cells()[:max_cells]:
            train_placement(cell=cell, cluster=study.cluster)
            train_spec(study, cell)
        return Outcome("valid", f"{len(study.cells())} cells")
    except RetraceError as exc:
        msg = str(exc)
        return Outcome("clear" if any(s in msg for s in NAMES_A_KEY) else "unclear", msg)
    except _Hung:
        return Outcome("defect", f"no answer within {time_limit_s} s")
    except Exception:  # noqa: BLE001 - any other exception is the defect this fuzzer looks for
        return Outcome("defect", traceback.format_exc(limit=-4))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
