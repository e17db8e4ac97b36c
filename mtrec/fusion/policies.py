"""Single-arm weight policies: ``static``, ``proportional`` and ``target``.

Each serves all traffic with one arm (:data:`~mtrec.fusion.control.MAIN`) and reads only that arm's
counts. The live rates they react to are exponentially discounted tallies (``Limits.smoothing``),
and every move goes through :func:`~mtrec.fusion.control.step_toward` (bounds and maximum step).
"""

from __future__ import annotations

import math
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
    """Weights proportional to each task's live rate (events per impression) to the power ``power``.

    The naive baseline: with ``power=1`` frequent events (clicks) get the largest weights, whatever
    they are worth; ``power=-1`` gives rare events the larger weights instead.
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
    """Hold each task's online rate near a target with bounded proportional steps.

    Each update multiplies the weight of every task with a target by ``exp(gain * (target - rate) /
    target)`` (a task under its target gains weight, one over it loses), renormalises, and steps at
    most ``max_step`` toward the result. Tasks without a target keep their weight before the
    renormalisation. A proportional controller on the log-weights; ``gain`` sets how hard it pushes.
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

    def _params(self) -> dict[str, Any]:
        return {"targets": self._targets, "gain": self._gain}

    def _step(self, obs: Observation) -> Decision:
        wait = self._read(obs, list(self._targets))
        if wait:
            return self._decide(obs, "wait", wait)
        rates = self._tally.rates(self.tasks)
        target = np.array([self._targets.get(t, r) for t, r in zip(self.tasks, rates)])
        error = np.where([t in self._targets for t in self.tasks], (target - rates) / target, 0.0)
        current = self._vector(self._decision.weights[MAIN])
        proposal = current * np.exp(self._gain * error)
        names = [t for t in self.tasks if t in self._targets]
        why = "rates " + _fmt(names, rates[[self.tasks.index(t) for t in names]]) + " vs targets "
        return self._move(obs, proposal / proposal.sum(), why + _fmt(names, [self._targets[t] for t in names]))


def _fmt(tasks: list[str], values: Any) -> str:
    return "{" + ", ".join(f"{t}: {v:.4g}" for t, v in zip(tasks, values)) + "}"
