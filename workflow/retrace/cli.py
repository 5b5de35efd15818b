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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrace",
        description="Reproduce published LLM pretraining runs and measure the distance to the published checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"retrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"retrace.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except RetraceError as exc:
        print(f"retrace {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
