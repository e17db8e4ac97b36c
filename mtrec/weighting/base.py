"""The interface every task-loss weighting strategy implements.

Three stages stay apart: the model predicts per task, :func:`mtrec.models.losses.task_losses`
turns predictions into a loss vector ``(T,)``, and a :class:`Weighting` reduces that vector to one
scalar and returns the weights it used (for logging). A weighting never calls ``backward``.

Data parallelism: any state that must agree across ranks is synchronised through ``reduce``, a
function the caller passes in that averages a tensor over ranks (identity on one process). Gradient
methods operate on per-task gradients averaged with ``reduce``, so every rank applies the same update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from mtrec.config import TaskSpec

Reduce = Callable[[Tensor], Tensor]


def identity_reduce(x: Tensor) -> Tensor:
    return x


@dataclass
class StepContext:
    """What a weighting may look at in one step, besides the loss vector."""

    shared_params: list[nn.Parameter] = field(default_factory=list)  # parameters every task uses
    observed: Tensor | None = None  # (T,) bool: the task had labels in this batch
    step: int = 0
    epoch: int = 0


class Weighting(nn.Module):
    """Loss vector ``(T,)`` in; scalar loss and weights ``(T,)`` out."""

    name: ClassVar[str] = ""
    needs_shared_grads: ClassVar[bool] = False  # True: forward uses ctx.shared_params

    def __init__(self, tasks: list[TaskSpec], reduce: Reduce | None = None) -> None:
        super().__init__()
        self._tasks: list[TaskSpec] = list(tasks)
        self._reduce: Reduce = reduce or identity_reduce
        self.register_buffer("prior", torch.tensor([t.loss_weight for t in tasks], dtype=torch.float32))

    @property
    def num_tasks(self) -> int:
        return len(self._tasks)

    def forward(self, losses: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def after_backward(self) -> None:
        """Average the gradients of this strategy's own parameters over ranks (after ``backward``)."""
        for p in self.parameters():
            if p.grad is not None:
                p.grad.copy_(self._reduce(p.grad))

    def end_epoch(self, mean_losses: Tensor) -> None:
        """Called once per epoch with the epoch's mean loss per task ``(T,)`` (already reduced)."""
