"""Static weighting: a fixed weight per task."""

from __future__ import annotations

from torch import Tensor

from mtrec.config import TaskSpec
from mtrec.errors import check_names
from mtrec.weighted import weighted_sum
from mtrec.weighting.base import Reduce, StepContext, Weighting
from mtrec.weighting.common import number, observed_losses, observed_mask


class StaticWeighting(Weighting):
    """``L = sum_t w_t L_t`` with ``w_t`` the task's ``loss_weight`` prior (:class:`TaskSpec`).

    The baseline every dynamic method is compared with (the fixed-weight sum of the multi-task
    literature, e.g. Caruana, "Multitask Learning", Machine Learning 1997). Parameters, keyed by task
    name, override the prior of that task: ``build_weighting("static", tasks, click=1.0, buy=5.0)``.
    """

    name = "static"

    def __init__(self, tasks: list[TaskSpec], reduce: Reduce | None = None, **weights: float) -> None:
        super().__init__(tasks, reduce)
        names = [t.name for t in tasks]
        check_names(f"weighting {self.name!r}", weights, names)
        for task, w in weights.items():
            self.prior[names.index(task)] = number(self.name, task, w, allow_zero=True)

    def forward(self, losses: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``losses (T,)`` -> ``(loss (), weights (T,))``."""
        weights = self.prior.clone()
        return weighted_sum(observed_losses(losses, observed_mask(losses, ctx)), weights), weights
