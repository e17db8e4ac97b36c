"""Score fusion: one ranking score per candidate from its per-task predictions and the fusion weights.

Predictions of different tasks live on different scales (a CTR near 0.2, a purchase rate near 0.01,
a dwell time in minutes), so each is divided by a reference *scale* first: :func:`fit_scales` takes
the mean prediction of each task over a reference sample (a validation set, a candidate pool). After
scaling every task averages 1, and a weight says how much a relative lift in that task counts. Weights
are compared on the simplex (non-negative, sum 1); both fusions below rank the same under a positive
rescaling of all weights, so nothing is lost.

:data:`FUSIONS` maps a name to ``f(scaled (..., T) float, weights (T,) float) -> (...,) float``:

- ``sum``: ``sum_t w_t x_t``, the weighted sum; with ``w_t`` proportional to the value of an event
  of task t times its scale, the score is the candidate's expected value (:func:`value_weights`).
- ``product``: ``prod_t x_t ** w_t`` (computed as ``sum_t w_t log x_t``), the multiplicative form
  used in industrial rankers, which needs every task to be somewhat good rather than one to be great.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mtrec.errors import ConfigError
from mtrec.weighted import weighted_sum

_LOG_FLOOR = 1e-12  # a scaled prediction of exactly 0 would make the product -inf for every weight


def weighted_product(scaled: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(...,) float``: ``log prod_t x_t ** w_t`` (a monotone transform of the product, so it ranks the same)."""
    return weighted_sum(np.log(np.maximum(scaled, _LOG_FLOOR)), weights)


FUSIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "sum": weighted_sum,
    "product": weighted_product,
}


def fusion_fn(name: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The fusion ``name`` from :data:`FUSIONS`; ConfigError listing the valid names otherwise."""
    if name not in FUSIONS:
        raise ConfigError(f"unknown fusion {name!r}; valid fusions: {', '.join(FUSIONS)}")
    return FUSIONS[name]


def fit_scales(preds: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The reference scale of each task: its mean prediction over ``preds`` (task -> ``(N,)`` float).

    ValueError naming the task when a mean is not a positive finite number (an empty or all-zero
    prediction column cannot be scaled).
    """
    scales = {}
    for task, p in preds.items():
        mean = float(np.mean(np.asarray(p, np.float64))) if np.size(p) else float("nan")
        if not np.isfinite(mean) or mean <= 0:
            raise ValueError(f"predictions of task {task!r}: mean {mean!r} is not a positive number; cannot scale")
        scales[task] = mean
    return scales


def value_weights(values: Mapping[str, float], scales: Mapping[str, float]) -> dict[str, float]:
    """Simplex weights that make the ``sum`` fusion rank by expected value.

    ``values`` is the worth of one event of each task (a click 1, a purchase 8). With
    ``w_t ∝ value_t * scale_t``, ``sum_t w_t p_t / scale_t ∝ sum_t value_t p_t``.
    """
    raw = {t: float(values.get(t, 0.0)) * float(scales[t]) for t in scales}
    return normalise_weights(raw)


def normalise_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """``weights`` divided by their sum; ValueError naming the task of a negative or non-finite weight."""
    for task, w in weights.items():
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"fusion weight of task {task!r} is {w!r}; weights must be finite and >= 0")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError(f"fusion weights {dict(weights)} sum to {total}; at least one must be positive")
    return {t: float(w) / total for t, w in weights.items()}


def stack(preds: Mapping[str, np.ndarray], tasks: Sequence[str], scales: Mapping[str, float] | None) -> np.ndarray:
    """``(N, T) float64``: the predictions of ``tasks`` side by side, each divided by its scale."""
    missing = [t for t in tasks if t not in preds]
    if missing:
        raise ValueError(f"no predictions for task(s) {missing}; got predictions for {sorted(preds)}")
    cols = [np.asarray(preds[t], np.float64) / (1.0 if scales is None else float(scales[t])) for t in tasks]
    sizes = {len(c) for c in cols}
    if len(sizes) > 1:
        raise ValueError(f"prediction arrays differ in length: {dict(zip(tasks, map(len, cols)))}")
    return np.stack(cols, axis=-1)


def fuse(
    preds: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    scales: Mapping[str, float] | None = None,
    fusion: str = "sum",
) -> np.ndarray:
    """``(N,) float``: the fused score of each candidate.

    ``preds`` maps task -> ``(N,)`` predictions; only the tasks in ``weights`` are read. ``scales``
    (task -> reference scale, from :func:`fit_scales`) divides each task first; None uses raw values.
    """
    tasks = list(weights)
    w = np.array([weights[t] for t in tasks], np.float64)
    return fusion_fn(fusion)(stack(preds, tasks, scales), w)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """``(min(k, N),) int64``: indexes of the ``k`` highest scores, best first; ties go to the lower index."""
    scores = np.asarray(scores, np.float64)
    k = min(int(k), len(scores))
    if k <= 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((np.arange(len(scores)), -scores))  # primary key last: score desc, then index
    return order[:k].astype(np.int64)


def rank(
    preds: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    k: int,
    scales: Mapping[str, float] | None = None,
    fusion: str = "sum",
) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` candidates: ``(indices (k,) int64 best first, scores (k,) float)``."""
    scores = fuse(preds, weights, scales, fusion)
    best = top_k(scores, k)
    return best, scores[best]
