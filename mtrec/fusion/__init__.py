"""Online score fusion and fusion-weight control policies (pure numpy; no Ray, HTTP or Prometheus).

Serving ranks candidates by ``score = fusion(weights, per-task predictions)`` (:mod:`mtrec.fusion.score`);
a controller feeds windowed per-arm metrics to a policy, ``policy.update(observation) -> Decision``
(:mod:`mtrec.fusion.control`). ``build_policy(name, weights, limits, seed, **params)`` builds one of
:data:`POLICIES`; ``restore_policy(policy.to_state())`` rebuilds a policy after a restart.

:data:`ADAPTIVE` (``calibrated``, :mod:`mtrec.fusion.calibrated`) maximises a north star against a
permanent holdout with always-valid tests (:mod:`mtrec.fusion.stats`); ``static`` is the yardstick,
``proportional`` the naive baseline and ``target`` holds quotas. :mod:`mtrec.fusion.simulator` and
:mod:`mtrec.fusion.worlds` are where ``bench/control_bench.py`` tells them apart.
"""

from __future__ import annotations

from typing import Any

from mtrec.config import TaskSpec
from mtrec.errors import ConfigError, check_keyword_params
from mtrec.fusion.calibrated import CalibratedPolicy
from mtrec.fusion.control import HOLDOUT, MAIN, ArmCounts, Decision, Limits, Observation, Policy, project, step_toward
from mtrec.fusion.policies import ProportionalPolicy, StaticPolicy, TargetPolicy
from mtrec.fusion.score import (
    FUSIONS,
    fit_scales,
    fuse,
    fusion_fn,
    normalise_weights,
    rank,
    top_k,
    value_weights,
)

ADAPTIVE = "calibrated"  # the policy for adaptive control (its figures lead bench/control_bench.py)
POLICIES: dict[str, type[Policy]] = {
    "static": StaticPolicy,
    "proportional": ProportionalPolicy,
    "target": TargetPolicy,
    "calibrated": CalibratedPolicy,
}


def policy_class(name: str, params: dict[str, Any]) -> type[Policy]:
    """The class of policy ``name``, once ``params`` are known to be parameters it takes.

    ConfigError on an unknown name (listing the valid ones) or parameter (listing the policy's).
    """
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    check_keyword_params(f"policy {name!r}", cls.__init__, params)
    return cls


def build_policy(
    name: str, weights: dict[str, float], limits: Limits | None = None, seed: int = 0, **params: Any
) -> Policy:
    """The policy ``name`` starting from ``weights`` (task -> weight); ConfigError as :func:`policy_class`,
    or naming a parameter value the policy refuses (a missing target, a task it does not know)."""
    return policy_class(name, params)(weights, limits, seed, **params)


def check_policy(name: str, params: dict[str, Any], tasks: list[TaskSpec] | None) -> None:
    """Build the policy the weight controller will build for ``tasks`` (their fusion weights) and drop
    it, so that a bad name or parameter fails before anything starts. ``tasks`` None (a bundle that is
    not on this machine): only the name and the parameter names are checked.

    ConfigError on one line, naming the tasks when a parameter value does not fit them.
    """
    cls = policy_class(name, params)
    if tasks is None:
        return
    try:
        cls({t.name: t.fusion_weight for t in tasks}, None, 0, **params)
    except ConfigError as e:
        raise ConfigError(f"{e} (the bundle's tasks: {', '.join(t.name for t in tasks)})") from e


def restore_policy(state: dict[str, Any]) -> Policy:
    """The policy a :meth:`Policy.to_state` dict describes (its class is named in ``state['policy']``)."""
    name = state.get("policy")
    if name not in POLICIES:
        raise ConfigError(f"policy state names unknown policy {name!r}; valid policies: {', '.join(POLICIES)}")
    return POLICIES[name].from_state(state)


__all__ = [
    "ADAPTIVE",
    "FUSIONS",
    "HOLDOUT",
    "MAIN",
    "POLICIES",
    "ArmCounts",
    "CalibratedPolicy",
    "Decision",
    "Limits",
    "Observation",
    "Policy",
    "ProportionalPolicy",
    "StaticPolicy",
    "TargetPolicy",
    "build_policy",
    "check_policy",
    "fit_scales",
    "fuse",
    "fusion_fn",
    "normalise_weights",
    "policy_class",
    "project",
    "rank",
    "restore_policy",
    "step_toward",
    "top_k",
    "value_weights",
]
