"""The feedback simulator: funnel draws, exact values, the oracle, the shift, and a short policy run."""

from __future__ import annotations

import numpy as np
import pytest

from mtrec.data.synthetic import generate
from mtrec.errors import ConfigError
from mtrec.fusion import Limits, build_policy, fit_scales
from mtrec.fusion.simulator import Pool, Shift, Simulator, chain, conditional, load_pool

TASKS = ["click", "add_to_cart", "purchase"]
PRIOR = {"click": 1.0, "add_to_cart": 3.0, "purchase": 8.0}
SALE = Shift(logit_shift={"click": -0.3, "add_to_cart": 0.5, "purchase": 1.0})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return generate("ecommerce", tmp_path_factory.mktemp("sim") / "ecom", 400, 300, 60_000, seed=3)


@pytest.fixture(scope="module")
def pool(data_dir):
    return load_pool(data_dir, TASKS, candidates=20, model_noise=0.5, seed=0)


def test_pool_holds_requests_truth_and_a_noisy_but_informative_model(pool):
    q, k = pool.requests.shape
    assert k == 20 and q > 1000 and len(np.unique(pool.requests)) == pool.requests.size
    assert pool.parents == [-1, 0, 1]
    assert (pool.truth[:, 2] <= pool.truth[:, 1]).all() and (pool.truth[:, 1] <= pool.truth[:, 0]).all()
    for t in range(3):
        corr = np.corrcoef(np.log(pool.truth[:, t]), np.log(pool.estimate[:, t]))[0, 1]
        assert 0.6 < corr < 0.99  # informative, not exact
    assert pool.scales == pytest.approx(dict(zip(TASKS, pool.estimate.mean(axis=0))))


def test_conditional_and_chain_are_inverse(pool):
    np.testing.assert_allclose(chain(conditional(pool.truth, pool.parents), pool.parents), pool.truth, rtol=1e-9)


def test_served_counts_follow_the_funnel_and_the_true_rates(pool):
    sim = Simulator(pool, {"purchase": 1.0}, k=5, seed=0)
    w = np.array([0.3, 0.2, 0.5])
    counts = sim.serve(w, 400_000, 0, np.random.default_rng(0))
    assert counts.impressions == 2_000_000
    ev = counts.events
    assert ev["purchase"] <= ev["add_to_cart"] <= ev["click"]
    expected = sim.rates(w, 0) * counts.impressions
    for t, e in zip(TASKS, expected):
        assert abs(ev[t] - e) < 5 * np.sqrt(e) + 0.01 * e, (t, ev[t], e)


def test_ranking_by_the_north_star_beats_random_and_the_oracle_beats_the_grid(pool):
    sim = Simulator(pool, {"purchase": 1.0}, k=5, shift=SALE, seed=0)
    w0, v0 = sim.oracle(0)
    random_value = (pool.truth[pool.requests][:, :, 2]).mean()
    assert v0 > 1.5 * random_value
    rng = np.random.default_rng(0)
    for w in rng.dirichlet(np.ones(3), 30):
        assert sim.value(w, 0) <= v0 + 1e-12
    w1, v1 = sim.oracle(1)
    assert np.abs(w1 - w0).max() > 0.05  # the shift moves the oracle
    assert sim.value(w0, 1) < v1


def test_shift_only_changes_the_truth_of_the_named_tasks(pool):
    truth = Shift(logit_shift={"purchase": 1.0}).apply(pool, seed=0)
    np.testing.assert_allclose(truth[:, :2], pool.truth[:, :2])
    assert (truth[:, 2] >= pool.truth[:, 2] - 1e-12).all()
    with pytest.raises(ConfigError, match="unknown task 'share'"):
        Shift(logit_shift={"share": 1.0}).apply(pool, seed=0)


def test_stale_windows_are_held(pool):
    sim = Simulator(pool, {"purchase": 1.0}, k=5, requests_per_round=20_000, seed=0)
    result = sim.run(build_policy("proportional", PRIOR), 30, stale_rate=0.3)
    assert 3 <= result.actions.count("hold") <= 18
    assert result.oracle_value.min() == result.oracle_value.max()


def test_load_pool_rejects_what_it_cannot_simulate(data_dir):
    with pytest.raises(ConfigError, match="depends on .add_to_cart., which must come before"):
        load_pool(data_dir, ["purchase", "add_to_cart"])
    with pytest.raises(ConfigError, match="no task 'share'"):
        load_pool(data_dir, ["click", "share"])
    with pytest.raises(ConfigError, match="no user has 100000 rows"):
        load_pool(data_dir, TASKS, candidates=100_000)


def _two_task_pool(seed: int, rows: int = 20_000, candidates: int = 20) -> Pool:
    """A hand-made click -> purchase pool where purchase given click varies much more than the click."""
    rng = np.random.default_rng(seed)
    cond = 1 / (1 + np.exp(-np.stack([rng.normal(-1.5, 0.7, rows), rng.normal(-2.0, 1.5, rows)], axis=1)))
    estimate = chain(1 / (1 + np.exp(-(np.log(cond / (1 - cond)) + rng.normal(0, 0.3, cond.shape)))), [-1, 0])
    requests = rng.permutation(rows).reshape(-1, candidates)
    scales = fit_scales({"click": estimate[:, 0], "purchase": estimate[:, 1]})
    return Pool(["click", "purchase"], [-1, 0], chain(cond, [-1, 0]), estimate, requests, scales)


def test_bandit_beats_static_after_the_shift():
    """A short run (100 rounds, seconds). Before the shift the model's purchase estimate is the best
    guide; half way, what makes a clicker buy changes in ways the model never learnt (its purchase
    estimate goes stale), so the best weights move from purchase to click. The synthetic scenarios'
    tasks are so correlated that weights matter by a few percent at most there (bench/policy_bench.py
    measures them); this world makes the margin wide enough to test in seconds."""
    pool = _two_task_pool(seed=0)
    shift = Shift(logit_drift={"purchase": 4.0})
    sim = Simulator(pool, {"purchase": 1.0}, k=3, requests_per_round=100_000, shift=shift, seed=0)
    assert sim.oracle(0)[0][1] > 0.9 and sim.oracle(1)[0][0] > 0.5
    prior = {"click": 1.0, "purchase": 8.0}
    static = sim.run(build_policy("static", prior), 100)
    limits = Limits(max_step=0.15, smoothing=0.9, min_events=200)
    bandit = build_policy("bandit", prior, limits, seed=0, values={"purchase": 1.0})
    result = sim.run(bandit, 100)
    assert result.fraction(0) >= 0.99 and static.fraction(0) >= 0.99  # both fine before the shift
    assert static.fraction(1) < 0.96
    assert result.fraction(1) > static.fraction(1) + 0.02
    assert result.fraction(1, skip=0.5) > 0.985  # re-adapted
    assert result.main_weights[-1][0] > 0.4  # toward the click weight
