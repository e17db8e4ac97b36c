"""The feedback simulator and its worlds: funnel draws, exact values, position bias, the oracle under a
guardrail, the shifts, realistic rates, the null world, the log statistics, and the demo's pool."""

from __future__ import annotations

import numpy as np
import pytest
from shared_data import shared_data

from mtrec.data.synthetic import generate
from mtrec.errors import ConfigError
from mtrec.fusion import HOLDOUT, Limits, build_policy
from mtrec.fusion.simulator import Phase, Simulator, World, chain, conditional, load_pool
from mtrec.fusion.worlds import MOVIELENS_100K, WORLDS, LogStats, build_world

TASKS = ["click", "add_to_cart", "purchase"]


@pytest.fixture(scope="module")
def step():
    return Simulator(build_world("step", 1))


def test_served_counts_follow_the_funnel_and_the_true_rates(step):
    w = step.static_weights
    counts = step.serve(w, 2_000_000, 0, np.random.default_rng(0))
    ev = counts.events
    assert counts.impressions == 2_000_000 and ev["purchase"] <= ev["add_to_cart"] <= ev["click"]
    expected = step.rates(w, 0) * counts.impressions
    for t, e in zip(TASKS, expected):
        assert abs(ev[t] - e) < 5 * np.sqrt(e), (t, ev[t], e)
    predicted = np.array([counts.predicted[t] for t in TASKS]) / counts.impressions
    assert (predicted > 0).all() and not np.allclose(predicted, step.rates(w, 0), rtol=0.05)  # a miscalibrated model


def test_rates_are_realistic_in_every_world():
    """Click-through 1-5 % and conversions 0.1-1 % per impression under the static weights."""
    for name in WORLDS:
        sim = Simulator(build_world(name, 2))
        for phase in range(len(sim.world.phases)):
            rates = dict(zip(sim.world.tasks, sim.rates(sim.static_weights, phase)))
            assert 0.01 <= rates["click"] <= 0.05, (name, rates)
            assert 0.001 <= rates["purchase"] <= 0.01, (name, rates)


def test_position_bias_makes_the_order_within_the_slate_matter(step):
    world = step.world
    flat = World(**{**world.__dict__, "examination": np.ones(len(world.examination))})
    assert Simulator(flat).value(step.static_weights, 0) > step.value(step.static_weights, 0) * 1.5
    assert (np.diff(world.examination) < 0).all()


def test_the_oracle_beats_the_grid_and_keeps_the_guardrail(step):
    w0, v0 = step.oracle(0)
    assert step.feasible(w0, 0) and v0 >= step.value(step.static_weights, 0)
    rng = np.random.default_rng(0)
    for w in rng.dirichlet(np.ones(3), 30):
        w = np.clip(w, 0.02, 0.9) / np.clip(w, 0.02, 0.9).sum()
        if step.feasible(w, 0):
            assert step.value(w, 0) <= v0 + 1e-12
    assert step.oracle(1)[1] > v0  # the sale lifts what the best weights earn


def test_the_conflict_world_has_a_binding_guardrail():
    sim = Simulator(build_world("conflict", 3))
    w, v = sim.oracle(1)
    assert sim.guardrail_ratio(w, 1)[0] == pytest.approx(0.98, abs=0.005)  # the oracle sits on the guardrail
    free = build_world("conflict", 3)
    free.guardrails = {}
    assert Simulator(free).oracle(1)[1] > v * 1.01  # without it, more ads would earn more


def test_in_the_null_world_no_weight_changes_the_value_or_the_clicks():
    sim = Simulator(build_world("null", 4))
    values = [sim.value(w, 0) for w in np.random.default_rng(1).dirichlet(np.ones(3), 10)]
    assert max(values) - min(values) < 1e-12 * max(values)
    assert sim.oracle(0)[1] == pytest.approx(sim.value(sim.static_weights, 0))


@pytest.mark.parametrize("name", ["step", "drift", "retrain", "reversal", "conflict"])
def test_each_shift_moves_the_oracle_and_makes_the_static_weights_worse(name):
    sim = Simulator(build_world(name, 5))
    last = len(sim.world.phases) - 1
    (w0, _), (w1, v1) = sim.oracle(0), sim.oracle(last)
    assert np.abs(w1 - w0).max() > 0.02
    assert sim.value(sim.static_weights, last) < v1
    assert sim.world.phase_at(0, 100) == 0 and sim.world.phase_at(99, 100) == last


