"""Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using
Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtrec.config import TaskSpec
from mtrec.weighting.base import Reduce, StepContext, Weighting
from mtrec.weighting.common import observed_mask


class UncertaintyWeighting(Weighting):
    """Each task has a learnable log-variance ``s_t = log sigma_t^2`` (an ``nn.Parameter`` the training
    loop puts in its optimizer). The loss is the negative log-likelihood of Kendall et al.:

    - regression (Gaussian likelihood, eq. 5): ``0.5 * exp(-s_t) * L_t + 0.5 * s_t``
    - binary (Boltzmann likelihood, eq. 10 with its approximation): ``exp(-s_t) * L_t + 0.5 * s_t``

    At the optimum ``exp(s_t)`` equals the task's loss level (its noise variance for a mean-squared
    error), so noisy tasks are down-weighted. Weights returned: ``c_t * exp(-s_t)``, ``c_t`` 0.5 or 1.
    Unobserved tasks add nothing, so their ``s_t`` get a zero gradient.
    """

    name = "uncertainty"

    def __init__(self, tasks: list[TaskSpec], reduce: Reduce | None = None, *, init_log_var: float = 0.0) -> None:
        super().__init__(tasks, reduce)
        self.log_var = nn.Parameter(torch.full((len(tasks),), float(init_log_var)))
        scale = [0.5 if t.kind == "regression" else 1.0 for t in tasks]
        self._scale: Tensor
        self.register_buffer("_scale", torch.tensor(scale))

    def forward(self, losses: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``losses (T,)`` -> ``(loss (), weights (T,))``."""
        weights = self._scale * torch.exp(-self.log_var)
        terms = weights.to(losses.dtype) * losses + 0.5 * self.log_var.to(losses.dtype)
        loss = torch.where(observed_mask(losses, ctx), terms, 0.0).sum()
        return loss, weights.detach()
