"""The data contract: a directory of Parquet files plus ``tasks.yaml``.

``interactions.parquet``  user_id, item_id, timestamp (int64 seconds), one column per task label
                          (0/1 or float, null where unobserved), optional ``split``
                          (train/valid/test), optional ``cold_item`` (bool), optional ``context`` text
``items.parquet``         item_id, text, optional side columns
``users.parquet``         (optional) user_id, optional text, optional side columns
``tasks.yaml``            ``tasks:`` a list of TaskSpec fields

Ids are int64 or string, the same type in every file. :func:`validate` checks every rule and returns
every problem, each naming the file, the column and the number of rows affected; :func:`check` raises
them together as one :class:`~mtrec.errors.DataError`; :func:`review` also returns warnings, for what
the contract allows but is rarely meant (a ``split`` column with no test rows). Writers go through :func:`mtrec.io.atomic_dir`, so a
failed write never leaves a half-written dataset posing as complete.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from mtrec.config import TASK_KINDS, Config, TaskSpec
from mtrec.errors import ConfigError, DataError
from mtrec.io import atomic_dir, check_output

INTERACTIONS = "interactions.parquet"
ITEMS = "items.parquet"
USERS = "users.parquet"
TASKS = "tasks.yaml"
SPLITS = ("train", "valid", "test")
RESERVED_INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "split", "cold_item", "context")


@dataclass(frozen=True)
class Problem:
    """One broken rule: where (file, column) and how many rows."""

    file: str
    column: str | None
    rows: int | None
    message: str

    def __str__(self) -> str:
        where = self.file + (f", column {self.column!r}" if self.column else "")
        count = f" ({self.rows:,} row{'s' if self.rows != 1 else ''})" if self.rows is not None else ""
        return f"{where}: {self.message}{count}"


# ---------------------------------------------------------------------------------------- tasks


def read_tasks(path: str | Path) -> list[TaskSpec]:
    """Read ``tasks.yaml`` (a dataset directory or the file itself) into TaskSpecs; a DataError lists
    every problem of every entry, not only the first."""
    p = Path(path)
    if p.is_dir():
        p = p / TASKS
    if not p.exists():
        raise DataError([Problem(str(p), None, None, "file is missing")])
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise DataError([Problem(str(p), None, None, f"not valid YAML: {e}")]) from e
    entries = raw.get("tasks") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError([Problem(str(p), "tasks", None, "expected a non-empty list under 'tasks:'")])
    tasks: list[TaskSpec] = []
    problems: list[Problem] = []
    unparsed: set[str] = set()
    for i, entry in enumerate(entries):
        try:
            tasks += Config.from_dict({"tasks": [entry]}).tasks
        except ConfigError as e:
            # Parsed one entry at a time, so every broken entry is reported; the config names it tasks[0].
            name = entry.get("name") if isinstance(entry, dict) else None
            label = f"entry {i + 1}" + (f" (task {name!r})" if isinstance(name, str) else "")
            problems.append(Problem(str(p), "tasks", None, f"{label}: {str(e).replace('tasks[0].', '')}"))
            if isinstance(name, str):
                unparsed.add(name)
    problems += task_problems(tasks, str(p), unparsed)
    if problems:
        raise DataError(problems)
    return tasks


def task_problems(tasks: list[TaskSpec], where: str = TASKS, unparsed: set[str] | None = None) -> list[Problem]:
    """Rules on the task list itself: unique names, known kinds, acyclic binary dependencies.

    ``unparsed`` names tasks whose entries were reported broken already: depending on one is not an
    unknown dependency.
    """
    out: list[Problem] = []
    names = [t.name for t in tasks]
    for n in sorted({n for n in names if names.count(n) > 1}):
        out.append(Problem(where, "name", None, f"task name {n!r} appears {names.count(n)} times"))
    by_name = {t.name: t for t in tasks}
    for t in tasks:
        if t.kind not in TASK_KINDS:
            out.append(Problem(where, "kind", None, f"task {t.name!r}: kind {t.kind!r} not in {TASK_KINDS}"))
        if t.depends_on is not None and t.depends_on not in (unparsed or set()):
            parent = by_name.get(t.depends_on)
            if parent is None:
                out.append(
                    Problem(where, "depends_on", None, f"task {t.name!r} depends on unknown task {t.depends_on!r}")
                )
            elif parent.kind != "binary":
                out.append(
                    Problem(
                        where, "depends_on", None, f"task {t.name!r} depends on {t.depends_on!r}, which is not binary"
                    )
                )
        if t.loss_weight < 0 or t.fusion_weight < 0:
            out.append(Problem(where, "loss_weight", None, f"task {t.name!r}: weights must be >= 0"))
    for t in tasks:  # cycles
        seen, cur = {t.name}, by_name.get(t.depends_on or "")
        while cur is not None:
            if cur.name in seen:
                out.append(Problem(where, "depends_on", None, f"dependency cycle through task {t.name!r}"))
                break
            seen.add(cur.name)
            cur = by_name.get(cur.depends_on or "")
    return out


def write_tasks(tasks: list[TaskSpec], path: str | Path) -> None:
    p = Path(path)
    if p.is_dir():
        p = p / TASKS
    p.write_text(yaml.safe_dump({"tasks": [dataclasses.asdict(t) for t in tasks]}, sort_keys=False))


# ---------------------------------------------------------------------------------------- writing


def write_dataset(
    out: str | Path,
    interactions: pa.Table,
    items: pa.Table,
    tasks: list[TaskSpec],
    users: pa.Table | None = None,
    extra: dict[str, str] | None = None,
    check_after: bool = True,
    force: bool = False,
) -> Path:
    """Write a whole dataset atomically; validate it first so nothing broken is published.

    ``out`` must be absent, empty or a directory ray-mtrec wrote, which is replaced whole (else
    :class:`~mtrec.io.OutputError`); with ``force`` another directory gets the dataset's files beside its
    own, which are kept (:func:`mtrec.io.atomic_dir`'s ``keep_foreign``).
    """
    check_output(out, force)
    with atomic_dir(out, keep_foreign=True) as tmp:
        pq.write_table(interactions, tmp / INTERACTIONS)
        pq.write_table(items, tmp / ITEMS)
        if users is not None:
            pq.write_table(users, tmp / USERS)
        write_tasks(tasks, tmp / TASKS)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        if check_after:
            check(tmp, display=Path(out))
    return Path(out)


# ---------------------------------------------------------------------------------------- reading


def load_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file; a missing or unreadable file is a DataError naming it."""
    p = Path(path)
    if not p.exists():
        raise DataError([Problem(str(p), None, None, "file is missing")])
    try:
        return pq.read_table(p, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError([Problem(str(p), None, None, f"not a readable Parquet file: {e}")]) from e


# ---------------------------------------------------------------------------------------- validation


def check(path: str | Path, display: Path | None = None) -> list[TaskSpec]:
    """Validate a dataset directory; raise one DataError listing every problem. Returns the tasks."""
    problems = validate(path, display=display)
    if problems:
        raise DataError(problems)
    return read_tasks(path)


def validate(path: str | Path, display: Path | None = None) -> list[Problem]:
    """Check every rule of the contract; return every problem found (empty when valid)."""
    return review(path, display).errors


@dataclass(frozen=True)
class Review:
    """What :func:`review` found: ``errors`` break the contract (training refuses the dataset);
    ``warnings`` are allowed but rarely meant (a split with no rows)."""

    errors: list[Problem]
    warnings: list[Problem]


def review(path: str | Path, display: Path | None = None) -> Review:
    """Check every rule of the contract and look for what is valid but suspicious; ``display`` is the
    path shown in messages (the published name of a dataset still being written)."""
    root = Path(path)
    shown = display or root
    name = lambda f: str(shown / f)  # noqa: E731 - the path users see in messages
    problems: list[Problem] = []
    if not root.is_dir():
        return Review([Problem(str(shown), None, None, "dataset directory does not exist")], [])

    tasks: list[TaskSpec] = []
    try:
        tasks = read_tasks(root)
    except DataError as e:
        problems += [dataclasses.replace(p, file=name(TASKS)) for p in e.problems]

    tables: dict[str, pa.Table] = {}
    for f in (INTERACTIONS, ITEMS, USERS):
        p = root / f
        if not p.exists():
            if f != USERS:
                problems.append(Problem(name(f), None, None, "file is missing"))
            continue
        try:
            tables[f] = pq.read_table(p)
        except (pa.ArrowInvalid, OSError) as e:
            problems.append(Problem(name(f), None, None, f"not a readable Parquet file: {e}"))

    items = tables.get(ITEMS)
    if items is not None:
        problems += check_entity(items, name(ITEMS), "item_id", text_required=True)
    users = tables.get(USERS)
    if users is not None:
        problems += check_entity(users, name(USERS), "user_id", text_required=False)
    inter = tables.get(INTERACTIONS)
    warnings: list[Problem] = []
    if inter is not None:
        problems += check_interactions(inter, name(INTERACTIONS), tasks)
        if items is not None:
            problems += check_foreign_ids(inter, items, "item_id", name(INTERACTIONS), name(ITEMS))
        if users is not None:
            problems += check_foreign_ids(inter, users, "user_id", name(INTERACTIONS), name(USERS))
        warnings += empty_splits(inter, name(INTERACTIONS))
    return Review(problems, warnings)


def _is_id_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def is_numeric_type(t: pa.DataType) -> bool:
    """Integer, floating or bool: a label column, or a numeric feature column."""
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def check_entity(t: pa.Table, file: str, id_col: str, text_required: bool) -> list[Problem]:
    out: list[Problem] = []
    if id_col not in t.column_names:
        return [Problem(file, id_col, None, "required column is missing")]
    ids = t.column(id_col)
    if not _is_id_type(ids.type):
        out.append(Problem(file, id_col, t.num_rows, f"must be int64 or string, found {ids.type}"))
    elif ids.null_count:
        out.append(Problem(file, id_col, ids.null_count, "null ids"))
    else:
        counts = pc.value_counts(ids)
        repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        if len(repeated):
            dup = t.num_rows - len(counts)
            out.append(Problem(file, id_col, dup, f"duplicate ids, e.g. {repeated[0].as_py()!r}"))
    if "text" not in t.column_names:
        if text_required:
            out.append(Problem(file, "text", None, "required column is missing"))
        return out
    text = t.column("text")
    if not _is_text_type(text.type):
        out.append(Problem(file, "text", t.num_rows, f"must be string, found {text.type}"))
        return out
    empty = pc.sum(pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_trim_whitespace(text), ""))).as_py() or 0
    if empty and text_required:
        out.append(Problem(file, "text", empty, "empty or null text"))
    return out


