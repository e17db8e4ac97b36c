"""Task-loss weighting strategies: one registry, one builder.

``build_weighting(cfg.train.weighting, tasks, reduce, **cfg.train.weighting_params)`` gives a
:class:`~mtrec.weighting.base.Weighting`; the interface is described in :mod:`mtrec.weighting.base`.
"""

from __future__ import annotations

from mtrec.config import TaskSpec
from mtrec.errors import ConfigError, check_keyword_params
from mtrec.weighting.base import Reduce, StepContext, Weighting, identity_reduce
from mtrec.weighting.dwa import DWA
from mtrec.weighting.famo import FAMO
from mtrec.weighting.gradnorm import GradNorm
from mtrec.weighting.pcgrad import PCGrad, project_conflicting
from mtrec.weighting.rlw import RLW
from mtrec.weighting.static import StaticWeighting
from mtrec.weighting.uncertainty import UncertaintyWeighting

WEIGHTINGS: dict[str, type[Weighting]] = {
    "static": StaticWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DWA,
    "gradnorm": GradNorm,
    "rlw": RLW,
    "famo": FAMO,
    "pcgrad": PCGrad,
}


def build_weighting(name: str, tasks: list[TaskSpec], reduce: Reduce | None = None, **params: float) -> Weighting:
    """The strategy ``name`` for ``tasks``; ``reduce`` averages a tensor over ranks (None: one process).

    ConfigError on an unknown name (listing the valid ones) or a parameter the strategy does not take
    (listing its parameters). ``static`` takes task names as parameters (weight overrides).
    """
    if name not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {name!r}; valid weightings: {', '.join(WEIGHTINGS)}")
    if not tasks:
        raise ConfigError(f"weighting {name!r}: the task list is empty")
    cls = WEIGHTINGS[name]
    check_keyword_params(f"weighting {name!r}", cls.__init__, params)
    return cls(tasks, reduce, **params)


__all__ = [
    "DWA",
    "FAMO",
    "RLW",
    "WEIGHTINGS",
    "GradNorm",
    "PCGrad",
    "Reduce",
    "StaticWeighting",
    "StepContext",
    "UncertaintyWeighting",
    "Weighting",
    "build_weighting",
    "identity_reduce",
    "project_conflicting",
]
