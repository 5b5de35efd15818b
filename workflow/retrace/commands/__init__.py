"""Subcommands of the ``retrace`` CLI, one module each (see ``retrace.cli``), and their shared argument types."""

from __future__ import annotations

import argparse


def steps_arg(text: str) -> list[int]:
    """``--steps 0,1,2,1000-5000`` as an argparse type: ``retrace.pythia.schedule.parse_steps``, sorted
    (its error becomes argparse's usage message naming the flag)."""
    from retrace.errors import RetraceError
    from retrace.pythia.schedule import parse_steps

    try:
        return sorted(parse_steps(text))
    except RetraceError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--steps: ")) from None