def check_interactions(t: pa.Table, file: str, tasks: list[TaskSpec]) -> list[Problem]:
    out: list[Problem] = []
    cols = t.column_names
    for c in ("user_id", "item_id"):
        if c not in cols:
            out.append(Problem(file, c, None, "required column is missing"))
        elif not _is_id_type(t.schema.field(c).type):
            out.append(Problem(file, c, t.num_rows, f"must be int64 or string, found {t.schema.field(c).type}"))
        elif t.column(c).null_count:
            out.append(Problem(file, c, t.column(c).null_count, "null ids"))
    out += _check_timestamps(t, file)
    if "split" in cols:
        s = t.column("split")
        if not _is_text_type(s.type):
            out.append(Problem(file, "split", t.num_rows, f"must be string, found {s.type}"))
        else:
            bad = pc.sum(pc.invert(pc.fill_null(pc.is_in(s, value_set=pa.array(SPLITS)), False))).as_py() or 0
            if bad:
                out.append(Problem(file, "split", bad, f"values outside {SPLITS}"))
    if "cold_item" in cols and not pa.types.is_boolean(t.schema.field("cold_item").type):
        out.append(Problem(file, "cold_item", t.num_rows, f"must be bool, found {t.schema.field('cold_item').type}"))
    if "context" in cols and not _is_text_type(t.schema.field("context").type):
        out.append(Problem(file, "context", t.num_rows, f"must be string, found {t.schema.field('context').type}"))
    for task in tasks:
        out += _check_label(t, file, task)
    return out + _check_dependencies(t, file, tasks)


