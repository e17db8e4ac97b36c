"""``curves.png``: per-task training loss, validation metric and task weight over epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtrec.config import TaskSpec


def plot_curves(history: list[dict[str, Any]], tasks: list[TaskSpec], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for t in tasks:
        axes[0].plot(epochs, [h["train_loss"][t.name] for h in history], marker="o", label=t.name)
        metric = "auc" if t.kind == "binary" else "rmse"
        axes[1].plot(epochs, [h["valid"][t.name].get(metric) for h in history], marker="o", label=f"{t.name} {metric}")
        axes[2].plot(epochs, [h["task_weights"][t.name] for h in history], marker="o", label=t.name)
    for ax, title in zip(axes, ("training loss", "validation metric", "task weight (end of epoch)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
