"""Model examples from a dataset in the contract: vocabularies, histories, side features, labels.

:func:`prepare_examples` reads a dataset directory and writes, atomically, what training streams:

``{train,valid,test}.parquet``  one row per interaction, flat columns: ``user``, ``item`` (int64
                                indexes), ``history`` (list<int64> item indexes, oldest first),
                                ``context`` (int64, 0 = none), ``user_cat_<col>`` (int64),
                                ``user_num_<col>`` / ``inter_num_<col>`` (float32, standardised),
                                ``label_<task>`` (float32, NaN = unobserved), ``cold`` (bool)
``items.parquet``               the item catalog in index order: ``item_id``, ``text``,
                                ``item_cat_<col>``, ``item_num_<col>`` (row ``i`` is item index ``i + 1``)
``meta.json``                   :class:`FeatureMeta`: vocabularies, statistics, tasks, feature layout

Indexes. Row 0 of every table is padding / unknown. The ``item`` index is the item's position in the
catalog (``items.parquet``) plus one, so every item, cold or not, has a text vector. Id embeddings
use :class:`Vocab`: ids seen in the train split get their own row, any other id (a cold user or
item, or one first met at serving) shares one of ``cfg.model.id_buckets`` hashed rows after them, so
it still has an embedding row. Categorical side values get a row per value; unknown values map to 0.

History. For each interaction, the catalog indexes of the user's last ``cfg.data.max_history``
positive items (label 1 of the first binary task; every interaction when no task is binary) with a
timestamp strictly earlier than the interaction's own: nothing at the same or a later time leaks in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from mtrec.config import Config, TaskSpec
from mtrec.data.contract import (
    INTERACTIONS,
    ITEMS,
    RESERVED_INTERACTION_COLUMNS,
    SPLITS,
    USERS,
    Problem,
    is_numeric_type,
    load_table,
    read_tasks,
    task_problems,
)
from mtrec.data.splits import mark_cold_items, time_split
from mtrec.errors import DataError
from mtrec.io import atomic_dir

META_VERSION = 1
META = "meta.json"
CATALOG = "items.parquet"


SMALL_LOOKUP = 16  # Vocab.lookup of at most this many values goes through a dict


@dataclass
class Vocab:
    """Raw values to embedding rows. Row 0 is padding; ``values[i]`` gets row ``i + 1``.

    With ``buckets > 0`` any other value shares one of ``buckets`` hashed rows after the known ones:
    row ``len(values) + 1 + blake2b(str(value)) mod buckets`` (stable across processes and runs).
    With ``buckets == 0`` unknown values map to row 0.
    """

    values: list[Any]
    buckets: int = 0
    _index: pd.Index | None = field(default=None, init=False, repr=False, compare=False)
    _rows: dict[Any, int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_rows(self) -> int:
        return 1 + len(self.values) + self.buckets

    def lookup(self, raw: Sequence[Any] | np.ndarray) -> np.ndarray:
        """``(N,)`` raw values -> ``(N,)`` int64 rows."""
        raw = np.asarray(raw)
        if len(raw) <= SMALL_LOOKUP:  # a serving request's few ids: a dict beats building pandas' indexer
            if self._rows is None:
                self._rows = {v: i + 1 for i, v in enumerate(self.values)}
            rows = np.array([self._rows.get(v, 0) for v in raw.tolist()], dtype=np.int64)
        else:
            if self._index is None:
                self._index = pd.Index(self.values)
            rows = self._index.get_indexer(raw).astype(np.int64) + 1
        unknown = rows == 0
        if self.buckets and unknown.any():
            codes, uniques = pd.factorize(raw[unknown])
            hashed = np.array([_bucket(v, self.buckets) for v in uniques], dtype=np.int64)
            rows[unknown] = len(self.values) + 1 + hashed[codes]
        return rows


def _bucket(value: Any, buckets: int) -> int:
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


@dataclass
class FeatureMeta:
    """Everything the model and serving need to turn raw ids and columns into model inputs.

    The item arrays (``item_texts``, ``item_cat_values``, ``item_num_values``) live in the
    examples' ``items.parquet``; they are None when the meta comes from ``meta.json`` alone
    (a bundle, whose model keeps them as buffers).
    """

    tasks: list[TaskSpec]
    users: Vocab
    items: Vocab  # id-embedding vocabulary: items seen in training, plus hashed buckets
    item_ids: list[Any]  # the catalog: item index i + 1 is item_ids[i]
    contexts: list[str]  # context index i + 1 is contexts[i]
    user_cat: dict[str, Vocab]
    user_num: dict[str, tuple[float, float]]  # column -> (mean, std) of the raw values
    inter_num: dict[str, tuple[float, float]]
    item_cat: dict[str, Vocab]
    item_num: dict[str, tuple[float, float]]
    label_stats: dict[str, tuple[float, float]]  # regression task -> train (mean, std)
    max_history: int
    history_task: str | None
    counts: dict[str, int]
    item_texts: list[str] | None = None
    item_cat_values: np.ndarray | None = None  # (num_items + 1, len(item_cat)) int64
    item_num_values: np.ndarray | None = None  # (num_items + 1, len(item_num)) float32
    # regression task -> train (min, max): serving refuses feedback outside it. Empty in a meta written
    # before ranges were stored; serving then refuses that task's feedback and asks for a retrain.
    label_range: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def item_id_rows(self) -> np.ndarray:
        """``(num_items + 1,)`` int64: the id-embedding row of each item index (0 for padding)."""
        return np.concatenate([[0], self.items.lookup(np.asarray(self.item_ids, dtype=object))])

    def to_json(self) -> dict[str, Any]:
        vocab = lambda v: {"values": v.values, "buckets": v.buckets}  # noqa: E731
        return {
            "version": META_VERSION,
            "tasks": [dataclasses.asdict(t) for t in self.tasks],
            "users": vocab(self.users),
            "items": vocab(self.items),
            "item_ids": self.item_ids,
            "contexts": self.contexts,
            "user_cat": {k: vocab(v) for k, v in self.user_cat.items()},
            "user_num": self.user_num,
            "inter_num": self.inter_num,
            "item_cat": {k: vocab(v) for k, v in self.item_cat.items()},
            "item_num": self.item_num,
            "label_stats": self.label_stats,
            "label_range": self.label_range,
            "max_history": self.max_history,
            "history_task": self.history_task,
            "counts": self.counts,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = META) -> FeatureMeta:
        if d.get("version") != META_VERSION:
            raise DataError(
                [Problem(where, "version", None, f"meta version {d.get('version')!r}, expected {META_VERSION}")]
            )
        vocab = lambda v: Vocab(list(v["values"]), int(v["buckets"]))  # noqa: E731
        pair = lambda m: {k: (float(a), float(b)) for k, (a, b) in m.items()}  # noqa: E731
        tasks = [TaskSpec(**t) for t in d["tasks"]]
        return cls(
            tasks=tasks,
            users=vocab(d["users"]),
            items=vocab(d["items"]),
            item_ids=list(d["item_ids"]),
            contexts=list(d["contexts"]),
            user_cat={k: vocab(v) for k, v in d["user_cat"].items()},
            user_num=pair(d["user_num"]),
            inter_num=pair(d["inter_num"]),
            item_cat={k: vocab(v) for k, v in d["item_cat"].items()},
            item_num=pair(d["item_num"]),
            label_stats=pair(d["label_stats"]),
            label_range=pair(d.get("label_range", {})),
            max_history=int(d["max_history"]),
            history_task=d["history_task"],
            counts={k: int(v) for k, v in d["counts"].items()},
        )


@dataclass
class ExampleSet:
    """A prepared examples directory and its meta."""

    root: Path
    meta: FeatureMeta

    @classmethod
    def load(cls, root: str | Path) -> ExampleSet:
        root = Path(root)
        meta = FeatureMeta.from_json(json.loads((root / META).read_text()), str(root / META))
        catalog = load_table(root / CATALOG)
        meta.item_texts = catalog.column("text").to_pylist()
        meta.item_cat_values = _with_pad_row(_stack(catalog, [f"item_cat_{c}" for c in meta.item_cat], np.int64))
        meta.item_num_values = _with_pad_row(_stack(catalog, [f"item_num_{c}" for c in meta.item_num], np.float32))
        return cls(root, meta)

    def path(self, split: str) -> Path:
        return self.root / f"{split}.parquet"

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """All columns of one split as numpy; ``history`` as ``(N, max_history)`` int64, 0-padded."""
        table = load_table(self.path(split))
        out = {c: table.column(c).to_numpy() for c in table.column_names if c != "history"}
        out["history"] = pad_history(table.column("history").combine_chunks(), self.meta.max_history)
        return out


def _stack(table: pa.Table, columns: list[str], dtype: type) -> np.ndarray:
    if not columns:
        return np.zeros((table.num_rows, 0), dtype=dtype)
    return np.stack([table.column(c).to_numpy() for c in columns], axis=1).astype(dtype)


def _with_pad_row(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros((1, x.shape[1]), dtype=x.dtype), x])


def pad_history(history: pa.ListArray, length: int) -> np.ndarray:
    """A list<int64> array -> ``(N, length)`` int64 with the most recent item last, 0 on the left."""
    offsets = history.offsets.to_numpy()
    values = history.values.to_numpy()
    n = len(offsets) - 1
    out = np.zeros((n, length), dtype=np.int64)
    lens = np.minimum(np.diff(offsets), length)
    if length and lens.sum():
        rows = np.repeat(np.arange(n), lens)
        within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        out[rows, length - lens[rows] + within] = values[np.repeat(offsets[1:] - lens, lens) + within]
    return out


# ------------------------------------------------------------------------------- preparing examples


def prepare_examples(data_dir: str | Path, cfg: Config, out_dir: str | Path) -> ExampleSet:
    """Build the examples of a dataset (see the module docstring) and write them atomically."""
    data_dir = Path(data_dir)
    tasks = list(cfg.tasks) or read_tasks(data_dir)
    problems = task_problems(tasks, "cfg.tasks")
    if problems:
        raise DataError(problems)
    inter = load_table(data_dir / INTERACTIONS)
    if "split" not in inter.column_names:
        inter = time_split(inter, cfg.data.valid_fraction, cfg.data.test_fraction)
    elif "cold_item" not in inter.column_names:
        inter = mark_cold_items(inter)
    items = load_table(data_dir / ITEMS)
    users = load_table(data_dir / USERS) if (data_dir / USERS).exists() else None
    split = inter.column("split").to_numpy(zero_copy_only=False)
    train = split == "train"
    user_raw = inter.column("user_id").to_numpy(zero_copy_only=False)
    item_raw = inter.column("item_id").to_numpy(zero_copy_only=False)

    item_ids = items.column("item_id").to_pylist()
    item_index = pd.Index(item_ids).get_indexer(item_raw).astype(np.int64) + 1
    if (item_index == 0).any():
        raise DataError(
            [Problem(str(data_dir / INTERACTIONS), "item_id", int((item_index == 0).sum()), f"ids not in {ITEMS}")]
        )
    labels = {t.name: _float(inter.column(t.label)).astype(np.float32) for t in tasks}
    label_names = {t.label for t in tasks} | {t.label for t in read_tasks(data_dir)}  # never a feature
    inter_cols = [
        c
        for c in inter.column_names
        if c not in RESERVED_INTERACTION_COLUMNS
        and c not in label_names
        and is_numeric_type(inter.schema.field(c).type)
    ]
    history_task = next((t.name for t in tasks if t.kind == "binary"), None)
    positive = labels[history_task] == 1 if history_task else np.ones(inter.num_rows, dtype=bool)
    ts = inter.column("timestamp").to_numpy()

    user_vocab = Vocab(_unique(user_raw[train]), cfg.model.id_buckets)
    columns: dict[str, pa.Array | np.ndarray] = {
        "user": user_vocab.lookup(user_raw),
        "item": item_index,
        "history": user_history(user_raw, ts, item_index, positive, cfg.data.max_history),
    }
    contexts: list[str] = []
    if "context" in inter.column_names:
        ctx = pc.utf8_trim_whitespace(pc.fill_null(inter.column("context"), "")).to_numpy(zero_copy_only=False)
        contexts = sorted(set(_unique(ctx)) - {""})
        columns["context"] = Vocab(contexts).lookup(ctx)
    else:
        columns["context"] = np.zeros(inter.num_rows, dtype=np.int64)

    user_cat, user_num_cols = _side_columns(users, "user_id")
    user_num: dict[str, tuple[float, float]] = {}
    if users is not None:
        row = pd.Index(users.column("user_id").to_pylist()).get_indexer(user_raw)
        for c, v in user_cat.items():
            codes = np.concatenate([v.lookup(users.column(c).to_numpy(zero_copy_only=False)), [0]])
            columns[f"user_cat_{c}"] = codes[row]  # row -1 (user absent from users.parquet) -> 0
        for c in user_num_cols:
            raw = np.concatenate([_float(users.column(c)), [np.nan]])[row]
            user_num[c] = _stats(raw[train])
            columns[f"user_num_{c}"] = standardise(raw, user_num[c])
    inter_num = {}
    for c in inter_cols:
        raw = _float(inter.column(c))
        inter_num[c] = _stats(raw[train])
        columns[f"inter_num_{c}"] = standardise(raw, inter_num[c])
    for t in tasks:
        columns[f"label_{t.name}"] = labels[t.name]
    columns["cold"] = inter.column("cold_item").to_numpy(zero_copy_only=False).astype(bool)

    item_cat, item_num_cols = _side_columns(items, "item_id")
    item_num: dict[str, tuple[float, float]] = {}
    catalog: dict[str, Any] = {"item_id": items.column("item_id"), "text": items.column("text")}
    for c, v in item_cat.items():
        catalog[f"item_cat_{c}"] = v.lookup(items.column(c).to_numpy(zero_copy_only=False))
    for c in item_num_cols:
        raw = _float(items.column(c))
        item_num[c] = _stats(raw)
        catalog[f"item_num_{c}"] = standardise(raw, item_num[c])

    meta = FeatureMeta(
        tasks=tasks,
        users=user_vocab,
        items=Vocab(_unique(item_raw[train]), cfg.model.id_buckets),
        item_ids=item_ids,
        contexts=contexts,
        user_cat=user_cat,
        user_num=user_num,
        inter_num=inter_num,
        item_cat=item_cat,
        item_num=item_num,
        label_stats={t.name: _stats(labels[t.name][train]) for t in tasks if t.kind == "regression"},
        label_range={t.name: _range(labels[t.name][train]) for t in tasks if t.kind == "regression"},
        max_history=cfg.data.max_history,
        history_task=history_task,
        counts={s: int((split == s).sum()) for s in SPLITS},
    )
    table = pa.table({k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in columns.items()})
    with atomic_dir(out_dir) as tmp:
        for s in SPLITS:
            pq.write_table(table.filter(pa.array(split == s)), tmp / f"{s}.parquet")
        pq.write_table(pa.table(catalog), tmp / CATALOG)
        (tmp / META).write_text(json.dumps(meta.to_json()))
    return ExampleSet.load(out_dir)


def user_history(
    users: np.ndarray, ts: np.ndarray, items: np.ndarray, positive: np.ndarray, length: int
) -> pa.ListArray:
    """Per row: the user's last ``length`` positive items strictly before the row's timestamp.

    ``users`` (N,) raw ids, ``ts`` (N,) int64, ``items`` (N,) int64 indexes, ``positive`` (N,) bool.
    Returns a list<int64> array of N lists, oldest first.
    """
    user_code = pd.factorize(users)[0].astype(np.int64)
    ranks = np.unique(ts, return_inverse=True)[1].astype(np.int64).reshape(-1)
    span = int(ranks.max(initial=0)) + 1
    key = user_code * span + ranks  # orders by (user, time); equal keys are simultaneous
    pos_order = np.flatnonzero(positive)[np.argsort(key[positive], kind="stable")]
    pos_key, pos_item = key[pos_order], items[pos_order]
    end = np.searchsorted(pos_key, key, side="left")  # first positive at or after (user, time)
    start = np.searchsorted(pos_key, user_code * span, side="left")  # the user's first positive
    lens = np.minimum(end - start, length)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lens)
    values = pos_item[np.repeat(end - lens, lens) + within]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))


def _side_columns(table: pa.Table | None, id_col: str) -> tuple[dict[str, Vocab], list[str]]:
    """Side columns of users/items: integer or string -> categorical (a vocabulary over the table's
    values), float or bool -> numeric. The id and ``text`` columns are not side features."""
    cat: dict[str, Vocab] = {}
    num: list[str] = []
    if table is None:
        return cat, num
    for f in table.schema:
        if f.name in (id_col, "text"):
            continue
        if pa.types.is_integer(f.type) or pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            cat[f.name] = Vocab(sorted(pc.unique(table.column(f.name).drop_null()).to_pylist()))
        elif pa.types.is_floating(f.type) or pa.types.is_boolean(f.type):
            num.append(f.name)
    return cat, num


def _float(col: pa.ChunkedArray) -> np.ndarray:
    return pc.cast(col, pa.float64()).to_numpy()


def _unique(x: np.ndarray) -> list[Any]:
    return pd.unique(x).tolist()


def _stats(x: np.ndarray) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if not len(x):
        return 0.0, 1.0
    std = float(x.std())
    return float(x.mean()), std if std > 0 else 1.0


def _range(x: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of the finite values (``(0, 0)`` when there are none)."""
    x = x[np.isfinite(x)]
    return (float(x.min()), float(x.max())) if len(x) else (0.0, 0.0)


