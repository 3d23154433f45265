"""Files and folders written atomically: a reader (a resumed trial, `status`, a query, a loader
of an export or a token cache) sees the old file or the new one, never half of one. Everything the project writes goes through here, and what it
reads back is checked here (`parquet_damage`): atomic writes cannot stop damage from outside
(a full disk, a lost NFS client, a node killed mid-copy).

Imports no torch, so `analysis` and the orchestrator's driver can use it cheaply.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it replaces `path` in one rename,
    on error it is removed. The name carries the PID, so two processes never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fresh_dir(path: Path) -> Path:
    """`path` as a new empty folder (whatever a crash left there removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def move_into_place(tmp: Path, path: Path, *, over_earlier: bool = False) -> None:
    """The filled folder `tmp` becomes `path` in one rename. `path` may be an empty folder (a
    placeholder: one with anything inside raises OSError, never lost); with `over_earlier`, an
    earlier try at the same folder that never became current is removed whole first."""
    if over_earlier:
        shutil.rmtree(path, ignore_errors=True)
    elif path.is_dir():
        path.rmdir()
    os.replace(tmp, path)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `path` to fill; on success it becomes `path`
    (`move_into_place`), on error it is removed, so `path` is never seen half-written. The name
    carries the PID, so two processes never share one (workers of one checkpoint, which must
    share it, use `fresh_dir` and `move_into_place` around their barriers)."""
    path = Path(path)
    tmp = fresh_dir(path.with_name(f".{path.name}.{os.getpid()}.tmp"))
    try:
        yield tmp
        move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any, indent: int | None = None) -> None:
    write_text(path, json.dumps(data, indent=indent))


def write_parquet(path: Path, rows: list[dict[str, Any]], schema: dict[str, pa.DataType] | None = None) -> None:
    """Rows as one Parquet file. Columns are the union of the rows' keys (missing values null);
    those in `schema` get its types and are written even when absent. A column of nulls only
    becomes a string column, so tables of many files concatenate. NaN floats are stored as null."""
    schema = schema or {}
    columns = list(dict.fromkeys([*schema, *(k for r in rows for k in r)]))
    arrays = {}
    for c in columns:
        values = [_null_nan(r.get(c)) for r in rows]
        arrays[c] = pa.array(values, type=schema.get(c) or (pa.string() if all(v is None for v in values) else None))
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(arrays), tmp)


def _null_nan(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def error_line(err: BaseException) -> str:
    """An exception's first line (pyarrow's messages run on), at most 200 characters."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


class DamagedFileWarning(UserWarning):
    """A file damaged from outside was set aside or left out (the message says which and why)."""


def parquet_damage(path: Path, columns: tuple[str, ...] = ()) -> str | None:
    """Why `path` is not a readable Parquet file holding `columns` (truncated, empty, not
    Parquet, another table's schema), in a few words; None if it is. Reads only the footer."""
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException, ValueError) as err:
        return error_line(err)
    missing = [c for c in columns if c not in names]
    return f"no column {missing[0]!r}: another table's file" if missing else None
