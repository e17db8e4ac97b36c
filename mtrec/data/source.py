"""Reading the raw files of public datasets, shared by every loader.

Columns are read as text and parsed explicitly, so a bad value is reported as
``u.data, column 'rating': values not parsable as integers (first 'abc' at data row 7) (1 row)``
instead of a bare Arrow error, and nothing is dropped silently. :func:`fields_text` writes the text
of entities that have no prose (Ali-CCP, AliExpress, Census, KuaiRand) from their fields in words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mtrec.data.contract import Problem
from mtrec.errors import DataError

Kind = Literal["int", "float", "binary"]
_PATTERN = {"int": r"^-?\d+$", "float": r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$", "binary": r"^[01]$"}
_TYPE = {"int": pa.int64(), "float": pa.float64(), "binary": pa.int8()}
_WORDS = {"int": "integers", "float": "numbers", "binary": "0/1"}
_SEP = "\x1f"  # ASCII unit separator: stands in for multi-character delimiters such as '::'


def fail(path: str | Path, column: str | None, message: str, rows: int | None = None) -> DataError:
    """A DataError with one problem (``raise fail(...)``)."""
    return DataError([Problem(str(path), column, rows, message)])


def find_file(src: Path, *names: str) -> Path:
    """The first of ``names`` that exists in the folder ``src``."""
    if not src.is_dir():
        raise fail(src, None, "source folder does not exist")
    for name in names:
        if (src / name).is_file():
            return src / name
    also = f" (nor {', '.join(names[1:])})" if len(names) > 1 else ""
    raise fail(src / names[0], None, f"file is missing{also}")


def find_files(src: Path, pattern: str) -> list[Path]:
    """Every file in ``src`` matching the glob ``pattern``, sorted; at least one."""
    if not src.is_dir():
        raise fail(src, None, "source folder does not exist")
    found = sorted(p for p in src.glob(pattern) if p.is_file())
    if not found:
        raise fail(src / pattern, None, "no file matches")
    return found


def read_text(path: Path, names: list[str] | None = None, delimiter: str = ",", encoding: str = "utf8") -> pa.Table:
    """Read a delimited text file into trimmed string columns.

    ``names`` are the columns of a file without a header line; otherwise the first line is the
    header. Quoting is honoured only for commas. A multi-character ``delimiter`` (MovieLens-1M's
    ``::``) is supported.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise fail(path, None, f"cannot be read: {e.strerror or e}") from e
    if len(delimiter) > 1:
        data, delimiter, encoding = data.decode(encoding).replace(delimiter, _SEP).encode(), _SEP, "utf8"
    header = 0
    if names is None:
        first = data.split(b"\n", 1)[0].decode(encoding).strip()
        names, header = [n.strip().strip('"') for n in first.split(delimiter)], 1
    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=header, encoding=encoding),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == "," else False),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise fail(path, None, f"cannot be parsed: {e}") from e
    if table.num_rows == 0:
        raise fail(path, None, "has no data rows")
    return pa.table({n: pc.utf8_trim_whitespace(table.column(n)) for n in table.column_names})


def require_columns(table: pa.Table, path: Path, columns: list[str]) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError([Problem(str(path), c, None, "required column is missing") for c in missing])


def parse(table: pa.Table, path: Path, column: str, kind: Kind, nullable: bool = False) -> pa.Array:
    """Parse a text column as int64, float64 or binary 0/1 (int8). Empty cells are null when
    ``nullable``, an error otherwise."""
    require_columns(table, path, [column])
    col = table.column(column).combine_chunks()
    empty = pc.equal(col, "")
    ok = pc.match_substring_regex(col, _PATTERN[kind])
    bad = pc.invert(pc.or_(ok, empty) if nullable else ok)
    n_bad = pc.sum(bad).as_py() or 0
    if n_bad:
        i = pc.index(bad, True).as_py()
        raise fail(
            path, column, f"values not parsable as {_WORDS[kind]} (first {col[i].as_py()!r} at data row {i + 1})", n_bad
        )
    return pc.cast(pc.if_else(empty, pa.scalar(None, pa.string()), col) if nullable else col, _TYPE[kind])


def parses_as(col: pa.ChunkedArray | pa.Array, kind: Kind) -> bool:
    """Whether every cell of a text column parses as ``kind`` (for columns whose type is not fixed)."""
    return bool(pc.all(pc.match_substring_regex(col, _PATTERN[kind])).as_py())


def fields_text(fields: list[tuple[str, pa.Array | pa.ChunkedArray]], sep: str = ", ", kv: str = " ") -> pa.Array:
    """Per row, the non-null, non-empty fields as ``label<kv>value`` joined by ``sep``: the text of
    an entity that has no prose, e.g. ``"item 12, category 3, shop 7, brand 5"``. Whole floats are
    written without a decimal point."""
    labels = [label for label, _ in fields]
    rows = zip(*(col.to_pylist() for _, col in fields))
    return pa.array(
        [sep.join(f"{lab}{kv}{_word(v)}" for lab, v in zip(labels, row) if v is not None and v != "") for row in rows],
        pa.string(),
    )


def _word(v: object) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def first_rows(table: pa.Table, key: str) -> pa.Table:
    """One row per distinct ``key``: its first occurrence, in order of first appearance."""
    _, first = np.unique(table.column(key).to_numpy(), return_index=True)
    return table.take(pa.array(np.sort(first)))
