"""The serving metrics, through ``ray.serve.metrics`` so they reach Ray's metrics export port.

Every metric is declared once in :data:`METRICS` and created lazily, once per process, on first
use (a module-level cache): importing this module outside a replica costs nothing. Inside a replica
Ray Serve adds the ``application``, ``deployment`` and ``replica`` labels. Every metric also carries
:data:`DEPLOYMENT_LABEL`, the id of the serving deployment the process belongs to (:func:`scope` sets
it once per process; :func:`deployment_id` picks the default), so that deployments sharing one
Prometheus (dev and prod, two clusters) never read each other's feedback. On the export port a
metric ``NAME`` appears as ``ray_NAME`` (a gauge), ``ray_NAME_total`` (a counter) or
``ray_NAME_bucket`` / ``_sum`` / ``_count`` (a histogram), 5-10 s after a change;
:func:`exported_name` gives the series name the controller's sources read.

Feedback counters are what the weight controller reads (:mod:`mtrec_serve.sources`): impressions per
weight arm, events per task and arm, and predicted events per task and arm (the sum of the served
model's predictions over the items shown, which the ``calibrated`` policy sets against the events to
measure calibration: :class:`mtrec.fusion.ArmCounts`). A binary event counts 1; a regression task
adds its value (a dwell time, a rating), so the controller's "rate" of such a task is its mean value
per impression. Counters only go up: a value that is not a positive finite number is not recorded
(a regression prediction below 0 adds nothing, as a feedback value below 0 does not).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("mtrec_serve.metrics")

STAGES = ("ingress", "embed", "heads", "fuse", "total")  # values of the latency histogram's stage label
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000, 10000)
# Probabilities of binary tasks. Ray requires positive boundaries, so the first bucket is (-inf, 0.001];
# a regression task's predictions above 1 land in the +Inf bucket (its _sum / _count still give the mean).
PREDICTION_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# The ``sum`` fusion of scaled predictions averages about 1 over a candidate pool (see
# mtrec.fusion.score); the ``product`` fusion's log-scores are mostly negative and fall in the first bucket.
FUSED_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)
MAX_OBSERVED = 16  # values observed per call: a random sample bounds the cost (about 10 us per observation)
DEPLOYMENT_LABEL = "deployment_id"  # on every metric: the serving deployment that emitted it
DEPLOYMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # what an id may look like (also a file name)
# The namespace of the pod this process runs in (every Kubernetes pod with a service account has it).
K8S_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# why the controller refused a reading (the ``reason`` label of mtrec_controller_rejected_reads)
REJECT_REASONS = ("unreachable", "malformed", "non_finite", "stale")
GUARDRAIL_STATES = {"held": 1.0, "uncertain": 0.0, "broken": -1.0}  # mtrec_guardrail_state's values


@dataclass(frozen=True)
class MetricSpec:
    """One metric: ``kind`` is counter, gauge or histogram; ``tags`` its own label names."""

    name: str
    kind: str
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


METRICS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        MetricSpec("mtrec_impressions", "counter", "Items shown, per weight arm.", ("arm",)),
        MetricSpec(
            "mtrec_feedback_events",
            "counter",
            "Feedback events per task and weight arm (1 per binary event; the value for a regression task).",
            ("task", "arm"),
        ),
        MetricSpec(
            "mtrec_predicted_events",
            "counter",
            "Sum of the served model's predictions per task and weight arm over the items shown (impressions).",
            ("task", "arm"),
        ),
        MetricSpec("mtrec_requests", "counter", "HTTP requests per route and status code.", ("route", "status")),
        MetricSpec("mtrec_latency_ms", "histogram", "Latency per serving stage, ms.", ("stage",), LATENCY_BUCKETS_MS),
        MetricSpec(
            "mtrec_prediction", "histogram", "Per-task predictions of served candidates.", ("task",), PREDICTION_BUCKETS
        ),
        MetricSpec("mtrec_fused_score", "histogram", "Fused scores of served candidates.", (), FUSED_BUCKETS),
        MetricSpec("mtrec_fusion_weight", "gauge", "Fusion weight in force per arm and task.", ("arm", "task")),
        MetricSpec("mtrec_arm_traffic", "gauge", "Share of the traffic each weight arm serves.", ("arm",)),
        MetricSpec(
            "mtrec_controller_staleness_s",
            "gauge",
            "Age in seconds of the newest metrics sample the controller read.",
            (),
        ),
        MetricSpec("mtrec_controller_updates", "counter", "Controller iterations per resulting action.", ("action",)),
        MetricSpec(
            "mtrec_lift_vs_holdout",
            "gauge",
            "The main arm's lift over the holdout in value per impression (relative; bound: estimate, and low "
            "and high of its always-valid 95 % interval).",
            ("bound",),
        ),
        MetricSpec(
            "mtrec_guardrail_ratio",
            "gauge",
            "A guarded task's rate on the main arm over the holdout's (bound: ratio, low of its always-valid "
            "95 % interval, least allowed).",
            ("task", "bound"),
        ),
        MetricSpec(
            "mtrec_guardrail_state",
            "gauge",
            "A guarded task's state against the holdout: 1 held, 0 uncertain, -1 broken.",
            ("task",),
        ),
        MetricSpec(
            "mtrec_controller_rejected_reads",
            "counter",
            "Controller readings refused (the last good weights held), per reason: unreachable, malformed, "
            "non_finite (a count, tally or weight that is not a finite number), stale (samples too old).",
            ("reason",),
        ),
    )
}

_CACHE: dict[str, Any] = {}  # metric name -> ray.serve.metrics object of this process
_SCOPE: dict[str, str] = {}  # DEPLOYMENT_LABEL -> this process's deployment id, once scope() set it


def deployment_id(given: str | None, app: str | None) -> str:
    """The deployment id of a serving app: ``given`` when set (ValueError unless it matches
    :data:`DEPLOYMENT_ID`), else ``<namespace>.<app>`` in a Kubernetes pod, else the Serve application
    name ``app`` (characters an id may not hold become ``_``). The Ingress and the WeightController of
    one app run in the same namespace under the same app name, so they derive the same id."""
    if given is not None:
        if not DEPLOYMENT_ID.fullmatch(given):
            raise ValueError(
                f"deployment_id {given!r}: use 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"
            )
        return given
    if not app:
        raise ValueError("deployment_id: none given and no Serve application name to derive it from")
    try:
        namespace = K8S_NAMESPACE_FILE.read_text().strip()
    except OSError:
        namespace = ""
    raw = f"{namespace}.{app}" if namespace else app
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw.lstrip("_.-") or "app")[:128]


def scope(deployment: str) -> None:
    """Label every metric this process records with ``deployment`` (call once, before recording)."""
    _SCOPE[DEPLOYMENT_LABEL] = deployment


def exported_name(name: str, series: str = "") -> str:
    """The series name Ray exports for metric ``name``: ``ray_`` prefix, ``_total`` for counters,
    ``series`` (``bucket``, ``sum`` or ``count``) for histograms."""
    spec = METRICS[name]
    if spec.kind == "counter":
        return f"ray_{name}_total"
    if spec.kind == "histogram":
        if series not in ("bucket", "sum", "count"):
            raise ValueError(f"histogram {name!r}: series must be bucket, sum or count, not {series!r}")
        return f"ray_{name}_{series}"
    return f"ray_{name}"


def tags(name: str, **values: Any) -> dict[str, str]:
    """The label values of one record of ``name``, as strings; ValueError naming a missing or unknown label."""
    spec = METRICS[name]
    if set(values) != set(spec.tags):
        raise ValueError(f"metric {name!r} takes labels {list(spec.tags)}, got {sorted(values)}")
    if not _SCOPE:
        raise ValueError(f"metric {name!r}: no deployment id in this process; call mtrec_serve.metrics.scope first")
    return {k: str(values[k]) for k in spec.tags} | _SCOPE


def sample(values: Any, limit: int = MAX_OBSERVED, rng: np.random.Generator | None = None) -> np.ndarray:
    """``(min(N, limit),) float64``: the finite values of ``values`` (any shape), a uniform random
    sample of ``limit`` of them when there are more (so the histogram stays an unbiased picture)."""
    flat = np.asarray(values, np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    if len(flat) > limit:
        flat = (rng or np.random.default_rng()).choice(flat, size=limit, replace=False)
    return flat


def _metric(name: str) -> Any:
    """The process's ``ray.serve.metrics`` object for ``name``, created on first use."""
    metric = _CACHE.get(name)
    if metric is None:
        import ray.serve.metrics

        spec = METRICS[name]
        kwargs: dict[str, Any] = {"description": spec.description, "tag_keys": (*spec.tags, DEPLOYMENT_LABEL)}
        if spec.kind == "counter":
            metric = ray.serve.metrics.Counter(name, **kwargs)
        elif spec.kind == "gauge":
            metric = ray.serve.metrics.Gauge(name, **kwargs)
        else:
            metric = ray.serve.metrics.Histogram(name, boundaries=list(spec.boundaries), **kwargs)
        _CACHE[name] = metric
    return metric


