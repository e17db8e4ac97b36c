"""Feedback simulation for fusion-weight policies: candidate pools with known truth, and worlds to serve.

:func:`load_pool` reads a synthetic dataset (:func:`mtrec.data.synthetic.generate`) as a candidate
pool: each row a (user, item, context) candidate with the true probability of each task
(``ground_truth.parquet``) and a simulated model's estimate (the truth with Gaussian noise of std
``model_noise`` on the logit of each task's conditional probability, chained back to the full space
as ESMM would). The demo's simulated users draw from it.

:class:`Simulator` serves a weight policy's decisions in a :class:`World` (the benchmark's worlds
come from :mod:`mtrec.fusion.worlds`), one *window* (a control period) at a time. Each window, a
fixed number of impressions is split between the decision's arms by their traffic shares. An arm
ranks every request's candidates by the fusion of the served model's estimates under its weights and
shows the top ``k`` in order; a user looks at slot ``j`` with probability ``examination[j]``
(position bias) and answers a candidate looked at with the TRUE probabilities. The counts an arm
reports are drawn per window, not per impression: the root task's events are binomial in the
impressions at the arm's expected rate, and each child task's binomial in its parent's events
(p(purchase | click) = rate_purchase / rate_click), as the funnel has them. Beside the events, an arm
reports the sum of the model's predictions over what it showed (``ArmCounts.predicted``), as serving
does; a calibration-aware policy compares the two.

Everything a benchmark scores is exact: the expected value per impression of every arm's slate
under the true probabilities, weighted by traffic share, so comparisons of policies carry no
sampling noise (the policies themselves see only the noisy counts). The oracle of a phase is the
best fixed weight vector within the policy limits' bounds that keeps every guardrail against the
static (holdout) weights: the best point of a simplex grid refined by a pattern search.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mtrec.data.contract import INTERACTIONS, read_tasks
from mtrec.data.synthetic import GROUND_TRUTH
from mtrec.errors import ConfigError
from mtrec.fusion.control import HOLDOUT, ArmCounts, Limits, Observation, Policy, project
from mtrec.fusion.score import fit_scales

_P_CLIP = 1e-6  # probabilities are kept inside (0, 1) before taking logits
_CACHE = 512  # slates kept per simulator (one per distinct model and weight vector)
_GRID_POINTS = 100  # about this many simplex grid points start the oracle's search


@dataclass
class Pool:
    """Candidate requests with the true and the estimated probability of each task."""

    tasks: list[str]
    parents: list[int]  # index (in tasks) of the task each depends on, -1 for none; parents come first
    truth: np.ndarray  # (N, T) float64 true full-space probability per candidate row
    estimate: np.ndarray  # (N, T) float64 the simulated model's estimate
    requests: np.ndarray  # (Q, K) int64 candidate rows of each request
    scales: dict[str, float] = field(default_factory=dict)  # fusion scale of each task (mean estimate)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _P_CLIP, 1 - _P_CLIP)
    return np.log(p / (1 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def conditional(full: np.ndarray, parents: Sequence[int]) -> np.ndarray:
    """``(..., T)``: p(task | parent task) from full-space probabilities (the task itself for roots)."""
    out = np.array(full, np.float64)
    for t, parent in enumerate(parents):
        if parent >= 0:
            out[..., t] = np.clip(full[..., t] / np.maximum(full[..., parent], _P_CLIP), 0.0, 1.0)
    return out


def chain(cond: np.ndarray, parents: Sequence[int]) -> np.ndarray:
    """``(..., T)``: full-space probabilities from conditional ones (inverse of :func:`conditional`)."""
    out = np.array(cond, np.float64)
    for t, parent in enumerate(parents):
        if parent >= 0:
            out[..., t] = cond[..., t] * out[..., parent]
    return out


def load_pool(
    data_dir: str | Path,
    tasks: Sequence[str] | None = None,
    candidates: int = 50,
    model_noise: float = 0.5,
    seed: int = 0,
) -> Pool:
    """The candidate pool of a synthetic dataset (one with ``ground_truth.parquet``).

    ``tasks`` (default: every task of the dataset) must be binary and include the task each depends on.
    """
    root = Path(data_dir)
    specs = {t.name: t for t in read_tasks(root)}
    names = list(tasks) if tasks is not None else list(specs)
    for name in names:
        spec = specs.get(name)
        if spec is None:
            raise ConfigError(f"{root / 'tasks.yaml'}: no task {name!r}; tasks: {', '.join(specs)}")
        if spec.kind != "binary":
            raise ConfigError(f"{root / 'tasks.yaml'}: task {name!r} is {spec.kind}; the simulator draws binary events")
        if spec.depends_on is not None and spec.depends_on not in names[: names.index(name)]:
            raise ConfigError(f"task {name!r} depends on {spec.depends_on!r}, which must come before it in tasks")
    parents = [names.index(specs[n].depends_on) if specs[n].depends_on else -1 for n in names]
    truth_table = pq.read_table(root / GROUND_TRUTH, columns=[f"p_{n}" for n in names])
    truth = np.stack([truth_table.column(f"p_{n}").to_numpy().astype(np.float64) for n in names], axis=1)
    users = pq.read_table(root / INTERACTIONS, columns=["user_id"]).column("user_id").to_numpy()
    rng = np.random.default_rng([seed, 1])
    estimate = chain(_sigmoid(_logit(conditional(truth, parents)) + rng.normal(0, model_noise, truth.shape)), parents)
    requests = _requests(users, candidates, rng)
    if len(requests) == 0:
        raise ConfigError(f"{root / INTERACTIONS}: no user has {candidates} rows; lower candidates")
    scales = fit_scales({n: estimate[:, i] for i, n in enumerate(names)})
    return Pool(names, parents, truth, estimate, requests, scales)


def _requests(users: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``(Q, size) int64``: each user's rows in random order, cut into groups of ``size`` (the rest dropped)."""
    order = np.lexsort((rng.random(len(users)), users))
    by_user = users[order]
    starts = np.flatnonzero(np.r_[True, by_user[1:] != by_user[:-1]])
    ends = np.r_[starts[1:], len(order)]
    groups = [order[a : a + size] for s, e in zip(starts, ends) for a in range(s, e - size + 1, size)]
    return np.array(groups, np.int64).reshape(-1, size)


