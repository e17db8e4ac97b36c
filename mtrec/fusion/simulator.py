"""A feedback simulator for fusion-weight policies, built on a synthetic scenario's ground truth.

The candidate pool is a synthetic dataset (:func:`mtrec.data.synthetic.generate`): each impression row
is a (user, item, context) candidate whose true probability of each task ``ground_truth.parquet``
holds. A user's rows, shuffled and cut into groups of ``candidates``, are that user's requests. The
ranking model is simulated: its estimate of each task is the truth with Gaussian noise of std
``model_noise`` on the logit of the task's conditional probability (p(cart | click), ...), fixed per
row (a trained model errs the same way each time it sees a candidate) and chained back to the full
space, as ESMM would.

Each round, requests arrive uniformly at random from the pool and are split between the arms of the
policy's decision by its traffic shares. An arm ranks a request's candidates by the fusion of the
estimates under its weights (:func:`mtrec.fusion.fuse` on estimates scaled by
:func:`mtrec.fusion.fit_scales`) and shows the top ``k``. The user answers each shown candidate with
Bernoulli draws from the TRUE probabilities along the task funnel: a click with p(click), a cart given
the click with p(cart | click), and so on. The draws are made in aggregate, as binomials over the
requests that repeat within a round, which has the same distribution as one Bernoulli per impression.
The counts per arm form the :class:`~mtrec.fusion.Observation` the policy reads, as the serving
controller would from Prometheus.

The north star is the value per impression, ``sum_t values_t * events_t / impressions``. It is
scored exactly: the expected value of every arm's slate under the true probabilities, weighted by
its traffic share, so the comparison of policies carries no sampling noise (the policies themselves
see only the noisy counts). The oracle is the fixed weight vector with the highest expected value,
found by a grid over the weight simplex refined by a pattern search. A :class:`Shift` changes the
users' behaviour part way (the model, trained before, does not see it), so the oracle moves.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mtrec.data.contract import INTERACTIONS, read_tasks
from mtrec.data.synthetic import GROUND_TRUTH, generate
from mtrec.errors import ConfigError
from mtrec.fusion import ArmCounts, Observation, Policy, fit_scales, fusion_fn

_P_CLIP = 1e-6  # probabilities are kept inside (0, 1) before taking logits
_CACHE = 256  # slates kept per simulator (one per distinct weight vector)


@dataclass
class Pool:
    """Candidate requests with the true and the estimated probability of each task."""

    tasks: list[str]
    parents: list[int]  # index (in tasks) of the task each depends on, -1 for none; parents come first
    truth: np.ndarray  # (N, T) float64 true full-space probability per candidate row
    estimate: np.ndarray  # (N, T) float64 the simulated model's estimate
    requests: np.ndarray  # (Q, K) int64 candidate rows of each request
    scales: dict[str, float] = field(default_factory=dict)  # fusion scale of each task (mean estimate)


@dataclass(frozen=True)
class Shift:
    """A change in the users' behaviour the model does not see.

    ``logit_shift[task]`` is added to the logit of the task's true conditional probability for every
    candidate; ``logit_drift[task]`` is the std of a per-candidate change of that logit (a taste the
    model never learnt).
    """

    logit_shift: Mapping[str, float] = field(default_factory=dict)
    logit_drift: Mapping[str, float] = field(default_factory=dict)

    def apply(self, pool: Pool, seed: int) -> np.ndarray:
        """``(N, T)``: the pool's truth after the shift."""
        for task in [*self.logit_shift, *self.logit_drift]:
            if task not in pool.tasks:
                raise ConfigError(f"Shift names unknown task {task!r}; tasks: {', '.join(pool.tasks)}")
        rng = np.random.default_rng([seed, 2])
        logits = _logit(conditional(pool.truth, pool.parents))
        shift = np.array([self.logit_shift.get(t, 0.0) for t in pool.tasks])
        drift = np.array([self.logit_drift.get(t, 0.0) for t in pool.tasks])
        return chain(_sigmoid(logits + shift + drift * rng.normal(size=logits.shape)), pool.parents)


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


