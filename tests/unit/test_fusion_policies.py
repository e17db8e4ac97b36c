"""Weight-control policies: safety limits, hold-last-good, determinism, state, and what each one does."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mtrec.arms import choose_arm
from mtrec.errors import ConfigError
from mtrec.fusion import (
    ADAPTIVE,
    HOLDOUT,
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
VALUES = {"click": 1.0, "purchase": 20.0}
PARAMS = {
    "static": {},
    "proportional": {},
    "target": {"targets": {"click": 0.2, "purchase": 0.02}},
    "calibrated": {"values": VALUES, "guardrails": {"click": 0.98}},
}


def make(name: str, limits: Limits = LIMITS, seed: int = 0, **params) -> Policy:
    return build_policy(name, PRIOR, limits, seed, **(PARAMS[name] | params))


def vec(weights: dict[str, float]) -> np.ndarray:
    return np.array([weights[t] for t in TASKS])


def counts(impressions: float, rates: dict[str, float], rng: np.random.Generator, bias: float = 1.5) -> ArmCounts:
    """One arm's window: binomial events at ``rates`` and predictions ``bias`` times too high."""
    n = int(impressions)
    events = {t: float(rng.binomial(n, rates[t])) for t in TASKS}
    return ArmCounts(float(n), events, {t: bias * n * rates[t] for t in TASKS})


def random_counts(rng: np.random.Generator, impressions: float) -> ArmCounts:
    """Counts with wildly varying rates, to tempt every policy into large moves."""
    rates = rng.uniform(0.001, 0.5, 3) * rng.choice([0.01, 1.0], 3)
    return counts(impressions, dict(zip(TASKS, rates)), rng, bias=rng.uniform(0.2, 5.0))


def observe(policy: Policy, ts: float, rng: np.random.Generator, impressions: float = 5e4) -> Observation:
    return Observation(ts, {a: random_counts(rng, impressions * s) for a, s in policy.current.traffic.items()})


def world(decision: Decision, rng, purchase_rate, click_rate=lambda w: 0.05, n: float = 1e6) -> dict[str, ArmCounts]:
    """Every arm's window in a world where the rates are functions of the arm's weights."""
    out = {}
    for arm, share in decision.traffic.items():
        w = vec(decision.weights[arm])
        out[arm] = counts(n * share, {"click": click_rate(w), "add_to_cart": 0.01, "purchase": purchase_rate(w)}, rng)
    return out


def run(policy: Policy, windows: int, start: int, rng, purchase_rate, click_rate=lambda w: 0.05, n=1e6) -> None:
    for ts in range(start, start + windows):
        policy.update(Observation(ts, world(policy.current, rng, purchase_rate, click_rate, n)))


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
            if arm != HOLDOUT:  # the holdout keeps the initial weights, however far the main arm goes
                assert np.abs(w - main).max() <= LIMITS.max_step + 1e-9  # a candidate stays near the main arm
        assert np.abs(main - vec(before.weights[before.main])).max() <= LIMITS.max_step + 1e-9
        before = d


@pytest.mark.parametrize("name", ["proportional", "target", "calibrated"])
def test_no_action_below_the_minimum_event_count(name):
    policy = make(name, Limits(min_events=1000, smoothing=0.5))
    start = policy.current
    per_impression = {"click": 0.3, "add_to_cart": 0.05, "purchase": 0.01}
    rng = np.random.default_rng(0)
    for ts in range(1, 30):  # at most 1e4 * 0.01 / (1 - 0.5) = 200 (discounted) purchases: never 1000
        d = policy.update(Observation(ts, {a: counts(1e4 * s, per_impression, rng) for a, s in start.traffic.items()}))
        assert (d.weights, d.traffic) == (start.weights, start.traffic)
        assert d.action in {"wait", "keep"}, d.reason


