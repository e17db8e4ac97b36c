"""``bandit``: Thompson sampling over a few weight arms near the main one, with guardrails and promotion.

The main arm (the *control*) serves ``1 - explore_share`` of the traffic. A few exploration arms,
each within ``max_step`` of the control on the weight simplex, share the rest. The north-star reward
of an arm is its value per impression, ``sum_t values_t * events_t / impressions``. For each
exploration arm the policy keeps two discounted tallies over the same windows: the arm's own counts
and the control's, so a change in the world that moves every arm alike (a preference shift, a
holiday) cancels out of the comparison. The *lift* (arm reward minus control reward) has a Gaussian
posterior: prior ``N(0, (prior_lift * control reward)^2)`` (arms near the control are a priori
about as good) and a normal likelihood whose per-impression variance is bounded by
``(sum_t values_t sqrt(rate_t))^2`` (Minkowski's inequality for 0/1 events; conservative when the
events of a funnel are correlated).

Each update:

1. add the window to the tallies (``Limits.smoothing`` discounts the past, so the posterior tracks
   a drifting world: discounted Thompson sampling, Raj & Kalyani 2017, arXiv:1707.09727);
2. promote the exploration arm most likely to beat the control when that probability reaches
   ``confidence``, both have ``min_events`` of every valued task, and every guardrail holds
   (``guardrails[task] = r``: the arm's rate of ``task`` is at least ``r`` times the control's);
3. retire arms that are confidently worse, break a guardrail, or reached ``max_age`` updates
   without a verdict, and spawn new ones around the control. New arms come in antithetic pairs
   ``c + d``, ``c - d`` with ``d`` a random direction on the simplex whose largest component is
   ``max_step``; a promotion keeps the successful direction and the next pair is spawned along it,
   a step of cross-entropy-style search that follows the slope of the reward;
4. split the exploration traffic by each arm's Thompson probability of being the best exploration
   arm (Thompson 1933; Chapelle & Li 2011), half of it spread evenly so every arm keeps learning.

A promotion moves the main weights by at most ``max_step`` (the arms are spawned within it), and
every served weight stays inside the bounds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mtrec.errors import ConfigError
from mtrec.fusion.control import MAIN, Decision, Limits, Observation, Policy, Tally, project

_EVEN = 0.5  # share of the exploration traffic spread evenly over the exploration arms


@dataclass
class _Arm:
    weights: list[float]
    born: int  # update count when the arm (or its comparison with the control) started
    own: Tally
    control: Tally  # the control arm's counts over the same windows


class BanditPolicy(Policy):
    """See the module docstring. ``values``: worth of one event per task (the north star)."""

    name = "bandit"

    def __init__(
        self,
        weights: dict[str, float],
        limits: Limits | None = None,
        seed: int = 0,
        *,
        values: dict[str, float] | None = None,
        guardrails: dict[str, float] | None = None,
        explore_share: float = 0.2,
        arms: int = 4,
        confidence: float = 0.9,
        prior_lift: float = 0.05,
        max_age: int = 50,
        samples: int = 2000,
    ) -> None:
        super().__init__(weights, limits, seed)
        self._values = _task_numbers("values", values or {}, self.tasks, allow_zero=True)
        if not any(v > 0 for v in self._values.values()):
            raise ConfigError("bandit policy: values (task -> worth of one event) must give some task a positive value")
        self._guardrails = _task_numbers("guardrails", guardrails or {}, self.tasks, allow_zero=False)
        checks = {
            "explore_share": (explore_share, 0 < explore_share <= 0.5),
            "arms": (arms, isinstance(arms, int) and arms >= 2),
            "confidence": (confidence, 0.5 < confidence < 1),
            "prior_lift": (prior_lift, prior_lift > 0),
            "max_age": (max_age, isinstance(max_age, int) and max_age >= 1),
            "samples": (samples, isinstance(samples, int) and samples >= 100),
        }
        for name, (value, ok) in checks.items():
            if not ok:
                raise ConfigError(f"bandit policy: {name}={value!r} is out of range")
        self._explore_share = float(explore_share)
        self._num_arms = arms
        self._confidence = float(confidence)
        self._prior_lift = float(prior_lift)
        self._max_age = max_age
        self._samples = samples
        self._v = np.array([self._values.get(t, 0.0) for t in self.tasks])
        self._arms: dict[str, _Arm] = {}
        self._main = "a0"
        self._next_id = 1
        self._direction: list[float] = []  # the direction of the next pair of arms; empty: draw one
        control = self._vector(self._decision.weights[MAIN])
        self._arms[self._main] = _Arm(control.tolist(), 0, Tally(), Tally())
        spawned = self._refill()
        self._decision = Decision(
            -math.inf,
            self._all_weights(),
            self._traffic(np.full(len(spawned), 1.0 / len(spawned))),
            self._main,
            "init",
            f"control {self._main}; exploring {', '.join(spawned)}",
        )

    # ------------------------------------------------------------------------------ state

    def _params(self) -> dict[str, Any]:
        return {
            "values": self._values,
            "guardrails": self._guardrails,
            "explore_share": self._explore_share,
            "arms": self._num_arms,
            "confidence": self._confidence,
            "prior_lift": self._prior_lift,
            "max_age": self._max_age,
            "samples": self._samples,
        }

    def _get_state(self) -> dict[str, Any]:
        return {
            "arms": {a: asdict(arm) for a, arm in self._arms.items()},
            "main": self._main,
            "next_id": self._next_id,
            "direction": self._direction,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._arms = {
            a: _Arm(list(s["weights"]), int(s["born"]), Tally(**s["own"]), Tally(**s["control"]))
            for a, s in state["arms"].items()
        }
        self._main, self._next_id, self._direction = state["main"], int(state["next_id"]), list(state["direction"])

    def _arms_read(self) -> list[str]:
        return [a for a, share in self._decision.traffic.items() if share > 0]

    # ------------------------------------------------------------------------------ the update

    def _step(self, obs: Observation) -> Decision:
        s = self.limits.smoothing
        explorers = [a for a in self._arms if a != self._main]
        self._arms[self._main].own.add(obs.arms[self._main], self.tasks, s)
        for a in explorers:
            self._arms[a].own.add(obs.arms[a], self.tasks, s)
            self._arms[a].control.add(obs.arms[self._main], self.tasks, s)
        mean, sd = self._lift_posteriors(explorers)
        p_better = {a: _normal_cdf(m / sd_) for a, m, sd_ in zip(explorers, mean, sd)}
        ready = {a: self._ready(self._arms[a]) for a in explorers}
        guards = {a: self._guards(self._arms[a]) for a in explorers}
        notes = []

        eligible = [a for a in explorers if ready[a] and guards[a] is None and p_better[a] >= self._confidence]
        if eligible:
            best = max(eligible, key=lambda a: (p_better[a], mean[explorers.index(a)]))
            lift = mean[explorers.index(best)] / max(self._reward(self._arms[best].control), 1e-300)
            notes.append(f"promote {best} over {self._main}: lift {lift:+.2%} (P={p_better[best]:.3f})")
            self._promote(best)
        else:
            for a in explorers:
                why = self._retire_reason(a, ready[a], guards[a], p_better[a])
                if why is not None:
                    notes.append(f"retire {a}: {why}")
                    del self._arms[a]
        spawned = self._refill()
        if spawned:
            notes.append(f"spawn {', '.join(spawned)}")
        explorers = [a for a in self._arms if a != self._main]
        mean, sd = self._lift_posteriors(explorers)
        best = self._thompson(mean, sd)
        traffic = self._traffic(best)
        action = "promote" if eligible else "explore" if spawned else "keep"
        summary = ", ".join(f"{a} P(best)={p:.2f}" for a, p in zip(explorers, best))
        return self._decide(
            obs, action, "; ".join([*notes, summary]), weights=self._all_weights(), traffic=traffic, main=self._main
        )

    def _reward(self, tally: Tally) -> float:
        return float(self._v @ tally.rates(self.tasks))

    def _lift_posteriors(self, explorers: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(mean (M,), sd (M,))`` of each exploration arm's lift over the control, reward per impression."""
        means, sds = [], []
        for a in explorers:
            arm = self._arms[a]
            pooled = Tally(
                arm.own.impressions + arm.control.impressions,
                {t: arm.own.events.get(t, 0.0) + arm.control.events.get(t, 0.0) for t in self.tasks},
            )
            var = float(self._v @ np.sqrt(pooled.rates(self.tasks))) ** 2  # per impression, upper bound
            n_own, n_ctl = arm.own.impressions, arm.control.impressions
            data_prec = 1.0 / (var / n_own + var / n_ctl) if n_own > 0 and n_ctl > 0 and var > 0 else 0.0
            prior_sd = self._prior_lift * max(self._reward(arm.control), self._reward(pooled), 1e-12)
            prec = data_prec + prior_sd**-2
            lift = self._reward(arm.own) - self._reward(arm.control) if data_prec > 0 else 0.0
            means.append(data_prec * lift / prec)
            sds.append(prec**-0.5)
        return np.array(means), np.array(sds)

    def _ready(self, arm: _Arm) -> bool:
        """Both tallies hold ``min_events`` of every valued and guarded task."""
        needed = [t for t in self.tasks if self._values.get(t, 0.0) > 0 or t in self._guardrails]
        return not arm.own.short(needed, self.limits.min_events) and not arm.control.short(
            needed, self.limits.min_events
        )

    def _guards(self, arm: _Arm) -> str | None:
        """Which guardrail the arm breaks (None: all hold)."""
        own, ctl = arm.own.rates(self.tasks), arm.control.rates(self.tasks)
        for t, ratio in self._guardrails.items():
            i = self.tasks.index(t)
            if own[i] < ratio * ctl[i]:
                return f"guardrail {t}: rate {own[i]:.4g} < {ratio:g} x control {ctl[i]:.4g}"
        return None

    def _retire_reason(self, arm_id: str, ready: bool, guard: str | None, p_better: float) -> str | None:
        if ready and p_better <= 1 - self._confidence:
            return f"worse (P(better)={p_better:.3f})"
        if ready and guard is not None:
            return guard
        age = self._updates - self._arms[arm_id].born
        return f"no verdict after {age} updates" if age >= self._max_age else None

    def _promote(self, arm_id: str) -> None:
        """``arm_id`` becomes the control. The next pair of arms goes on along the step just taken and
        back to the old control; the other arms survive if within ``max_step`` of the new control,
        their comparisons restarted (the control changed)."""
        old, new = self._arms.pop(self._main), self._arms[arm_id]
        c = np.array(new.weights)
        self._direction = (c - np.array(old.weights)).tolist()
        self._main = arm_id
        fresh = {arm_id: _Arm(new.weights, self._updates, new.own, Tally())}
        for a, arm in self._arms.items():
            if a != arm_id and np.abs(np.array(arm.weights) - c).max() <= self.limits.max_step + 1e-9:
                fresh[a] = _Arm(arm.weights, self._updates, Tally(), Tally())
        self._arms = fresh

    def _refill(self) -> list[str]:
        """Spawn exploration arms until there are ``arms`` of them; their ids."""
        c = np.array(self._arms[self._main].weights)
        lo = np.maximum(self.limits.min_weight, c - self.limits.max_step)
        hi = np.minimum(self.limits.max_weight, c + self.limits.max_step)
        spawned = []
        while len(self._arms) - 1 < self._num_arms:
            if not self._direction:
                d = self._rng.normal(size=len(c))
                d -= d.mean()
                self._direction = (d * self.limits.max_step / max(np.abs(d).max(), 1e-12)).tolist()
            d = np.array(self._direction)
            for sign in (1.0, -1.0):
                if len(self._arms) - 1 < self._num_arms:
                    arm_id = f"a{self._next_id}"
                    self._next_id += 1
                    self._arms[arm_id] = _Arm(project(c + sign * d, lo, hi).tolist(), self._updates, Tally(), Tally())
                    spawned.append(arm_id)
            self._direction = []
        return spawned

    def _thompson(self, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
        """``(M,)``: the share of posterior draws in which each exploration arm has the largest lift."""
        draws = self._rng.normal(mean, sd, size=(self._samples, len(mean)))
        return np.bincount(draws.argmax(axis=1), minlength=len(mean)) / self._samples

    def _traffic(self, p_best: np.ndarray) -> dict[str, float]:
        explorers = [a for a in self._arms if a != self._main]
        shares = self._explore_share * (_EVEN / len(explorers) + (1 - _EVEN) * p_best)
        return {self._main: 1.0 - self._explore_share} | {a: float(x) for a, x in zip(explorers, shares)}

    def _all_weights(self) -> dict[str, dict[str, float]]:
        return {a: self._named(np.array(arm.weights)) for a, arm in self._arms.items()}


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def _task_numbers(what: str, given: dict[str, float], tasks: list[str], *, allow_zero: bool) -> dict[str, float]:
    out = {}
    for task, x in given.items():
        if task not in tasks:
            raise ConfigError(f"bandit policy: {what} names unknown task {task!r}; tasks: {', '.join(tasks)}")
        ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
        if not ok or (x == 0 and not allow_zero):
            raise ConfigError(
                f"bandit policy: {what}[{task!r}]={x!r} must be a {'non-negative' if allow_zero else 'positive'} number"
            )
        out[task] = float(x)
    return out
