"""Evaluation metrics per task, in numpy: AUC, logloss, RMSE, MAE, NDCG@K and HR@K per user, and a
seesaw report comparing a multi-task run with single-task runs.

Every function takes 1-d arrays of equal length and returns a Python float (NaN when the metric is
undefined on the input, e.g. AUC with one class only, or an empty input).
"""

from __future__ import annotations

import math

import numpy as np

from mtrec.config import TaskSpec

_HIGHER_IS_BETTER = ("auc", "cold_auc", "ndcg@10", "hr@10")
# what :func:`task_metrics` may report per task kind (cold_* and @10 only when the data allows)
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("auc", "logloss", "cold_auc", "ndcg@10", "hr@10"),
    "regression": ("rmse", "mae", "cold_rmse"),
}


def objective_names(tasks: list[TaskSpec]) -> list[str]:
    """Every metric an objective may name for ``tasks``: ``mean_auc`` (the mean AUC of the binary tasks)
    and ``<task>.<metric>``."""
    return ["mean_auc"] + [f"{t.name}.{m}" for t in tasks for m in TASK_METRICS[t.kind]]


def _arrays(*arrays: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
    out = [np.asarray(a).reshape(-1) for a in arrays]
    sizes = {name: len(a) for name, a in zip(names, out)}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"arrays differ in length: {sizes}")
    return out