def _positive(x: float) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------------------------- Ingress


def record_impressions(arm: str, n: int) -> None:
    """``n`` items shown by weight arm ``arm``."""
    if _positive(n):
        _metric("mtrec_impressions").inc(float(n), tags("mtrec_impressions", arm=arm))


def record_predicted(arm: str, predictions: Mapping[str, np.ndarray]) -> None:
    """The predictions ``{task: (N,)}`` of the ``N`` items ``arm`` showed (its impressions): each task's
    sum of the finite predictions above 0 (a regression prediction below 0 adds nothing, as a feedback
    value below 0 does not) is added to its predicted-events counter."""
    metric = _metric("mtrec_predicted_events")
    for task, values in predictions.items():
        p = np.asarray(values, np.float64).ravel()
        total = float(np.clip(p[np.isfinite(p)], 0.0, None).sum())
        if _positive(total):
            metric.inc(total, tags("mtrec_predicted_events", task=task, arm=arm))


def record_feedback(task: str, arm: str, value: float) -> None:
    """One feedback event of ``task`` on an item served by ``arm``: 1 for a binary event, the value
    for a regression task. Zero (a binary non-event), negative and non-finite values are not counted."""
    if _positive(value):
        _metric("mtrec_feedback_events").inc(float(value), tags("mtrec_feedback_events", task=task, arm=arm))


