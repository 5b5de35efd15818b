"""The workflow's input, param and resource functions, each with its signature computed once.

Snakemake inspects a function's signature every time it calls one (``inspect.signature``, to choose
which of ``input``, ``threads``, ``attempt`` … to pass): two or three inspections per function and job,
about 100,000 at 5,000 cells, seconds of a dry run. Snakemake's ``get_function_params`` reads a
signature stored on the function first (``snakemake.common.overwrite_function_params``, what its own
``subpath`` and ``as_py_module`` wrappers use); ``remember_signatures`` stores each function's own
signature there, so nothing but the inspection changes. Should Snakemake drop that lookup, the
attribute is ignored and every call inspects again: slower, never wrong.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any


def rule_functions(*, namespace: Mapping[str, Any], directory: str | Path) -> list[Callable[..., Any]]:
    """The plain functions of ``namespace`` whose code was compiled from a file in ``directory`` (the
    workflow's rule files), not those it imported.

    Args:
        namespace: the workflow's globals.
        directory: the folder of the rule files (``workflow.current_basedir`` in a rule file).

    Returns:
        The functions, in namespace order.
    """
    folder = Path(directory).resolve()
    return [f for f in list(namespace.values())
            if isinstance(f, types.FunctionType) and Path(f.__code__.co_filename).resolve().parent == folder]


def remember_signatures(*, functions: Iterable[Callable[..., Any]]) -> None:
    """Store each function's signature where Snakemake looks for it before inspecting the function.

    Args:
        functions: input, param or resource functions of the workflow.
    """
    from snakemake.common import overwrite_function_params

    for f in functions:
        overwrite_function_params(f, inspect.signature(f).parameters)
