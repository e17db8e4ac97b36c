"""Single-arm weight policies: ``static``, ``proportional`` and ``target``.

Each serves all traffic with one arm (:data:`~mtrec.fusion.control.MAIN`) and reads only that arm's
counts. The live rates they react to are exponentially discounted tallies (``Limits.smoothing``),
and every move goes through :func:`~mtrec.fusion.control.step_toward` (bounds and maximum step).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from mtrec.errors import ConfigError
from mtrec.fusion.control import MAIN, Decision, Limits, Observation, Policy, Tally, step_toward


class StaticPolicy(Policy):
    """Fixed weights: the prior, never changed (the baseline every adaptive policy must beat)."""

    name = "static"

    def _step(self, obs: Observation) -> Decision:
        return self._decide(obs, "keep", "static weights")


class _TallyPolicy(Policy):
    """A single-arm policy that keeps a discounted tally of the main arm's counts."""

    def __init__(self, weights: dict[str, float], limits: Limits | None = None, seed: int = 0) -> None:
        super().__init__(weights, limits, seed)
        self._tally = Tally()

    def _get_state(self) -> dict[str, Any]:
        return {"impressions": self._tally.impressions, "events": self._tally.events}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._tally = Tally(state["impressions"], dict(state["events"]))

    def _read(self, obs: Observation, tasks: list[str]) -> str | None:
        """Add the window to the tally; the reason to wait when ``tasks`` have too few events."""
        self._tally.add(obs.arms[MAIN], self.tasks, self.limits.smoothing)
        short = self._tally.short(tasks, self.limits.min_events)
        return f"waiting for {self.limits.min_events:.0f} events: {', '.join(short)}" if short else None

    def _move(self, obs: Observation, target: np.ndarray, why: str) -> Decision:
        current = self._vector(self._decision.weights[MAIN])
        new = step_toward(current, target, self.limits)
        if np.allclose(new, current, atol=1e-9):
            return self._decide(obs, "keep", f"at target ({why})")
        moves = ", ".join(f"{t} {a:.3f}->{b:.3f}" for t, a, b in zip(self.tasks, current, new) if abs(b - a) > 5e-4)
        return self._decide(obs, "update", f"{why}: {moves or 'small moves'}", weights={MAIN: self._named(new)})


class ProportionalPolicy(_TallyPolicy):
    """The naive baseline: weights proportional to each task's live rate (events per impression) to the
    power ``power``.

    It has no objective: with ``power=1`` frequent events (clicks) get the largest weights, whatever they
    are worth; ``power=-1`` gives rare events the larger weights instead. Kept to show what control
    without an objective does (``bench/control_bench.py``), not for production.
    """

    name = "proportional"

    def __init__(
        self, weights: dict[str, float], limits: Limits | None = None, seed: int = 0, *, power: float = 1.0
    ) -> None:
        super().__init__(weights, limits, seed)
        if not math.isfinite(power):
            raise ConfigError(f"proportional policy: power={power!r} must be a finite number")
        self._power = float(power)

    def _params(self) -> dict[str, Any]:
        return {"power": self._power}

    def _step(self, obs: Observation) -> Decision:
        wait = self._read(obs, self.tasks)
        if wait:
            return self._decide(obs, "wait", wait)
        rates = self._tally.rates(self.tasks)
        if (rates <= 0).any():
            return self._decide(obs, "wait", "a task has a zero rate")
        target = rates**self._power / (rates**self._power).sum()
        return self._move(obs, target, "weights proportional to live rates " + _fmt(self.tasks, rates))


