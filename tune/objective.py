"""What a search maximises: a weighted sum of per-task metrics, optionally under guardrails.

Written as text (``mtrec tune --objective``)::

    purchase.auc                                   one metric
    0.3*click.auc + 0.7*purchase.auc               a weighted sum
    mean_auc                                       the mean AUC of the binary tasks
    purchase.auc; click.auc>=0.70, dwell_time.rmse<=1.2   a primary metric with guardrails

Each term is read by :func:`mtrec.engine.objective_value`, so losses and errors (logloss, rmse, mae)
count negated and every term is higher-is-better. Guardrails compare the raw metric with its bound.

Infeasible trials: a trial whose validation metrics break a guardrail scores
``INFEASIBLE - violation`` (``violation`` = the summed amounts by which the bounds are missed), far
below any feasible score. It is never the best trial; ASHA stops it first, yet still ranks a trial
that misses a bound narrowly above one that misses it widely, since a trial can become feasible as it
trains. Tables report ``feasible`` and ``violation`` beside the score.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from mtrec.config import TaskSpec
from mtrec.engine import objective_value
from mtrec.errors import ConfigError
from mtrec.preflight import check_objective

INFEASIBLE = -1e6
_TERM = re.compile(r"^\s*(?:(?P<w>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*)?(?P<m>[\w@.]+)\s*$")
_GUARD = re.compile(r"^\s*(?P<m>\w+\.[\w@]+)\s*(?P<op>>=|<=)\s*(?P<v>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Guardrail:
    """``metric op bound`` on a raw validation metric (``click.auc >= 0.7``)."""

    metric: str  # task.metric
    op: str  # ">=" or "<="
    bound: float

    def violation(self, metrics: dict[str, dict[str, float]]) -> float:
        """How far the metric misses the bound (0 when it holds; inf when the metric is NaN)."""
        value = _raw(metrics, self.metric)
        if math.isnan(value):
            return math.inf
        gap = self.bound - value if self.op == ">=" else value - self.bound
        return max(gap, 0.0)


@dataclass(frozen=True)
class Objective:
    """A weighted sum of higher-is-better metric terms, subject to guardrails."""

    terms: tuple[tuple[float, str], ...]  # (weight, "task.metric" or "mean_auc")
    guardrails: tuple[Guardrail, ...] = ()
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> Objective:
        head, _, guards = text.partition(";")
        terms = []
        for part in re.split(r"(?<![eE])\+", head):
            m = _TERM.match(part)
            if not m or not part.strip():
                raise ConfigError(f"objective {text!r}: cannot read term {part!r} (expected [weight*]task.metric)")
            terms.append((float(m["w"]) if m["w"] else 1.0, m["m"]))
        guardrails = []
        for part in filter(str.strip, guards.split(",")):
            g = _GUARD.match(part)
            if not g:
                raise ConfigError(f"objective {text!r}: cannot read guardrail {part!r} (expected task.metric>=value)")
            guardrails.append(Guardrail(g["m"], g["op"], float(g["v"])))
        return cls(tuple(terms), tuple(guardrails), text.strip())

    @property
    def primary(self) -> str:
        """The heaviest term: what each trial's training ranks checkpoints and stops early by."""
        return max(self.terms, key=lambda t: t[0])[1]

    def value(self, metrics: dict[str, dict[str, float]]) -> float:
        """The weighted sum, ignoring guardrails (ConfigError naming the valid keys on an unknown metric)."""
        return float(sum(w * objective_value(metrics, m) for w, m in self.terms))

    def violation(self, metrics: dict[str, dict[str, float]]) -> float:
        return float(sum(g.violation(metrics) for g in self.guardrails))

    def score(self, metrics: dict[str, dict[str, float]]) -> dict[str, float | bool]:
        """``score`` (what the search maximises), ``feasible``, ``violation`` and the unconstrained ``value``."""
        value, violation = self.value(metrics), self.violation(metrics)
        feasible = violation == 0.0
        score = value if feasible else INFEASIBLE - min(violation, 1e6)
        return {"score": score, "feasible": feasible, "violation": violation, "value": value}

    def check(self, tasks: list[TaskSpec]) -> None:
        """ConfigError when a term or guardrail names a metric that evaluation does not report for ``tasks``."""
        for _, m in self.terms:
            check_objective(m, tasks, f"objective {self.text!r}: term")
        for g in self.guardrails:
            check_objective(g.metric, tasks, f"objective {self.text!r}: guardrail")


def _raw(metrics: dict[str, dict[str, float]], metric: str) -> float:
    task, _, name = metric.partition(".")
    if task not in metrics or name not in metrics[task]:
        valid = [f"{t}.{k}" for t, m in metrics.items() for k in m]
        raise ConfigError(f"guardrail metric {metric!r} is not one of {', '.join(valid)}")
    return float(metrics[task][name])