# seconds since the epoch stay below 1e11 until the year 5138; above it, a finer unit (magnitude, unit, divisor)
_FINER_UNITS = ((1e17, "nanoseconds", 10**9), (1e14, "microseconds", 10**6), (1e11, "milliseconds", 10**3))
_ARROW_UNITS = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}


def _check_timestamps(t: pa.Table, file: str) -> list[Problem]:
    """``timestamp`` is int64 seconds: a temporal Arrow type or values in a finer unit get a conversion hint."""
    if "timestamp" not in t.column_names:
        return [Problem(file, "timestamp", None, "required column is missing")]
    col = t.column("timestamp")
    if pa.types.is_timestamp(col.type):
        divisor = _ARROW_UNITS[col.type.unit]
        how = "cast it to int64" + (f" and divide by {divisor:,}" if divisor > 1 else "")
        return [Problem(file, "timestamp", t.num_rows, f"must be int64 seconds, found {col.type}; {how}")]
    if not pa.types.is_integer(col.type):
        return [Problem(file, "timestamp", t.num_rows, f"must be int64 seconds, found {col.type}")]
    if col.null_count:
        return [Problem(file, "timestamp", col.null_count, "null timestamps")]
    top = pc.max(col).as_py()
    for magnitude, unit, divisor in _FINER_UNITS:
        if top is not None and top > magnitude:
            rows = pc.sum(pc.greater(col, int(magnitude))).as_py()
            message = f"values up to {top:,} look like {unit}, not seconds; divide by {divisor:,}"
            return [Problem(file, "timestamp", rows, message)]
    return []


