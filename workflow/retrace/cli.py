"""The ``retrace`` command line: one subcommand per module in ``retrace.commands``.

Each command module defines ``register(subparsers)`` (adds its parser and sets ``func``) and keeps
heavy imports (torch, pandas) inside the function it runs, so ``retrace --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from retrace import __version__, commands
from retrace.errors import RetraceError


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or only with command ``only`` when a module of that name exists
    (``compare-run`` lives in ``compare_run.py``): a command then imports nothing of the others, which
    is a third of ``retrace compare``'s start-up."""
    parser = argparse.ArgumentParser(
        prog="retrace",
        description="Reproduce published LLM pretraining runs and measure the distance to the published checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"retrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # one module per command; a module whose name starts with "_" is a helper the commands share
    infos = sorted((m for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")), key=lambda m: m.name)
    if only is not None:
        infos = [m for m in infos if m.name == only.replace("-", "_")] or infos
    for info in infos:
        module = importlib.import_module(f"retrace.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None, *, own_process: bool | None = None) -> int:
    """Run one command. ``own_process``: this call is the process's entry point (the console script or
    ``python -m retrace``, where ``argv`` is None), so no torch op ran before it; ``retrace train`` then
    starts a CPU cell's local ranks as forks of this process. A caller inside another program (a test)
    is not, by default."""
    own_process = argv is None if own_process is None else own_process
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and not argv[0].startswith("-") else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    args.own_process = own_process
    try:
        return int(args.func(args) or 0)
    except RetraceError as exc:
        print(f"retrace {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