def _finite(name: str, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} non-finite value{'s' if bad > 1 else ''} of {len(x)}")
    return x


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve, ``y (N,)`` 0/1, ``score (N,)`` float.

    Rank-based (Mann-Whitney U) in O(N log N); tied scores get their average rank, so a tie between a
    positive and a negative counts one half. NaN when ``y`` holds one class only.
    """
    y, score = _arrays(y, score, names=("y", "score"))
    pos = _finite("y", y) > 0.5
    score = _finite("score", score)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(score, kind="stable")
    s = score[order]
    first = np.r_[True, s[1:] != s[:-1]]  # first position of each run of equal scores
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(s)]
    mean_rank = (starts + ends + 1) / 2.0  # 1-based ranks starts+1 .. ends, averaged
    ranks = mean_rank[np.cumsum(first) - 1]
    rank_sum = ranks[pos[order]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, ``p`` clipped to ``[eps, 1 - eps]``; NaN when empty."""
    y, p = _arrays(y, p, names=("y", "p"))
    if len(y) == 0:
        return math.nan
    y = y.astype(np.float64)
    p = np.clip(_finite("p", p), eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def rmse(y: np.ndarray, yhat: np.ndarray) -> float:
    """Root mean squared error; NaN when empty."""
    y, yhat = _arrays(y, yhat, names=("y", "yhat"))
    return float(np.sqrt(np.mean((yhat.astype(np.float64) - y) ** 2))) if len(y) else math.nan


def mae(y: np.ndarray, yhat: np.ndarray) -> float:
    """Mean absolute error; NaN when empty."""
    y, yhat = _arrays(y, yhat, names=("y", "yhat"))
    return float(np.mean(np.abs(yhat.astype(np.float64) - y))) if len(y) else math.nan


def _ranked_in_group(groups: np.ndarray, y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows sorted by group, then by descending score (ties: positives last, a pessimistic order).

    Returns ``(group index per sorted row, position in its group (0 = top), y sorted by score,
    y sorted ideally)``.
    """
    codes = np.unique(groups, return_inverse=True)[1].reshape(-1)
    by_score = np.lexsort((y, -score, codes))
    ideal = np.lexsort((-y, codes))
    sorted_codes = codes[by_score]
    first = np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]
    group = np.cumsum(first) - 1
    position = np.arange(len(codes)) - np.flatnonzero(first)[group]
    return group, position, y[by_score], y[ideal]


def ndcg_at_k(groups: np.ndarray, y: np.ndarray, score: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@K over groups (users) with at least one relevant row.

    ``groups (N,)`` any sortable ids, ``y (N,)`` relevance >= 0 (gain = y, discount ``1/log2(rank+1)``),
    ``score (N,)``. NaN when no group has a relevant row.
    """
    groups, y, score = _arrays(groups, y, score, names=("groups", "y", "score"))
    y = y.astype(np.float64)
    group, position, y_ranked, y_ideal = _ranked_in_group(groups, y, _finite("score", score))
    discount = np.where(position < k, 1.0 / np.log2(position + 2.0), 0.0)
    dcg = np.bincount(group, weights=y_ranked * discount)
    idcg = np.bincount(group, weights=y_ideal * discount)
    valid = idcg > 0
    return float(np.mean(dcg[valid] / idcg[valid])) if valid.any() else math.nan


def hr_at_k(groups: np.ndarray, y: np.ndarray, score: np.ndarray, k: int = 10) -> float:
    """Hit rate@K: share of groups (with at least one relevant row, ``y > 0``) that have a relevant row
    among their top K scores. NaN when no group has a relevant row."""
    groups, y, score = _arrays(groups, y, score, names=("groups", "y", "score"))
    y = y.astype(np.float64)
    group, position, y_ranked, _ = _ranked_in_group(groups, y, _finite("score", score))
    is_relevant = (y_ranked > 0).astype(np.float64)
    hits = np.bincount(group, weights=is_relevant * (position < k))
    valid = np.bincount(group, weights=is_relevant) > 0
    return float(np.mean(hits[valid] > 0)) if valid.any() else math.nan


def task_metrics(
    tasks: list[TaskSpec],
    labels: np.ndarray,
    preds: np.ndarray,
    cold: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics per task name over the rows where the task's label is observed.

    ``labels (N, T)`` float, NaN = unobserved; ``preds (N, T)`` (probabilities for binary tasks);
    ``cold (N,)`` bool marks cold-item rows; ``groups (N,)`` the user of each row.
    Binary: ``auc``, ``logloss``, ``cold_auc`` (when the cold rows hold both classes), ``ndcg@10`` and
    ``hr@10`` (when groups are given). Regression: ``rmse``, ``mae``, ``cold_rmse`` (when any cold row).
    """
    labels = np.asarray(labels, dtype=np.float64)
    preds = np.asarray(preds, dtype=np.float64)
    if labels.ndim != 2 or labels.shape != preds.shape or labels.shape[1] != len(tasks):
        raise ValueError(
            f"labels {labels.shape} and preds {preds.shape} must both be (N, {len(tasks)}) for tasks "
            f"{[t.name for t in tasks]}"
        )
    n = labels.shape[0]
    for name, extra in (("cold", cold), ("groups", groups)):
        if extra is not None and np.asarray(extra).shape != (n,):
            raise ValueError(f"{name} has shape {np.asarray(extra).shape}, expected ({n},)")
    out: dict[str, dict[str, float]] = {}
    for t, task in enumerate(tasks):
        mask = ~np.isnan(labels[:, t])
        y, p = labels[mask, t], preds[mask, t]
        is_cold = np.asarray(cold, dtype=bool)[mask] if cold is not None else None
        m: dict[str, float]
        if task.kind == "binary":
            m = {"auc": auc(y, p), "logloss": logloss(y, p)}
            if is_cold is not None and len(np.unique(y[is_cold])) == 2:
                m["cold_auc"] = auc(y[is_cold], p[is_cold])
            if groups is not None:
                g = np.asarray(groups)[mask]
                m["ndcg@10"] = ndcg_at_k(g, y, p, 10)
                m["hr@10"] = hr_at_k(g, y, p, 10)
        else:
            m = {"rmse": rmse(y, p), "mae": mae(y, p)}
            if is_cold is not None and is_cold.any():
                m["cold_rmse"] = rmse(y[is_cold], p[is_cold])
        out[task.name] = m
    return out


def seesaw_report(multi: dict[str, dict[str, float]], single: dict[str, dict[str, float]]) -> str:
    """A table of every metric the multi-task run and the single-task runs share, per task, with the
    change and whether it is better, then a verdict: a seesaw is when the multi-task model improves
    some tasks and degrades others on their main metric (AUC for binary tasks, RMSE for regression).

    ``multi``: :func:`task_metrics` of the multi-task model; ``single``: task name -> metrics of the
    model trained on that task alone.
    """
    rows = [f"{'task':<16} {'metric':<10} {'multi':>9} {'single':>9} {'delta':>9}  verdict"]
    better: list[str] = []
    worse: list[str] = []
    for task in sorted(set(multi) & set(single)):
        main = "auc" if "auc" in multi[task] else "rmse"
        for metric in [k for k in multi[task] if k in single[task]]:
            a, b = multi[task][metric], single[task][metric]
            delta = a - b
            if math.isnan(delta) or delta == 0:
                verdict = "n/a" if math.isnan(delta) else "same"
            else:
                verdict = "better" if (delta > 0) == (metric in _HIGHER_IS_BETTER) else "worse"
            rows.append(f"{task:<16} {metric:<10} {a:>9.4f} {b:>9.4f} {delta:>+9.4f}  {verdict}")
            if metric == main and verdict in ("better", "worse"):
                (better if verdict == "better" else worse).append(task)
    if better and worse:
        summary = f"seesaw: yes ({', '.join(better)} better; {', '.join(worse)} worse)"
    elif worse:
        summary = f"seesaw: no; every task is worse or unchanged ({', '.join(worse)} worse)"
    else:
        summary = f"seesaw: no; no task is worse ({', '.join(better) or 'none'} better)"
    return "\n".join([*rows, summary])
