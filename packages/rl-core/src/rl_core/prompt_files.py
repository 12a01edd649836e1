"""Reading prompt records from JSONL or Parquet, with slime's `path@[start:end]` row slices.

`data.parquet@[0:1000]` is the first 1000 rows, `data.jsonl@[-100:]` the last 100: a Python slice over
records (blank JSONL lines are not records). Each record comes with where it was found, `path:line` for
JSONL and `path: row N` for Parquet, so that a bad row can be named.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_ROW_SLICE = re.compile(r"^(?P<path>.*)@\[(?P<start>-?\d*):(?P<end>-?\d*)\]$")


class DataError(ValueError):
    """A row of the prompt data is unusable; the message names the file and line."""


def split_row_slice(spec: str | Path) -> tuple[Path, slice | None]:
    """`path@[start:end]` -> (path, slice(start, end)); a plain path -> (path, None)."""
    match = _ROW_SLICE.match(str(spec))
    if match is None:
        return Path(spec), None
    bound = lambda text: int(text) if text else None  # noqa: E731
    return Path(match["path"]), slice(bound(match["start"]), bound(match["end"]))


def _jsonl_records(path: Path) -> list[tuple[str, Any]]:
    lines = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                lines.append((f"{path}:{line_no}", line))
    return lines


def _parse_json(where: str, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def _parquet_records(path: Path) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading Parquet prompt data needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return [(f"{path}: row {i}", row) for i, row in enumerate(rows)]


def read_records(spec: str | Path) -> list[tuple[str, Any]]:
    """(where, record) for every selected record of a `.jsonl` (any other suffix) or `.parquet` file."""
    path, rows = split_row_slice(spec)
    if not path.is_file():
        raise DataError(f"{path}: prompt data file not found")
    if path.suffix == ".parquet":
        records = _parquet_records(path)
        return records if rows is None else records[rows]
    lines = _jsonl_records(path)
    if rows is not None:
        lines = lines[rows]  # only the selected lines are parsed: a slice skips broken rows outside it
    return [(where, _parse_json(where, line)) for where, line in lines]
