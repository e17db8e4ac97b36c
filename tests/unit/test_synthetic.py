"""Synthetic scenarios: determinism, the data contract, designed label behaviour, oracle range, streaming."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mtrec.data.synthetic as synthetic
from mtrec.data.contract import read_tasks, validate
from mtrec.data.splits import split_boundaries, time_split
from mtrec.data.synthetic import (
    BLOCK_ROWS,
    GROUND_TRUTH,
    ITEM_LATENT,
    SCENARIOS,
    generate,
    oracle_metrics,
)
from mtrec.errors import ConfigError, DataError
from mtrec_app.cli import main

ROWS = 100_000  # the size the model engineer trains on: 2k users, 1k items


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {s: generate(s, root / s, num_users=2000, num_items=1000, num_interactions=ROWS, seed=0) for s in SCENARIOS}


def _inter(path: Path) -> pa.Table:
    return pq.read_table(path / "interactions.parquet")


def _float(t: pa.Table, col: str) -> np.ndarray:
    return pc.cast(t.column(col), pa.float64()).to_numpy(zero_copy_only=False)


def _digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


# ---------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_dataset_follows_the_contract(data, scenario):
    root = data[scenario]
    assert validate(root) == []
    tasks = read_tasks(root)
    truth = pq.read_table(root / GROUND_TRUTH)
    assert truth.num_rows == ROWS
    assert truth.column_names == [f"p_{t.name}" for t in tasks]
    assert pq.read_metadata(root / ITEM_LATENT).num_rows == 1000
    users = pq.read_table(root / "users.parquet")
    assert users.num_rows == 2000
    assert pc.count_distinct(users.column("segment")).as_py() == 8
    for side in ("segment", "age_band", "region"):  # categorical features: string columns
        assert pa.types.is_string(users.schema.field(side).type)


def test_task_priors(data):
    tasks = {s: {t.name: t for t in read_tasks(data[s])} for s in SCENARIOS}
    shop = tasks["ecommerce"]
    assert shop["add_to_cart"].depends_on == "click" and shop["purchase"].depends_on == "add_to_cart"
    assert shop["purchase"].fusion_weight > shop["add_to_cart"].fusion_weight > shop["click"].fusion_weight
    assert {t.depends_on for n, t in tasks["social"].items() if n != "click"} == {"click"}
    assert tasks["search"]["dwell_time"].kind == "regression"
    assert all(t.loss_weight == 1.0 for ts in tasks.values() for t in ts.values())


def test_timestamps_increase_and_users_have_history(data):
    t = _inter(data["ecommerce"])
    ts = t.column("timestamp").to_numpy()
    assert np.all(np.diff(ts) >= 0) and ts[-1] - ts[0] > 50 * 86_400
    clicks_per_user = np.bincount(t.column("user_id").to_numpy(), weights=_float(t, "click"))[1:]
    assert np.median(clicks_per_user) >= 5  # a history to learn the personal taste from
    assert (clicks_per_user > 0).mean() > 0.98


# ---------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    a = generate("search", tmp_path / "a", num_users=300, num_items=200, num_interactions=20_000, seed=3)
    b = generate("search", tmp_path / "b", num_users=300, num_items=200, num_interactions=20_000, seed=3)
    c = generate("search", tmp_path / "c", num_users=300, num_items=200, num_interactions=20_000, seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a)["interactions.parquet"] != _digest(c)["interactions.parquet"]


def test_chunk_size_changes_layout_not_content(tmp_path):
    """600k rows in row groups of 1 block and of 4 blocks (the default): the same rows, and the streamed
    split and cold-item columns are what time_split computes on the whole table."""
    n = 600_000
    small = generate("social", tmp_path / "small", 500, 300, n, seed=1, chunk_rows=BLOCK_ROWS)
    big = generate("social", tmp_path / "big", 500, 300, n, seed=1)
    for f in ("interactions.parquet", GROUND_TRUTH):
        assert pq.read_table(small / f).equals(pq.read_table(big / f))

    def sizes(path: Path) -> list[int]:
        meta = pq.read_metadata(path / "interactions.parquet")
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    assert sizes(small) == [BLOCK_ROWS] * 8 + [n - 8 * BLOCK_ROWS]  # the 10,176-row tail joins the last group
    assert sizes(big) == [4 * BLOCK_ROWS, 4 * BLOCK_ROWS, n - 8 * BLOCK_ROWS]
    inter = pq.read_table(big / "interactions.parquet")
    again = time_split(inter.drop_columns(["split", "cold_item"]))
    assert again.column("split").equals(inter.column("split"))
    assert again.column("cold_item").equals(inter.column("cold_item"))


def test_a_short_last_chunk_joins_the_one_before():
    assert synthetic._chunks(2 * BLOCK_ROWS + 10, 2 * BLOCK_ROWS) == [range(0, 3)]
    assert synthetic._chunks(3 * BLOCK_ROWS, 2 * BLOCK_ROWS) == [range(0, 2), range(2, 3)]
    assert synthetic._chunks(10, 4 * BLOCK_ROWS) == [range(0, 1)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 50), min_size=1, max_size=300),
    st.sampled_from([0.0, 0.05, 0.1, 0.2, 1 / 3]),
    st.sampled_from([0.0, 0.1, 0.15, 0.3]),
)
def test_streaming_boundaries_follow_the_split_rule(ts, valid, test):
    """One split rule: the lookup-only (presorted) path gives what the sorting path gives."""
    assert split_boundaries(sorted(ts), valid, test, presorted=True) == split_boundaries(np.array(ts), valid, test)


def test_stream_schedule_gives_the_materialised_boundaries():
    n = 12_345
    lazy = split_boundaries(synthetic._Schedule(n), 0.1, 0.1, presorted=True)
    assert lazy == split_boundaries(synthetic._timestamps(np.arange(n), n), 0.1, 0.1)


# ---------------------------------------------------------------------------------------- labels


def test_ecommerce_funnel_and_ad_slots(data):
    t = _inter(data["ecommerce"])
    click, cart, buy = _float(t, "click"), _float(t, "add_to_cart"), _float(t, "purchase")
    assert np.all(buy <= cart) and np.all(cart <= click)  # purchase => cart => click, full space
    assert 0.12 < click.mean() < 0.35 and 0.02 < cart.mean() < 0.10 and 0.008 < buy.mean() < 0.05
    ad = t.column("is_ad").to_numpy() == 1
    ad_click = _float(t, "ad_click")
    assert 0.15 < ad.mean() < 0.25
    assert np.array_equal(np.isnan(ad_click), ~ad)  # observed exactly on sponsored slots
    assert np.array_equal(ad_click[ad], click[ad])  # there the click is the ad click
    truth = pq.read_table(data["ecommerce"] / GROUND_TRUTH)
    p_click, p_cart, p_buy = (truth.column(c).to_numpy() for c in ("p_click", "p_add_to_cart", "p_purchase"))
    assert np.all(p_buy <= p_cart + 1e-7) and np.all(p_cart <= p_click + 1e-7)
    assert abs(p_cart.mean() - cart.mean()) < 0.005  # labels are draws from the stored truth
    discount = t.column("discount").to_numpy()
    cvr = lambda m: buy[m & (click == 1)].mean()  # noqa: E731
    assert cvr(discount >= 0.3) > cvr(discount == 0) + 0.02  # discounts convert


def test_social_engagement_and_friends(data):
    t = _inter(data["social"])
    click = _float(t, "click")
    for task, lo, hi in (("like", 0.03, 0.15), ("follow", 0.01, 0.06), ("share", 0.02, 0.10)):
        y = _float(t, task)
        assert np.all(y <= click), task
        assert lo < y.mean() < hi, (task, y.mean())
    assert 0.15 < click.mean() < 0.40
    friends = t.column("friend_engagement").to_numpy()
    clicked = click == 1
    for task in ("like", "share"):  # friends' engagement raises like and share given a click
        y = _float(t, task)
        assert y[clicked & (friends > 0.25)].mean() > y[clicked & (friends < 0.05)].mean() + 0.1, task


def test_search_queries_drive_clicks_and_dwell_is_observed_on_clicks(data):
    root = data["search"]
    t = _inter(root)
    click, dwell = _float(t, "click"), _float(t, "dwell_time")
    assert 0.12 < click.mean() < 0.35
    assert np.array_equal(np.isnan(dwell), click == 0) and np.all(dwell[click == 1] > 0)
    latent = pq.read_table(root / ITEM_LATENT)
    category = latent.column("category").to_numpy(zero_copy_only=False)[t.column("item_id").to_numpy() - 1]
    context = t.column("context").to_numpy(zero_copy_only=False)
    on_topic = np.array([c in q for c, q in zip(category, context)])
    assert 0.3 < on_topic.mean() < 0.95  # the engine mostly shows relevant items, not only
    assert click[on_topic].mean() > 2 * click[~on_topic].mean()


def test_text_spells_out_the_attributes(data):
    for scenario in ("ecommerce", "social"):
        root = data[scenario]
        latent = pq.read_table(root / ITEM_LATENT)
        texts = pq.read_table(root / "items.parquet").column("text").to_pylist()
        spec = synthetic.load_spec(scenario)
        for attr in spec["item_attributes"]:
            values = latent.column(attr).to_pylist()
            assert all(v.lower() in s.lower() for v, s in zip(values, texts)), attr
        phrases = spec["quality_phrases"]
        for level, s in zip(latent.column("quality").to_pylist(), texts):
            assert any(p.lower() in s.lower() for p in phrases[level]), s
        assert len({re.sub(r"\W", "", s)[:12] for s in texts}) > 50  # varied templates, not one pattern
        users = pq.read_table(root / "users.parquet")
        for age, region, s in zip(*(users.column(c).to_pylist() for c in ("age_band", "region", "text"))):
            assert age in s and region.lower() in s.lower()


# ---------------------------------------------------------------------------------------- oracle, cold items


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_oracle_is_in_the_designed_range(data, scenario):
    root = data[scenario]
    tasks = read_tasks(root)
    for split in ("valid", "test"):
        metrics = oracle_metrics(root, split)
        assert set(metrics) == {t.name for t in tasks}
        for t in tasks:
            m = metrics[t.name]
            if t.kind == "binary":
                assert 0.70 <= m["auc"] <= 0.88, (t.name, split, m)
                assert 0.65 <= m["cold_auc"] <= 0.92, (t.name, split, m)
            else:  # the true mean beats the best constant
                y = _float(_inter(root).filter(pc.equal(_inter(root).column("split"), split)), t.label)
                assert m["rmse"] < 0.95 * np.nanstd(y), (t.name, m)


def test_oracle_rejects_an_unknown_split(data):
    with pytest.raises(ValueError, match="split='dev'"):
        oracle_metrics(data["social"], "dev")


def test_new_items_are_cold_in_test(data):
    t = _inter(data["ecommerce"])
    split, cold = t.column("split").to_numpy(zero_copy_only=False), t.column("cold_item").to_numpy()
    assert not cold[split == "train"].any()
    assert 0.05 < cold[split == "test"].mean() < 0.30
    train_items = set(t.column("item_id").to_numpy()[split == "train"])
    assert all(i not in train_items for i in t.column("item_id").to_numpy()[cold])


# ---------------------------------------------------------------------------------------- failures, CLI


def test_a_failed_write_leaves_no_output(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    real = synthetic._block_tables

    def broken_second_block(w, block, *args):
        inter, truth = real(w, block, *args)
        if block == 1:  # a generator bug: a label outside 0/1
            inter = inter.set_column(inter.column_names.index("click"), "click", pc.add(inter.column("click"), 2))
        return inter, truth

    monkeypatch.setattr(synthetic, "_block_tables", broken_second_block)
    with pytest.raises(DataError, match=r"interactions.parquet, column 'click'.*in rows 65,536-"):
        generate("ecommerce", out, 200, 100, 3 * BLOCK_ROWS, chunk_rows=BLOCK_ROWS)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_dataset(tmp_path, monkeypatch):
    out = generate("social", tmp_path / "ds", 100, 50, 1000)
    before = _digest(out)
    monkeypatch.setattr(synthetic, "_write_rows", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        generate("social", out, 100, 50, 2000, seed=9)
    assert _digest(out) == before and [p.name for p in tmp_path.iterdir()] == ["ds"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scenario": "retail"}, "unknown scenario 'retail'; valid scenarios: ecommerce, social, search"),
        ({"num_users": 0}, "num_users=0: must be at least 1"),
        ({"chunk_rows": 1000}, "chunk_rows=1000: must be a positive multiple of 65536"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    args = {"scenario": "ecommerce", "out": tmp_path / "ds", **kwargs}
    with pytest.raises(ConfigError, match=re.escape(message)):
        generate(**args)
    assert not (tmp_path / "ds").exists()


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "search"
    assert main(["data", "synth", "--scenario", "search", "--out", str(out), "--users", "50", "--items", "40",
                 "--interactions", "3000", "--seed", "2"]) == 0  # fmt: skip
    assert "3,000 interactions, 50 users, 40 items" in capsys.readouterr().out
    assert validate(out) == []