def synthetic_pool(
    scenario: str = "ecommerce",
    tasks: Sequence[str] | None = None,
    num_users: int = 2000,
    num_items: int = 1000,
    num_interactions: int = 300_000,
    candidates: int = 50,
    model_noise: float = 0.5,
    seed: int = 0,
) -> Pool:
    """Generate scenario ``scenario`` (world ``seed``) in a temporary folder and load its pool."""
    with tempfile.TemporaryDirectory(prefix="mtrec-sim-") as tmp:
        data = generate(scenario, Path(tmp) / "data", num_users, num_items, num_interactions, seed)
        return load_pool(data, tasks, candidates, model_noise, seed)


@dataclass
class SimResult:
    """Per round: the expected value per impression of the served traffic and of the oracle, and weights."""

    tasks: list[str]
    shift_round: int
    value: np.ndarray  # (R,) policy
    oracle_value: np.ndarray  # (R,) oracle of the round's phase
    main_weights: np.ndarray  # (R, T) weights of the main arm in force during each round
    oracle_weights: np.ndarray  # (R, T)
    actions: list[str]

    def fraction(self, phase: int, skip: float = 0.0) -> float:
        """The policy's total value over a phase (0 before the shift, 1 after) as a fraction of the
        oracle's, leaving out the phase's first ``skip`` fraction of rounds."""
        lo, hi = (0, self.shift_round) if phase == 0 else (self.shift_round, len(self.value))
        lo += int(skip * (hi - lo))
        return float(self.value[lo:hi].sum() / self.oracle_value[lo:hi].sum())


