"""Score fusion: hand-checked rankings, scales, value weights and the registry."""

from __future__ import annotations

import numpy as np
import pytest

from mtrec.errors import ConfigError
from mtrec.fusion import FUSIONS, fit_scales, fuse, normalise_weights, rank, top_k, value_weights

PREDS = {
    "click": np.array([0.10, 0.40, 0.20, 0.30]),
    "purchase": np.array([0.05, 0.00, 0.03, 0.01]),
}


def test_weighted_sum_ranks_a_hand_checked_example():
    # scores: 0.1 + 10*0.05 = 0.6, 0.4, 0.2 + 0.3 = 0.5, 0.3 + 0.1 = 0.4 -> 0, 2, then the tie 1/3 by index
    idx, scores = rank(PREDS, {"click": 1.0, "purchase": 10.0}, k=3)
    assert idx.tolist() == [0, 2, 1]
    np.testing.assert_allclose(scores, [0.6, 0.5, 0.4])
    # clicks alone: 1, 3, 2
    assert rank(PREDS, {"click": 1.0, "purchase": 0.0}, k=3)[0].tolist() == [1, 3, 2]


def test_scales_make_weights_relative_lifts():
    scales = fit_scales(PREDS)
    assert scales == pytest.approx({"click": 0.25, "purchase": 0.0225})
    # equal weights on scaled predictions: click/0.25 + purchase/0.0225
    expected = PREDS["click"] / 0.25 + PREDS["purchase"] / 0.0225
    np.testing.assert_allclose(fuse(PREDS, {"click": 0.5, "purchase": 0.5}, scales), 0.5 * expected)
    # 0.4 + 2.22, 1.6 + 0, 0.8 + 1.33, 1.2 + 0.44 -> 0, 2, 3, 1 (unscaled, clicks would dominate: 1 first)
    assert rank(PREDS, {"click": 0.5, "purchase": 0.5}, 4, scales)[0].tolist() == [0, 2, 3, 1]
    assert rank(PREDS, {"click": 0.5, "purchase": 0.5}, 1)[0].tolist() == [1]


def test_product_fusion_is_the_weighted_geometric_form():
    preds = {"click": np.array([0.5, 0.2, 0.8]), "like": np.array([0.1, 0.4, 0.05])}
    w = {"click": 0.5, "like": 0.5}
    # sqrt(click * like): 0.2236, 0.2828, 0.2 -> 1, 0, 2
    idx, scores = rank(preds, w, 3, fusion="product")
    assert idx.tolist() == [1, 0, 2]
    np.testing.assert_allclose(np.exp(scores), np.sqrt(preds["click"] * preds["like"])[[1, 0, 2]])
    # a zero prediction sinks the candidate instead of producing NaN
    assert np.isfinite(fuse({"click": np.array([0.0, 0.1])}, {"click": 1.0}, fusion="product")).all()


def test_value_weights_rank_by_expected_value():
    rng = np.random.default_rng(0)
    preds = {"click": rng.uniform(0.05, 0.5, 200), "purchase": rng.uniform(0.001, 0.05, 200)}
    values = {"click": 1.0, "purchase": 20.0}
    scales = fit_scales(preds)
    w = value_weights(values, scales)
    assert sum(w.values()) == pytest.approx(1.0)
    expected_value = preds["click"] * 1.0 + preds["purchase"] * 20.0
    assert rank(preds, w, 10, scales)[0].tolist() == top_k(expected_value, 10).tolist()


def test_regression_predictions_are_scaled_to_compare_with_rates():
    preds = {"click": np.array([0.2, 0.1]), "dwell_time": np.array([2.0, 6.0])}  # minutes
    scales = fit_scales(preds)
    # unscaled, minutes swamp probabilities; scaled, a 0.5 weight each balances relative lifts
    assert rank(preds, {"click": 0.5, "dwell_time": 0.5}, 1)[0].tolist() == [1]
    scaled = fuse(preds, {"click": 0.5, "dwell_time": 0.5}, scales)
    np.testing.assert_allclose(scaled, 0.5 * np.array([0.2 / 0.15 + 2 / 4, 0.1 / 0.15 + 6 / 4]))


def test_top_k_edges():
    assert top_k(np.array([1.0, 3.0, 2.0]), 10).tolist() == [1, 2, 0]
    assert top_k(np.array([1.0]), 0).tolist() == []


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="valid fusions: sum, product"):
        fuse(PREDS, {"click": 1.0}, fusion="max")
    with pytest.raises(ValueError, match="'purchase'"):
        fit_scales({"purchase": np.zeros(3)})
    with pytest.raises(ValueError, match="no predictions for task"):
        fuse(PREDS, {"share": 1.0})
    with pytest.raises(ValueError, match="'click'"):
        normalise_weights({"click": -1.0, "purchase": 2.0})
    assert set(FUSIONS) == {"sum", "product"}
