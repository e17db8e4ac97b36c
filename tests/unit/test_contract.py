"""The data contract: every bad-data case gets an error naming file, column and row count."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtrec.config import TaskSpec
from mtrec.data.contract import (
    INTERACTIONS,
    ITEMS,
    TASKS,
    USERS,
    DataError,
    atomic_dir,
    check,
    read_tasks,
    review,
    validate,
    write_dataset,
)
from mtrec.data.splits import time_split

TASK_LIST = [TaskSpec("click"), TaskSpec("buy", depends_on="click"), TaskSpec("rating", kind="regression")]


def _tables():
    inter = pa.table(
        {
            "user_id": pa.array([1, 1, 2, 2, 3, 3], pa.int64()),
            "item_id": pa.array([10, 11, 10, 12, 11, 12], pa.int64()),
            "timestamp": pa.array([1, 2, 3, 4, 5, 6], pa.int64()),
            "click": pa.array([1, 0, 1, 1, 0, 1], pa.int8()),
            "buy": pa.array([1, 0, 0, 1, 0, 0], pa.int8()),
            "rating": pa.array([4.0, None, 3.5, 5.0, None, 2.0], pa.float32()),
        }
    )
    items = pa.table({"item_id": pa.array([10, 11, 12], pa.int64()), "text": ["a red dress", "blue jeans", "a hat"]})
    users = pa.table({"user_id": pa.array([1, 2, 3], pa.int64()), "age": [20, 30, 40]})
    return inter, items, users


@pytest.fixture
def dataset(tmp_path) -> Path:
    inter, items, users = _tables()
    return write_dataset(tmp_path / "ds", inter, items, TASK_LIST, users=users)


def _rewrite(path: Path, file: str, table: pa.Table) -> None:
    pq.write_table(table, path / file)


def _only(problems, file, column):
    hits = [p for p in problems if p.file.endswith(file) and p.column == column]
    assert hits, f"no problem reported for {file}:{column}; got {[str(p) for p in problems]}"
    return hits[0]


def test_valid_dataset_has_no_problems(dataset):
    assert validate(dataset) == []
    assert [t.name for t in check(dataset)] == ["click", "buy", "rating"]


def test_missing_file(dataset):
    (dataset / ITEMS).unlink()
    p = _only(validate(dataset), ITEMS, None)
    assert "missing" in p.message


def test_missing_column(dataset):
    inter, _, _ = _tables()
    _rewrite(dataset, INTERACTIONS, inter.drop_columns(["timestamp"]))
    assert "missing" in _only(validate(dataset), INTERACTIONS, "timestamp").message


def test_wrong_type(dataset):
    inter, _, _ = _tables()
    ts = inter.column_names.index("timestamp")
    _rewrite(dataset, INTERACTIONS, inter.set_column(ts, "timestamp", pa.array(["x"] * 6)))
    p = _only(validate(dataset), INTERACTIONS, "timestamp")
    assert p.rows == 6 and "int64" in p.message


def test_nan_and_out_of_range_labels(dataset):
    inter, _, _ = _tables()
    i = inter.column_names.index("rating")
    inter = inter.set_column(i, "rating", pa.array([4.0, float("nan"), float("nan"), 5.0, None, 2.0]))
    j = inter.column_names.index("click")
    inter = inter.set_column(j, "click", pa.array([1, 0, 2, 1, 3, 1], pa.int8()))
    _rewrite(dataset, INTERACTIONS, inter)
    problems = validate(dataset)
    nan = _only(problems, INTERACTIONS, "rating")
    assert nan.rows == 2 and "NaN" in nan.message
    rng = _only(problems, INTERACTIONS, "click")
    assert rng.rows == 2 and "0/1" in rng.message


def test_unknown_item(dataset):
    inter, _, _ = _tables()
    i = inter.column_names.index("item_id")
    _rewrite(dataset, INTERACTIONS, inter.set_column(i, "item_id", pa.array([10, 11, 99, 98, 11, 12], pa.int64())))
    p = _only(validate(dataset), INTERACTIONS, "item_id")
    assert p.rows == 2 and ITEMS in p.message


def test_empty_text_and_duplicate_ids(dataset):
    items = pa.table({"item_id": pa.array([10, 11, 12, 12], pa.int64()), "text": ["a", "  ", None, "c"]})
    _rewrite(dataset, ITEMS, items)
    problems = validate(dataset)
    assert _only(problems, ITEMS, "text").rows == 2
    dup = _only(problems, ITEMS, "item_id")
    assert dup.rows == 1 and "e.g. 12" in dup.message


def test_duplicate_users(dataset):
    _rewrite(dataset, USERS, pa.table({"user_id": pa.array([1, 2, 2, 3], pa.int64())}))
    assert _only(validate(dataset), USERS, "user_id").rows == 1


def test_every_problem_is_reported_at_once(dataset):
    inter, _, _ = _tables()
    _rewrite(dataset, INTERACTIONS, inter.drop_columns(["buy", "timestamp"]))
    (dataset / ITEMS).unlink()
    with pytest.raises(DataError) as e:
        check(dataset)
    msg = str(e.value)
    assert "3 data problems" in msg
    assert "'buy'" in msg and "'timestamp'" in msg and ITEMS in msg


@pytest.mark.parametrize(
    "yaml_text, fragment",
    [
        ("tasks: []", "non-empty list"),
        ("tasks:\n- {name: a}\n- {name: a}", "appears 2 times"),
        ("tasks:\n- {name: a, depends_on: b}", "unknown task 'b'"),
        ("tasks:\n- {name: a, kind: ordinal}", "not one of"),
        ("tasks:\n- {name: a, depends_on: b}\n- {name: b, depends_on: a}", "cycle"),
        ("tasks:\n- {name: a, kind: regression}\n- {name: b, depends_on: a}", "not binary"),
        ("tasks:\n- {name: a, weight: 2}", "unknown key"),
    ],
)
def test_bad_task_files(tmp_path, yaml_text, fragment):
    (tmp_path / TASKS).write_text(yaml_text)
    with pytest.raises(DataError) as e:
        read_tasks(tmp_path)
    assert fragment in str(e.value) and TASKS in str(e.value)


def test_every_broken_task_entry_is_reported(tmp_path):
    (tmp_path / TASKS).write_text(
        "tasks:\n- {name: a, kind: ordinal}\n- {name: b, weight: 2}\n- {name: c, depends_on: zz}\n"
        "- {name: d, depends_on: a}\n- {name: c}"
    )
    with pytest.raises(DataError) as e:
        read_tasks(tmp_path)
    messages = [p.message for p in e.value.problems]
    assert len(messages) == 4, messages
    assert messages[0].startswith("entry 1 (task 'a'): kind: 'ordinal' is not one of")
    assert messages[1].startswith("entry 2 (task 'b'): unknown key weight; valid keys: name, kind, label")
    # d depends on the broken entry a: that counts as a's problem, not as an unknown task (4 problems, not 5)
    assert messages[2:] == ["task name 'c' appears 2 times", "task 'c' depends on unknown task 'zz'"]


def test_task_file_that_is_not_yaml(tmp_path):
    (tmp_path / TASKS).write_text("tasks: [ {name: a\n")
    with pytest.raises(DataError, match="not valid YAML"):
        read_tasks(tmp_path)


def test_dependent_task_positive_where_its_parent_is_zero(dataset):
    inter, _, _ = _tables()
    j = inter.column_names.index("buy")
    _rewrite(dataset, INTERACTIONS, inter.set_column(j, "buy", pa.array([1, 1, 0, 1, 1, 0], pa.int8())))
    p = _only(validate(dataset), INTERACTIONS, "buy")
    assert p.rows == 2 and p.message == "task 'buy' depends on 'click', yet is positive where 'click' is 0"


@pytest.mark.parametrize(
    "column, rows, fragment",
    [
        (pa.array([1_700_000_000_000 + i for i in range(6)], pa.int64()), 6, "look like milliseconds"),
        (pa.array([1_700_000_000 + i for i in range(5)] + [1_700_000_000_000_000], pa.int64()), 1, "microseconds"),
        (pa.array([1_700_000_000_000_000_000 + i for i in range(6)], pa.timestamp("ns")), 6,
         "found timestamp[ns]; cast it to int64 and divide by 1,000,000,000"),
        (pa.array(list(range(6)), pa.timestamp("ms")), 6, "found timestamp[ms]; cast it to int64 and divide by 1,000"),
    ],
)  # fmt: skip
def test_timestamps_in_a_finer_unit_get_a_hint(dataset, column, rows, fragment):
    inter, _, _ = _tables()
    _rewrite(dataset, INTERACTIONS, inter.set_column(inter.column_names.index("timestamp"), "timestamp", column))
    p = _only(validate(dataset), INTERACTIONS, "timestamp")
    assert p.rows == rows and fragment in p.message, p.message


def test_an_empty_split_is_a_warning_not_an_error(dataset):
    inter, _, _ = _tables()
    _rewrite(dataset, INTERACTIONS, inter.append_column("split", pa.array(["train"] * 5 + ["test"])))
    assert validate(dataset) == []
    found = review(dataset)
    assert found.errors == [] and [str(w) for w in found.warnings] == [
        f"{dataset / INTERACTIONS}, column 'split': no 'valid' rows: its metrics will be empty "
        "(drop the column to split by time)"
    ]


def test_write_dataset_never_replaces_a_directory_it_did_not_write(tmp_path):
    from mtrec.io import OUTPUT_MARKER, OutputError

    inter, items, users = _tables()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "interactions.parquet").write_text("the user's own")
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="interactions.parquet, notes.txt"):
        write_dataset(mine, inter, items, TASK_LIST, users=users)
    assert (mine / "interactions.parquet").read_text() == "the user's own"
    write_dataset(mine, inter, items, TASK_LIST, users=users, force=True)
    assert validate(mine) == [] and (mine / "notes.txt").read_text() == "mine"  # same names replaced, others kept
    assert not (mine / OUTPUT_MARKER).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path, dataset):
    before = sorted(p.name for p in dataset.iterdir())
    inter, items, _ = _tables()
    bad_items = items.set_column(1, "text", pa.array(["", "", ""]))
    with pytest.raises(DataError):
        write_dataset(dataset, inter, bad_items, TASK_LIST)
    assert sorted(p.name for p in dataset.iterdir()) == before
    assert validate(dataset) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "fresh") as tmp:
            (tmp / "half.parquet").write_text("x")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "fresh").exists()


def test_time_split_and_cold_items():
    n = 100
    inter = pa.table(
        {
            "user_id": pa.array([i % 7 for i in range(n)], pa.int64()),
            "item_id": pa.array([i // 10 for i in range(n)], pa.int64()),  # item k first seen at t=10k
            "timestamp": pa.array(list(range(n)), pa.int64()),
        }
    )
    out = time_split(inter, valid_fraction=0.1, test_fraction=0.2)
    split = out.column("split").to_pylist()
    ts = out.column("timestamp").to_pylist()
    assert split.count("train") == 70 and split.count("valid") == 10 and split.count("test") == 20
    assert max(t for t, s in zip(ts, split) if s == "train") < min(t for t, s in zip(ts, split) if s != "train")
    cold = out.column("cold_item").to_pylist()
    assert all(c == (item >= 7) for c, item in zip(cold, out.column("item_id").to_pylist()))


def test_atomic_write_text_keeps_the_old_contents_when_the_write_fails(tmp_path, monkeypatch):
    from mtrec.io import atomic_write_text

    target = tmp_path / "sub" / "state.json"
    atomic_write_text(target, "old")
    assert target.read_text() == "old"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("mtrec.io.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]  # no temporary file left behind
