"""The study a command reads: ``--configfile`` and ``--directory``, resolved the way Snakemake would.

One home for the two options and for where envs/ is found, shared by ``retrace cells`` and ``retrace plan``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--configfile`` and ``--directory`` (``-d``) to a subcommand's parser."""
    p.add_argument("--configfile", default="config.yaml", help="the study config (default: config.yaml)")
    p.add_argument("--directory", "-d", default=".", help="the directory the workflow runs in (default: .)")


def study_from_args(args: argparse.Namespace):
    """Load and validate the study named by ``args.configfile``, relative to ``args.directory`` if need be.

    Returns:
        The :class:`retrace.grid.Study`.

    Raises:
        retrace.errors.RetraceError: the config is missing or invalid (the message names the key).
    """
    from retrace.grid import load_study

    workdir = Path(args.directory)
    config = Path(args.configfile)
    if not config.is_absolute() and not config.exists() and (workdir / config).exists():
        config = workdir / config
    return load_study(config, root=workflow_root(config, workdir))


def workflow_root(config: str | Path, workdir: str | Path) -> Path:
    """The directory holding envs/: the working directory's, the config's (or its parent's, for
    studies/*.yaml), else the checkout this package runs from (where the Snakefile is)."""
    import retrace

    config = Path(config).resolve()
    checkout = Path(retrace.__file__).resolve().parents[2]
    for candidate in (Path(workdir), config.parent, config.parent.parent, checkout):
        if (candidate / "envs").is_dir():
            return candidate
    return Path(workdir)