def record_requests(route: str, status: int) -> None:
    """One HTTP request on ``route`` answered with ``status``."""
    _metric("mtrec_requests").inc(1.0, tags("mtrec_requests", route=route, status=status))


def observe_latency(stage: str, ms: float) -> None:
    """The latency of one serving ``stage`` (one of :data:`STAGES`), in ms."""
    if stage not in STAGES:
        raise ValueError(f"latency stage {stage!r} is not one of {', '.join(STAGES)}")
    if math.isfinite(ms):
        _metric("mtrec_latency_ms").observe(float(ms), tags("mtrec_latency_ms", stage=stage))


def observe_predictions(task: str, values: np.ndarray) -> None:
    """The predictions ``(N,)`` of ``task`` for the candidates of one request (at most
    :data:`MAX_OBSERVED`, sampled; non-finite values skipped)."""
    metric, t = _metric("mtrec_prediction"), tags("mtrec_prediction", task=task)
    for v in sample(values):
        metric.observe(float(v), t)


def observe_fused(values: np.ndarray) -> None:
    """The fused scores ``(N,)`` of one request's candidates (sampled as in :func:`observe_predictions`)."""
    metric, t = _metric("mtrec_fused_score"), tags("mtrec_fused_score")
    for v in sample(values):
        metric.observe(float(v), t)


# ---------------------------------------------------------------------------------- WeightController


def set_weights(weights: Mapping[str, Mapping[str, float]], traffic: Mapping[str, float], gone: Iterable[str]) -> None:
    """The weights (arm -> task -> w) and traffic shares (arm -> share) in force; arms in ``gone``
    (retired since the last call) get weight and share 0, so a dashboard does not show them frozen."""
    weight, share = _metric("mtrec_fusion_weight"), _metric("mtrec_arm_traffic")
    for arm, ws in weights.items():
        for task, w in ws.items():
            weight.set(float(w), tags("mtrec_fusion_weight", arm=arm, task=task))
        share.set(float(traffic.get(arm, 0.0)), tags("mtrec_arm_traffic", arm=arm))
    tasks = {t for ws in weights.values() for t in ws}
    for arm in gone:
        for task in tasks:
            weight.set(0.0, tags("mtrec_fusion_weight", arm=arm, task=task))
        share.set(0.0, tags("mtrec_arm_traffic", arm=arm))


def set_staleness(seconds: float) -> None:
    """The age of the newest metrics sample the controller has read, in seconds."""
    _metric("mtrec_controller_staleness_s").set(float(seconds), tags("mtrec_controller_staleness_s"))


def record_rejected_read(reason: str) -> None:
    """One controller reading refused for ``reason`` (one of :data:`REJECT_REASONS`)."""
    if reason not in REJECT_REASONS:
        raise ValueError(f"rejected-read reason {reason!r} is not one of {', '.join(REJECT_REASONS)}")
    _metric("mtrec_controller_rejected_reads").inc(1.0, tags("mtrec_controller_rejected_reads", reason=reason))


def record_update(action: str) -> None:
    """One controller iteration that ended in ``action`` (hold, wait, keep, update, promote, explore)."""
    _metric("mtrec_controller_updates").inc(1.0, tags("mtrec_controller_updates", action=action))


def set_report(report: Mapping[str, Any]) -> None:
    """What the policy measured against the holdout (``Decision.report`` of the ``calibrated`` policy;
    other policies report nothing, and nothing is set): the main arm's lift with its always-valid 95 %
    interval, and each guardrail's ratio, lower bound, least ratio and state. A bound the report leaves
    out (None: no data yet) is not set."""
    lift = report.get("lift_vs_holdout") or {}
    for bound in ("estimate", "low", "high"):
        if lift.get(bound) is not None:
            _metric("mtrec_lift_vs_holdout").set(float(lift[bound]), tags("mtrec_lift_vs_holdout", bound=bound))
    for task, g in (report.get("guardrails") or {}).items():
        for bound in ("ratio", "low", "least"):
            if g.get(bound) is not None:
                metric, labels = _metric("mtrec_guardrail_ratio"), tags("mtrec_guardrail_ratio", task=task, bound=bound)
                metric.set(float(g[bound]), labels)
        if g.get("state") in GUARDRAIL_STATES:
            _metric("mtrec_guardrail_state").set(GUARDRAIL_STATES[g["state"]], tags("mtrec_guardrail_state", task=task))
