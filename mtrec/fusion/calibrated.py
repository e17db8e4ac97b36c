"""``calibrated``: weights from the calibrated north star, rolled out against a permanent holdout.

**Objective.** The north star is the value per impression ``V = sum_t values_t * rate_t``
(``values``: the worth of one event of each task; by default the initial weights divided by the
fusion ``scales``, i.e. the initial weights are taken to rank by value). ``guardrails[task] = rho``
keeps the rate of ``task`` at least ``rho`` times the holdout's, judged on confidence bounds.

**Arms** (``Decision.traffic``, in this order, which :func:`mtrec.arms.choose_arm` keeps sticky):
``holdout`` serves the initial weights to ``holdout`` of the users for ever (never promoted, never
changed); the main arm (``Decision.main``) serves the rest; a *candidate*, when there is one, takes
a share of the non-holdout traffic that grows along ``ramp`` (1 -> 5 -> 20 -> 50 %) and replaces
the main arm when promoted (100 %).

**Candidates.** The served model's predictions are off by a factor per task (``c_t``: events over
predicted events, every arm pooled, discounted by ``Limits.smoothing``). Ranking by
``sum_t (values_t + lambda_t) * c_t * p_t`` ranks by calibrated (shadow) value, and with the ``sum``
fusion the weights that do so are ``w_t ~ (values_t + lambda_t) * c_t * scale_t``. ``lambda_t``, a
shadow value per guarded event (Lagrangian relaxation of the guardrail), is 0 until a candidate or
the main arm breaks the guardrail of ``t``, then doubled each time. The candidate is the step from
the main weights toward those, along the straight line and at most ``Limits.max_step`` in any
weight, once the pooled counts hold ``Limits.min_events`` of every valued and guarded task and the
step moves some weight by ``min_move``. When calibration has nothing new to propose and the traffic
could confirm a lift of ``effect`` within ``horizon`` windows, a search takes over: a step of
``max_step`` along a random direction, then the opposite one, then a new one; a promotion keeps
the direction (a hill climb whose every step is tested). A calibrated candidate is superseded when
the calibration moves its step by half of ``max_step``.

**Ramp.** A candidate moves up a stage after ``dwell`` windows, ``Limits.min_events`` of every
valued and guarded task at its present stage, and a posterior (Gaussian, prior ``N(0, (effect *
V)^2)``) at least even that it is better than the main arm and keeps every guardrail.

**Tests** (:mod:`mtrec.fusion.stats`). Each window adds the candidate-minus-main difference of the
value per impression (variance bounded by :func:`~mtrec.fusion.stats.value_variance`) and of each
guarded rate to e-processes that run from the candidate's start. At the last stage the candidate
gets its e-LOND level (:func:`~mtrec.fusion.stats.lond_level`): the false discovery rate over all
promotions stays at most ``alpha``, however many candidates and looks. It is promoted when its value
e-value reaches ``1 / level`` and the lower bound of every guardrail margin ``rate_c - rho *
rate_holdout`` is at least 0 at the same level (an intersection-union test). The margin is bounded
as ``(rate_c - rate_main) + (rate_main - rho * rate_holdout)``: the first part over the candidate's
windows (two large arms), the second over the main arm's (while the main arm has the holdout's
weights, exactly ``(1 - rho) * rate``), each at half the level. A candidate is retired, at level
0.1 (a wrong retirement only loses an opportunity), when it is worse than the main arm, when no lift
worth a quarter of ``effect`` remains possible, or when it breaks a guardrail; also after ``horizon``
windows at one stage without a positive estimate, when the traffic could have shown one.

**Rollback.** Against the holdout, the main arm's value and guarded rates are watched by CUSUMs
(:class:`~mtrec.fusion.stats.Cusum` for a fall of ``effect``; a false alarm once per
``rollback_windows`` windows on average). An alarm rolls the main arm back to the weights it
replaced (the holdout's at the bottom) and drops the candidate.

**Report** (``Decision.report``): the main arm's lift over the holdout with an always-valid 95 %
interval, each guardrail's ratio to the holdout with its lower bound and state (held, uncertain,
broken), the calibration, the shadow values and the candidate's stage and evidence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mtrec.errors import ConfigError
from mtrec.fusion.control import HOLDOUT, MAIN, ArmCounts, Decision, Limits, Observation, Policy, project, step_toward
from mtrec.fusion.stats import Cusum, Evidence, chance_above, lond_level, value_variance

RAMP = (0.01, 0.05, 0.2, 0.5)
_TRIED = 8  # retired candidates remembered, so a failed proposal is not tried again at once
_STOP = 0.1  # level of the tests that retire a candidate (a wrong one only loses an opportunity)
_REPORT = 0.05  # level of the intervals in reasons and reports (95 %)
_WORTH = 0.25  # a lift below this fraction of ``effect`` is not worth a promotion


@dataclass
class _Main:
    """The main arm and what is known of it against the holdout since it took over."""

    arm: str
    weights: list[float]
    value: Evidence  # main minus holdout, value per impression
    guards: dict[str, Evidence]  # main minus rho * holdout, rate of each guarded task
    value_alarm: Cusum
    guard_alarms: dict[str, Cusum]
    holdout_events: list[float]  # (T,) the holdout's events since


@dataclass
class _Candidate:
    """The candidate arm and its evidence against the main arm since it started."""

    arm: str
    weights: list[float]
    kind: str  # "calibrated" (the calibrated proposal) or "search" (a step along the search direction)
    level: float  # e-LOND level of its promotion test, fixed when it reaches the last stage (0 before)
    stage: int  # index into the ramp
    stage_since: int  # update count when the stage began
    value: Evidence  # candidate minus main, value per impression
    guards: dict[str, Evidence]  # candidate minus main, rate of each guarded task
    events: list[float]  # (T,) the candidate's events since it started
    main_events: list[float]  # (T,) the main arm's over the same windows
    stage_events: list[float]  # (T,) the candidate's events at its present stage


class CalibratedPolicy(Policy):
    """See the module docstring."""

    name = "calibrated"

    def __init__(
        self,
        weights: dict[str, float],
        limits: Limits | None = None,
        seed: int = 0,
        *,
        values: dict[str, float] | None = None,
        scales: dict[str, float] | None = None,
        guardrails: dict[str, float] | None = None,
        holdout: float = 0.05,
        alpha: float = 0.01,
        ramp: list[float] | tuple[float, ...] = RAMP,
        dwell: int = 2,
        min_move: float = 0.02,
        effect: float = 0.02,
        horizon: int = 50,
        rollback_windows: float = 1000.0,
    ) -> None:
        super().__init__(weights, limits, seed)
        self._scales = _numbers("scales", scales or {t: 1.0 for t in self.tasks}, self.tasks, positive=True)
        if set(self._scales) != set(self.tasks):
            raise ConfigError(f"calibrated policy: scales must give every task: {', '.join(self.tasks)}")
        start = self._vector(self._decision.weights[MAIN])
        default_values = {t: w / self._scales[t] for t, w in zip(self.tasks, start)}
        self._values = _numbers("values", values if values is not None else default_values, self.tasks)
        if not any(v > 0 for v in self._values.values()):
            raise ConfigError(
                "calibrated policy: values (task -> worth of one event) must give some task a positive value"
            )
        self._guardrails = _numbers("guardrails", guardrails or {}, self.tasks, positive=True)
        ramp = [float(r) for r in ramp]
        checks = {
            "holdout": (holdout, 0 < holdout < 0.5),
            "alpha": (alpha, 0 < alpha < 0.5),
            "ramp": (ramp, bool(ramp) and all(a < b for a, b in zip([0.0, *ramp], ramp)) and ramp[-1] < 1),
            "dwell": (dwell, isinstance(dwell, int) and dwell >= 1),
            "min_move": (min_move, 0 < min_move <= self.limits.max_step),
            "effect": (effect, 0 < effect < 1),
            "horizon": (horizon, isinstance(horizon, int) and horizon >= 1),
            "rollback_windows": (rollback_windows, rollback_windows > 1),
        }
        for key, (value, ok) in checks.items():
            if not ok:
                raise ConfigError(f"calibrated policy: {key}={value!r} is out of range")
        for task, rho in self._guardrails.items():
            if not rho <= 1:
                raise ConfigError(f"calibrated policy: guardrails[{task!r}]={rho!r} must be at most 1")
        self._holdout_share, self._alpha, self._ramp = float(holdout), float(alpha), ramp
        self._dwell, self._min_move, self._effect, self._horizon = dwell, float(min_move), float(effect), horizon
        self._rollback_windows = float(rollback_windows)
        self._v = np.array([self._values.get(t, 0.0) for t in self.tasks])
        self._s = np.array([self._scales[t] for t in self.tasks])
        self._g = [self.tasks.index(t) for t in self._guardrails]
        self._events = [0.0] * len(self.tasks)  # discounted, every arm pooled
        self._predicted = [0.0] * len(self.tasks)
        self._impressions = 0.0
        self._holdout_w = start.tolist()
        self._main = self._new_main("a0", self._holdout_w)
        self._stack: list[tuple[str, list[float]]] = []  # the mains it replaced, oldest first
        self._candidate: _Candidate | None = None
        self._tried: list[list[float]] = []
        self._lambda = {t: 0.0 for t in self._guardrails}
        self._direction: list[float] = []  # the search direction (empty: draw one), tried along +1 then -1
        self._sign = 1.0
        self._next_id, self._tests, self._promotions = 1, 0, 0
        self._decision = self._decide_now(-math.inf, "init", "holdout and main on the initial weights", {})

    # ------------------------------------------------------------------------------ state

    def _params(self) -> dict[str, Any]:
        return {
            "values": self._values,
            "scales": self._scales,
            "guardrails": self._guardrails,
            "holdout": self._holdout_share,
            "alpha": self._alpha,
            "ramp": self._ramp,
            "dwell": self._dwell,
            "min_move": self._min_move,
            "effect": self._effect,
            "horizon": self._horizon,
            "rollback_windows": self._rollback_windows,
        }

    def _get_state(self) -> dict[str, Any]:
        return {
            "main": asdict(self._main),
            "stack": [[a, w] for a, w in self._stack],
            "candidate": asdict(self._candidate) if self._candidate else None,
            "tried": self._tried,
            "lambda": self._lambda,
            "direction": [self._direction, self._sign],
            "events": self._events,
            "predicted": self._predicted,
            "impressions": self._impressions,
            "counters": [self._next_id, self._tests, self._promotions],
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        m = state["main"]
        self._main = _Main(
            m["arm"],
            m["weights"],
            Evidence(**m["value"]),
            {t: Evidence(**e) for t, e in m["guards"].items()},
            Cusum(**m["value_alarm"]),
            {t: Cusum(**c) for t, c in m["guard_alarms"].items()},
            m["holdout_events"],
        )
        self._stack = [(a, w) for a, w in state["stack"]]
        c = state["candidate"]
        self._candidate = None
        if c is not None:
            guards = {t: Evidence(**e) for t, e in c.pop("guards").items()}
            self._candidate = _Candidate(**(c | {"value": Evidence(**c["value"]), "guards": guards}))
        self._tried, self._lambda = state["tried"], state["lambda"]
        self._direction, self._sign = state["direction"]
        self._events, self._predicted, self._impressions = state["events"], state["predicted"], state["impressions"]
        self._next_id, self._tests, self._promotions = state["counters"]

    def _arms_read(self) -> list[str]:
        return list(self._decision.traffic)

    # ------------------------------------------------------------------------------ the update

    def _step(self, obs: Observation) -> Decision:
        arms = obs.arms
        missing = [t for t in self.tasks if any(t not in arms[a].predicted for a in self._arms_read())]
        if missing:
            return self._decide(obs, "wait", f"no predictions reported for {', '.join(missing)}: cannot calibrate")
        self._calibrate(arms)
        window = self._pooled(arms)
        notes: list[str] = []
        action = "keep"
        alarm = self._watch_main(arms, window)
        if alarm:
            action = "rollback"
            notes.append(self._rollback(alarm))
        elif self._candidate is not None:
            verdict = self._judge(arms, window, self._resolvable(sum(c.impressions for c in arms.values())))
            if verdict:
                action = "promote" if verdict.startswith("promote") else "explore"
                notes.append(verdict)
        if action != "rollback":
            proposed = self._propose(sum(c.impressions for c in arms.values()))
            if proposed:
                action = "explore" if action == "keep" else action
                notes.append(proposed)
        return self._decide_now(obs.timestamp, action, "; ".join(notes) or "nothing to change", self._report())

    def _calibrate(self, arms: dict[str, ArmCounts]) -> None:
        s = self.limits.smoothing
        for i, t in enumerate(self.tasks):
            self._events[i] = s * self._events[i] + sum(c.events[t] for c in arms.values())
            self._predicted[i] = s * self._predicted[i] + sum(c.predicted[t] for c in arms.values())
        self._impressions = s * self._impressions + sum(c.impressions for c in arms.values())

    def _pooled(self, arms: dict[str, ArmCounts]) -> np.ndarray:
        """``(T,)``: this window's rates over every arm (the variance of each arm's rates comes from them)."""
        n = sum(c.impressions for c in arms.values())
        return np.array([sum(c.events[t] for c in arms.values()) / n if n > 0 else 0.0 for t in self.tasks])

    def _watch_main(self, arms: dict[str, ArmCounts], rates: np.ndarray) -> str | None:
        """Add the window to the main arm's comparisons with the holdout; why to roll back (None: no alarm)."""
        m, h = arms[self._main.arm], arms[HOLDOUT]
        main = self._main
        self._scaled(main.value, *main.guards.values())
        main.holdout_events = [a + h.events[t] for a, t in zip(main.holdout_events, self.tasks)]
        if m.impressions <= 0 or h.impressions <= 0:
            return None
        same = self._main.weights == self._holdout_w
        var_v = value_variance(self._v, rates) * (1 / m.impressions + 1 / h.impressions)
        diff_v = _value(self._v, m, self.tasks) - _value(self._v, h, self.tasks)
        main.value.add(diff_v, var_v)
        alarms = []
        ready = not _short(main.holdout_events, self._needed(), self.limits.min_events)
        if not same and main.value_alarm.add(diff_v, var_v, main.value.tau) and ready:
            alarms.append(f"value {self._lift(main.value)} against the holdout")
        for (t, rho), i in zip(self._guardrails.items(), self._g):
            r = rates[i]
            rm, rh = m.events[t] / m.impressions, h.events[t] / h.impressions
            if same:  # one distribution: the margin is (1 - rho) * rate, from both arms pooled
                n = m.impressions + h.impressions
                main.guards[t].add((1 - rho) * (m.events[t] + h.events[t]) / n, (1 - rho) ** 2 * r * (1 - r) / n)
                continue
            var = r * (1 - r) * (1 / m.impressions + rho**2 / h.impressions)
            main.guards[t].add(rm - rho * rh, var)
            if main.guard_alarms[t].add(rm - rho * rh, var, main.guards[t].tau) and ready:
                alarms.append(f"guardrail {t}: rate {rm:.4g} against {rho:g} x holdout {rh:.4g}")
                self._raise_lambda(t)
        return "; ".join(alarms) or None

    def _judge(self, arms: dict[str, ArmCounts], rates: np.ndarray, resolvable: bool) -> str | None:
        """Add the window to the candidate's evidence; what happened to it (None: it goes on as it is).
        ``resolvable``: the traffic can confirm a lift of ``effect`` within ``horizon`` windows."""
        cand = self._candidate
        c, m = arms[cand.arm], arms[self._main.arm]
        cand.events = [a + c.events[t] for a, t in zip(cand.events, self.tasks)]
        cand.main_events = [a + m.events[t] for a, t in zip(cand.main_events, self.tasks)]
        cand.stage_events = [a + c.events[t] for a, t in zip(cand.stage_events, self.tasks)]
        if c.impressions > 0 and m.impressions > 0:
            inv = 1 / c.impressions + 1 / m.impressions
            diff = _value(self._v, c, self.tasks) - _value(self._v, m, self.tasks)
            cand.value.add(diff, value_variance(self._v, rates) * inv)
            for t, i in zip(self._guardrails, self._g):
                r = rates[i]
                cand.guards[t].add(c.events[t] / c.impressions - m.events[t] / m.impressions, r * (1 - r) * inv)
        needed = self._needed()
        ready = not _short(cand.events, needed, self.limits.min_events) and not _short(
            cand.main_events, needed, self.limits.min_events
        )
        p_better = chance_above(cand.value.posterior())
        p_kept = {t: chance_above(cand.guards[t].posterior(), self._main_margin(t)) for t in self._guardrails}
        if ready:
            if cand.value.log_e_below() >= math.log(1 / _STOP):
                return self._retire(f"worse than {self._main.arm}: lift {self._lift(cand.value)}")
            if cand.value.interval(_STOP)[1] < _WORTH * self._effect * self._north_star():
                return self._retire(f"no lift worth having: lift {self._lift(cand.value)}")
            for t in self._guardrails:
                if self._margin_bounds(t, _STOP)[1] < 0:
                    self._raise_lambda(t)
                    return self._retire(f"breaks guardrail {t}: {self._margin(t)}")
        if resolvable and self._updates - cand.stage_since > self._horizon and cand.value.estimate <= 0:
            return self._retire(f"no sign of a lift in {self._horizon} windows: lift {self._lift(cand.value)}")
        if cand.stage < len(self._ramp) - 1:
            waited = self._updates - cand.stage_since >= self._dwell
            favourable = p_better >= 0.5 and all(p >= 0.5 for p in p_kept.values())
            if waited and favourable and not _short(cand.stage_events, needed, self.limits.min_events):
                cand.stage, cand.stage_since = cand.stage + 1, self._updates
                cand.stage_events = [0.0] * len(self.tasks)
                if cand.stage == len(self._ramp) - 1:  # its promotion test starts: the next e-LOND level
                    self._tests += 1
                    cand.level = lond_level(self._alpha, self._tests, self._promotions)
                return f"ramp {cand.arm} to {self._ramp[cand.stage]:.0%}"
            return None
        holdout_ready = self._main.weights == self._holdout_w or not _short(
            self._main.holdout_events, needed, self.limits.min_events
        )
        if not (ready and holdout_ready) or cand.value.log_e_above() < math.log(1 / cand.level):
            return None
        if any(self._margin_bounds(t, cand.level)[0] < 0 for t in self._guardrails):
            return None
        return self._promote()

    def _margin_bounds(self, task: str, level: float) -> tuple[float, float]:
        """Confidence bounds (each side at level ``level``) on the candidate's guardrail margin
        ``rate - rho * holdout rate`` of ``task``: its difference from the main arm plus the main arm's
        margin, each bounded at half the level."""
        cand = self._candidate.guards[task].interval(level / 2)
        main = self._main.guards[task].interval(level / 2)
        return cand[0] + main[0], cand[1] + main[1]

    def _main_margin(self, task: str) -> tuple[float, float]:
        """The posterior ``(mean, sd)`` of the main arm's margin ``rate - rho * holdout rate`` for ``task``,
        its prior centred where the main arm's rate equals the holdout's."""
        rate = self._rates()[self.tasks.index(task)]
        return self._main.guards[task].posterior((1 - self._guardrails[task]) * rate)

    def _margin(self, task: str) -> str:
        """The candidate's guardrail margin of ``task`` for a reason: estimate and confidence bounds, as ratios."""
        rate = max(self._rates()[self.tasks.index(task)], 1e-12)
        rho = self._guardrails[task]
        est = self._candidate.guards[task].estimate + self._main.guards[task].estimate
        low, high = self._margin_bounds(task, _REPORT)
        return f"ratio to the holdout {rho + est / rate:.4f} [{rho + low / rate:.4f}, {rho + high / rate:.4f}], least {rho:g}"

    # ------------------------------------------------------------------------------ changes

    def _proposal(self) -> np.ndarray | None:
        """``(T,)``: the step from the main weights toward the calibrated shadow-value weights (None before
        there are predictions to calibrate against): along the straight line, at most ``max_step`` in any
        weight (cutting each weight at the box instead would bend the direction)."""
        if any(p <= 0 for p in self._predicted) or self._impressions <= 0:
            return None
        calib = np.array(self._events) / np.array(self._predicted)
        shadow = np.array([self._lambda.get(t, 0.0) for t in self.tasks])
        u = (self._v + shadow) * calib * self._s
        if not np.isfinite(u).all() or u.sum() <= 0:
            return None
        main = np.array(self._main.weights)
        lo, hi = np.full(len(u), self.limits.min_weight), np.full(len(u), self.limits.max_weight)
        move = project(u / u.sum(), lo, hi) - main
        return main + move * min(1.0, self.limits.max_step / max(np.abs(move).max(), 1e-12))

    def _propose(self, impressions: float) -> str | None:
        """Supersede a candidate the calibrated proposal has moved away from; start a candidate from the
        calibrated proposal when it moves the main weights by ``min_move`` and was not tried lately, else
        from the search when the traffic can resolve it. What was done, for the reason."""
        if _short(self._events, self._needed(), self.limits.min_events):
            return None  # too few events to calibrate on
        step = self._proposal()
        main = np.array(self._main.weights)
        fresh = step is not None and np.abs(step - main).max() >= self._min_move and not self._was_tried(step)
        done = []
        cand = self._candidate
        if cand is not None:
            if not fresh or (
                cand.kind == "calibrated" and np.abs(step - cand.weights).max() < self.limits.max_step / 2
            ):
                return None
            done.append(self._retire("superseded: the calibrated proposal moved on"))
        if fresh:
            done.append(self._start(step, "calibrated"))
        elif self._resolvable(impressions):
            search = self._search()
            if search is not None:
                done.append(self._start(search, "search"))
        return "; ".join(done) or None

    def _start(self, weights: np.ndarray, kind: str) -> str:
        arm = f"a{self._next_id}"
        self._next_id += 1
        value, guards = self._evidence()
        zeros = [0.0] * len(self.tasks)
        self._candidate = _Candidate(
            arm, weights.tolist(), kind, 0.0, 0, self._updates, value, guards, zeros, zeros, zeros
        )
        self._scaled(value, *guards.values())
        calib = np.array(self._events) / np.array(self._predicted)
        main = self._main.weights
        moves = ", ".join(f"{t} {a:.3f}->{b:.3f}" for t, a, b in zip(self.tasks, main, weights) if abs(b - a) > 5e-4)
        return f"{kind} candidate {arm} ({moves}; calibration {_fmt(self.tasks, calib)})"

    def _resolvable(self, impressions: float) -> bool:
        """Whether, with ``impressions`` a window, the last ramp stage would confirm a lift of ``effect``
        (its e-value reaching the next test's level) within ``horizon`` windows, by the normal approximation."""
        value, last = self._north_star(), self._ramp[-1]
        arm = impressions * (1 - self._holdout_share)
        if value <= 0 or arm <= 0:
            return False
        var = value_variance(self._v, self._rates()) * (1 / (arm * last) + 1 / (arm * (1 - last)))
        z2 = 2 * math.log(1 / lond_level(self._alpha, self._tests + 1, self._promotions))
        return z2 * var / (self._effect * value) ** 2 <= self._horizon

    def _search(self) -> np.ndarray | None:
        """``(T,)``: the next step of the search around the main weights (None: every step near was tried).

        The search tries a random direction (summing to 0, largest component ``max_step``), then its
        opposite, then draws another; a promotion keeps the direction, so the search climbs on.
        """
        main = np.array(self._main.weights)
        for _ in range(8):
            if not self._direction:
                d = self._rng.normal(size=len(self.tasks))
                d -= d.mean()
                self._direction, self._sign = (d * self.limits.max_step / np.abs(d).max()).tolist(), 1.0
            step = step_toward(main, main + self._sign * np.array(self._direction), self.limits)
            if np.abs(step - main).max() >= self._min_move and not self._was_tried(step):
                return step
            self._turn()
        return None

    def _turn(self) -> None:
        """The search direction failed: try its opposite, or, after both, a new one."""
        if self._sign > 0:
            self._sign = -1.0
        else:
            self._direction, self._sign = [], 1.0

    def _was_tried(self, weights: np.ndarray) -> bool:
        return any(np.abs(weights - np.array(w)).max() < self._min_move for w in self._tried)

    def _promote(self) -> str:
        cand = self._candidate
        lift, level = self._lift(cand.value), cand.level
        self._stack.append((self._main.arm, self._main.weights))
        self._main = self._new_main(cand.arm, cand.weights)
        self._candidate, self._tried = None, []
        self._promotions += 1
        return f"promote {cand.arm}: lift over the old main {lift} (e-value >= 1/{level:.3g})"

    def _retire(self, why: str) -> str:
        cand = self._candidate
        self._tried = [*self._tried, cand.weights][-_TRIED:]
        self._candidate = None
        if cand.kind == "search":
            self._turn()
        return f"retire {cand.arm}: {why}"

    def _rollback(self, why: str) -> str:
        old = self._main.arm
        arm, weights = self._stack.pop() if self._stack else ("a0", self._holdout_w)
        self._main = self._new_main(arm, weights)
        dropped = f"; candidate {self._candidate.arm} dropped" if self._candidate else ""
        self._candidate, self._tried = None, []
        return f"roll back {old} to {arm}: {why}{dropped}"

    def _raise_lambda(self, task: str) -> None:
        unit = self._north_star() / max(self._rates()[self.tasks.index(task)], 1e-12) / 4
        self._lambda[task] = max(2 * self._lambda[task], unit)

    def _new_main(self, arm: str, weights: list[float]) -> _Main:
        threshold = math.log(self._rollback_windows)
        value, guards = self._evidence()
        return _Main(
            arm,
            list(weights),
            value,
            guards,
            Cusum(threshold),
            {t: Cusum(threshold) for t in self._guardrails},
            [0.0] * len(self.tasks),
        )

    def _evidence(self) -> tuple[Evidence, dict[str, Evidence]]:
        """Fresh evidence for the value and each guarded rate, its mixture scale ``effect`` times the
        current value and rates (0 before any data: set by :meth:`_scaled` at the first window)."""
        rates = self._rates()
        value = Evidence(self._effect * float(self._v @ rates))
        return value, {t: Evidence(self._effect * rates[i]) for t, i in zip(self._guardrails, self._g)}

    def _scaled(self, *evidence: Evidence) -> None:
        """Give evidence started before any data its mixture scale (from the pooled rates, not from the
        difference it tests)."""
        fresh, guards = self._evidence()
        for e, scale in zip(evidence, [fresh, *guards.values()]):
            if e.tau <= 0 < scale.tau:  # not before the pooled rates exist: a scale fixed at ~0 would
                e.tau = scale.tau  # make every later interval ~1e9 times too wide

    # ------------------------------------------------------------------------------ the decision

    def _decide_now(self, timestamp: float, action: str, reason: str, report: dict[str, Any]) -> Decision:
        rest = 1.0 - self._holdout_share
        weights = {
            HOLDOUT: self._named(np.array(self._holdout_w)),
            self._main.arm: self._named(np.array(self._main.weights)),
        }
        traffic = {HOLDOUT: self._holdout_share, self._main.arm: rest}
        cand = self._candidate
        if cand is not None:
            share = self._ramp[cand.stage]
            weights[cand.arm] = self._named(np.array(cand.weights))
            traffic[self._main.arm], traffic[cand.arm] = rest * (1 - share), rest * share
        return Decision(timestamp, weights, traffic, self._main.arm, action, reason, report)

    def _report(self) -> dict[str, Any]:
        main, cand = self._main, self._candidate
        rates = self._rates()
        value = float(self._v @ rates)
        low, high = main.value.interval(_REPORT)
        report: dict[str, Any] = {
            "north_star": value,
            "lift_vs_holdout": {
                "arm": main.arm,
                "estimate": main.value.estimate / value if value > 0 else 0.0,
                "low": low / value if value > 0 else -math.inf,
                "high": high / value if value > 0 else math.inf,
                "windows": main.value.windows,
            },
            "guardrails": {},
            "calibration": {t: e / p if p > 0 else None for t, e, p in zip(self.tasks, self._events, self._predicted)},
            "shadow_values": dict(self._lambda),
            "tests": self._tests,
            "promotions": self._promotions,
        }
        for (t, rho), i in zip(self._guardrails.items(), self._g):
            lo, hi = main.guards[t].interval(_REPORT)
            r = max(rates[i], 1e-12)
            state = "held" if lo >= 0 else "broken" if hi < 0 else "uncertain"
            report["guardrails"][t] = {
                "least": rho,
                "ratio": rho + main.guards[t].estimate / r,
                "low": rho + lo / r,
                "state": state,
            }
        if cand is not None:
            report["candidate"] = {
                "arm": cand.arm,
                "share": self._ramp[cand.stage],
                "lift_vs_main": cand.value.estimate / value if value > 0 else 0.0,
                "log_e": cand.value.log_e_above(),
                "log_e_needed": math.log(1 / cand.level) if cand.level > 0 else None,
            }
        return _finite(report)

    def _rates(self) -> np.ndarray:
        """``(T,)``: the discounted event rates, every arm pooled."""
        return np.array(self._events) / max(self._impressions, 1e-12)

    def _north_star(self) -> float:
        """The discounted value per impression, every arm pooled."""
        return float(self._v @ self._rates())

    def _needed(self) -> list[int]:
        return [i for i, t in enumerate(self.tasks) if self._values.get(t, 0.0) > 0 or t in self._guardrails]

    def _lift(self, evidence: Evidence) -> str:
        value = max(self._north_star(), 1e-300)
        low, high = evidence.interval(_REPORT)
        return f"{evidence.estimate / value:+.2%} [{low / value:+.2%}, {high / value:+.2%}]"


def _value(v: np.ndarray, counts: ArmCounts, tasks: list[str]) -> float:
    """The value per impression of one arm's window."""
    return float(sum(x * counts.events[t] for x, t in zip(v, tasks)) / counts.impressions)


def _short(events: list[float], needed: list[int], minimum: float) -> bool:
    return any(events[i] < minimum for i in needed)


def _finite(x: Any) -> Any:
    """``x`` with non-finite floats as None (the report crosses JSON)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _fmt(tasks: list[str], values: Any) -> str:
    return "{" + ", ".join(f"{t}: {v:.3g}" for t, v in zip(tasks, values)) + "}"


def _numbers(what: str, given: dict[str, float], tasks: list[str], positive: bool = False) -> dict[str, float]:
    out = {}
    for task, x in given.items():
        if task not in tasks:
            raise ConfigError(f"calibrated policy: {what} names unknown task {task!r}; tasks: {', '.join(tasks)}")
        ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
        if not ok or (positive and x == 0):
            kind = "positive" if positive else "non-negative"
            raise ConfigError(f"calibrated policy: {what}[{task!r}]={x!r} must be a {kind} number")
        out[task] = float(x)
    return out
