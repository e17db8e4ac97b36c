"""Online score fusion and fusion-weight control policies (pure numpy; no Ray, HTTP or Prometheus).

Serving ranks candidates by ``score = fusion(weights, per-task predictions)`` (:mod:`mtrec.fusion.score`);
a controller feeds windowed per-arm metrics to a policy, ``policy.update(observation) -> Decision``
(:mod:`mtrec.fusion.control`). ``build_policy(name, weights, limits, seed, **params)`` builds one of
:data:`POLICIES`; ``restore_policy(policy.to_state())`` rebuilds a policy after a restart.
"""

from __future__ import annotations

import inspect
from typing import Any

from mtrec.errors import ConfigError
from mtrec.fusion.bandit import BanditPolicy
from mtrec.fusion.control import MAIN, ArmCounts, Decision, Limits, Observation, Policy, project, step_toward
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

POLICIES: dict[str, type[Policy]] = {
    "static": StaticPolicy,
    "proportional": ProportionalPolicy,
    "target": TargetPolicy,
    "bandit": BanditPolicy,
}


def build_policy(
    name: str, weights: dict[str, float], limits: Limits | None = None, seed: int = 0, **params: Any
) -> Policy:
    """The policy ``name`` starting from ``weights`` (task -> weight).

    ConfigError on an unknown name (listing the valid ones) or a parameter the policy does not take
    (listing its parameters).
    """
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    valid = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(
            f"policy {name!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(valid) or '(none)'}"
        )
    return cls(weights, limits, seed, **params)


def restore_policy(state: dict[str, Any]) -> Policy:
    """The policy a :meth:`Policy.to_state` dict describes (its class is named in ``state['policy']``)."""
    name = state.get("policy")
    if name not in POLICIES:
        raise ConfigError(f"policy state names unknown policy {name!r}; valid policies: {', '.join(POLICIES)}")
    return POLICIES[name].from_state(state)


__all__ = [
    "FUSIONS",
    "MAIN",
    "POLICIES",
    "ArmCounts",
    "BanditPolicy",
    "Decision",
    "Limits",
    "Observation",
    "Policy",
    "ProportionalPolicy",
    "StaticPolicy",
    "TargetPolicy",
    "build_policy",
    "fit_scales",
    "fuse",
    "fusion_fn",
    "normalise_weights",
    "project",
    "rank",
    "restore_policy",
    "step_toward",
    "top_k",
    "value_weights",
]
