"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive
Loss Balancing in Deep Multitask Networks", ICML 2018)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mtrec.config import TaskSpec
from mtrec.errors import ConfigError
from mtrec.weighted import weighted_sum
from mtrec.weighting.base import Reduce, StepContext, Weighting
from mtrec.weighting.common import number, observed_losses, observed_mask, task_grads, trainable


class GradNorm(Weighting):
    """Weights that make each task's weighted gradient norm on the shared layer match a target.

    With ``G_t = w_t * ||grad_W L_t||``, ``G_avg`` their mean, ``Ltilde_t = L_t / L_t(0)`` and
    ``r_t = Ltilde_t / mean(Ltilde)`` the inverse training rate, the paper's loss is
    ``L_grad = sum_t |G_t - target_t|`` with ``target_t = G_avg * r_t ** alpha`` held constant. Since
    the weights are renormalised to sum to T, only the ratios of the ``G_t`` can be steered, so the
    targets here are rescaled to average ``G_avg`` (``r ** alpha / mean(r ** alpha)``): otherwise, for
    ``alpha != 1``, every ``G_t`` can sit below its target and the ratios drift. The fixed point is
    ``G_s / G_t = (r_s / r_t) ** alpha``; ``alpha`` sets how hard slow tasks are pulled up (0: equal
    gradient norms). The weights take their own step (no ``backward``): an exponentiated-gradient
    step on ``L_grad / G_avg``, ``w_t <- w_t * exp(-lr * sign(G_t - target_t) * G_t / G_avg)``, which
    is scale-free and keeps weights positive, then renormalisation to sum to T.

    ``W`` is the last shared weight matrix of ``ctx.shared_params`` (the paper's choice) or, with
    ``all_shared=1``, all shared parameters. Per-task gradients (with this rank's losses) are averaged
    over the ranks that observed the task with one ``reduce`` before norms are taken, so every rank
    makes the same update. ``L_t(0)`` is the first rank-averaged loss seen for the task. Tasks no
    rank observed keep their weight. State changes only in training mode.
    """

    name = "gradnorm"
    needs_shared_grads = True

    def __init__(
        self,
        tasks: list[TaskSpec],
        reduce: Reduce | None = None,
        *,
        alpha: float = 1.5,
        lr: float = 0.025,
        all_shared: float = 0,
    ) -> None:
        super().__init__(tasks, reduce)
        self._alpha: float = number(self.name, "alpha", alpha, allow_zero=True)
        self._lr: float = number(self.name, "lr", lr)
        if all_shared not in (0, 1):
            raise ConfigError(
                f"weighting 'gradnorm': parameter 'all_shared' must be 0 (last shared weight matrix) "
                f"or 1 (all shared parameters), got {all_shared!r}"
            )
        self._all_shared: bool = bool(all_shared)
        self._weights: Tensor  # (T,) sums to T
        self._initial_losses: Tensor  # (T,) L_t(0); NaN until the task is first observed
        self.register_buffer("_weights", torch.ones(len(tasks)))
        self.register_buffer("_initial_losses", torch.full((len(tasks),), math.nan))

    def forward(self, losses: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``losses (T,)`` -> ``(loss (), weights (T,))``; the weights used here, before this step's update."""
        observed = observed_mask(losses, ctx)
        weights = self._weights.clone()
        loss = weighted_sum(observed_losses(losses, observed), weights)
        if self.training and losses.requires_grad:
            self._update(losses, observed, self._grad_params(ctx.shared_params))
        return loss, weights

    def _grad_params(self, shared: list[nn.Parameter]) -> list[nn.Parameter]:
        shared = trainable(shared)
        if self._all_shared or not shared:
            return shared
        matrices = [p for p in shared if p.dim() >= 2]
        return [matrices[-1] if matrices else shared[-1]]

    def _update(self, losses: Tensor, observed: Tensor, params: list[nn.Parameter]) -> None:
        grads = task_grads(losses, observed, params)
        local_loss = torch.where(observed, losses.detach().float(), 0.0)
        packed = torch.cat([grads, local_loss[:, None], observed[:, None].float()], dim=1)
        total = self._reduce(packed)  # (T, P + 2) averaged over ranks
        count = total[:, -1]
        seen = count > 0
        if not bool(seen.any()):
            return
        norms = (total[:, :-2] / count.clamp_min(1e-12)[:, None]).norm(dim=1)
        mean_loss = total[:, -2] / count.clamp_min(1e-12)
        self._initial_losses.copy_(
            torch.where(seen & torch.isnan(self._initial_losses), mean_loss, self._initial_losses)
        )
        g = self._weights * norms
        g_avg = g[seen].mean()
        if not bool(g_avg > 0):
            return
        rate = mean_loss / self._initial_losses.clamp_min(1e-12)
        inverse_rate = rate / rate[seen].mean()
        pull = torch.where(seen, inverse_rate.clamp_min(0.0) ** self._alpha, 0.0)
        target = g_avg * pull / pull[seen].mean()
        if not bool(torch.isfinite(target[seen]).all()):  # e.g. every loss reached exactly 0
            return
        step = torch.exp(-self._lr * torch.sign(g - target) * g / g_avg)
        updated = torch.where(seen, self._weights * step, self._weights)
        budget = self.num_tasks - self._weights[~seen].sum()  # unseen tasks keep their weight
        self._weights.copy_(torch.where(seen, updated * budget / updated[seen].sum(), self._weights))
