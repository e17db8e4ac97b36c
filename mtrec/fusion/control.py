"""What a weight-control policy reads and returns, the safety limits every policy obeys, and the base class.

The serving layer's WeightController reads, each period, the windowed counts of every weight *arm*
(a fusion-weight variant that served part of the traffic) from Prometheus: impressions and the events
of each task (clicks, carts, purchases; for a regression task, the sum of its values). That snapshot
is an :class:`Observation`. A policy turns it into a :class:`Decision`: the weights of every arm, the
share of traffic each arm gets and a human-readable reason. Policies are pure code (no Ray, HTTP or
Prometheus) so the simulator (:mod:`mtrec.fusion.simulator`) runs them offline, and their whole state
round-trips through JSON (:meth:`Policy.to_state`, :meth:`Policy.from_state`) so a restarted controller
resumes.

Every policy obeys :class:`Limits`: each weight stays in ``[min_weight, max_weight]``, no weight moves
more than ``max_step`` in one update, past counts are discounted by ``smoothing`` per update
(an exponentially weighted window), nothing changes until ``min_events`` events are in hand, and a
stale, missing or malformed observation (NaN, infinite or negative counts or predictions, an arm or
task absent, a timestamp not after the last one) is answered with the last good decision. Windows
must not overlap: each observation is added to the policy's tallies once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from mtrec.errors import ConfigError
from mtrec.fusion.score import normalise_weights

MAIN = "main"  # the arm of single-arm policies
HOLDOUT = "holdout"  # the arm that keeps the initial weights for a fixed share of users, for ever
HISTORY = 1000  # decisions kept in Policy.history
STATE_VERSION = 1

logger = logging.getLogger("mtrec.fusion")


@dataclass(frozen=True)
class ArmCounts:
    """One arm's counts over one window: impressions, and events (or value sums) per task.

    ``predicted``: the sum, over the items the arm showed, of the served model's prediction of each
    task (empty when the source does not report it); against ``events`` it measures calibration.
    """

    impressions: float
    events: dict[str, float]
    predicted: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"impressions": self.impressions, "events": dict(self.events), "predicted": dict(self.predicted)}


@dataclass(frozen=True)
class Observation:
    """A snapshot of windowed metrics per arm. ``stale``: the source says the data is not current."""

    timestamp: float
    arms: dict[str, ArmCounts]
    stale: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Observation:
        """From ``{"timestamp", "arms": {arm: {"impressions", "events": {task: n}}}, "stale"}``."""
        arms = {
            a: ArmCounts(c["impressions"], dict(c["events"]), dict(c.get("predicted", {})))
            for a, c in d.get("arms", {}).items()
        }
        return cls(d["timestamp"], arms, bool(d.get("stale", False)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "timestamp": self.timestamp,
            "arms": {a: c.to_dict() for a, c in self.arms.items()},
            "stale": self.stale,
        }


@dataclass(frozen=True)
class Decision:
    """What serving applies: weights per arm (task -> weight, on the simplex) and traffic share per arm.

    ``traffic`` lists the arms in the order serving lays them out on the users' hash range
    (:func:`mtrec.arms.choose_arm`): a holdout first, a ramping candidate last.
    ``action``: ``init`` (before any observation), ``hold`` (bad metrics: last good decision kept),
    ``wait`` (too few events to act), ``keep`` (nothing to change), ``update`` (weights moved),
    ``unreachable`` (a target cannot be met: the weights hold at the best seen), ``explore`` (a
    candidate arm started, ramped or retired), ``promote`` (a candidate takes the main traffic),
    ``rollback`` (the main arm went back to earlier weights).
    ``report``: what the policy measured, as JSON values (lifts against the holdout with their
    confidence intervals, guardrail states, an unreachable target's best achievable rate).
    """

    timestamp: float
    weights: dict[str, dict[str, float]]
    traffic: dict[str, float]
    main: str
    action: str
    reason: str
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        return cls(**d)


@dataclass(frozen=True)
class Limits:
    """The safety limits of every policy."""

    min_weight: float = 0.02  # each weight at least this...
    max_weight: float = 0.9  # ...and at most this
    max_step: float = 0.1  # largest change of any weight in one update (calibrated: also a candidate's distance)
    smoothing: float = 0.8  # past counts are multiplied by this each update (0: only the latest window)
    min_events: float = 100.0  # events of each task a policy reads before it acts on them

    def __post_init__(self) -> None:
        checks = {
            "min_weight": 0 <= self.min_weight < 1,
            "max_weight": 0 < self.max_weight <= 1 and self.max_weight >= self.min_weight,
            "max_step": 0 < self.max_step <= 1,
            "smoothing": 0 <= self.smoothing < 1,
            "min_events": self.min_events >= 0,
        }
        for name, ok in checks.items():
            if not ok or not math.isfinite(getattr(self, name)):
                raise ConfigError(f"Limits.{name}={getattr(self, name)!r} is out of range")

    def check_tasks(self, num_tasks: int) -> None:
        if num_tasks * self.min_weight > 1 or num_tasks * self.max_weight < 1:
            raise ConfigError(
                f"Limits min_weight={self.min_weight}, max_weight={self.max_weight}: no weights of "
                f"{num_tasks} tasks summing to 1 fit these bounds"
            )


def project(target: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``(T,)``: the point of ``{x: lo <= x <= hi, sum x = 1}`` nearest (Euclidean) to ``target``.

    It is ``clip(target - tau, lo, hi)`` for the ``tau`` that makes the sum 1, found by bisection
    (the sum falls as ``tau`` grows). Requires ``sum lo <= 1 <= sum hi``.
    """
    if lo.sum() > 1 + 1e-9 or hi.sum() < 1 - 1e-9:
        raise ValueError(f"no point with sum 1 between lo={lo} and hi={hi}")
    a, b = float((target - hi).min()), float((target - lo).max())
    for _ in range(100):
        mid = 0.5 * (a + b)
        if np.clip(target - mid, lo, hi).sum() > 1:
            a = mid
        else:
            b = mid
    return np.clip(target - 0.5 * (a + b), lo, hi)


def step_toward(current: np.ndarray, target: np.ndarray, limits: Limits) -> np.ndarray:
    """``(T,)``: the weights nearest ``target`` within the bounds and within ``max_step`` of ``current``."""
    lo = np.maximum(limits.min_weight, current - limits.max_step)
    hi = np.minimum(limits.max_weight, current + limits.max_step)
    return project(target, lo, hi)


@dataclass
class Tally:
    """Exponentially discounted impressions and events per task (one arm, or one arm's control)."""

    impressions: float = 0.0
    events: dict[str, float] = field(default_factory=dict)

    def add(self, counts: ArmCounts, tasks: list[str], smoothing: float) -> None:
        self.impressions = smoothing * self.impressions + float(counts.impressions)
        self.events = {t: smoothing * self.events.get(t, 0.0) + float(counts.events[t]) for t in tasks}

    def rates(self, tasks: list[str]) -> np.ndarray:
        """``(T,)`` events per impression (0 before any impression)."""
        n = self.impressions
        return np.array([self.events.get(t, 0.0) / n if n > 0 else 0.0 for t in tasks])

    def short(self, tasks: list[str], minimum: float) -> list[str]:
        """The tasks with fewer than ``minimum`` (discounted) events, with their counts, for reasons."""
        return [f"{t} {self.events.get(t, 0.0):.0f}" for t in tasks if self.events.get(t, 0.0) < minimum]


def counts_problem(counts: ArmCounts, tasks: list[str]) -> str | None:
    """Why an arm's counts are malformed (None if they are fine). Predictions may be absent; any given
    must be a finite count >= 0 like the others."""
    values = {"impressions": counts.impressions} | {t: counts.events.get(t) for t in tasks}
    values |= {f"predicted {t}": v for t, v in counts.predicted.items() if t in tasks}
    for name, v in values.items():
        if v is None:
            return f"{name} missing"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            return f"{name}={v!r} is not a finite count >= 0"
    return None


class Policy:
    """Observation in, Decision out. Subclasses implement :meth:`_step` and their state hooks.

    ``weights`` are the initial weights (task -> weight, any positive scale; normalised to the
    simplex and brought inside the bounds). ``seed`` seeds the policy's random generator, which is
    part of the state, so a run is reproducible and resumes exactly.
    """

    name: ClassVar[str] = ""

    def __init__(self, weights: dict[str, float], limits: Limits | None = None, seed: int = 0) -> None:
        self.limits = limits or Limits()
        self.tasks: list[str] = list(weights)
        self.limits.check_tasks(len(self.tasks))
        w = np.array(list(normalise_weights(weights).values()))
        self._initial: dict[str, float] = dict(weights)
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._last_timestamp = -math.inf
        self._updates = 0
        self.history: list[Decision] = []
        start = project(w, np.full(len(w), self.limits.min_weight), np.full(len(w), self.limits.max_weight))
        self._decision = Decision(
            -math.inf, {MAIN: self._named(start)}, {MAIN: 1.0}, MAIN, "init", "initial weights within bounds"
        )

    # ------------------------------------------------------------------------------ public

    @property
    def current(self) -> Decision:
        """The decision in force."""
        return self._decision

    def update(self, obs: Observation) -> Decision:
        """Read one window of metrics; return (and log) the decision in force after it."""
        problem = self._problem(obs)
        if problem is not None:
            return self._record(replace(self._decision, timestamp=obs.timestamp, action="hold", reason=problem))
        self._last_timestamp = float(obs.timestamp)
        self._updates += 1
        return self._record(self._step(obs))

    def to_state(self) -> dict[str, Any]:
        """Everything needed to resume, as JSON-serialisable values."""
        return {
            "policy": self.name,
            "version": STATE_VERSION,
            "weights": self._initial,
            "limits": asdict(self.limits),
            "seed": self._seed,
            "params": self._params(),
            "rng": self._rng.bit_generator.state,
            "last_timestamp": self._last_timestamp if math.isfinite(self._last_timestamp) else None,
            "updates": self._updates,
            "decision": self._decision.to_dict() | {"timestamp": _finite_or_none(self._decision.timestamp)},
            "state": self._get_state(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Policy:
        """The policy ``to_state`` described, ready to take the next observation."""
        if state.get("policy") != cls.name or state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"policy state is for {state.get('policy')!r} version {state.get('version')!r}; "
                f"expected {cls.name!r} version {STATE_VERSION}"
            )
        policy = cls(state["weights"], Limits(**state["limits"]), state["seed"], **state["params"])
        policy._rng.bit_generator.state = state["rng"]
        last = state["last_timestamp"]
        policy._last_timestamp = -math.inf if last is None else float(last)
        policy._updates = int(state["updates"])
        d = dict(state["decision"])
        d["timestamp"] = -math.inf if d["timestamp"] is None else d["timestamp"]
        policy._decision = Decision.from_dict(d)
        policy._set_state(state["state"])
        return policy

    # ------------------------------------------------------------------------------ for subclasses

    def _params(self) -> dict[str, Any]:
        """The subclass's constructor keyword arguments (JSON values)."""
        return {}

    def _get_state(self) -> dict[str, Any]:
        return {}

    def _set_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_get_state` returned."""

    def _arms_read(self) -> list[str]:
        """The arms an observation must carry for this policy to act."""
        return [MAIN]

    def _step(self, obs: Observation) -> Decision:
        raise NotImplementedError

    def _named(self, w: np.ndarray) -> dict[str, float]:
        return {t: float(x) for t, x in zip(self.tasks, w)}

    def _vector(self, weights: dict[str, float]) -> np.ndarray:
        return np.array([weights[t] for t in self.tasks])

    def _decide(self, obs: Observation, action: str, reason: str, **changes: Any) -> Decision:
        return replace(self._decision, timestamp=obs.timestamp, action=action, reason=reason, **changes)

    # ------------------------------------------------------------------------------ internals

    def _problem(self, obs: Observation) -> str | None:
        if obs.stale:
            return "hold: metrics are stale"
        if not isinstance(obs.timestamp, (int, float)) or not math.isfinite(obs.timestamp):
            return f"hold: timestamp {obs.timestamp!r} is not a finite number"
        if obs.timestamp <= self._last_timestamp:
            return f"hold: window at {obs.timestamp} is not after the last one read ({self._last_timestamp})"
        for arm in self._arms_read():
            if arm not in obs.arms:
                return f"hold: metrics of arm {arm!r} are missing"
        for arm, counts in obs.arms.items():
            bad = counts_problem(counts, self.tasks) if arm in self._arms_read() else None
            if bad is not None:
                return f"hold: arm {arm!r}: {bad}"
        return None

    def _record(self, decision: Decision) -> Decision:
        changed = decision.weights != self._decision.weights or decision.traffic != self._decision.traffic
        self._decision = decision
        self.history.append(decision)
        del self.history[:-HISTORY]
        level = logging.WARNING if decision.action == "hold" else logging.INFO if changed else logging.DEBUG
        logger.log(level, "%s policy at %s: %s: %s", self.name, decision.timestamp, decision.action, decision.reason)
        return decision


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
