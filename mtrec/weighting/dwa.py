"""Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
CVPR 2019, eq. 7)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtrec.config import TaskSpec
from mtrec.weighted import weighted_sum
from mtrec.weighting.base import Reduce, StepContext, Weighting
from mtrec.weighting.common import number, observed_losses, observed_mask


class DWA(Weighting):
    """``w_t = T * softmax(r / temperature)_t`` with ``r_t = L_t(e-1) / L_t(e-2)``, the ratio of the task's
    mean loss over the last two epochs: a task whose loss falls slowly gets more weight.

    Weights are equal (1) until two epochs have been seen and change only in :meth:`end_epoch`, which
    receives the epoch's mean losses already averaged over ranks, so every rank agrees. A task with
    no finite mean loss in an epoch (never observed) keeps its history; a task without two epochs of
    history gets the neutral ratio 1.
    """

    name = "dwa"

    def __init__(self, tasks: list[TaskSpec], reduce: Reduce | None = None, *, temperature: float = 2.0) -> None:
        super().__init__(tasks, reduce)
        self._temperature: float = number(self.name, "temperature", temperature)
        self._history: Tensor  # (2, T): mean losses of the epoch before last and of the last epoch
        self._weights: Tensor  # (T,)
        self.register_buffer("_history", torch.full((2, len(tasks)), math.nan))
        self.register_buffer("_weights", torch.ones(len(tasks)))

    def forward(self, losses: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``losses (T,)`` -> ``(loss (), weights (T,))``."""
        weights = self._weights.clone()
        return weighted_sum(observed_losses(losses, observed_mask(losses, ctx)), weights), weights

    def end_epoch(self, mean_losses: Tensor) -> None:
        """``mean_losses (T,)``: this epoch's mean loss per task over all ranks (NaN: not observed)."""
        m = mean_losses.detach().to(self._history)
        seen = torch.isfinite(m)
        previous, last = self._history
        self._history.copy_(torch.stack([torch.where(seen, last, previous), torch.where(seen, m, last)]))
        previous, last = self._history
        known = torch.isfinite(previous) & torch.isfinite(last) & (previous > 0)
        ratio = torch.where(known, last / torch.where(known, previous, 1.0), 1.0)
        self._weights.copy_(self.num_tasks * torch.softmax(ratio / self._temperature, dim=0))
