"""A training run's plots: ``curves.png`` (per-task training loss, validation metric and task weight over
epochs) and, on a synthetic dataset, ``oracle.png`` (each task's test metric beside the oracle's, the
true probabilities of the scenario: the best any model can reach on those labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtrec.config import Config, TaskSpec


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metric(task: TaskSpec) -> str:
    return "auc" if task.kind == "binary" else "rmse"


def plot_curves(history: list[dict[str, Any]], tasks: list[TaskSpec], path: str | Path) -> None:
    """``history``: one row per epoch as the worker loop reports it (``epoch`` 1-based, ``train_loss``,
    ``valid`` and ``task_weights`` per task)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for t in tasks:
        axes[0].plot(epochs, [h["train_loss"][t.name] for h in history], marker="o", label=t.name)
        axes[1].plot(epochs, [h["valid"][t.name].get(_metric(t)) for h in history], marker="o", label=t.name)
        axes[2].plot(epochs, [h["task_weights"][t.name] for h in history], marker="o", label=t.name)
    kinds = sorted({_metric(t).upper() for t in tasks})
    for ax, title, ylabel in zip(
        axes,
        ("training loss", "validation metric", "task weight (end of epoch)"),
        ("mean loss over the epoch", " / ".join(kinds) + " (validation split)", "loss weight"),
    ):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_oracle(
    model: dict[str, dict[str, float]], oracle: dict[str, dict[str, float]], tasks: list[TaskSpec], path: str | Path
) -> None:
    """``oracle.png``: per task, the model's metric (``model[task]["auc"]``, or ``"rmse"`` for a regression
    task) as a bar beside the oracle's (:func:`mtrec.data.synthetic.oracle_metrics` of the same split).
    One panel per metric: AUC (0.5 is chance) and, when the scenario has regression tasks, RMSE."""
    plt = _pyplot()
    panels = [(m, [t for t in tasks if _metric(t) == m]) for m in ("auc", "rmse")]
    panels = [(m, ts) for m, ts in panels if ts]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(2 + 1.6 * len(tasks), 4), squeeze=False, width_ratios=[len(ts) for _, ts in panels]
    )
    for ax, (metric, ts) in zip(axes[0], panels):
        x = range(len(ts))
        ours, best = [model[t.name][metric] for t in ts], [oracle[t.name][metric] for t in ts]
        for offset, who, values, color in (
            (-0.2, "model", ours, "tab:blue"),
            (0.2, "oracle (true probabilities)", best, "tab:gray"),
        ):
            bars = ax.bar([i + offset for i in x], values, width=0.4, label=who, color=color)
            ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xticks(list(x), [t.name for t in ts])
        if metric == "auc":
            ax.axhline(0.5, color="black", lw=0.8, ls="--")
            ax.set_ylim(0.45, min(1.0, max(ours + best) + 0.1))  # from just below chance: differences show
            ax.set_ylabel("test AUC (0.5 = chance; higher is better)")
        else:
            ax.set_ylim(0, max(ours + best) * 1.25)
            ax.set_ylabel("test RMSE (lower is better)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper right")
    fig.suptitle("each task against the oracle of the synthetic scenario")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_run(cfg: Config, history: list[dict[str, Any]], test: dict[str, dict[str, float]], out: Path) -> None:
    """A finished run's plots in ``out``: ``curves.png``, and ``oracle.png`` when the run's data
    (``cfg.data.path``) is a synthetic scenario, which stores the true probabilities."""
    from mtrec.data.synthetic import GROUND_TRUTH, oracle_metrics

    plot_curves(history, cfg.tasks, out / "curves.png")
    data = Path(cfg.data.path)
    if (data / GROUND_TRUTH).exists():
        plot_oracle(test, oracle_metrics(data, "test"), cfg.tasks, out / "oracle.png")
