"""Search spaces, objectives and the Pareto front: pure functions, no Ray cluster."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from ray.tune.search.variant_generator import generate_variants

from mtrec.config import Config, TaskSpec
from mtrec.errors import ConfigError
from mtrec.weighting import WEIGHTINGS
from mtrec_tune.objective import INFEASIBLE, Objective
from mtrec_tune.pareto import dominates, non_dominated
from mtrec_tune.spaces import (
    STRATEGY_SPACES,
    USES_TASK_WEIGHTS,
    effective_point,
    equal_weights,
    normalised_weights,
    search_space,
    trial_config,
)

TASKS = ["click", "purchase", "dwell"]


def _base() -> Config:
    cfg = Config()
    cfg.tasks = [TaskSpec("click"), TaskSpec("purchase", depends_on="click"), TaskSpec("dwell", kind="regression")]
    return cfg


def _samples(space, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.RandomState(seed)
    return [next(generate_variants(space, random_state=rng))[1] for _ in range(n)]


# ---------------------------------------------------------------------------------------- spaces


def test_every_searched_strategy_exists_and_accepts_its_sampled_hyperparameters():
    assert set(STRATEGY_SPACES) <= set(WEIGHTINGS)
    seen = set()
    for sample in _samples(search_space(TASKS, archs=["mmoe", "ple"]), 60):
        cfg = trial_config(_base(), sample)  # builds the weighting: raises on a parameter it does not take
        name = sample["weighting"]
        seen.add(name)
        assert cfg.train.weighting == name
        assert set(cfg.train.weighting_params) == set(STRATEGY_SPACES[name])
        assert 3e-4 <= cfg.train.lr <= 1e-2 and cfg.model.arch in ("mmoe", "ple")
        # conditional: task weights only where the strategy uses them, hyperparameters only of its own
        point = effective_point(sample)
        assert ("task_weights" in point) == (name in USES_TASK_WEIGHTS)
        assert set(point.get("params", {})) <= {name}
        if name not in USES_TASK_WEIGHTS:
            assert [t.loss_weight for t in cfg.tasks] == [1.0, 1.0, 1.0]
    assert seen == set(STRATEGY_SPACES)


def test_sampled_task_weights_land_on_the_simplex_scaled_to_the_task_count():
    for sample in _samples(search_space(TASKS, strategies=["static"]), 20):
        cfg = trial_config(_base(), sample)
        weights = [t.loss_weight for t in cfg.tasks]
        assert sum(weights) == pytest.approx(len(TASKS)) and min(weights) > 0
        raw = sample["task_weights"]
        assert weights[0] / weights[1] == pytest.approx(raw["click"] / raw["purchase"])


def test_the_same_seed_gives_the_same_search():
    space = search_space(TASKS)
    assert _samples(space, 5, seed=3) == _samples(space, 5, seed=3)
    assert _samples(space, 5, seed=3) != _samples(space, 5, seed=4)


def test_pinned_points_come_first_and_the_rest_is_drawn():
    from ray.tune.experiment import Experiment
    from ray.tune.search.basic_variant import BasicVariantGenerator

    space = {**search_space(["a", "b"], strategies=["static", "gradnorm"]), "seed": 0}
    points = [
        {**equal_weights(["a", "b"]), "lr": 1e-3},
        {"weighting": "static", "task_weights": {"a": 1, "b": 0.1}, "seed": 2},
    ]
    gen = BasicVariantGenerator(points_to_evaluate=points, random_state=0)
    gen.add_configurations([Experiment("x", lambda config: None, config=space, num_samples=4)])
    configs = [gen.next_trial().config for _ in range(4)]
    assert gen.next_trial() is None
    assert effective_point(configs[0]) == {
        "weighting": "static",
        "task_weights": {"a": 1.0, "b": 1.0},
        "lr": 1e-3,
        "seed": 0,
    }
    assert configs[1]["task_weights"] == {"a": 1, "b": 0.1} and configs[1]["seed"] == 2
    assert all(c["seed"] == 0 for c in configs[2:])


def test_equal_weights_is_the_untuned_prior():
    cfg = trial_config(_base(), equal_weights(TASKS))
    assert [t.loss_weight for t in cfg.tasks] == [1.0, 1.0, 1.0] and cfg.train.weighting == "static"


def test_trial_config_sets_seed_and_leaves_the_base_alone():
    base = _base()
    cfg = trial_config(base, {"seed": 7, "lr": 0.01, "weighting": "dwa", "params": {"dwa": {"temperature": 3.0}}})
    assert (cfg.train.seed, cfg.train.lr, cfg.train.weighting_params) == (7, 0.01, {"temperature": 3.0})
    assert base.train.seed == 0 and base.train.weighting == "static"


@pytest.mark.parametrize(
    "sample, fragment",
    [
        ({"epochs": 3}, "search point: unknown key 'epochs'; valid keys: weighting, params"),
        ({"weighting": "magic"}, "unknown weighting 'magic'"),
        ({"weighting": "dwa", "params": {"dwa": {"alpha": 1.0}}}, "alpha"),
        ({"weighting": "static", "task_weights": {"click": 1.0}}, "missing purchase, dwell"),
        (
            {"weighting": "static", "task_weights": {"click": 1, "purchase": 1, "dwell": 1, "x": 1}},
            "unknown x",
        ),
        ({"weighting": "static", "task_weights": {"click": -1, "purchase": 1, "dwell": 1}}, ">= 0"),
        ({"arch": "transformer"}, "model.arch"),
    ],
)
def test_bad_points_fail_with_a_message_naming_what_is_wrong(sample, fragment):
    with pytest.raises(ConfigError, match=fragment):
        trial_config(_base(), sample)


def test_trial_config_needs_resolved_tasks_and_search_space_known_strategies():
    with pytest.raises(ConfigError, match="no tasks"):
        trial_config(Config(), {"lr": 0.01})
    with pytest.raises(ConfigError, match="unknown weighting 'nope'"):
        search_space(TASKS, strategies=["nope"])


def test_normalised_weights_sum_to_task_count():
    assert normalised_weights({"a": 2.0, "b": 6.0}, ["a", "b"]) == {"a": 0.5, "b": 1.5}


# ---------------------------------------------------------------------------------------- objective

METRICS = {
    "click": {"auc": 0.72, "logloss": 0.40},
    "purchase": {"auc": 0.80, "logloss": 0.10},
    "dwell": {"rmse": 1.5, "mae": 1.1},
}


def test_weighted_sum_negates_losses_and_errors():
    obj = Objective.parse("0.3*click.auc + 0.7*purchase.auc + 0.1*dwell.rmse")
    assert obj.value(METRICS) == pytest.approx(0.3 * 0.72 + 0.7 * 0.80 - 0.1 * 1.5)
    assert obj.primary == "purchase.auc"
    assert Objective.parse("mean_auc").value(METRICS) == pytest.approx(0.76)
    assert Objective.parse("1e-1*click.auc").value(METRICS) == pytest.approx(0.072)


def test_guardrails_make_a_trial_infeasible_by_how_much_it_misses():
    obj = Objective.parse("purchase.auc; click.auc>=0.70, dwell.rmse<=2")
    ok = obj.score(METRICS)
    assert ok == {"score": pytest.approx(0.80), "feasible": True, "violation": 0.0, "value": pytest.approx(0.80)}
    worse = {**METRICS, "click": {"auc": 0.65}}
    much_worse = {**METRICS, "click": {"auc": 0.60}}
    s1, s2 = obj.score(worse), obj.score(much_worse)
    assert not s1["feasible"] and s1["violation"] == pytest.approx(0.05)
    # infeasible is below anything feasible, and a narrower miss ranks above a wider one
    assert s2["score"] < s1["score"] < INFEASIBLE + 1 < ok["score"]
    nan = obj.score({**METRICS, "click": {"auc": float("nan")}})
    assert not nan["feasible"] and math.isfinite(nan["score"])


@pytest.mark.parametrize(
    "text, fragment",
    [("click.auc >> 3", "cannot read term"), ("click.auc; click.auc=0.7", "cannot read guardrail"), ("2*", "term")],
)
def test_unreadable_objectives_fail(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Objective.parse(text)


def test_objectives_naming_unknown_tasks_or_metrics_fail():
    tasks = _base().tasks
    Objective.parse("0.5*click.auc + purchase.logloss + mean_auc; dwell.rmse<=1.2").check(tasks)
    with pytest.raises(ConfigError, match=r"term 'buy.auc' is not one of mean_auc, click.auc, click.logloss"):
        Objective.parse("buy.auc").check(tasks)
    with pytest.raises(ConfigError, match="guardrail 'dwell.auc' is not one of .*dwell.rmse, dwell.mae"):
        Objective.parse("click.auc; dwell.auc>=0.5").check(tasks)
    with pytest.raises(ConfigError, match="click.ndcg"):
        Objective.parse("click.ndcg").value(METRICS)
    with pytest.raises(ConfigError, match="guardrail metric 'click.ndcg'"):
        Objective.parse("click.auc; click.ndcg>=0.1").score(METRICS)


# ---------------------------------------------------------------------------------------- pareto

_POINTS = arrays(
    np.float64,
    st.tuples(st.integers(1, 12), st.integers(1, 4)),
    elements=st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.8, float("nan")]),  # few values: many ties
)


@settings(max_examples=300, deadline=None)
@given(_POINTS)
def test_front_is_exactly_the_non_dominated_rows(points):
    front = non_dominated(points)
    finite = ~np.isnan(points).any(axis=1)
    for i in range(len(points)):
        beaten = any(dominates(points[j], points[i]) for j in range(len(points)) if finite[j])
        assert front[i] == (finite[i] and not beaten)


@settings(max_examples=200, deadline=None)
@given(_POINTS, st.randoms(use_true_random=False))
def test_front_does_not_depend_on_row_order(points, rnd):
    order = list(range(len(points)))
    rnd.shuffle(order)
    assert non_dominated(points)[order].tolist() == non_dominated(points[order]).tolist()


@settings(max_examples=200, deadline=None)
@given(_POINTS)
def test_every_dominated_finite_row_is_dominated_by_a_front_row(points):
    front = non_dominated(points)
    for i in np.flatnonzero(~front & ~np.isnan(points).any(axis=1)):
        assert any(dominates(points[j], points[i]) for j in np.flatnonzero(front))


def test_front_of_a_known_set():
    points = np.array([[0.7, 0.6], [0.8, 0.5], [0.6, 0.6], [0.8, 0.5], [0.5, 0.9], [0.4, 0.4]])
    assert non_dominated(points).tolist() == [True, True, False, True, True, False]
    assert all(
        non_dominated(np.array(p)).tolist() == [True] * len(p) for p in itertools.permutations([[0.1, 0.9], [0.9, 0.1]])
    )
    with pytest.raises(ValueError):
        non_dominated(np.zeros(3))
