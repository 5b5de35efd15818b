"""The main-job environment (what ``scripts/setup.sh`` installs: retrace + its ``workflow`` extra) inside the
test environment: the installed distributions that ``retrace[workflow]`` requires, transitively, and a
Python that cannot import anything else.

The test environment has more (pytest, transformers, ruff…), and those pull in packages the workflow
needs without declaring them (pygments came in through pytest and rich, which hid that
``snakemake --report`` needs it). ``blocked_python(...)`` runs a command with an import hook that refuses
the top-level modules of every installed distribution outside that closure, so a test sees the
failure a user of ``setup.sh`` would.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

_HOOK = r'''
import importlib.abc, json, os, runpy, sys
_BLOCKED = frozenset(json.loads(os.environ["RETRACE_TEST_BLOCKED_MODULES"]))
class _NotInTheWorkflowEnvironment(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not in retrace[workflow])", name=name)
        return None
sys.meta_path.insert(0, _NotInTheWorkflowEnvironment())
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''


def declared(extra: str = "workflow") -> list[Requirement]:
    """retrace's own requirements plus those of ``extra``, from this checkout's pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"][extra]]]


def closure(requirements: list[Requirement]) -> set[str]:
    """Canonical names of the installed distributions the requirements reach (extras and markers honoured)."""
    seen: dict[str, set[str]] = {}
    todo = [(r, set()) for r in requirements]
    while todo:
        req, via_extras = todo.pop()
        envs = [{"extra": e} for e in (via_extras or {""})]
        if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
            continue
        name = canonicalize_name(req.name)
        if name == "retrace":  # the project itself: expand its extras from pyproject
            for extra in req.extras:
                todo += [(r, set()) for r in declared(extra)]
            continue
        extras = set(req.extras)
        if name in seen and extras <= seen[name]:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = seen.get(name, set()) | extras
        for text in dist.requires or []:
            todo.append((Requirement(text), extras))
    return set(seen)


def top_level_modules(dist: md.Distribution) -> set[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return {line.strip() for line in text.splitlines() if line.strip()}
    names = set()
    for f in dist.files or []:
        first = f.parts[0]
        if first.endswith((".dist-info", ".data", ".egg-info")) or first in ("..", "__pycache__"):
            continue
        if len(f.parts) > 1 or first.endswith((".py", ".so", ".pyd")):
            names.add(first.split(".")[0])
    return names


def blocked_modules(allowed: set[str]) -> set[str]:
    """Top-level modules of installed distributions outside ``allowed`` (none that an allowed one provides)."""
    keep, block = set(), set()
    for dist in md.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        (keep if name in allowed else block).update(top_level_modules(dist))
    return block - keep - set(sys.stdlib_module_names)


def blocked_python(module: str, *args: str, env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and environment that run ``python -m module args…`` seeing only the workflow environment."""
    blocked = blocked_modules(closure(declared("workflow")))
    e = dict(os.environ if env is None else env, RETRACE_TEST_BLOCKED_MODULES=json.dumps(sorted(blocked)))
    return [sys.executable, "-c", _HOOK, module, *args], e