def standardise(x: np.ndarray, stats: tuple[float, float]) -> np.ndarray:
    mean, std = stats
    return np.nan_to_num((x - mean) / std, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------- batches


def collate(batch: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """One batch of example columns -> the model batch.

    ``user`` (B,), ``item`` (B,), ``history`` (B, L) 0 = padding, ``context`` (B,), ``user_cat``
    (B, C), ``user_num`` (B, F), ``inter_num`` (B, G), ``labels`` (B, T) NaN = unobserved, ``cold``
    (B,) bool. ``history`` may come as ``(B, L)`` ints or as B variable-length arrays (Ray Data).
    Column groups keep the order in which they appear in the batch (the order of the Parquet file).
    """
    n = len(batch["user"])
    group = lambda prefix, dtype: (  # noqa: E731
        np.stack([np.asarray(batch[c], dtype=dtype) for c in batch if c.startswith(prefix)], axis=1)
        if any(c.startswith(prefix) for c in batch)
        else np.zeros((n, 0), dtype=dtype)
    )
    tensor = lambda x, dtype: torch.from_numpy(np.array(x, dtype=dtype))  # noqa: E731 - a writable copy
    return {
        "user": tensor(batch["user"], np.int64),
        "item": tensor(batch["item"], np.int64),
        "history": tensor(_history_matrix(batch["history"]), np.int64),
        "context": tensor(batch["context"], np.int64),
        "user_cat": tensor(group("user_cat_", np.int64), np.int64),
        "user_num": tensor(group("user_num_", np.float32), np.float32),
        "inter_num": tensor(group("inter_num_", np.float32), np.float32),
        "labels": tensor(group("label_", np.float32), np.float32),
        "cold": tensor(batch["cold"], bool),
    }


def _history_matrix(history: np.ndarray) -> np.ndarray:
    if history.dtype != object and history.ndim == 2:
        return history.astype(np.int64, copy=False)
    lists = [np.asarray(h, dtype=np.int64) for h in history]
    length = max((len(h) for h in lists), default=0)
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in lists])])
    flat = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    return pad_history(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int64())), length)
