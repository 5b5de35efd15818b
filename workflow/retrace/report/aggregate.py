"""Join every cell's Parquet outputs with the cell's axes into study-wide tables.

``results/runs/<cell>/{similarity,similarity_tensors,train_log}.parquet`` are concatenated, each row
prefixed with ``cell`` and every axis column of ``results/cells.parquet`` (so any table can be grouped
by any axis without a join), into ``results/tables/<same name>.parquet``. The tables are streamed cell
by cell through a Parquet writer, one row group per cell, so that a large study's per-tensor rows
never sit in memory at once; each output is written to a temporary file and renamed when complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from retrace.errors import RetraceError
from retrace.io import atomic_path, lock_directory

#: (output table, per-cell file) pairs; every cell must have every file.
TABLES = (
    ("similarity.parquet", "similarity.parquet"),
    ("similarity_tensors.parquet", "similarity_tensors.parquet"),
    ("train_log.parquet", "train_log.parquet"),
)


def read_cells(path: str | Path) -> pa.Table:
    """The cells table: a unique ``cell`` id per row plus one column per axis."""
    path = Path(path)
    if not path.is_file():
        raise RetraceError(f"{path}: cells table not found")
    try:
        cells = pq.read_table(path)
    except Exception as exc:
        raise RetraceError(f"{path}: cannot read cells table as Parquet: {exc}") from exc
    if "cell" not in cells.column_names:
        raise RetraceError(f"{path}: cells table has no 'cell' column")
    ids = cells.column("cell").to_pylist()
    if not ids:
        raise RetraceError(f"{path}: cells table is empty")
    dup = sorted({c for c in ids if ids.count(c) > 1})
    if dup:
        raise RetraceError(f"{path}: duplicate cell id(s) {', '.join(map(str, dup))}")
    return cells


def _with_axes(table: pa.Table, cells: pa.Table, row: int, source: Path) -> pa.Table:
    clash = [c for c in cells.column_names if c in table.column_names]
    if clash:
        raise RetraceError(f"{source}: column(s) {', '.join(clash)} clash with the cells table's columns")
    n = table.num_rows
    prefix = [pa.repeat(cells.column(c)[row], n).cast(cells.schema.field(c).type) for c in cells.column_names]
    return pa.Table.from_arrays(prefix + table.columns, names=cells.column_names + table.column_names)


def _conform(table: pa.Table, schema: pa.Schema, source: Path) -> pa.Table:
    if table.schema.equals(schema):
        return table
    if set(table.column_names) != set(schema.names):
        extra = sorted(set(table.column_names) - set(schema.names))
        lacks = sorted(set(schema.names) - set(table.column_names))
        raise RetraceError(
            f"{source}: columns differ from the other cells' (extra: {', '.join(extra) or 'none'}; "
            f"missing: {', '.join(lacks) or 'none'})"
        )
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise RetraceError(f"{source}: column types differ from the other cells': {exc}") from exc


def _sources(cells: pa.Table, runs: Path, filename: str) -> list[Path]:
    sources = [runs / str(c) / filename for c in cells.column("cell").to_pylist()]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise RetraceError(f"missing per-cell output(s): {', '.join(missing[:3])}{more}")
    return sources


def concat_runs(cells: pa.Table, runs: Path, filename: str, out: Path) -> int:
    """Stream ``runs/<cell>/<filename>`` for every cell, with axes prepended, into ``out`` (atomically).
    Returns rows."""
    with atomic_path(out, suffix=".parquet") as tmp:
        return _concat_into(cells, runs, filename, tmp)


def _concat_into(cells: pa.Table, runs: Path, filename: str, tmp: Path) -> int:
    """``concat_runs`` into ``tmp`` as it is (the caller renames it)."""
    sources = _sources(cells, runs, filename)
    rows = 0
    writer = None
    try:
        for i, source in enumerate(sources):
            try:
                table = pq.read_table(source)
            except Exception as exc:
                raise RetraceError(f"{source}: cannot read as Parquet: {exc}") from exc
            table = _with_axes(table, cells, i, source)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            table = _conform(table, writer.schema, source)
            writer.write_table(table)
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


def aggregate(
    cells_path: str | Path, runs: str | Path, out_dir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Path]:
    """Write ``out_dir/{similarity,similarity_tensors,train_log}.parquet``; returns their paths."""
    cells = read_cells(cells_path)
    runs, out_dir = Path(runs), Path(out_dir)
    for _, filename in TABLES:  # every input present before anything is written
        _sources(cells, runs, filename)
    # Every table is written to a temporary file first and the three are renamed into place together, under
    # a lock on out_dir: a failure (a full disk) leaves the previous complete tables, and two aggregate
    # runs at once leave the tables of one of them, never a mix.
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with lock_directory(out_dir), contextlib.ExitStack() as renames:
        for name, filename in TABLES:
            path = out_dir / name
            try:
                tmp = renames.enter_context(atomic_path(path, suffix=".parquet"))
                rows = _concat_into(cells, runs, filename, tmp)
            except OSError as exc:  # a full disk, a read-only directory: the previous tables stay
                raise RetraceError(f"{path}: could not write the table ({exc.strerror or exc}); the previous "
                                   "tables are unchanged") from exc
            written[name] = path
            log(f"aggregate: {path} ({cells.num_rows} cells, {rows} rows)")
    return written