class TargetPolicy(_TallyPolicy):
    """Quotas: each task in ``targets`` keeps a rate per impression of at least its target (a quota such as
    "at least 2 purchases per 1000 impressions"). For quota-style metrics only: it has no objective
    beyond the quotas; ``calibrated`` maximises the north star.

    - Success is never punished: a task at or above its target keeps its weight.
    - Each update, a task below its target has its weight multiplied by ``exp(gain * shortfall /
      target)``; the other weights shrink in proportion, so no untargeted task soaks up weight.
    - Anti-windup. The tally restarts at every move, so a rate is always that of the weights in force.
      When a task's weight has risen by ``max_step`` since it fell short and its rate has not risen by
      more than two standard errors, or its weight cannot rise further (its bound, or the others'
      lower bounds), the target is *unreachable*: the weights go back to those with the best rate seen
      and hold there (``action`` ``unreachable``; the reason and ``report["unreachable"]`` give the best
      achievable rate and the weight it came at). It resumes when the held weights meet the target.
    """

    name = "target"

    def __init__(
        self,
        weights: dict[str, float],
        limits: Limits | None = None,
        seed: int = 0,
        *,
        targets: dict[str, float] | None = None,
        gain: float = 1.0,
    ) -> None:
        super().__init__(weights, limits, seed)
        targets = dict(targets or {})
        if not targets:
            raise ConfigError("target policy: targets (task -> rate per impression) must name at least one task")
        for task, rate in targets.items():
            if task not in self.tasks:
                raise ConfigError(f"target policy: target for unknown task {task!r}; tasks: {', '.join(self.tasks)}")
            if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
                raise ConfigError(f"target policy: target rate of {task!r} is {rate!r}; must be a positive number")
        if not (math.isfinite(gain) and gain > 0):
            raise ConfigError(f"target policy: gain={gain!r} must be a positive number")
        self._targets = {t: float(r) for t, r in targets.items()}
        self._gain = float(gain)
        self._short_since: dict[str, list[float]] = {}  # task -> [rate, impressions, weight] when it fell short
        self._best: dict[str, list[Any]] = {}  # task -> [best rate seen, the weights it came at]
        self._unreachable: dict[str, Any] = {}

    def _params(self) -> dict[str, Any]:
        return {"targets": self._targets, "gain": self._gain}

    def _get_state(self) -> dict[str, Any]:
        extra = {"short_since": self._short_since, "best": self._best, "unreachable": self._unreachable}
        return super()._get_state() | extra

    def _set_state(self, state: dict[str, Any]) -> None:
        super()._set_state(state)
        self._short_since, self._best, self._unreachable = state["short_since"], state["best"], state["unreachable"]

    def _step(self, obs: Observation) -> Decision:
        wait = self._read(obs, list(self._targets))
        if wait:
            return self._decide(obs, "wait", wait)
        rate = dict(zip(self.tasks, self._tally.rates(self.tasks)))
        n = self._tally.impressions
        current = self._vector(self._decision.weights[MAIN])
        weight = dict(zip(self.tasks, current))
        for t in self._targets:
            if t not in self._best or rate[t] > self._best[t][0]:
                self._best[t] = [float(rate[t]), self._named(current)]
        short = [t for t in self._targets if rate[t] < self._targets[t]]
        self._short_since = {t: v for t, v in self._short_since.items() if t in short}
        for t in short:
            self._short_since.setdefault(t, [float(rate[t]), n, float(weight[t])])
        why = f"rates {_fmt(list(self._targets), [rate[t] for t in self._targets])} vs targets {_fmt(list(self._targets), self._targets.values())}"
        if not short:
            self._unreachable = {}
            return self._decide(obs, "keep", f"every target met ({why})", report={})
        if self._unreachable:
            return self._decide(
                obs, "unreachable", self._unreachable["reason"], report={"unreachable": self._unreachable}
            )
        stalled = [
            t
            for t in short
            if weight[t] >= self._short_since[t][2] + self.limits.max_step - 1e-9
            and not _rose(self._short_since[t][:2], rate[t], n)
        ]
        raise_by = [
            self._gain * (self._targets[t] - rate[t]) / self._targets[t] if t in short else 0.0 for t in self.tasks
        ]
        proposal = current * np.exp(raise_by)
        new = step_toward(current, proposal / proposal.sum(), self.limits)
        blocked = [t for t in short if new[self.tasks.index(t)] <= weight[t] + 1e-9]
        if stalled:
            return self._give_up(obs, stalled[0], f"its weight rose {self.limits.max_step:g} and its rate did not")
        if blocked:
            return self._give_up(obs, blocked[0], "its weight cannot rise further")
        decision = self._move(obs, new, why)
        self._tally = Tally()  # the next rates are those of the new weights
        return decision

    def _give_up(self, obs: Observation, task: str, why: str) -> Decision:
        """Go back toward the weights with the best rate of ``task`` seen and hold: the target is unreachable."""
        rate, weights = self._best[task]
        reason = (
            f"unreachable: best achievable {task} {rate:.4g} per impression at weight {weights[task]:.3f} "
            f"(target {self._targets[task]:.4g}; {why})"
        )
        self._unreachable = {
            "task": task,
            "best_rate": rate,
            "weight": weights[task],
            "target": self._targets[task],
            "reason": reason,
        }
        moved = self._move(obs, self._vector(weights), reason)
        if moved.action == "update":
            self._tally = Tally()
        return replace(moved, action="unreachable", reason=reason, report={"unreachable": self._unreachable})


def _rose(before: list[float], rate: float, impressions: float) -> bool:
    """Whether ``rate`` (over ``impressions``) is above ``before = [rate, impressions]`` by more than two
    standard errors of the difference (binomial)."""
    r0, n0 = before
    se = math.sqrt(r0 * (1 - r0) / max(n0, 1.0) + rate * (1 - rate) / max(impressions, 1.0))
    return rate - r0 > 2 * se


def _fmt(tasks: list[str], values: Any) -> str:
    return "{" + ", ".join(f"{t}: {v:.4g}" for t, v in zip(tasks, values)) + "}"