class Simulator:
    """Serve a policy's decisions on a :class:`Pool`, round after round; see the module docstring."""

    def __init__(
        self,
        pool: Pool,
        values: Mapping[str, float],
        k: int = 5,
        fusion: str = "sum",
        requests_per_round: int = 100_000,
        shift: Shift | None = None,
        seed: int = 0,
    ) -> None:
        unknown = sorted(set(values) - set(pool.tasks))
        if unknown:
            raise ConfigError(f"values name unknown task(s) {unknown}; tasks: {', '.join(pool.tasks)}")
        if not 1 <= k <= pool.requests.shape[1]:
            raise ConfigError(f"k={k}: must be between 1 and the {pool.requests.shape[1]} candidates per request")
        self.pool = pool
        self.k = k
        self.requests_per_round = requests_per_round
        self._values = np.array([float(values.get(t, 0.0)) for t in pool.tasks])
        self._fuse = fusion_fn(fusion)
        scale = np.array([pool.scales[t] for t in pool.tasks])
        self._scaled = pool.estimate[pool.requests] / scale  # (Q, K, T)
        truths = [pool.truth] + ([shift.apply(pool, seed)] if shift is not None else [])
        self._truth = [t[pool.requests] for t in truths]  # per phase (Q, K, T)
        self._cond = [conditional(t, pool.parents) for t in self._truth]
        self._slates: dict[tuple[float, ...], np.ndarray] = {}
        self._oracles: dict[int, tuple[np.ndarray, float]] = {}
        self._seed = seed

    @property
    def phases(self) -> int:
        return len(self._truth)

    def slate(self, weights: np.ndarray) -> np.ndarray:
        """``(Q, k) int64``: the position (in each request's candidates) of the ``k`` shown under ``weights``."""
        key = tuple(np.round(np.asarray(weights, np.float64), 12))
        if key not in self._slates:
            scores = self._fuse(self._scaled, np.asarray(key))
            if len(self._slates) >= _CACHE:
                self._slates.pop(next(iter(self._slates)))
            self._slates[key] = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
        return self._slates[key]

    def rates(self, weights: np.ndarray, phase: int) -> np.ndarray:
        """``(T,)``: expected events of each task per impression under ``weights`` in ``phase``."""
        shown = np.take_along_axis(self._truth[phase], self.slate(weights)[:, :, None], axis=1)
        return shown.mean(axis=(0, 1))

    def value(self, weights: np.ndarray, phase: int) -> float:
        """Expected north-star value per impression under ``weights`` in ``phase``."""
        return float(self.rates(weights, phase) @ self._values)

    def oracle(self, phase: int, grid: int = 0) -> tuple[np.ndarray, float]:
        """``(weights (T,), value)``: the best fixed weights of ``phase``: the best point of a simplex
        grid (``grid`` divisions; 0 picks about 300 points), then a pattern search that moves weight
        between pairs of tasks in halving steps down to 0.001."""
        if phase not in self._oracles:
            num = len(self.pool.tasks)
            grid = grid or next(g for g in range(40, 0, -1) if _simplex_size(num, g) <= 300)
            points = [np.array(c, np.float64) / grid for c in _compositions(num, grid)]
            best = max(points, key=lambda w: self.value(w, phase))
            best_value, step = self.value(best, phase), 1.0 / grid
            while step >= 1e-3:
                moved = False
                for i, j in itertools.permutations(range(num), 2):
                    w = best.copy()
                    shift = min(step, w[j])
                    w[i] += shift
                    w[j] -= shift
                    v = self.value(w, phase) if shift > 0 else -np.inf
                    if v > best_value + 1e-12:
                        best, best_value, moved = w, v, True
                if not moved:
                    step /= 2
            self._oracles[phase] = (best, best_value)
        return self._oracles[phase]

    def serve(self, weights: np.ndarray, num_requests: int, phase: int, rng: np.random.Generator) -> ArmCounts:
        """One arm's counts for ``num_requests`` requests: Bernoulli draws from the true probabilities along
        the funnel, aggregated per shown candidate (binomials over the requests that repeat)."""
        slate = self.slate(weights)
        arrivals = rng.multinomial(num_requests, np.full(len(slate), 1.0 / len(slate)))  # (Q,)
        cond = np.take_along_axis(self._cond[phase], slate[:, :, None], axis=1)  # (Q, k, T)
        trials = np.broadcast_to(arrivals[:, None], slate.shape)
        events: list[np.ndarray] = []
        for t, parent in enumerate(self.pool.parents):
            events.append(rng.binomial(trials if parent < 0 else events[parent], cond[:, :, t]))
        return ArmCounts(
            float(num_requests * self.k), {task: float(e.sum()) for task, e in zip(self.pool.tasks, events)}
        )

    def run(self, policy: Policy, rounds: int, shift_at: float = 0.5, stale_rate: float = 0.0) -> SimResult:
        """Run ``policy`` for ``rounds`` rounds; the shift (if any) starts at round ``shift_at * rounds``.

        ``stale_rate``: the chance that a round's metrics reach the policy marked stale (lost scrape).
        """
        if policy.tasks != self.pool.tasks:
            raise ConfigError(f"policy tasks {policy.tasks} differ from the simulator's {self.pool.tasks}")
        rng = np.random.default_rng([self._seed, 3])
        shift_round = int(round(shift_at * rounds)) if self.phases > 1 else rounds
        value, oracle_value, main, oracle_w, actions = [], [], [], [], []
        for r in range(rounds):
            phase = int(r >= shift_round)
            decision = policy.current
            arms = list(decision.traffic)
            shares = np.array([decision.traffic[a] for a in arms])
            counts = rng.multinomial(self.requests_per_round, shares / shares.sum())
            weights = {a: np.array([decision.weights[a][t] for t in self.pool.tasks]) for a in arms}
            served = {a: self.serve(weights[a], int(n), phase, rng) for a, n in zip(arms, counts)}
            value.append(sum(s * self.value(weights[a], phase) for a, s in zip(arms, shares)))
            best_w, best_v = self.oracle(phase)
            oracle_value.append(best_v)
            oracle_w.append(best_w)
            main.append(weights[decision.main])
            stale = bool(rng.random() < stale_rate)
            actions.append(policy.update(Observation(float(r + 1), served, stale=stale)).action)
        return SimResult(
            list(self.pool.tasks),
            shift_round,
            np.array(value),
            np.array(oracle_value),
            np.array(main),
            np.array(oracle_w),
            actions,
        )


def _compositions(parts: int, total: int) -> list[tuple[int, ...]]:
    """Every tuple of ``parts`` non-negative integers summing to ``total``."""
    return [c for c in itertools.product(range(total + 1), repeat=parts) if sum(c) == total]


def _simplex_size(parts: int, total: int) -> int:
    return int(np.prod(np.arange(total + 1, total + parts)) // np.prod(np.arange(1, parts)))
