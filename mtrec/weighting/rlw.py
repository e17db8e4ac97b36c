"""Random Loss Weighting (Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting:
A Litmus Test for Multi-Task Learning", TMLR 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.config import TaskSpec
from mtrec.weighted import weighted_sum
from mtrec.weighting.base import Reduce, StepContext, Weighting
from mtrec.weighting.common import number, observed_losses, observed_mask, step_generator


class RLW(Weighting):
    """Fresh random weights every step: ``w = T * softmax(z)``, ``z ~ N(0, I)``.

    ``z`` comes from a generator seeded by ``(seed, ctx.step)``, so every rank draws the same weights
    without communicating, and a resumed run replays the same sequence. ``ctx.step`` must advance by
    one per optimizer step.
    """

    name = "rlw"

    def __init__(self, tasks: list[TaskSpec], reduce: Reduce | None = None, *, seed: float = 0) -> None:
        super().__init__(tasks, reduce)
        self._seed: int = int(number(self.name, "seed", seed, allow_zero=True))

    def forward(self, losses: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``losses (T,)`` -> ``(loss (), weights (T,))``."""
        z = torch.randn(self.num_tasks, generator=step_generator(self._seed, ctx.step))
        weights = (self.num_tasks * torch.softmax(z, dim=0)).to(losses.device)
        return weighted_sum(observed_losses(losses, observed_mask(losses, ctx)), weights), weights