def _check_dependencies(t: pa.Table, file: str, tasks: list[TaskSpec]) -> list[Problem]:
    """A task that ``depends_on`` another (ESMM: p(buy) = p(click) p(buy | click)) is never positive
    where its parent's label is 0."""
    by_name = {task.name: task for task in tasks}
    out: list[Problem] = []
    for task in tasks:
        parent = by_name.get(task.depends_on or "")
        if parent is None or not {task.label, parent.label} <= set(t.column_names):
            continue
        child_col, parent_col = t.column(task.label), t.column(parent.label)
        if not (is_numeric_type(child_col.type) and is_numeric_type(parent_col.type)):
            continue  # the label checks report the type
        child, par = pc.cast(child_col, pa.float64()), pc.cast(parent_col, pa.float64())
        bad = pc.sum(pc.fill_null(pc.and_(pc.greater(child, 0.0), pc.equal(par, 0.0)), False)).as_py() or 0
        if bad:
            message = f"task {task.name!r} depends on {parent.name!r}, yet is positive where {parent.label!r} is 0"
            out.append(Problem(file, task.label, bad, message))
    return out


def empty_splits(t: pa.Table, file: str) -> list[Problem]:
    """Warnings for a ``split`` column with no rows in one of train/valid/test (the metrics of that split
    would be empty); nothing when the column is absent (training splits by time) or not strings."""
    if "split" not in t.column_names or not _is_text_type(t.schema.field("split").type):
        return []
    present = set(pc.unique(t.column("split")).to_pylist())
    return [
        Problem(file, "split", None, f"no {s!r} rows: its metrics will be empty (drop the column to split by time)")
        for s in SPLITS
        if s not in present
    ]


def _check_label(t: pa.Table, file: str, task: TaskSpec) -> list[Problem]:
    if task.label not in t.column_names:
        return [Problem(file, task.label, None, f"label column of task {task.name!r} is missing")]
    col = t.column(task.label)
    if not is_numeric_type(col.type):
        return [Problem(file, task.label, t.num_rows, f"label must be numeric, found {col.type}")]
    if pa.types.is_boolean(col.type):
        return []
    x = pc.cast(col, pa.float64())
    out: list[Problem] = []
    if pa.types.is_floating(col.type):
        nan = pc.sum(pc.fill_null(pc.is_nan(x), False)).as_py() or 0
        if nan:
            out.append(Problem(file, task.label, nan, "NaN labels (use null for unobserved)"))
        inf = pc.sum(pc.fill_null(pc.is_inf(x), False)).as_py() or 0
        if inf:
            out.append(Problem(file, task.label, inf, "infinite labels"))
    if task.kind == "binary":
        ok = pc.or_kleene(pc.equal(x, 0.0), pc.equal(x, 1.0))
        bad = pc.sum(pc.invert(pc.fill_null(pc.or_kleene(ok, pc.is_nan(x)), True))).as_py() or 0
        if bad:
            out.append(Problem(file, task.label, bad, f"binary task {task.name!r} has labels other than 0/1"))
    if x.null_count == t.num_rows and t.num_rows:
        out.append(Problem(file, task.label, t.num_rows, f"task {task.name!r} has no observed label"))
    return out


def check_foreign_ids(inter: pa.Table, ent: pa.Table, col: str, file: str, ref_file: str) -> list[Problem]:
    if col not in inter.column_names or col not in ent.column_names:
        return []
    a, b = inter.column(col), ent.column(col)
    if not (_is_id_type(a.type) and _is_id_type(b.type)):
        return []
    if pa.types.is_integer(a.type) != pa.types.is_integer(b.type):
        return [Problem(file, col, inter.num_rows, f"id type {a.type} differs from {b.type} in {ref_file}")]
    if pa.types.is_integer(a.type):
        a, b = pc.cast(a, pa.int64()), pc.cast(b, pa.int64())
    missing = pc.sum(pc.invert(pc.fill_null(pc.is_in(a, value_set=b.combine_chunks()), True))).as_py() or 0
    if missing:
        return [Problem(file, col, missing, f"ids not present in {ref_file}")]
    return []
