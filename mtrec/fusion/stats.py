"""Always-valid statistics for comparing weight arms window by window, and the levels that keep many tests honest.

A controller looks at its arms after every window, for as long as it runs, and tests one candidate
after another. A fixed-horizon z-test read at every look, or a posterior probability compared with a
bar, promotes noise (the winner's curse): evidence here is an e-process, which stays valid at every
look and under any stopping rule.

- :class:`Evidence` accumulates, per window ``w``, an estimate ``d_w`` of a difference ``theta``
  between two arms (a lift in value per impression, a guardrail margin) with its variance ``v_w``:
  ``S = sum d_w / v_w`` and ``I = sum 1 / v_w``. ``S / I`` is the inverse-variance estimate of theta
  and ``exp(t S - t^2 I / 2)`` the Gaussian likelihood ratio of ``theta = t`` against ``theta = 0``.
  Mixing it over ``t`` gives the mixture sequential probability ratio test (mSPRT; Robbins 1970;
  Johari, Koomen, Pekelis & Walsh 2017/2022, "Always valid inference: continuous monitoring of A/B
  tests"). Mixed over a half-normal ``t >= 0`` of scale ``tau`` it is an e-process for
  ``theta <= 0`` (:meth:`Evidence.log_e_above`); by Ville's inequality the chance that it ever
  reaches ``1 / alpha`` under that null is at most ``alpha``. Mixed over ``N(0, tau^2)`` it gives a
  confidence sequence (:meth:`Evidence.interval`): an interval that covers theta at every window at
  once with probability ``1 - alpha`` (Howard, Ramdas, McAuliffe & Sekhon 2021). The per-window
  estimates are sums over many impressions, so the Gaussian likelihood is the central-limit one:
  the guarantees hold once each arm has enough events (callers wait for ``Limits.min_events``).
- :func:`lond_level`: the level of the k-th of a sequence of tests under e-LOND (Xu & Ramdas 2024,
  "Online multiple testing with e-values"): ``alpha * gamma_k * (discoveries so far + 1)`` with
  ``gamma_k = 6 / (pi^2 k^2)``. Every candidate a policy ever tests is one hypothesis, so the false
  discovery rate over all promotions, however many arms and looks, stays at most ``alpha``.
- :class:`Cusum`: Page's CUSUM (Page 1954) of the same Gaussian likelihood ratios, for a change that
  happens after a long good stretch (a promoted arm that stops being good when the world shifts):
  it alarms within a few windows of the change, where an e-process started at the promotion would
  first have to unlearn the good stretch. Its false alarms come at most once per ``e^h`` windows on
  average (Lorden 1971); an e-detector in the sense of Shin, Ramdas & Rinaldo (2023).
- :func:`value_variance`: a bound on the per-impression variance of a weighted sum of 0/1 events.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_SQRT2 = math.sqrt(2.0)


def _log_normal_cdf(z: float) -> float:
    """``log Phi(z)``, accurate in the far left tail too."""
    if z > -20.0:
        return math.log(0.5 * math.erfc(-z / _SQRT2))
    return -0.5 * z * z - math.log(-z) - 0.5 * math.log(2 * math.pi)  # Mills' ratio


@dataclass
class Evidence:
    """Always-valid evidence about a difference ``theta`` between two arms; see the module docstring.

    ``tau``: the mixture scale, in theta's units: roughly the size of difference the test is most
    sensitive to. It must not be chosen from the data being tested (a caller fixes it when it starts).
    """

    tau: float
    s: float = 0.0  # sum d_w / v_w
    info: float = 0.0  # sum 1 / v_w
    windows: int = 0

    def add(self, diff: float, var: float) -> None:
        """One window's estimate ``diff`` of theta and its variance ``var`` (> 0; a window without data is skipped)."""
        if var > 0 and math.isfinite(diff) and math.isfinite(var):
            self.s += diff / var
            self.info += 1.0 / var
            self.windows += 1

    @property
    def estimate(self) -> float:
        """The inverse-variance weighted estimate of theta (0 before any data)."""
        return self.s / self.info if self.info > 0 else 0.0

    def log_e_above(self) -> float:
        """``log`` of the e-value against ``theta <= 0`` (large: theta > 0)."""
        return self._log_e_one_sided(self.s)

    def log_e_below(self) -> float:
        """``log`` of the e-value against ``theta >= 0`` (large: theta < 0)."""
        return self._log_e_one_sided(-self.s)

    def _log_e_one_sided(self, s: float) -> float:
        # int_0^inf exp(t s - t^2 I / 2) * 2 phi(t / tau) / tau dt
        #   = 2 / sqrt(1 + tau^2 I) * exp(tau^2 s^2 / (2 (1 + tau^2 I))) * Phi(tau s / sqrt(1 + tau^2 I))
        a = 1.0 + self.tau**2 * self.info
        return (
            math.log(2.0)
            - 0.5 * math.log(a)
            + self.tau**2 * s * s / (2 * a)
            + _log_normal_cdf(self.tau * s / math.sqrt(a))
        )

    def posterior(self, prior_mean: float = 0.0) -> tuple[float, float]:
        """``(mean, sd)`` of theta under the prior ``N(prior_mean, tau^2)`` and the Gaussian likelihood.
        Not always valid: for allocating traffic and stopping, never for claims."""
        if self.tau <= 0:  # no scale yet: the prior is all there is
            return prior_mean, 0.0
        precision = self.info + self.tau**-2
        return (self.s + prior_mean * self.tau**-2) / precision, precision**-0.5

    def interval(self, alpha: float) -> tuple[float, float]:
        """A ``1 - alpha`` confidence sequence for theta: valid at every window at once. ``(-inf, inf)``
        before any data."""
        if self.info <= 0 or self.tau <= 0:
            return -math.inf, math.inf
        a = 1.0 + self.tau**2 * self.info
        radius = math.sqrt(a / self.tau**2 * (2 * math.log(1 / alpha) + math.log(a))) / self.info
        return self.estimate - radius, self.estimate + radius


