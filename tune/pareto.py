"""The Pareto front across tasks: trials that no other trial beats on every task at once.

Every column is higher-is-better (losses and errors enter negated). Trial ``a`` dominates ``b`` when
``a >= b`` on every column and ``a > b`` on at least one; the front is the set of trials nothing
dominates. A row with a NaN (a task never evaluated) is neither on the front nor dominates anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """``a (K,)`` dominates ``b (K,)``."""
    return bool(np.all(a >= b) and np.any(a > b))


def non_dominated(points: np.ndarray) -> np.ndarray:
    """``points (N, K)`` float, higher is better -> ``(N,) bool``: True on the Pareto front."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"points must be (N, K), got shape {p.shape}")
    finite = ~np.isnan(p).any(axis=1)
    q = p[finite]
    # (N, N): row j dominates row i
    geq = (q[:, None, :] >= q[None, :, :]).all(axis=2)
    gt = (q[:, None, :] > q[None, :, :]).any(axis=2)
    dominated = (geq & gt).any(axis=0)
    front = np.zeros(len(p), dtype=bool)
    front[np.flatnonzero(finite)[~dominated]] = True
    return front


def trial_label(trial_id: str, weighting: str | None = None) -> str:
    """A trial's short name in plots and the console: ``"#2 dwa"`` for Tune's trial ``"ab12c_00001"``
    (its creation order, 1-based), the id itself when it does not end in that counter."""
    head, _, counter = trial_id.rpartition("_")
    name = f"#{int(counter) + 1}" if head and counter.isdigit() else trial_id
    return f"{name} {weighting}" if weighting else name


def plot_front(
    points: np.ndarray,
    front: np.ndarray,
    names: list[str],
    labels: list[str],
    path: str | Path,
    baseline: int | None = None,
    stopped: np.ndarray | None = None,
) -> None:
    """``pareto.png``: two columns as a scatter with the front joined; more as a grid of pairwise
    scatters (front membership is over all columns, so a front trial may look dominated in one pair).

    ``points (N, K)`` higher is better, ``front (N,) bool``, ``labels``: one name per trial, written beside
    its point; ``baseline``: the row of the equal-weights trial (ringed); ``stopped (N,) bool``: trials that
    ended before their last epoch (ASHA or early stopping), drawn hollow: their metrics are of fewer
    epochs, so being behind says little about their settings.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    p, front = np.asarray(points, dtype=np.float64), np.asarray(front, dtype=bool)
    stopped = np.zeros(len(p), dtype=bool) if stopped is None else np.asarray(stopped, dtype=bool)
    k = p.shape[1]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4.5 * rows), squeeze=False)
    kinds = (
        (front & ~stopped, {"c": "tab:red"}, "Pareto front"),
        (~front & ~stopped, {"c": "tab:gray", "alpha": 0.7}, "dominated"),
        (
            stopped,
            {"facecolors": "none", "edgecolors": "tab:orange", "linewidths": 1.5},
            "stopped early (fewer epochs)",
        ),
    )
    for ax, (i, j) in zip(axes.flat, pairs):
        for rows_of, style, label in kinds:
            if rows_of.any():
                ax.scatter(p[rows_of, i], p[rows_of, j], s=40, label=label, **style)
        if baseline is not None:
            ax.scatter(
                p[baseline, i], p[baseline, j], s=220, facecolors="none", edgecolors="black", label="equal weights"
            )
        if k == 2:
            order = np.argsort(p[front, i])
            ax.plot(p[front, i][order], p[front, j][order], c="tab:red", alpha=0.5)
        for x, y, text in zip(p[:, i], p[:, j], labels):
            ax.annotate(text, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(names[i])
        ax.set_ylabel(names[j])
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.margins(0.15)  # room for the names beside the outermost points
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.axis("off")
    handles, names_ = axes.flat[0].get_legend_handles_labels()
    ncol = min(len(handles), 2 * cols)
    fig.legend(handles, names_, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(f"{int(front.sum())} of {len(p)} trials on the Pareto front\n(validation metrics, higher is better)")
    legend_rows = -(-len(handles) // ncol)
    fig.tight_layout(rect=(0, 0.05 * legend_rows / rows, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
