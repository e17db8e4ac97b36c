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


def plot_front(points: np.ndarray, front: np.ndarray, names: list[str], labels: list[str], path: str | Path) -> None:
    """``pareto.png``: two columns as a scatter with the front joined; more as a grid of pairwise
    scatters (front membership is over all columns, so a front trial may look dominated in one pair)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, front = np.asarray(points, dtype=np.float64), np.asarray(front, dtype=bool)
    k = p.shape[1]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4.5 * rows), squeeze=False)
    for ax, (i, j) in zip(axes.flat, pairs):
        ax.scatter(p[~front, i], p[~front, j], c="tab:gray", alpha=0.6, label="dominated")
        ax.scatter(p[front, i], p[front, j], c="tab:red", label="Pareto front")
        if k == 2:
            order = np.argsort(p[front, i])
            ax.plot(p[front, i][order], p[front, j][order], c="tab:red", alpha=0.5)
            for x, y, text in zip(p[front, i], p[front, j], np.asarray(labels)[front]):
                ax.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(names[i])
        ax.set_ylabel(names[j])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.axis("off")
    fig.suptitle(f"{int(front.sum())} of {len(p)} trials on the Pareto front (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
