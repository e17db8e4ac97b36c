"""Weight-control policies: safety limits, hold-last-good, determinism, state, and what each one learns."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mtrec.errors import ConfigError
from mtrec.fusion import (
    MAIN,
    POLICIES,
    ArmCounts,
    Decision,
    Limits,
    Observation,
    Policy,
    build_policy,
    restore_policy,
)

TASKS = ["click", "add_to_cart", "purchase"]
PRIOR = {"click": 1.0, "add_to_cart": 3.0, "purchase": 8.0}
PRIOR_W = np.array([1.0, 3.0, 8.0]) / 12
LIMITS = Limits(min_weight=0.05, max_weight=0.8, max_step=0.05, smoothing=0.5, min_events=50)
PARAMS = {
    "static": {},
    "proportional": {},
    "target": {"targets": {"click": 0.2, "purchase": 0.02}},
    "bandit": {"values": {"purchase": 1.0}, "guardrails": {"click": 0.9}},
}


def make(name: str, limits: Limits = LIMITS, seed: int = 0, **params) -> Policy:
    return build_policy(name, PRIOR, limits, seed, **(PARAMS[name] | params))


def vec(weights: dict[str, float]) -> np.ndarray:
    return np.array([weights[t] for t in TASKS])


def random_counts(rng: np.random.Generator, impressions: float) -> ArmCounts:
    """Counts with wildly varying rates, to tempt every policy into large moves."""
    rates = rng.uniform(0.001, 0.5, 3) * rng.choice([0.01, 1.0], 3)
    return ArmCounts(impressions, {t: float(rng.binomial(int(impressions), r)) for t, r in zip(TASKS, rates)})


def observe(policy: Policy, ts: float, rng: np.random.Generator, impressions: float = 5e4) -> Observation:
    return Observation(ts, {a: random_counts(rng, impressions * s) for a, s in policy.current.traffic.items()})


def toy(decision: Decision, rng: np.random.Generator, purchase_rate, click_rate=lambda w: 0.2, n: float = 2e6):
    """Counts of every arm in a world where the rates are functions of the arm's weights."""
    arms = {}
    for arm, share in decision.traffic.items():
        w, imp = vec(decision.weights[arm]), int(n * share)
        rates = {"click": click_rate(w), "add_to_cart": 0.05, "purchase": purchase_rate(w)}
        arms[arm] = ArmCounts(float(imp), {t: float(rng.binomial(imp, r)) for t, r in rates.items()})
    return arms


# ---------------------------------------------------------------------------------------- safety


@pytest.mark.parametrize("name", list(POLICIES))
def test_bounds_and_step_cap_hold_under_adversarial_metrics(name):
    policy, rng = make(name), np.random.default_rng(1)
    before = policy.current
    for ts in range(1, 150):
        d = policy.update(observe(policy, ts, rng))
        assert math.isclose(sum(d.traffic.values()), 1.0) and min(d.traffic.values()) > 0
        main = vec(d.weights[d.main])
        for arm, w in d.weights.items():
            w = vec(w)
            assert (w >= LIMITS.min_weight - 1e-9).all() and (w <= LIMITS.max_weight + 1e-9).all(), (arm, w)
            assert math.isclose(w.sum(), 1.0, abs_tol=1e-9)
            assert np.abs(w - main).max() <= LIMITS.max_step + 1e-9  # exploration stays near the main arm
        assert np.abs(main - vec(before.weights[before.main])).max() <= LIMITS.max_step + 1e-9
        before = d


@pytest.mark.parametrize("name", ["proportional", "target", "bandit"])
def test_no_action_below_the_minimum_event_count(name):
    policy = make(name, Limits(min_events=1000, smoothing=0.5))
    start = policy.current
    per_impression = {"click": 0.3, "add_to_cart": 0.05, "purchase": 0.01}
    for ts in range(1, 30):  # at most 1e4 * 0.01 / (1 - 0.5) = 200 (discounted) purchases: never 1000
        arms = {
            a: ArmCounts(1e4 * s, {t: 1e4 * s * r for t, r in per_impression.items()})
            for a, s in policy.current.traffic.items()
        }
        d = policy.update(Observation(ts, arms))
        assert d.weights[d.main] == start.weights[start.main]
        assert d.action in {"wait", "keep", "explore"}, d.reason


