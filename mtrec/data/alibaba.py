"""Ali-CCP (Ma et al., ESMM, SIGIR 2018) and AliExpress (Li et al., CIKM 2020) in the data contract.

Both come as torch-rechub CSV slices with two ESMM-style labels (a conversion implies a click) and
no text and no timestamps: item text is written from the item's categorical fields in words, row
order (train, then valid, then test files) stands in for time, and each file gives the split.
Categorical fields go to their entity (users/items, integer = categorical side columns); numeric
fields stay per interaction (numeric features, contract point 2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrec.config import TaskSpec
from mtrec.data.contract import write_dataset
from mtrec.data.source import fail, fields_text, find_file, first_rows, parse, read_text, require_columns
from mtrec.data.splits import mark_cold_items

# Ali-CCP field ids (Tianchi dataset 408 field guide) -> side-column name / words in the item text.
CCP_USER = {
    "121": "profile_category", "122": "profile_group", "124": "gender", "125": "age",
    "126": "consumption_level_1", "127": "consumption_level_2", "128": "occupation", "129": "geography_level",
    "109_14": "history_category", "110_14": "history_shop", "127_14": "history_brand", "150_14": "history_intention",
}  # fmt: skip
CCP_ITEM = {"206": "category", "207": "shop", "210": "intention node", "216": "brand"}
CCP_DENSE = ("D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853")
CCP_FILES = {
    s: (f"ali_ccp_{f}.csv", f"ali_ccp_{f}_sample.csv")
    for s, f in (("train", "train"), ("valid", "val"), ("test", "test"))
}
CCP_TASKS = [
    TaskSpec("click", "binary", fusion_weight=1.0),
    TaskSpec("purchase", "binary", depends_on="click", fusion_weight=3.0),
]

# AliExpress: search_id, 16 categorical, 63 numerical fields. Fields 1-9 and 16 are constant within
# a search (query/user side), 10-15 vary across the impressions of a search (item side).
AE_USER = tuple(f"categorical_{i}" for i in (*range(1, 10), 16))
AE_ITEM = tuple(f"categorical_{i}" for i in range(10, 16))
AE_DENSE = tuple(f"numerical_{i}" for i in range(1, 64))
AE_FILES = {s: (f"aliexpress_{s}.csv", f"aliexpress_{s}_sample.csv", f"{s}.csv") for s in ("train", "test")}
AE_VALID_FRACTION = 0.1  # the tail of the train file by row order; the release has no validation file
AE_TASKS = [
    TaskSpec("click", "binary", fusion_weight=1.0),
    TaskSpec("conversion", "binary", depends_on="click", fusion_weight=3.0),
]


def convert_ali_ccp(src: Path, out: Path, seed: int = 0, force: bool = False) -> Path:
    """Ali-CCP CSVs (``ali_ccp_{train,val,test}[_sample].csv``) -> dataset at ``out``. Field 101 is
    the user, 205 the item, 301 the position (context). The categorical cross fields 508/509/702/853
    are left out; their numeric values (``D508``...) are kept. Deterministic; ``seed`` is unused."""
    t = _read(Path(src), CCP_FILES, ["101", "205", "301", *CCP_USER, *CCP_ITEM], CCP_DENSE, ("click", "purchase"))
    users = first_rows(t.select(["101", *CCP_USER]).rename_columns(["user_id", *CCP_USER.values()]), "user_id")
    names = [n.replace(" ", "_") for n in CCP_ITEM.values()]
    items = first_rows(t.select(["205", *CCP_ITEM]).rename_columns(["item_id", *names]), "item_id")
    text = fields_text(
        [("item", items.column("item_id"))] + [(w, items.column(n)) for w, n in zip(CCP_ITEM.values(), names)]
    )
    context = pa.array(["position " + str(p) for p in t.column("301").to_pylist()], pa.string())
    inter = t.select(["101", "205", "click", "purchase", *CCP_DENSE, "split"]).rename_columns(
        ["user_id", "item_id", "click", "purchase", *CCP_DENSE, "split"]
    )
    inter = inter.append_column("context", context)
    return _write(out, inter, items.append_column("text", text), users, CCP_TASKS, force)


def convert_aliexpress(src: Path, out: Path, seed: int = 0, force: bool = False) -> Path:
    """AliExpress CSVs (``aliexpress_{train,test}[_sample].csv``) -> dataset at ``out``. There is no
    user or item id: the search (``search_id``) stands for the user, and an item is a distinct
    combination of the item-side categorical fields. Deterministic; ``seed`` is unused."""
    t = _read(Path(src), AE_FILES, ["search_id", *AE_USER, *AE_ITEM], AE_DENSE, ("click", "conversion"))
    keys = np.stack([t.column(c).to_numpy() for c in AE_ITEM], axis=1)
    _, first, code = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))  # ids in order of first appearance
    item_id = pa.array(rank[code.ravel()], pa.int64())
    items = first_rows(t.select(AE_ITEM).add_column(0, "item_id", item_id), "item_id")
    text = fields_text(
        [("item profile", items.column("item_id"))] + [(c.replace("_", " "), items.column(c)) for c in AE_ITEM]
    )
    users = first_rows(t.select(["search_id", *AE_USER]).rename_columns(["user_id", *AE_USER]), "user_id")
    split = t.column("split").to_numpy(zero_copy_only=False).copy()
    train = np.flatnonzero(split == "train")
    split[train[len(train) - round(AE_VALID_FRACTION * len(train)) :]] = "valid"
    inter = pa.table(
        {
            "user_id": t.column("search_id"),
            "item_id": item_id,
            **{c: t.column(c) for c in ("click", "conversion", *AE_DENSE)},
            "split": pa.array(split, pa.string()),
        }
    )
    return _write(out, inter, items.append_column("text", text), users, AE_TASKS, force)


def _read(
    src: Path, files: dict[str, tuple[str, ...]], ints: list[str], floats: tuple[str, ...], labels: tuple[str, str]
) -> pa.Table:
    """The split files parsed and concatenated in order, with a ``split`` column. ``labels`` is
    (click, conversion): a conversion without a click is bad source data (ESMM needs the chain)."""
    parts = []
    for split, names in files.items():
        path = find_file(src, *names)
        raw = read_text(path)
        require_columns(raw, path, [*labels, *ints, *floats])
        t = pa.table(
            {
                **{c: parse(raw, path, c, "binary") for c in labels},
                **{c: parse(raw, path, c, "int") for c in ints},
                **{c: parse(raw, path, c, "float") for c in floats},
                "split": pa.array([split] * raw.num_rows, pa.string()),
            }
        )
        click, conversion = (t.column(c) for c in labels)
        broken = pc.sum(pc.and_(pc.equal(conversion, 1), pc.equal(click, 0))).as_py()
        if broken:
            raise fail(path, labels[1], f"{labels[1]}=1 on rows with {labels[0]}=0", broken)
        parts.append(t)
    return pa.concat_tables(parts)


def _write(out: Path, inter: pa.Table, items: pa.Table, users: pa.Table, tasks: list[TaskSpec], force: bool) -> Path:
    """Row order is the only time there is: timestamps 0..N-1."""
    inter = inter.append_column("timestamp", pa.array(np.arange(inter.num_rows), pa.int64()))
    return write_dataset(out, mark_cold_items(inter), items, tasks, users=users, force=force)
