"""Always-valid statistics: e-values that stay honest under repeated looks, intervals that cover at every
look, the CUSUM's false alarms and delay, e-LOND levels and the variance bound. Each is checked by
simulation (vectorised, a second or two)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtrec.fusion.stats import Cusum, Evidence, chance_above, lond_level, value_variance

LOOKS, RUNS = 200, 2000


def _paths(theta: float, seed: int, sd: float = 1.0) -> np.ndarray:
    """``(RUNS, LOOKS)`` per-window estimates of ``theta``, each with variance ``sd**2`` (windows of unequal
    size are what ``Evidence`` handles; equal ones suffice here)."""
    return np.random.default_rng(seed).normal(theta, sd, (RUNS, LOOKS))


def _ever(paths: np.ndarray, check) -> float:
    """The share of runs in which ``check(evidence)`` was true at some look."""
    hits = 0
    for row in paths:
        e = Evidence(tau=0.3)
        for d in row:
            e.add(float(d), 1.0)
            if check(e):
                hits += 1
                break
    return hits / len(paths)


def test_the_one_sided_e_value_stays_below_one_over_alpha_under_the_null_at_every_look():
    alpha = 0.05
    null = _ever(_paths(0.0, 0), lambda e: e.log_e_above() >= math.log(1 / alpha))
    assert null <= alpha  # Ville's inequality, whatever the number of looks
    naive = np.mean((np.cumsum(_paths(0.0, 0), axis=1) / np.sqrt(np.arange(1, LOOKS + 1)) > 1.645).any(axis=1))
    assert naive > 4 * alpha  # a z-test read at every look would claim a lift many times as often
    worse = _ever(_paths(-0.1, 1), lambda e: e.log_e_above() >= math.log(1 / alpha))
    assert worse <= alpha / 5  # a negative effect is the null too, and rejected even more rarely
    power = _ever(_paths(0.3, 2), lambda e: e.log_e_above() >= math.log(1 / alpha))
    assert power > 0.95  # a real effect is found


def test_the_e_value_for_harm_is_the_mirror_image():
    e = Evidence(tau=0.3)
    for d in _paths(-0.3, 3)[0]:
        e.add(float(d), 1.0)
    assert e.log_e_below() > math.log(100) and e.log_e_above() < 0


def test_the_confidence_sequence_covers_at_every_look_at_once():
    alpha, theta = 0.1, 0.2

    def missed(e: Evidence) -> bool:
        low, high = e.interval(alpha)
        return not low <= theta <= high

    assert _ever(_paths(theta, 4), missed) <= alpha
    e = Evidence(tau=0.3)
    assert e.interval(alpha) == (-math.inf, math.inf)  # no data, no claim


def test_evidence_ignores_windows_without_data():
    e = Evidence(tau=1.0)
    e.add(5.0, 0.0)
    e.add(math.nan, 1.0)
    assert (e.s, e.info, e.windows) == (0.0, 0.0, 0)
    e.add(2.0, 4.0)
    e.add(1.0, 4.0)
    assert e.estimate == pytest.approx(1.5) and e.windows == 2


def test_the_posterior_shrinks_toward_its_prior_and_chance_above_adds_gaussians():
    e = Evidence(tau=1.0)
    assert e.posterior(prior_mean=0.5) == (pytest.approx(0.5), pytest.approx(1.0))
    e.add(2.0, 1.0)  # one unit of information each from the prior and the data
    mean, sd = e.posterior()
    assert mean == pytest.approx(1.0) and sd == pytest.approx(math.sqrt(0.5))
    assert chance_above((0.0, 1.0)) == pytest.approx(0.5)
    assert chance_above((1.0, 1.0), (-1.0, 1.0)) == pytest.approx(0.5)
    assert chance_above((3.0, 1.0)) == pytest.approx(0.99865, abs=1e-5)


def test_cusum_false_alarms_are_rare_and_a_change_is_caught_soon():
    rng = np.random.default_rng(5)
    threshold = math.log(1000)  # about one false alarm per 1000 windows
    alarms = 0
    for _ in range(50):
        c = Cusum(threshold)
        alarms += any(c.add(float(d), 1.0, 0.5) for d in rng.normal(0.0, 1.0, 200))
    assert alarms <= 50 * 200 / 1000 * 2  # at most about twice the rate Lorden's bound allows
    delays = []
    for _ in range(50):
        c = Cusum(threshold)
        for d in rng.normal(0.0, 1.0, 300):  # a long good stretch does not slow the alarm down...
            c.add(float(d), 1.0, 0.5)
        delays.append(next(i for i, d in enumerate(rng.normal(-0.5, 1.0, 1000)) if c.add(float(d), 1.0, 0.5)))
    assert np.median(delays) < 2 * threshold / (0.5**2 / 2)  # ...about h / KL windows after the change


def test_lond_levels_spend_alpha_once_and_grow_with_discoveries():
    assert sum(lond_level(0.05, k, 0) for k in range(1, 100_000)) == pytest.approx(0.05, rel=1e-4)
    assert lond_level(0.05, 3, 2) == pytest.approx(3 * lond_level(0.05, 3, 0))
    assert lond_level(0.05, 2, 0) < lond_level(0.05, 1, 0)


@pytest.mark.parametrize("nested", [True, False])
def test_the_value_variance_bound_is_exact_for_a_funnel_and_safe_otherwise(nested):
    rng = np.random.default_rng(6)
    n, values = 400_000, np.array([2.0, 30.0])
    click = rng.random(n) < 0.05
    buy = (click & (rng.random(n) < 0.1)) if nested else (rng.random(n) < 0.005)
    x = values[0] * click + values[1] * buy
    bound = value_variance(values, np.array([click.mean(), buy.mean()]))
    if nested:
        assert bound == pytest.approx(x.var(), rel=0.02)
    else:
        assert bound >= x.var() * 0.98
    assert value_variance(values, np.zeros(2)) == 0.0