BAD = {
    "stale": lambda o: Observation(o.timestamp, o.arms, stale=True),
    "nan": lambda o: Observation(o.timestamp, {a: ArmCounts(math.nan, c.events) for a, c in o.arms.items()}),
    "negative": lambda o: Observation(
        o.timestamp, {a: ArmCounts(c.impressions, c.events | {"purchase": -3.0}) for a, c in o.arms.items()}
    ),
    "missing_task": lambda o: Observation(
        o.timestamp, {a: ArmCounts(c.impressions, {"click": c.events["click"]}) for a, c in o.arms.items()}
    ),
    "missing_arm": lambda o: Observation(o.timestamp, {}),
    "repeated_window": lambda o: Observation(o.timestamp - 1, o.arms),
    "infinite": lambda o: Observation(
        o.timestamp, {a: ArmCounts(c.impressions, c.events | {"click": math.inf}) for a, c in o.arms.items()}
    ),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", list(POLICIES))
def test_hold_last_good_on_stale_missing_or_malformed_metrics(name, bad):
    rng = np.random.default_rng(2)
    policy = make(name)
    for ts in range(1, 20):
        policy.update(observe(policy, ts, rng))
    good, state = policy.current, policy.to_state()
    d = policy.update(BAD[bad](observe(policy, 20, rng)))
    assert d.action == "hold" and d.reason.startswith("hold:")
    assert (d.weights, d.traffic, d.main) == (good.weights, good.traffic, good.main)
    after = policy.to_state()
    assert {k: after[k] for k in ("state", "rng", "last_timestamp", "updates")} == {
        k: state[k] for k in ("state", "rng", "last_timestamp", "updates")
    }
    assert policy.history[-1] is d


@pytest.mark.parametrize("name", list(POLICIES))
def test_deterministic_with_a_seed_and_state_round_trips_through_json(name):
    def feed(policy: Policy, start: int, seed: int) -> list[Decision]:
        rng = np.random.default_rng(seed)
        return [policy.update(observe(policy, ts, rng)) for ts in range(start, start + 25)]

    a, b = make(name, seed=7), make(name, seed=7)
    assert feed(a, 1, 3) == feed(b, 1, 3)
    restored = restore_policy(json.loads(json.dumps(a.to_state())))
    assert type(restored) is type(a) and restored.current == a.current
    assert feed(restored, 100, 4) == feed(a, 100, 4)
    assert json.loads(json.dumps(restored.to_state())) == json.loads(json.dumps(a.to_state()))


def test_bandit_seed_changes_the_exploration_arms():
    assert make("bandit", seed=1).current.weights != make("bandit", seed=2).current.weights


def test_configuration_errors_name_the_problem():
    with pytest.raises(ConfigError, match="valid policies: static, proportional, target, bandit"):
        build_policy("greedy", PRIOR)
    with pytest.raises(ConfigError, match="unknown parameter.*'gain'.*valid parameters: power"):
        build_policy("proportional", PRIOR, gain=1.0)
    with pytest.raises(ConfigError, match="unknown task 'share'"):
        build_policy("target", PRIOR, targets={"share": 0.1})
    with pytest.raises(ConfigError, match="positive value"):
        build_policy("bandit", PRIOR, values={"purchase": 0.0})
    with pytest.raises(ConfigError, match="no weights of 3 tasks"):
        build_policy("static", PRIOR, Limits(min_weight=0.4))
    with pytest.raises(ConfigError, match="Limits.smoothing"):
        Limits(smoothing=1.0)
    with pytest.raises(ConfigError, match="policy state is for 'static'"):
        POLICIES["bandit"].from_state(make("static").to_state())


# ---------------------------------------------------------------------------------------- behaviour


def test_static_never_moves():
    policy, rng = make("static"), np.random.default_rng(0)
    for ts in range(1, 20):
        d = policy.update(observe(policy, ts, rng))
        assert d.action == "keep" and d.weights == {MAIN: policy.history[0].weights[MAIN]}
    np.testing.assert_allclose(vec(d.weights[MAIN]), [1 / 12, 3 / 12, 8 / 12])


def test_proportional_moves_toward_the_live_rates():
    policy = make("proportional", Limits(max_step=0.05, min_events=10, max_weight=0.9))
    counts = {"click": 2e4, "add_to_cart": 5e3, "purchase": 1e3}  # rates 0.2, 0.05, 0.01
    for ts in range(1, 40):
        d = policy.update(Observation(ts, {MAIN: ArmCounts(1e5, counts)}))
    np.testing.assert_allclose(vec(d.weights[MAIN]), [0.2, 0.05, 0.01] / np.sum([0.2, 0.05, 0.01]), atol=1e-6)


def test_target_moves_each_task_toward_its_target():
    policy = make("target", targets={"click": 0.2, "purchase": 0.02})
    start = vec(policy.current.weights[MAIN])
    # clicks above target (0.3 > 0.2), purchases below (0.01 < 0.02): purchase weight up, click down
    d = policy.update(Observation(1, {MAIN: ArmCounts(1e5, {"click": 3e4, "add_to_cart": 5e3, "purchase": 1e3})}))
    w = vec(d.weights[MAIN])
    assert d.action == "update" and w[2] > start[2] and w[0] < start[0]
    # and the other way round
    policy = make("target", targets={"click": 0.2, "purchase": 0.02})
    d = policy.update(Observation(1, {MAIN: ArmCounts(1e5, {"click": 1e4, "add_to_cart": 5e3, "purchase": 4e3})}))
    w = vec(d.weights[MAIN])
    assert w[0] > start[0] and w[2] < start[2]
    # on target: nothing to do
    policy = make("target", targets={"click": 0.2, "purchase": 0.02})
    d = policy.update(Observation(1, {MAIN: ArmCounts(1e5, {"click": 2e4, "add_to_cart": 5e3, "purchase": 2e3})}))
    assert d.action == "keep"


def _run_toy(policy: Policy, rounds: int, start: int, rng, purchase_rate, click_rate=lambda w: 0.2) -> None:
    for ts in range(start, start + rounds):
        policy.update(Observation(ts, toy(policy.current, rng, purchase_rate, click_rate)))


def test_bandit_concentrates_on_the_best_weights_and_re_adapts_after_a_shift():
    limits = Limits(min_weight=0.05, max_weight=0.9, max_step=0.1, smoothing=0.9, min_events=200)
    policy = make("bandit", limits, seed=0)
    rng = np.random.default_rng(0)

    def peak(best):
        return lambda w: 0.02 * (1.0 - 1.5 * float(((w - best) ** 2).sum()))

    best = np.array([0.5, 0.2, 0.3])  # far from the prior (0.08, 0.25, 0.67): several promotions away
    _run_toy(policy, 80, 1, rng, peak(best))
    main = vec(policy.current.weights[policy.current.main])
    assert np.abs(main - best).max() <= 0.1, main
    assert policy.current.traffic[policy.current.main] == pytest.approx(0.8)  # the best arm has the main traffic
    assert sum(d.action == "promote" for d in policy.history) >= 3

    shifted = np.array([0.15, 0.15, 0.7])
    _run_toy(policy, 80, 100, rng, peak(shifted))
    main = vec(policy.current.weights[policy.current.main])
    assert np.abs(main - shifted).max() <= 0.1, main


def test_bandit_guardrail_blocks_arms_that_cost_clicks():
    """Purchases grow with the purchase weight, but clicks fall 5% per 0.01 of click weight lost."""
    limits = Limits(min_weight=0.05, max_weight=0.9, max_step=0.1, smoothing=0.9, min_events=200)

    def purchases(w):
        return 0.01 + 0.02 * w[2]

    def clicks(w):
        return 0.2 * math.exp(-5.0 * max(0.0, PRIOR_W[0] - w[0]))

    guarded, free = make("bandit", limits, guardrails={"click": 0.95}), make("bandit", limits, guardrails={})
    for policy in (guarded, free):
        _run_toy(policy, 60, 1, np.random.default_rng(0), purchases, clicks)
    final = {p: vec(p.current.weights[p.current.main]) for p in (guarded, free)}
    assert final[free][0] < PRIOR_W[0] - 0.03  # without the guardrail, clicks are traded for purchases
    assert final[guarded][0] >= PRIOR_W[0] - 0.02
    assert any("guardrail click" in d.reason for d in guarded.history)


def test_observations_and_decisions_cross_json():
    obs = Observation(12.0, {MAIN: ArmCounts(1e4, {"click": 2e3, "add_to_cart": 400.0, "purchase": 90.0})})
    assert Observation.from_dict(json.loads(json.dumps(obs.to_dict()))) == obs
    d = make("bandit").update(obs)
    assert d.action == "hold"  # the bandit's exploration arms are missing from this observation
    assert Decision.from_dict(json.loads(json.dumps(d.to_dict()))) == d
