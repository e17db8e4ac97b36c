"""Census-Income (KDD) loader: the MMoE tasks on the real 1,891-record head sample, and bad sources."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
from shared_data import assert_fails_cleanly, shared_data

from mtrec.data.census import convert, read_names
from mtrec.data.contract import read_tasks, validate

DATA = "census-income.data.head1891"


def test_label_rates_match_source(tmp_path: Path) -> None:
    out = convert(shared_data("census-income"), tmp_path / "census")
    assert validate(out) == []
    inter = pq.read_table(out / "interactions.parquet").to_pandas()
    items = pq.read_table(out / "items.parquet").to_pandas()
    assert len(inter) == 1891 and inter.income.sum() == 102 and inter.marital.sum() == 824  # SOURCE.md counts
    assert [t.name for t in read_tasks(out)] == ["income", "marital"]
    assert (inter.user_id == inter.item_id).all() and inter.item_id.is_unique
    assert inter.split.value_counts().to_dict() == {"train": 1513, "valid": 189, "test": 189}
    first = items.set_index("item_id").loc[0]
    assert first.text.startswith("age: 73, sex: Female, education: High school graduate,")
    assert first.age == 73.0 and first.weeks_worked_in_year == 0.0 and first.class_of_worker == "Not in universe"
    assert "Not in universe" not in first.text and "class of worker" not in first.text  # "does not apply" left out
    assert not any(c.startswith(("marital", "income", "instance")) for c in items)  # no label, no sampling weight
    assert not items.text.str.contains("marital stat|50000|Never married|instance weight").any()


def test_names_file_gives_kinds() -> None:
    kinds = read_names(shared_data("census-income") / "census-income.names")
    assert len(kinds) == 41 and list(kinds)[:2] == ["age", "class of worker"]
    continuous = [a for a, k in kinds.items() if k == "continuous"]
    assert len(continuous) == 8  # the 7 the file counts, plus the instance weight


def _src(tmp_path: Path, data_lines: int, test_lines: int = 0) -> Path:
    real = shared_data("census-income")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(real / "census-income.names", src / "census-income.names")
    lines = (real / DATA).read_text().splitlines()
    (src / "census-income.data").write_text("\n".join(lines[:data_lines]) + "\n")
    if test_lines:
        (src / "census-income.test").write_text("\n".join(lines[data_lines : data_lines + test_lines]) + "\n")
    return src


def test_test_file_is_split_into_valid_and_test_by_seed(tmp_path: Path) -> None:
    src = _src(tmp_path, 100, 60)
    splits = []
    for seed in (0, 0, 1):
        out = convert(src, tmp_path / f"out{len(splits)}", seed=seed)
        splits.append(pq.read_table(out / "interactions.parquet").column("split").to_pylist())
    assert splits[0][:100] == ["train"] * 100
    assert splits[0][100:].count("valid") == 30 and splits[0][100:].count("test") == 30
    assert splits[0] == splits[1] and splits[0] != splits[2]


def _assert_fails(src: Path, out: Path, *fragments: str) -> None:
    assert_fails_cleanly(convert, src, out, *fragments)


def test_bad_sources_name_file_and_column(tmp_path: Path) -> None:
    src = _src(tmp_path, 20)
    data = src / "census-income.data"
    good = data.read_text()
    data.write_text(good.replace("73, Not in universe", "seventy, Not in universe", 1))
    _assert_fails(src, tmp_path / "o1", "census-income.data", "column 'age'", "'seventy'", "data row 1")
    data.write_text(good.replace("- 50000.", "maybe.", 1))
    _assert_fails(src, tmp_path / "o2", "census-income.data", "column 'income'", "'maybe'")
    data.write_text(good.replace(", 95, - 50000.", ", - 50000.", 1))
    _assert_fails(src, tmp_path / "o3", "census-income.data", "Expected 42 columns")
    data.write_text(good)
    (src / "census-income.names").unlink()
    _assert_fails(src, tmp_path / "o4", "census-income.names", "missing")