def test_the_retrain_swaps_the_model_and_the_reversal_flips_the_best_move():
    retrain = build_world("retrain", 6)
    assert retrain.phases[1].estimate is not retrain.phases[0].estimate
    np.testing.assert_array_equal(retrain.phases[1].truth, retrain.phases[0].truth)  # users stay
    sim = Simulator(build_world("reversal", 6))
    before, after = sim.oracle(0)[0][2], sim.oracle(1)[0][2]  # the best purchase weight
    assert before > sim.static_weights[2] + 0.02 > after + 0.04


def test_worlds_are_drawn_from_their_seed_and_unknown_names_are_refused():
    a, b = build_world("step", 7), build_world("step", 7)
    np.testing.assert_array_equal(a.phases[0].estimate, b.phases[0].estimate)
    assert not np.array_equal(a.phases[0].truth, build_world("step", 8).phases[0].truth)
    with pytest.raises(ConfigError, match="valid worlds: step, drift"):
        build_world("sale", 1)


def test_the_log_statistics_are_those_of_movielens_100k():
    stats = LogStats.from_movielens(shared_data("ml-100k"))
    for name, value in stats.__dict__.items():
        assert value == pytest.approx(getattr(MOVIELENS_100K, name), abs=2e-3), name
    assert 0 < MOVIELENS_100K.corr < 1


def test_a_run_scores_every_window_exactly_and_records_moves(step):
    policy = build_policy("calibrated", step.world.prior, Limits(), 0, values=step.world.values)
    run = step.run(policy, 1_000_000, 40, seed=1)
    assert run.value.shape == run.static.shape == run.oracle.shape == (40,)
    assert (run.oracle >= run.static - 1e-12).all() and (run.oracle >= run.main_value - 1e-12).all()
    assert HOLDOUT in policy.current.traffic and {m.action for m in run.moves} <= {"promote", "rollback"}
    static = step.run(build_policy("static", step.world.prior), 10_000, 5)
    np.testing.assert_allclose(static.value, static.static)


def test_a_world_that_names_unknown_tasks_is_refused(step):
    bad = World(**{**step.world.__dict__, "values": {"share": 1.0}})
    with pytest.raises(ConfigError, match="unknown task"):
        Simulator(bad)


# ---------------------------------------------------------------------------------------- the demo's pool


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return generate("ecommerce", tmp_path_factory.mktemp("sim") / "ecom", 400, 300, 60_000, seed=3)


def test_load_pool_holds_requests_truth_and_a_noisy_but_informative_model(data_dir):
    pool = load_pool(data_dir, TASKS, candidates=20, model_noise=0.5, seed=0)
    q, k = pool.requests.shape
    assert k == 20 and q > 1000 and len(np.unique(pool.requests)) == pool.requests.size
    assert pool.parents == [-1, 0, 1]
    assert (pool.truth[:, 2] <= pool.truth[:, 1]).all() and (pool.truth[:, 1] <= pool.truth[:, 0]).all()
    for t in range(3):
        corr = np.corrcoef(np.log(pool.truth[:, t]), np.log(pool.estimate[:, t]))[0, 1]
        assert 0.6 < corr < 0.99  # informative, not exact
    np.testing.assert_allclose(chain(conditional(pool.truth, pool.parents), pool.parents), pool.truth, rtol=1e-9)


def test_load_pool_rejects_what_it_cannot_simulate(data_dir):
    with pytest.raises(ConfigError, match="depends on .add_to_cart., which must come before"):
        load_pool(data_dir, ["purchase", "add_to_cart"])
    with pytest.raises(ConfigError, match="no task 'share'"):
        load_pool(data_dir, ["click", "share"])
    with pytest.raises(ConfigError, match="no user has 100000 rows"):
        load_pool(data_dir, TASKS, candidates=100_000)


def test_phases_share_a_served_model_and_its_slates():
    world = build_world("step", 9)
    assert world.phases[0].estimate is world.phases[1].estimate
    assert isinstance(world.phases[0], Phase)
