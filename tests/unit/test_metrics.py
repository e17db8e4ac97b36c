"""Metrics: AUC against a brute-force pairwise count, logloss/RMSE/MAE, NDCG/HR on hand-checked
examples, task_metrics masking and the seesaw report."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrec.config import TaskSpec
from mtrec.metrics import auc, hr_at_k, logloss, mae, ndcg_at_k, rmse, seesaw_report, task_metrics


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=2, max_size=60),
)
def test_auc_matches_brute_force_pairwise_count_with_ties(rows: list[tuple[int, int]]) -> None:
    y = np.array([r[0] for r in rows])
    s = np.array([r[1] for r in rows], dtype=float) / 3.0  # few distinct values: many ties
    if len(np.unique(y)) < 2:
        assert math.isnan(auc(y, s))
    else:
        assert auc(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)


def test_auc_perfect_reversed_constant_and_one_class() -> None:
    y = np.array([0, 0, 1, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.7, 0.3, 0.8, 0.9])
    assert auc(y, s) == 1.0
    assert auc(y, -s) == 0.0
    assert auc(y, np.zeros(6)) == 0.5
    assert math.isnan(auc(np.ones(4), np.arange(4.0)))
    assert math.isnan(auc(np.zeros(4), np.arange(4.0)))


def test_auc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        auc(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="score has 1 non-finite"):
        auc(np.array([0, 1]), np.array([0.1, np.nan]))


def test_logloss_rmse_mae() -> None:
    y = np.array([1.0, 0.0])
    assert logloss(y, np.array([0.8, 0.4])) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert logloss(y, np.array([0.0, 1.0])) == pytest.approx(-math.log(1e-7), rel=1e-6)  # clipped, finite
    assert rmse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 4.0, 3.0])) == pytest.approx(math.sqrt(4 / 3))
    assert mae(np.array([1.0, 2.0, 3.0]), np.array([0.0, 4.0, 3.0])) == pytest.approx(1.0)
    assert math.isnan(rmse(np.array([]), np.array([])))


def test_ndcg_and_hr_hand_checked() -> None:
    # user a: relevant item ranked 2nd of 3 -> NDCG 1/log2(3); user b: relevant at top -> 1;
    # user c: no relevant item -> left out.
    groups = np.array(["a", "a", "a", "b", "b", "c"])
    y = np.array([0, 1, 0, 1, 0, 0])
    s = np.array([0.9, 0.5, 0.1, 0.7, 0.2, 0.3])
    expected = (1 / math.log2(3) + 1.0) / 2
    assert ndcg_at_k(groups, y, s, k=10) == pytest.approx(expected)
    assert ndcg_at_k(groups, y, s, k=1) == pytest.approx(0.5)  # a misses at K=1
    assert hr_at_k(groups, y, s, k=1) == pytest.approx(0.5)
    assert hr_at_k(groups, y, s, k=2) == pytest.approx(1.0)
    # two relevant items at ranks 1 and 3: DCG = 1 + 1/2, IDCG = 1 + 1/log2(3)
    g2, y2, s2 = np.zeros(3), np.array([1, 0, 1]), np.array([3.0, 2.0, 1.0])
    assert ndcg_at_k(g2, y2, s2, k=3) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    # ties are ordered pessimistically: a constant score gives no credit for input order
    assert ndcg_at_k(np.zeros(3), np.array([1, 0, 0]), np.zeros(3), k=1) == 0.0
    assert math.isnan(hr_at_k(np.zeros(2), np.zeros(2), np.ones(2), k=1))


def test_task_metrics_masks_nan_labels_and_reports_cold() -> None:
    tasks = [TaskSpec("click"), TaskSpec("watch", kind="regression")]
    nan = np.nan
    labels = np.array([[1, 2.0], [0, nan], [1, 4.0], [0, 1.0], [nan, 3.0], [1, nan], [0, 2.0]])
    preds = np.array([[0.9, 2.0], [0.2, 99], [0.6, 5.0], [0.7, 1.0], [0.0, 3.0], [0.8, 0.0], [0.1, 2.0]])
    cold = np.array([False, False, True, True, True, False, True])
    users = np.array([1, 1, 2, 2, 3, 3, 3])
    m = task_metrics(tasks, labels, preds, cold=cold, groups=users)
    click = labels[:, 0] == labels[:, 0]
    assert m["click"]["auc"] == pytest.approx(auc(labels[click, 0], preds[click, 0]))
    assert m["click"]["logloss"] == pytest.approx(logloss(labels[click, 0], preds[click, 0]))
    # cold click rows: (1, 0.6), (0, 0.7), (0, 0.1) -> positive beats one of two negatives
    assert m["click"]["cold_auc"] == pytest.approx(0.5)
    assert m["click"]["hr@10"] == 1.0 and 0 < m["click"]["ndcg@10"] <= 1
    # the NaN-labelled rows (with wild predictions 99 and 0.0) are ignored
    assert m["watch"]["rmse"] == pytest.approx(math.sqrt(1 / 5))
    assert m["watch"]["mae"] == pytest.approx(1 / 5)
    assert m["watch"]["cold_rmse"] == pytest.approx(math.sqrt(1 / 4))
    assert set(task_metrics(tasks, labels, preds)["click"]) == {"auc", "logloss"}
    with pytest.raises(ValueError, match=r"must both be \(N, 2\)"):
        task_metrics(tasks, labels[:, :1], preds[:, :1])


def test_task_metrics_omits_cold_auc_with_one_class() -> None:
    labels = np.array([[1.0], [0.0], [1.0]])
    m = task_metrics([TaskSpec("click")], labels, np.array([[0.9], [0.1], [0.5]]), cold=np.array([1, 0, 1]))
    assert "cold_auc" not in m["click"]


def test_seesaw_report() -> None:
    single = {"click": {"auc": 0.70, "logloss": 0.50}, "watch": {"rmse": 1.0, "mae": 0.8}}
    seesaw = {"click": {"auc": 0.72, "logloss": 0.49}, "watch": {"rmse": 1.1, "mae": 0.8}}
    report = seesaw_report(seesaw, single)
    assert "seesaw: yes (click better; watch worse)" in report
    assert "+0.0200" in report and "same" in report
    both_better = {"click": {"auc": 0.71, "logloss": 0.5}, "watch": {"rmse": 0.9, "mae": 0.7}}
    assert "seesaw: no; no task is worse (click, watch better)" in seesaw_report(both_better, single)
