"""UCI Census-Income (KDD) in the data contract: the two tasks of MMoE (Ma et al., KDD 2018),
``income`` (> 50K) and ``marital`` (never married).

Each record is one interaction between a user and an item of its own (record ``i`` is user ``i``
and item ``i``); the item's text states the person's attributes in words, so a language model
reads the tabular row as text. Column names and kinds come from ``census-income.names``.
Continuous fields are also float side columns, nominal ones string side columns; the two labels
and the ``instance weight`` (a sampling weight, not a feature) are in neither. Without a
``census-income.test`` file the records (UCI's file order) are split 80/10/10 by row order; with it,
the data file is train and the test file is split in halves, at random by ``seed``, into valid and
test (the protocol of the MMoE paper).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrec.config import TaskSpec
from mtrec.data.contract import write_dataset
from mtrec.data.source import fail, fields_text, find_file, parse, read_text
from mtrec.data.splits import mark_cold_items, time_split

TASKS = [TaskSpec("income", "binary"), TaskSpec("marital", "binary")]
INCOME = "income"
MARITAL = "marital stat"
IGNORED = ("instance weight",)
# The text leads with what a reader weighs first, since an encoder truncates (max_length); numeric
# recodes mean nothing in words and stay side columns only.
TEXT_FIRST = (
    "age", "sex", "education", "class of worker", "major occupation code", "major industry code",
    "weeks worked in year", "wage per hour", "capital gains", "capital losses", "dividends from stocks",
    "full or part time employment stat", "tax filer stat", "detailed household summary in household",
)  # fmt: skip
TEXT_SKIP = ("detailed industry recode", "detailed occupation recode")
NOT_APPLICABLE = re.compile(r"^(Not in universe.*|\?|NA)$")  # left out of the text: "does not apply"


def convert(src: Path, out: Path, seed: int = 0, force: bool = False) -> Path:
    """``src`` holds ``census-income.names`` and ``census-income.data`` (or the
    ``census-income.data.head1891`` sample), optionally ``census-income.test``."""
    src = Path(src)
    attributes = read_names(find_file(src, "census-income.names"))
    data = find_file(src, "census-income.data", "census-income.data.head1891")
    parts = [_read(data, attributes)]
    if (src / "census-income.test").is_file():
        parts.append(_read(src / "census-income.test", attributes))
    rows = pa.concat_tables(parts)
    n = rows.num_rows
    ids = pa.array(np.arange(n), pa.int64())
    features = [a for a in attributes if a not in (MARITAL, *IGNORED)]
    in_text = [a for a in TEXT_FIRST if a in features] + [a for a in features if a not in (*TEXT_FIRST, *TEXT_SKIP)]
    shown = [(a, _applicable(rows.column(a)) if attributes[a] == "nominal" else rows.column(a)) for a in in_text]
    text = fields_text(shown, kv=": ")
    items = pa.table({"item_id": ids, "text": text, **{_snake(a): rows.column(a) for a in features}})
    inter = pa.table(
        {
            "user_id": ids,
            "item_id": ids,
            "timestamp": ids,
            "income": pc.cast(pc.starts_with(rows.column(INCOME), "50000+"), pa.int8()),
            "marital": pc.cast(pc.equal(rows.column(MARITAL), "Never married"), pa.int8()),
        }
    )
    if len(parts) == 1:
        inter = time_split(inter)
    else:
        n_train, rng = parts[0].num_rows, np.random.default_rng(seed)
        split = np.array(["train"] * n_train + ["test"] * (n - n_train), dtype=object)
        held = n_train + rng.permutation(n - n_train)
        split[held[: len(held) // 2]] = "valid"
        inter = mark_cold_items(inter.append_column("split", pa.array(split, pa.string())))
    return write_dataset(out, inter, items, TASKS, force=force)


def read_names(path: Path) -> dict[str, str]:
    """Attribute name -> "continuous" or "nominal", in file order, from the UCI ``.names`` file
    (lines ``name: continuous.`` or ``name: v1, v2, ... .``; ``|`` starts a comment)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("|") or ":" not in line:
            continue
        name, values = line.split(":", 1)
        out[name.strip()] = "continuous" if values.strip() == "continuous." else "nominal"
    if MARITAL not in out:
        raise fail(path, MARITAL, "attribute is missing from the attribute list")
    return out


def _read(path: Path, attributes: dict[str, str]) -> pa.Table:
    """The records of one data file: nominal fields as text, continuous ones as float64, and the
    income label (its last field, without the closing period)."""
    raw = read_text(path, [*attributes, INCOME])
    income = pc.utf8_rtrim(raw.column(INCOME), ".")
    bad = pc.invert(pc.is_in(income, pa.array(["- 50000", "50000+"])))
    if pc.any(bad).as_py():
        first = pc.filter(income, bad)[0].as_py()
        raise fail(path, INCOME, f"values other than '- 50000.' / '50000+.' (first {first!r})", pc.sum(bad).as_py())
    return pa.table(
        {
            **{
                a: parse(raw, path, a, "float") if kind == "continuous" else raw.column(a)
                for a, kind in attributes.items()
            },
            INCOME: income,
        }
    )


def _applicable(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Null where the value only says the attribute does not apply ("Not in universe", "?")."""
    return pc.if_else(pc.match_substring_regex(col, NOT_APPLICABLE.pattern), pa.scalar(None, pa.string()), col)


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
