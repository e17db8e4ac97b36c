"""Per-task losses: predictions and labels in, a loss vector ``(T,)`` out (weighting comes after)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtrec.config import TaskSpec
from mtrec.errors import ConfigError

EPS = 1e-7


def full_space_labels(labels: Tensor, tasks: list[TaskSpec]) -> Tensor:
    """ESMM labels on the full space (Ma et al., SIGIR 2018).

    A child task's prediction is the joint probability p(parent) * p(child | parent), so its label is
    the joint event: where the parent's label is 0 the child's is 0, even when the data left it
    unobserved (a purchase that needs a click is never observed without one). ``labels`` (B, T).
    """
    out = labels.clone()
    col = {t.name: j for j, t in enumerate(tasks)}
    for t in parents_first(tasks):
        if t.depends_on is not None:
            j, parent = col[t.name], out[:, col[t.depends_on]]
            out[:, j] = torch.where(torch.isnan(out[:, j]) & (parent == 0), torch.zeros_like(parent), out[:, j])
    return out


def parents_first(tasks: list[TaskSpec]) -> list[TaskSpec]:
    """The tasks ordered so that every task comes after the one it depends on."""
    order: list[TaskSpec] = []
    while len(order) < len(tasks):
        names = {t.name for t in order}
        ready = [t for t in tasks if t.name not in names and (t.depends_on is None or t.depends_on in names)]
        if not ready:
            raise ConfigError(f"tasks: dependency cycle among {sorted({t.name for t in tasks} - names)}")
        order += ready
    return order


def task_losses(
    preds: dict[str, Tensor], labels: Tensor, tasks: list[TaskSpec], scales: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Masked mean loss per task: ``(T,)`` losses and ``(T,)`` bool, True where the task had labels.

    ``preds`` task -> (B,) probability (binary, after the ESMM chain) or value (regression);
    ``labels`` (B, T) float, NaN = unobserved. Binary tasks: cross-entropy on the clamped
    probability, over the full space for ESMM children (:func:`full_space_labels`). Regression: mean
    squared error divided by ``scales[t] ** 2`` (the label's train variance, so that a model that
    predicts the mean scores 1 whatever the unit). A task without labels in the batch contributes a
    zero that stays connected to the graph (every rank of data-parallel training runs the same backward).
    """
    labels = full_space_labels(labels, tasks)
    losses, observed = [], []
    for j, t in enumerate(tasks):
        y, p = labels[:, j], preds[t.name]
        mask = ~torch.isnan(y)
        observed.append(bool(mask.any()))
        if not mask.any():
            losses.append((p * 0.0).sum())
        elif t.kind == "binary":
            losses.append(F.binary_cross_entropy(p[mask].clamp(EPS, 1 - EPS).float(), y[mask]))
        else:
            scale = 1.0 if scales is None else scales[j]
            losses.append(F.mse_loss(p[mask].float(), y[mask]) / scale**2)
    return torch.stack(losses), torch.tensor(observed, device=labels.device)
