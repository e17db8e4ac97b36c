"""Fast Adaptive Multitask Optimization (Liu, Liu, Stone & Liu, "FAMO: Fast Adaptive Multitask
Optimization", NeurIPS 2023, Algorithm 1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtrec.config import TaskSpec
from mtrec.weighted import weighted_sum
from mtrec.weighting.base import Reduce, StepContext, Weighting
from mtrec.weighting.common import number, observed_losses, observed_mask, rank_mean_losses

_BETAS = (0.9, 0.999)  # Adam moments of the logit update, as in the authors' code


class FAMO(Weighting):
    """FAMO decreases all task losses at an equal rate, at O(1) cost per step.

    The model follows the gradient of ``sum_t z_t log L_t / c`` with ``z = softmax(xi)`` and
    ``c = sum_t z_t / L_t``; equivalently the linear weights ``w_t = T * (z_t / L_t) / sum_s (z_s / L_s)``
    (scaled to sum to T), which is what :meth:`forward` applies. The logits ``xi`` then take an Adam
    step (weight decay ``gamma``) along ``J_softmax^T delta``, where ``delta_t = log L_t(prev) -
    log L_t(now)`` is the change of the log-loss between consecutive steps: tasks that improved
    the least gain weight. Instead of the paper's second forward pass on the same batch, the change
    is taken between consecutive batches.

    The ``L_t`` here are losses averaged over the ranks that observed the task (one ``reduce`` per
    step), so weights and logits agree on every rank. A task no rank observed keeps its logit and
    Adam state, and weighs with its last known loss. State changes only in training mode.
    """

    name = "famo"

    def __init__(
        self,
        tasks: list[TaskSpec],
        reduce: Reduce | None = None,
        *,
        lr: float = 0.025,
        gamma: float = 0.01,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks, reduce)
        self._lr: float = number(self.name, "lr", lr)
        self._gamma: float = number(self.name, "gamma", gamma, allow_zero=True)
        self._eps: float = number(self.name, "eps", eps)
        n = len(tasks)
        self._logits: Tensor  # (T,) xi
        self._last_log_loss: Tensor  # (T,) log-loss of the last step that observed the task; NaN: never
        self._adam_m: Tensor  # (T,)
        self._adam_v: Tensor  # (T,)
        self._adam_steps: Tensor  # (T,) Adam steps taken per logit (unobserved tasks skip steps)
        self.register_buffer("_logits", torch.zeros(n))
        self.register_buffer("_last_log_loss", torch.full((n,), math.nan))
        self.register_buffer("_adam_m", torch.zeros(n))
        self.register_buffer("_adam_v", torch.zeros(n))
        self.register_buffer("_adam_steps", torch.zeros(n))

    def forward(self, losses: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``losses (T,)`` -> ``(loss (), weights (T,))``."""
        observed = observed_mask(losses, ctx)
        mean, seen = rank_mean_losses(losses, observed, self._reduce)
        log_loss = torch.where(seen, torch.log(mean.clamp_min(0.0) + self._eps), self._last_log_loss)
        if self.training:
            self._update_logits(log_loss, seen)
            self._last_log_loss.copy_(log_loss)
        z = torch.softmax(self._logits, dim=0)
        inv_loss = torch.exp(-torch.nan_to_num(log_loss, nan=0.0))  # 1/L_t; 1 for a never-seen task
        weights = self.num_tasks * z * inv_loss / (z * inv_loss).sum()
        return weighted_sum(observed_losses(losses, observed), weights), weights

    def _update_logits(self, log_loss: Tensor, seen: Tensor) -> None:
        step = seen & torch.isfinite(self._last_log_loss)
        delta = torch.where(step, self._last_log_loss - log_loss, 0.0)
        z = torch.softmax(self._logits, dim=0)
        grad = z * (delta - (z * delta).sum()) + self._gamma * self._logits  # J_softmax^T delta + decay
        b1, b2 = _BETAS
        self._adam_steps.add_(step.float())
        self._adam_m.copy_(torch.where(step, b1 * self._adam_m + (1 - b1) * grad, self._adam_m))
        self._adam_v.copy_(torch.where(step, b2 * self._adam_v + (1 - b2) * grad * grad, self._adam_v))
        t = self._adam_steps.clamp_min(1.0)
        m_hat = self._adam_m / (1 - b1**t)
        v_hat = self._adam_v / (1 - b2**t)
        update = self._lr * m_hat / (v_hat.sqrt() + 1e-8)
        self._logits.copy_(torch.where(step, self._logits - update, self._logits))