@dataclass
class Cusum:
    """Page's CUSUM for a fall of theta from ``>= 0`` to ``-shift`` (see the module docstring).

    ``stat`` is the largest log likelihood ratio, over all start windows, of ``theta = -shift`` against
    ``theta = 0``; :meth:`add` returns True when it reaches ``threshold``.
    """

    threshold: float
    stat: float = 0.0

    def add(self, diff: float, var: float, shift: float) -> bool:
        if var > 0 and shift > 0 and math.isfinite(diff) and math.isfinite(var):
            self.stat = max(0.0, self.stat + (-shift * diff - shift * shift / 2) / var)
        return self.stat >= self.threshold


def chance_above(*posteriors: tuple[float, float]) -> float:
    """The probability that a sum of independent Gaussians, each ``(mean, sd)``, is above 0."""
    mean = sum(m for m, _ in posteriors)
    sd = math.sqrt(sum(s * s for _, s in posteriors))
    return 0.5 * math.erfc(-mean / (sd * _SQRT2))


def lond_level(alpha: float, k: int, discoveries: int) -> float:
    """The level of the ``k``-th test (1-based) after ``discoveries`` rejections, under e-LOND:
    reject when the e-value reaches ``1 / level``. Keeps the false discovery rate at most ``alpha``."""
    return alpha * 6.0 / (math.pi**2 * k * k) * (discoveries + 1)


def value_variance(values: np.ndarray, rates: np.ndarray) -> float:
    """An upper bound on the per-impression variance of ``sum_t values_t * x_t``, each ``x_t`` a 0/1 event
    with rate ``rates_t`` and ``values >= 0`` (``(T,)`` each). Two events happen together at most as often
    as the rarer one, whatever their dependence, so the variance is at most ``sum_{t,s} v_t v_s
    min(r_t, r_s) - (sum_t v_t r_t)^2``; it is exact for a funnel (each event implies the one before)."""
    r = np.clip(np.asarray(rates, np.float64), 0.0, 1.0)
    v = np.asarray(values, np.float64)
    return float(max(v @ np.minimum.outer(r, r) @ v - (v @ r) ** 2, 0.0))
