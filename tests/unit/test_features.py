"""Examples from a dataset: no history leakage, hashed rows for unseen ids, NaN label masks, layout."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from mtrec.config import Config, TaskSpec
from mtrec.data.contract import write_dataset
from mtrec.features import ExampleSet, Vocab, collate, pad_history, prepare_examples
from mtrec.io import OUTPUT_MARKER

TASKS = [TaskSpec("click"), TaskSpec("buy", depends_on="click"), TaskSpec("stars", "regression", label="rating")]


def write(tmp_path, rows: list[tuple], users: pa.Table | None = None, with_split: bool = True):
    """rows: (user, item, timestamp, click, buy, rating, split, context, position)."""
    cols = list(zip(*rows))
    inter = {
        "user_id": pa.array(cols[0], pa.string()),
        "item_id": pa.array(cols[1], pa.int64()),
        "timestamp": pa.array(cols[2], pa.int64()),
        "click": pa.array(cols[3], pa.int8()),
        "buy": pa.array(cols[4], pa.int8()),
        "rating": pa.array(cols[5], pa.float64()),
        "context": pa.array(cols[7], pa.string()),
        "position": pa.array(cols[8], pa.int64()),
    }
    if with_split:
        inter["split"] = pa.array(cols[6], pa.string())
    item_ids = sorted(set(cols[1]) | {99})
    items = pa.table(
        {
            "item_id": pa.array(item_ids, pa.int64()),
            "text": [f"item {i}" for i in item_ids],
            "category": [f"c{i % 2}" for i in item_ids],
            "price": [float(i) for i in item_ids],
        }
    )
    return write_dataset(tmp_path / "data", pa.table(inter), items, TASKS, users)


ROWS = [  # user, item, ts, click, buy, rating, split, context, position
    ("u1", 1, 10, 1, 1, 4.0, "train", "red shoes", 1),
    ("u1", 2, 20, 1, 0, None, "train", None, 2),
    ("u1", 3, 20, 0, None, None, "train", "red shoes", 3),  # same time as item 2: must not see it
    ("u1", 4, 30, 1, 0, 3.0, "train", "", 1),
    ("u1", 5, 40, 0, None, None, "valid", "blue hat", 2),
    ("u1", 6, 50, 1, 1, 5.0, "test", None, 3),
    ("u2", 1, 15, 0, None, None, "train", None, 1),
    ("u2", 2, 25, 1, 0, 2.0, "train", None, 2),
    ("u3", 7, 45, 1, None, None, "test", "green", 1),  # a user and an item unseen in training
]


def prepare(tmp_path, rows=ROWS, max_history=2, **kw) -> ExampleSet:
    cfg = Config()
    cfg.data.max_history = max_history
    cfg.model.id_buckets = 11
    return prepare_examples(write(tmp_path, rows, **kw), cfg, tmp_path / "examples")


def all_rows(ex: ExampleSet) -> dict[str, np.ndarray]:
    parts = [ex.arrays(s) for s in ("train", "valid", "test")]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_history_holds_only_earlier_positives_most_recent_last(tmp_path):
    ex = prepare(tmp_path)
    a = all_rows(ex)  # rows come back in ROWS order within each split; ROWS is ordered by split
    item = lambda raw: ex.meta.item_ids.index(raw) + 1  # noqa: E731
    expected = [
        [],  # u1 t10: nothing before
        [item(1)],  # u1 t20
        [item(1)],  # u1 t20: item 2 is at the same time, not before
        [item(1), item(2)],  # u1 t30: item 3 was not clicked
        [item(2), item(4)],  # u1 t40: the last two positives
        [item(2), item(4)],  # u1 t50: item 5 (valid) was not clicked
        [],  # u2 t15
        [],  # u2 t25: u2's only earlier row was not clicked
        [],  # u3
    ]
    got = [[int(x) for x in row if x] for row in a["history"]]
    order = [0, 1, 2, 3, 6, 7, 4, 5, 8]  # train rows, then valid, then test
    assert got == [expected[i] for i in order]


def test_history_matches_brute_force_on_random_data_with_ties(tmp_path):
    rng = np.random.default_rng(3)
    n, splits = 300, ["train", "valid", "test"]
    rows = [
        (
            f"u{rng.integers(6)}",
            int(rng.integers(1, 9)),
            int(rng.integers(0, 40)),
            int(rng.random() < 0.5),
            0,
            1.0,
            splits[rng.integers(3)],
            None,
            0,
        )
        for _ in range(n)
    ]  # splits at random: the history spans every split, only time matters
    ex = prepare(tmp_path, rows, max_history=4)
    hist = all_rows(ex)["history"]
    ids = ex.meta.item_ids
    for out_row, r in enumerate(sorted(range(n), key=lambda r: splits.index(rows[r][6]))):
        u, _, t = rows[r][:3]
        earlier = sorted((rows[q][2], q) for q in range(n) if rows[q][0] == u and rows[q][2] < t and rows[q][3] == 1)
        want = [ids.index(rows[q][1]) + 1 for _, q in earlier][-4:]
        assert [int(x) for x in hist[out_row] if x] == want


def test_without_a_split_column_the_time_split_applies(tmp_path):
    ex = prepare(tmp_path, with_split=False)
    assert ex.meta.counts == {"train": 7, "valid": 1, "test": 1}  # the two latest rows: t45 valid, t50 test


def test_unseen_ids_hash_into_buckets_and_cold_rows_are_flagged(tmp_path):
    ex = prepare(tmp_path)
    meta = ex.meta
    test = ex.arrays("test")
    known_users = len(meta.users.values)
    assert sorted(meta.users.values) == ["u1", "u2"] and meta.users.num_rows == 1 + 2 + 11
    u3 = test["user"][1]
    assert known_users < u3 < meta.users.num_rows
    assert meta.users.lookup(["u3", "u3", "u1"]).tolist() == [u3, u3, 1 + meta.users.values.index("u1")]
    rows = meta.item_id_rows()
    for raw in (5, 6, 7, 99):  # never in the train split
        assert rows[meta.item_ids.index(raw) + 1] > len(meta.items.values)
    assert test["cold"].tolist() == [True, True]
    assert Vocab(["a"]).lookup(["b", "a"]).tolist() == [0, 1]  # no buckets: unknown -> 0


def test_labels_are_nan_where_unobserved_and_numeric_features_standardised(tmp_path):
    ex = prepare(tmp_path)
    train = ex.arrays("train")
    assert np.isnan(train["label_buy"]).tolist() == [False, False, True, False, True, False]
    assert np.isnan(train["label_stars"]).tolist() == [False, True, True, False, True, False]
    assert train["label_click"].tolist() == [1, 1, 0, 1, 0, 1]
    pos = train["inter_num_position"]
    assert abs(pos.mean()) < 1e-6 and abs(pos.std() - 1) < 1e-6  # train statistics
    assert ex.meta.label_stats == {"stars": (3.0, pytest.approx(np.std([4.0, 3.0, 2.0])))}
    assert ex.meta.contexts == ["blue hat", "green", "red shoes"]
    assert train["context"].tolist() == [3, 0, 3, 0, 0, 0]
    assert list(ex.meta.item_cat) == ["category"] and list(ex.meta.item_num) == ["price"]
    assert ex.meta.item_cat_values.shape == (len(ex.meta.item_ids) + 1, 1)


def test_user_side_features_collate_and_meta_round_trip(tmp_path):
    users = pa.table(
        {"user_id": ["u1", "u2", "u3"], "age": [30, 40, 30], "spend": [1.0, 3.0, None], "text": ["a", "b", "c"]}
    )
    ex = prepare(tmp_path, users=users)
    train = ex.arrays("train")
    age = ex.meta.user_cat["age"]
    assert train["user_cat_age"].tolist() == age.lookup([30, 30, 30, 30, 40, 40]).tolist()
    assert set(train) >= {"user_num_spend", "inter_num_position"}
    files = sorted(p.name for p in ex.root.iterdir())
    assert files == [OUTPUT_MARKER, "items.parquet", "meta.json", "test.parquet", "train.parquet", "valid.parquet"]
    again = ExampleSet.load(ex.root)
    assert json.loads(json.dumps(again.meta.to_json())) == json.loads((ex.root / "meta.json").read_text())
    assert again.meta.user_num == ex.meta.user_num and again.meta.users == ex.meta.users
    b = collate({k: v[:4] for k, v in train.items()})
    assert b["history"].shape == (4, 2) and b["labels"].shape == (4, 3)
    assert b["user_cat"].shape == (4, 1) and b["user_num"].shape == (4, 1) and b["inter_num"].shape == (4, 1)
    ragged = np.empty(3, dtype=object)  # what Ray Data hands over for a list column
    ragged[:] = [np.array([4]), np.array([], dtype=np.int64), np.array([1, 2])]
    out = collate({**{k: v[:3] for k, v in train.items()}, "history": ragged})
    assert out["history"].tolist() == [[0, 4], [0, 0], [1, 2]]


def test_pad_history_keeps_the_most_recent_items():
    h = pa.array([[1, 2, 3], [], [7]], pa.list_(pa.int64()))
    assert pad_history(h, 2).tolist() == [[2, 3], [0, 0], [0, 7]]
    assert pad_history(h.slice(1), 2).tolist() == [[0, 0], [0, 7]]


def test_failed_prepare_leaves_no_output(tmp_path, monkeypatch):
    import mtrec.features as features

    data = write(tmp_path, ROWS)
    monkeypatch.setattr(features.pq, "write_table", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        prepare_examples(data, Config(), tmp_path / "examples")
    assert not (tmp_path / "examples").exists() and [p.name for p in tmp_path.iterdir()] == ["data"]


@pytest.mark.parametrize(
    "values, probes",
    [
        (list(range(50)), [3, np.int64(7), 49, 50, -1, "3", 3.0, None]),
        (["a", "b", "10"], ["b", np.str_("a"), "c", 10, "10", ""]),
    ],
)
def test_a_small_lookup_maps_exactly_as_a_large_one(values, probes):
    """Serving looks a few ids up through a dict, training many through pandas: the same rows."""
    from mtrec.features import SMALL_LOOKUP

    vocab = Vocab(values, buckets=5)
    small = vocab.lookup(np.array(probes, dtype=object))
    large = vocab.lookup(np.array(probes * (SMALL_LOOKUP // len(probes) + 1), dtype=object))[: len(probes)]
    assert small.tolist() == large.tolist()
