"""PCGrad, projecting conflicting gradients (Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient
Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.config import TaskSpec
from mtrec.weighted import weighted_sum
from mtrec.weighting.base import Reduce, StepContext, Weighting
from mtrec.weighting.common import number, observed_losses, observed_mask, step_generator, task_grads, trainable


def project_conflicting(grads: Tensor, generator: torch.Generator) -> Tensor:
    """PCGrad's combined gradient: ``(T, P)`` per-task gradients -> ``(P,)``.

    Each task's gradient is projected, visiting the other tasks in a random order drawn from
    ``generator``, onto the normal plane of every other task's (original) gradient it conflicts with
    (negative dot product); the projected gradients are summed. Zero gradients are never projected on.
    """
    num_tasks = grads.shape[0]
    sq_norms = (grads * grads).sum(dim=1)
    projected = grads.clone()
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        for k in torch.randperm(len(others), generator=generator).tolist():
            j = others[k]
            dot = projected[i] @ grads[j]
            if bool(dot < 0) and bool(sq_norms[j] > 0):
                projected[i] -= dot / sq_norms[j] * grads[j]
    return projected.sum(dim=0)


class PCGrad(Weighting):
    """Gradient surgery on the shared parameters, expressed as a surrogate loss to ``backward``.

    Per-task gradients of ``w_t L_t`` (``w_t`` the task's ``loss_weight`` prior) on
    ``ctx.shared_params`` are averaged over ranks with one ``reduce``, then combined by
    :func:`project_conflicting` with a task order drawn from a generator seeded by ``(seed, ctx.step)``,
    the same on every rank. The returned scalar is
    ``sum_t w_t L_t + sum_p <(g_proj_p - g_sum_p).detach(), p>`` with ``g_sum`` the rank-averaged
    plain gradient (minus the detached value of the second term, so the scalar still reads as the
    weighted loss): after a data-parallel backward (which averages over ranks) its gradient is
    ``g_proj`` on the shared parameters and the plain per-task gradient on task-specific ones.
    Weights returned: the priors.
    """

    name = "pcgrad"
    needs_shared_grads = True

    def __init__(self, tasks: list[TaskSpec], reduce: Reduce | None = None, *, seed: float = 0) -> None:
        super().__init__(tasks, reduce)
        self._seed: int = int(number(self.name, "seed", seed, allow_zero=True))

    def forward(self, losses: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``losses (T,)`` -> ``(surrogate loss (), weights (T,))``."""
        observed = observed_mask(losses, ctx)
        weights = self.prior.clone()
        loss = weighted_sum(observed_losses(losses, observed), weights)
        if not losses.requires_grad:
            return loss, weights
        params = trainable(ctx.shared_params)
        grads = self._reduce(task_grads(losses, observed, params) * weights[:, None])
        correction = project_conflicting(grads, step_generator(self._seed, ctx.step)) - grads.sum(dim=0)
        offset = 0
        for p in params:
            c = correction[offset : offset + p.numel()].view_as(p).to(p.dtype)
            shift = (c * p).sum().to(loss.dtype)
            loss = loss + (shift - shift.detach())  # adds gradient c and value 0
            offset += p.numel()
        return loss, weights