@dataclass
class Phase:
    """One stretch of a world: what users do and what the served model predicts."""

    truth: np.ndarray  # (Q, K, T) float64 full-space probability of each task for a candidate looked at
    estimate: np.ndarray  # (Q, K, T) float64 the served model's estimate of the same
    scales: dict[str, float]  # the served model's fusion scale of each task (its mean estimate)


@dataclass
class World:
    """A world to serve: requests of ``K`` candidates, the truth and the served model per phase, and
    what is worth what. Phase ``i`` runs from ``starts[i]`` (a fraction of the run) to the next start."""

    name: str
    tasks: list[str]
    parents: list[int]  # index (in tasks) of the task each depends on, -1 for none; parents come first
    values: dict[str, float]  # the north star: the worth of one event of each task
    guardrails: dict[str, float]  # task -> least rate, as a multiple of the holdout's (the static weights')
    prior: dict[str, float]  # the static fusion weights (what serving starts from)
    examination: np.ndarray  # (k,) float64 chance a user looks at each of the k slots shown (position bias)
    phases: list[Phase]
    starts: list[float] = field(default_factory=lambda: [0.0])

    def phase_at(self, window: int, windows: int) -> int:
        """The phase in force during ``window`` (0-based) of a run of ``windows``."""
        return int(np.searchsorted(np.asarray(self.starts) * windows, window, side="right") - 1)


@dataclass
class Move:
    """A change of the main arm's weights: when, by which action, and what it did to the true value."""

    window: int
    action: str
    lift: float  # the new main's expected value over the old one's, relative, in the phase of the move


@dataclass
class Run:
    """One policy over ``R`` windows of one world; every value is exact (expected value per impression)."""

    tasks: list[str]
    phase: np.ndarray  # (R,) int phase of each window
    value: np.ndarray  # (R,) the traffic served, every arm by its share
    static: np.ndarray  # (R,) the static weights
    oracle: np.ndarray  # (R,) the phase's oracle
    main_value: np.ndarray  # (R,) the main arm alone
    main_weights: np.ndarray  # (R, T) weights of the main arm during each window
    main_ratio: np.ndarray  # (R, G) the main arm's true rate of each guarded task over the static weights'
    guardrail_ratio: np.ndarray  # (R, G) the same for all the traffic outside the holdout
    actions: list[str]
    moves: list[Move]