BAD = {
    "stale": lambda o: Observation(o.timestamp, o.arms, stale=True),
    "nan": lambda o: Observation(
        o.timestamp, {a: ArmCounts(math.nan, c.events, c.predicted) for a, c in o.arms.items()}
    ),
    "negative": lambda o: Observation(
        o.timestamp,
        {a: ArmCounts(c.impressions, c.events | {"purchase": -3.0}, c.predicted) for a, c in o.arms.items()},
    ),
    "missing_task": lambda o: Observation(
        o.timestamp, {a: ArmCounts(c.impressions, {"click": c.events["click"]}, c.predicted) for a, c in o.arms.items()}
    ),
    "missing_arm": lambda o: Observation(o.timestamp, {}),
    "repeated_window": lambda o: Observation(o.timestamp - 1, o.arms),
    "infinite": lambda o: Observation(
        o.timestamp,
        {a: ArmCounts(c.impressions, c.events | {"click": math.inf}, c.predicted) for a, c in o.arms.items()},
    ),
    "infinite_prediction": lambda o: Observation(
        o.timestamp,
        {a: ArmCounts(c.impressions, c.events, c.predicted | {"purchase": math.inf}) for a, c in o.arms.items()},
    ),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", list(POLICIES))
def test_non_finite_or_malformed_metrics_are_refused_and_the_last_good_weights_hold(name, bad):
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


def test_configuration_errors_name_the_problem():
    with pytest.raises(ConfigError, match="valid policies: static, proportional, target, calibrated"):
        build_policy("greedy", PRIOR)
    with pytest.raises(ConfigError, match="unknown parameter.*'gain'.*valid parameters: power"):
        build_policy("proportional", PRIOR, gain=1.0)
    with pytest.raises(ConfigError, match="unknown task 'share'"):
        build_policy("target", PRIOR, targets={"share": 0.1})
    with pytest.raises(ConfigError, match="positive value"):
        build_policy("calibrated", PRIOR, values={"purchase": 0.0})
    with pytest.raises(ConfigError, match=r"guardrails\['click'\]=1.5 must be at most 1"):
        build_policy("calibrated", PRIOR, guardrails={"click": 1.5})
    with pytest.raises(ConfigError, match="holdout=0.0 is out of range"):
        build_policy("calibrated", PRIOR, holdout=0.0)
    with pytest.raises(ConfigError, match="no weights of 3 tasks"):
        build_policy("static", PRIOR, Limits(min_weight=0.4))
    with pytest.raises(ConfigError, match="Limits.smoothing"):
        Limits(smoothing=1.0)
    with pytest.raises(ConfigError, match="policy state is for 'static'"):
        POLICIES["calibrated"].from_state(make("static").to_state())


def test_observations_and_decisions_cross_json():
    obs = Observation(
        12.0, {MAIN: ArmCounts(1e4, {"click": 2e3, "add_to_cart": 400.0, "purchase": 90.0}, {"click": 1e3})}
    )
    assert Observation.from_dict(json.loads(json.dumps(obs.to_dict()))) == obs
    d = make("calibrated").update(obs)
    assert d.action == "hold"  # the holdout's counts are missing from this observation
    assert Decision.from_dict(json.loads(json.dumps(d.to_dict()))) == d


# ---------------------------------------------------------------------------------------- static, proportional


def test_static_never_moves():
    policy, rng = make("static"), np.random.default_rng(0)
    for ts in range(1, 20):
        d = policy.update(observe(policy, ts, rng))
        assert d.action == "keep" and d.weights == {MAIN: policy.history[0].weights[MAIN]}
    np.testing.assert_allclose(vec(d.weights[MAIN]), [1 / 12, 3 / 12, 8 / 12])


def test_proportional_moves_toward_the_live_rates():
    policy = make("proportional", Limits(max_step=0.05, min_events=10, max_weight=0.9))
    counts_ = {"click": 2e4, "add_to_cart": 5e3, "purchase": 1e3}  # rates 0.2, 0.05, 0.01
    for ts in range(1, 40):
        d = policy.update(Observation(ts, {MAIN: ArmCounts(1e5, counts_)}))
    np.testing.assert_allclose(vec(d.weights[MAIN]), [0.2, 0.05, 0.01] / np.sum([0.2, 0.05, 0.01]), atol=1e-6)


# ---------------------------------------------------------------------------------------- target


def _quota(policy: Policy, windows: int, purchase_rate, rng) -> list[Decision]:
    out = []
    for ts in range(1, windows + 1):
        w = vec(policy.current.weights[MAIN])
        rates = {"click": 0.2, "add_to_cart": 0.05, "purchase": purchase_rate(w)}
        out.append(policy.update(Observation(ts, {MAIN: counts(1e5, rates, rng)})))
    return out


def test_target_never_punishes_success():
    """Purchases above their target: the purchase weight is never lowered, whatever clicks do."""
    policy = make("target", targets={"purchase": 0.01})
    start = vec(policy.current.weights[MAIN])
    for d in _quota(policy, 30, lambda w: 0.03, np.random.default_rng(0)):
        assert vec(d.weights[MAIN])[2] >= start[2] - 1e-12
        assert d.action in {"wait", "keep"}, d.reason


def test_target_raises_a_short_task_until_met_and_the_others_shrink_in_proportion():
    policy = make("target", targets={"purchase": 0.02})
    start = vec(policy.current.weights[MAIN])
    decisions = _quota(policy, 60, lambda w: 0.03 * w[2], np.random.default_rng(1))  # 0.02 needs w >= 0.67
    final = vec(decisions[-1].weights[MAIN])
    assert final[2] > start[2] and decisions[-1].action == "keep" and "every target met" in decisions[-1].reason
    np.testing.assert_allclose(final[0] / final[1], start[0] / start[1], rtol=0.05)  # no task soaks up weight


def test_an_unreachable_target_is_reported_as_such_with_the_best_achievable_rate():
    """More purchase weight helps a little, but the target is twice what the bound reaches: the policy
    says so, names the best rate it saw and holds, instead of winding up."""
    policy = make("target", targets={"purchase": 0.04})
    decisions = _quota(policy, 80, lambda w: 0.01 + 0.01 * w[2], np.random.default_rng(2))
    stuck = [d for d in decisions if d.action == "unreachable"]
    assert stuck, [d.reason for d in decisions[-3:]]
    assert stuck[-1].reason.startswith("unreachable: best achievable purchase")
    report = stuck[-1].report["unreachable"]
    assert report["task"] == "purchase" and report["target"] == 0.04 and 0.01 < report["best_rate"] < 0.02
    first = decisions.index(stuck[0])
    held = {tuple(vec(d.weights[MAIN]).round(12)) for d in decisions[first + 1 :]}
    assert len(held) == 1  # it holds once it knows


def test_a_target_whose_rate_falls_as_its_weight_rises_is_unreachable_too():
    """After a shift more weight means fewer purchases: the policy stops, at the best weights it saw."""
    policy = make("target", targets={"purchase": 0.02})
    start = vec(policy.current.weights[MAIN])
    decisions = _quota(policy, 60, lambda w: 0.02 - 0.01 * w[2], np.random.default_rng(3))
    assert decisions[-1].action == "unreachable"
    assert vec(decisions[-1].weights[MAIN])[2] <= start[2] + LIMITS.max_step + 1e-9


# ---------------------------------------------------------------------------------------- calibrated


def _peak(best: np.ndarray, height: float = 0.01):
    return lambda w: height * (1.0 - 2.0 * float(((w - best) ** 2).sum()))


def test_the_holdout_keeps_its_share_and_weights_and_its_users_through_promotions_and_rollbacks():
    """A real improvement is promoted; then the world turns so that the promoted weights cost clicks,
    and the main arm is rolled back. Through it all the holdout serves 5% of traffic, on the initial
    weights, to the same users."""
    limits = Limits(min_weight=0.05, max_weight=0.8, max_step=0.1, smoothing=0.5, min_events=100)
    policy = make("calibrated", limits, holdout=0.05)
    initial = policy.current.weights[HOLDOUT]
    users = [f"user-{i}" for i in range(2000)]
    in_holdout = {u for u in users if choose_arm(u, policy.current.traffic) == HOLDOUT}
    assert abs(len(in_holdout) / len(users) - 0.05) < 0.015
    rng = np.random.default_rng(4)
    prior = vec(initial)

    run(policy, 150, 1, rng, lambda w: 0.003 * (1 + 2 * w[2]))
    run(
        policy,
        200,
        151,
        rng,
        lambda w: 0.003 * (1 + 2 * w[2]),
        lambda w: 0.05 * math.exp(-3 * max(0.0, w[2] - prior[2])),
    )
    actions = [d.action for d in policy.history]
    assert "promote" in actions and "rollback" in actions, actions
    assert actions.index("rollback") > actions.index("promote")
    layouts = {tuple(d.traffic.items()) for d in policy.history}  # every traffic split served
    assert len(layouts) >= 5
    for d in policy.history:
        assert list(d.traffic)[0] == HOLDOUT and d.traffic[HOLDOUT] == pytest.approx(0.05)
        assert d.weights[HOLDOUT] == initial
    for layout in layouts:
        assert {u for u in users if choose_arm(u, dict(layout)) == HOLDOUT} == in_holdout


def test_a_guardrail_breach_of_the_main_arm_rolls_it_back():
    limits = Limits(min_weight=0.05, max_weight=0.8, max_step=0.1, smoothing=0.5, min_events=100)
    policy = make("calibrated", limits)
    rng = np.random.default_rng(5)
    prior = vec(policy.current.weights[HOLDOUT])
    run(policy, 150, 1, rng, lambda w: 0.003 * (1 + 2 * w[2]))
    promoted = [d for d in policy.history if d.action == "promote"]
    assert promoted and vec(policy.current.weights[policy.current.main])[2] > prior[2]
    run(
        policy,
        100,
        151,
        rng,
        lambda w: 0.003 * (1 + 2 * w[2]),
        lambda w: 0.05 * (0.9 if w[2] > prior[2] + 0.01 else 1.0),
    )
    rollbacks = [d for d in policy.history if d.action == "rollback"]
    assert rollbacks and "guardrail click" in rollbacks[0].reason, [d.reason for d in policy.history[-5:]]
    assert rollbacks[0].timestamp - 150 <= 40  # a 10% breach is caught within a day or two of windows
    assert vec(policy.current.weights[policy.current.main])[2] < vec(promoted[-1].weights[promoted[-1].main])[2]


def test_a_real_lift_is_promoted_only_through_the_test_and_reported_against_the_holdout():
    limits = Limits(min_weight=0.05, max_weight=0.8, max_step=0.1, smoothing=0.5, min_events=100)
    policy = make("calibrated", limits)
    best = np.array([0.3, 0.05, 0.65])
    run(policy, 200, 1, np.random.default_rng(6), _peak(best))
    promotions = [d for d in policy.history if d.action == "promote"]
    assert promotions and all("e-value >= 1/" in d.reason for d in promotions)
    main = vec(policy.current.weights[policy.current.main])
    assert np.abs(main - best).max() < np.abs(PRIOR_W - best).max()  # closer to the best than it started
    lift = policy.current.report["lift_vs_holdout"]
    assert lift["low"] <= lift["estimate"] <= lift["high"] and lift["arm"] == policy.current.main


def test_promotion_needs_the_sequential_test_a_null_world_with_many_looks_rarely_promotes():
    """Rates that no weight changes, looked at every window for 200 windows, on 20 seeds: the share of
    seeds that claim a lift stays near alpha (0.01), where a z-test read at every look would claim one
    most of the time."""
    limits = Limits(min_weight=0.05, max_weight=0.8, max_step=0.1, smoothing=0.5, min_events=100)
    claims, tests = 0, 0
    for seed in range(20):
        policy = make("calibrated", limits, seed=seed)
        run(policy, 200, 1, np.random.default_rng(100 + seed), lambda w: 0.004, n=3e5)
        claims += any(d.action == "promote" for d in policy.history)
        tests += policy.current.report["tests"]
    assert tests >= 20  # candidates were tested: the null was looked at, and often
    assert claims <= 1


def test_the_default_adaptive_policy_is_the_calibrated_one():
    assert ADAPTIVE == "calibrated" and ADAPTIVE in POLICIES


def test_a_first_window_without_events_does_not_widen_every_later_interval():
    """The controller steps before traffic arrives: an empty first window must not fix the evidence's
    mixture scale at ~0 (every later interval ~1e9 times too wide, no promotion ever)."""
    limits = Limits(min_weight=0.05, max_weight=0.8, max_step=0.1, smoothing=0.5, min_events=10)
    intervals = []
    for empty_first in (False, True):
        policy = make("calibrated", limits)
        if empty_first:
            empty = ArmCounts(0.0, dict.fromkeys(TASKS, 0.0), dict.fromkeys(TASKS, 0.0))
            policy.update(Observation(0, dict.fromkeys(policy.current.traffic, empty)))
        run(policy, 5, 1, np.random.default_rng(9), lambda w: 0.003, n=2e4)
        lift = policy.current.report["lift_vs_holdout"]
        assert lift["low"] <= lift["estimate"] <= lift["high"]
        intervals.append(lift["high"] - lift["low"])
    assert intervals[1] < 2 * intervals[0], intervals
