"""The shared reading helpers of the loaders (mtrec.data.source)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from mtrec.data.source import fields_text, first_rows, parse, read_text
from mtrec.errors import DataError


def test_read_text_header_quotes_and_trim(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text('id,tag, name\n1,"3,21", x \n2,,y\n')
    t = read_text(p)
    assert t.column_names == ["id", "tag", "name"]
    assert t.column("tag").to_pylist() == ["3,21", ""] and t.column("name").to_pylist() == ["x", "y"]


def test_read_text_multichar_delimiter_latin1(tmp_path: Path) -> None:
    p = tmp_path / "m.dat"
    p.write_bytes("1::Misérables: Les (1995)::Drama\n".encode("latin-1"))
    t = read_text(p, ["id", "title", "genres"], "::", "latin-1")
    assert t.column("title").to_pylist() == ["Misérables: Les (1995)"]


def test_parse_kinds_and_errors(tmp_path: Path) -> None:
    t = pa.table({"a": ["1", "-2", ""], "b": ["0.5", "1e3", "7"], "c": ["0", "1", "2"]})
    p = tmp_path / "f.csv"
    assert parse(t, p, "a", "int", nullable=True).to_pylist() == [1, -2, None]
    assert parse(t, p, "b", "float").to_pylist() == [0.5, 1000.0, 7.0]
    with pytest.raises(
        DataError, match=r"f.csv, column 'a': values not parsable as integers \(first '' at data row 3\) \(1 row\)"
    ):
        parse(t, p, "a", "int")
    with pytest.raises(DataError, match=r"column 'c': values not parsable as 0/1 \(first '2' at data row 3\)"):
        parse(t, p, "c", "binary")
    with pytest.raises(DataError, match="column 'z': required column is missing"):
        parse(t, p, "z", "int")


def test_fields_text_skips_missing_values_and_keeps_rows() -> None:
    # rows whose every field is missing stay (pyarrow's binary_join_element_wise "skip" drops them)
    text = fields_text(
        [("item", pa.array([12, None, 3])), ("size", pa.array([2.0, None, 0.5])), ("shop", pa.array(["", None, "x"]))]
    )
    assert text.to_pylist() == ["item 12, size 2", "", "item 3, size 0.5, shop x"]


def test_first_rows_in_order_of_first_appearance() -> None:
    t = pa.table({"k": [5, 3, 5, 1, 3], "v": ["a", "b", "c", "d", "e"]})
    assert first_rows(t, "k").to_pydict() == {"k": [5, 3, 1], "v": ["a", "b", "d"]}