class Simulator:
    """Serve a policy's decisions in a :class:`World`, window after window; see the module docstring.

    ``limits``: the bounds the oracle searches within (the policies' own; default :class:`Limits`).
    """

    def __init__(self, world: World, limits: Limits | None = None) -> None:
        unknown = sorted((set(world.values) | set(world.guardrails)) - set(world.tasks))
        if unknown:
            raise ConfigError(f"world {world.name!r}: values or guardrails name unknown task(s) {unknown}")
        self.world = world
        self.limits = limits or Limits()
        self.k = len(world.examination)
        t = len(world.tasks)
        self._lo, self._hi = np.full(t, self.limits.min_weight), np.full(t, self.limits.max_weight)
        self._values = np.array([float(world.values.get(task, 0.0)) for task in world.tasks])
        self._guarded = [world.tasks.index(task) for task in world.guardrails]
        self._ratios = np.array(list(world.guardrails.values()))
        prior = np.array([world.prior[task] for task in world.tasks], np.float64)
        self.static_weights = project(prior / prior.sum(), self._lo, self._hi)
        # phases that share the served model (the same estimate array) share its slates
        self._model = [next(j for j, q in enumerate(world.phases) if q.estimate is p.estimate) for p in world.phases]
        self._scaled = {
            m: world.phases[m].estimate / np.array([world.phases[m].scales[task] for task in world.tasks])
            for m in set(self._model)
        }
        q, k_all, _ = world.phases[0].truth.shape
        self._row0 = (np.arange(q) * k_all)[:, None]  # flat index of each request's first candidate
        self._flat = [(p.truth.reshape(q * k_all, t), p.estimate.reshape(q * k_all, t)) for p in world.phases]
        self._slates: dict[tuple, np.ndarray] = {}
        self._stats: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._oracles: dict[int, tuple[np.ndarray, float]] = {}

    # ------------------------------------------------------------------------------ exact quantities

    def slate(self, weights: np.ndarray, phase: int) -> np.ndarray:
        """``(Q, k) int64``: the candidates shown under ``weights`` in ``phase``, best first, as flat row
        indexes into the ``(Q * K, T)`` candidate arrays."""
        key = (self._model[phase], *np.round(np.asarray(weights, np.float64), 12))
        if key not in self._slates:
            scores = self._scaled[self._model[phase]] @ np.asarray(key[1:])  # (Q, K)
            top = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k] + self._row0
            order = np.argsort(-scores.ravel()[top], axis=1, kind="stable")
            if len(self._slates) >= _CACHE:
                self._slates.pop(next(iter(self._slates)))
            self._slates[key] = np.take_along_axis(top, order, axis=1)
        return self._slates[key]

    def _rates_and_predicted(self, weights: np.ndarray, phase: int) -> tuple[np.ndarray, np.ndarray]:
        key = (phase, *np.round(np.asarray(weights, np.float64), 12))
        if key not in self._stats:
            slate = self.slate(weights, phase)
            truth, estimate = self._flat[phase]
            seen = self.world.examination @ truth[slate].mean(axis=0)  # (k, T) -> (T,)
            if len(self._stats) >= _CACHE:
                self._stats.pop(next(iter(self._stats)))
            self._stats[key] = (seen / self.k, estimate[slate].mean(axis=(0, 1)))
        return self._stats[key]

    def rates(self, weights: np.ndarray, phase: int) -> np.ndarray:
        """``(T,)``: expected events of each task per impression under ``weights`` in ``phase``."""
        return self._rates_and_predicted(weights, phase)[0]

    def value(self, weights: np.ndarray, phase: int) -> float:
        """Expected north-star value per impression under ``weights`` in ``phase``."""
        return float(self.rates(weights, phase) @ self._values)

    def guardrail_ratio(self, weights: np.ndarray, phase: int) -> np.ndarray:
        """``(G,)``: the rate of each guarded task under ``weights`` over its rate under the static weights."""
        return self.rates(weights, phase)[self._guarded] / self.rates(self.static_weights, phase)[self._guarded]

    def feasible(self, weights: np.ndarray, phase: int) -> bool:
        """Whether ``weights`` keep every guardrail in ``phase``."""
        return bool((self.guardrail_ratio(weights, phase) >= self._ratios - 1e-12).all())

    def oracle(self, phase: int) -> tuple[np.ndarray, float]:
        """``(weights (T,), value)``: the best fixed feasible weights of ``phase`` within the bounds: the
        best point of a simplex grid (and the static weights), then a pattern search that moves weight
        between pairs of tasks in halving steps down to 0.001."""
        if phase not in self._oracles:
            t = len(self.world.tasks)
            grid = next(g for g in range(60, 0, -1) if _simplex_size(t, g) <= _GRID_POINTS)
            points = [np.array(c, np.float64) / grid for c in _compositions(t, grid)]
            points = [w for w in points if (w >= self._lo - 1e-12).all() and (w <= self._hi + 1e-12).all()]

            def score(w: np.ndarray) -> float:
                return self.value(w, phase) if self.feasible(w, phase) else -np.inf

            best = max([self.static_weights, *points], key=score)
            best_value, step = score(best), 1.0 / grid
            while step >= 1e-3:
                moved = False
                for i, j in itertools.permutations(range(t), 2):
                    shift = min(step, best[j] - self._lo[j], self._hi[i] - best[i])
                    if shift <= 1e-12:
                        continue
                    w = best.copy()
                    w[i] += shift
                    w[j] -= shift
                    v = score(w)
                    if v > best_value + 1e-12:
                        best, best_value, moved = w, v, True
                if not moved:
                    step /= 2
            self._oracles[phase] = (best, best_value)
        return self._oracles[phase]

    # ------------------------------------------------------------------------------ serving

    def serve(self, weights: np.ndarray, impressions: int, phase: int, rng: np.random.Generator) -> ArmCounts:
        """One arm's counts over ``impressions``: funnel draws at the arm's expected rates, and the sum of
        the model's predictions over what it showed."""
        rates, predicted = self._rates_and_predicted(weights, phase)
        events: list[int] = []
        for t, parent in enumerate(self.world.parents):
            if parent < 0:
                events.append(int(rng.binomial(impressions, rates[t])))
            else:
                p = rates[t] / rates[parent] if rates[parent] > 0 else 0.0
                events.append(int(rng.binomial(events[parent], min(p, 1.0))))
        tasks = self.world.tasks
        return ArmCounts(
            float(impressions),
            {task: float(e) for task, e in zip(tasks, events)},
            {task: float(impressions * p) for task, p in zip(tasks, predicted)},
        )

    def run(self, policy: Policy, impressions: int, windows: int, seed: int = 0) -> Run:
        """Run ``policy`` for ``windows`` windows of ``impressions`` impressions each."""
        if policy.tasks != self.world.tasks:
            raise ConfigError(f"policy tasks {policy.tasks} differ from the world's {self.world.tasks}")
        rng = np.random.default_rng(seed)
        r = windows
        phases = np.array([self.world.phase_at(w, windows) for w in range(windows)])
        value, main_value, main_w = np.zeros(r), np.zeros(r), np.zeros((r, len(policy.tasks)))
        ratios: list[np.ndarray] = []
        main_ratios: list[np.ndarray] = []
        actions: list[str] = []
        moves: list[Move] = []
        for w, phase in enumerate(phases):
            decision = policy.current
            arms = list(decision.traffic)
            shares = np.array([decision.traffic[a] for a in arms])
            shares = shares / shares.sum()
            counts = rng.multinomial(impressions, shares)
            weights = {a: np.array([decision.weights[a][t] for t in policy.tasks]) for a in arms}
            served = {a: self.serve(weights[a], int(n), phase, rng) for a, n in zip(arms, counts)}
            value[w] = sum(s * self.value(weights[a], phase) for a, s in zip(arms, shares))
            main_w[w] = weights[decision.main]
            main_value[w] = self.value(main_w[w], phase)
            outside = [(a, s) for a, s in zip(arms, shares) if a != HOLDOUT]
            mix = sum(s * self.rates(weights[a], phase) for a, s in outside) / sum(s for _, s in outside)
            ratios.append(mix[self._guarded] / self.rates(self.static_weights, phase)[self._guarded])
            main_ratios.append(self.guardrail_ratio(main_w[w], phase))
            after = policy.update(Observation(float(w + 1), served))
            actions.append(after.action)
            new_main = np.array([after.weights[after.main][t] for t in policy.tasks])
            if not np.allclose(new_main, main_w[w], atol=1e-12):
                moves.append(Move(w, after.action, self.value(new_main, phase) / main_value[w] - 1.0))
        static = np.array([self.value(self.static_weights, p) for p in phases])
        oracle = np.array([self.oracle(p)[1] for p in phases])
        return Run(
            list(policy.tasks),
            phases,
            value,
            static,
            oracle,
            main_value,
            main_w,
            np.array(main_ratios),
            np.array(ratios),
            actions,
            moves,
        )


def _compositions(parts: int, total: int) -> list[tuple[int, ...]]:
    """Every tuple of ``parts`` non-negative integers summing to ``total``."""
    return [c for c in itertools.product(range(total + 1), repeat=parts) if sum(c) == total]


def _simplex_size(parts: int, total: int) -> int:
    return int(np.prod(np.arange(total + 1, total + parts)) // np.prod(np.arange(1, parts)))
