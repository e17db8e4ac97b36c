"""The demo's summary: what it found (``OUT/summary.json``) and the block the terminal shows last.

Honest about what is served: the test AUC per task is the SERVED run's (Tune's best trial, or the
training run when that was better on validation), beside the oracle's (the synthetic scenario's true
probabilities: :func:`mtrec.data.synthetic.oracle_metrics`), and the best trial's settings are listed
wherever they differ from the config the search started from, not only its weighting.

Honest about what the controller did (:func:`against_holdout`): the adaptive traffic against the
permanent holdout, each side's north-star value per impression and guarded rates with 95 % intervals,
and the verdict of the controller's own always-valid interval on the main arm's lift (helped, no
detectable difference, hurt), beside the impressions a 1 % lift would take to show. The quick demo's
few hundred requests are far too few to show a lift of a few percent: expect "no detectable difference".
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from mtrec.config import Config
from mtrec.fusion import HOLDOUT
from mtrec.fusion.stats import Evidence, value_variance
from mtrec.weighted import weighted_sum
from mtrec_tune.pareto import trial_label

RULE = "-" * 72
ADAPTIVE_TRAFFIC = "adaptive"  # the users the holdout does not serve: the main arm and any candidate
VERDICTS = ("helped", "no detectable difference", "hurt")
DETECT = 0.01  # the lift whose cost in impressions the summary names
_Z95 = NormalDist().inv_cdf(0.975)


def _flat_settings(cfg: Config) -> dict[str, Any]:
    """``cfg`` as dotted keys (tasks by name: ``tasks.click.loss_weight``)."""
    d = cfg.to_dict()
    d["tasks"] = {t["name"]: t for t in d["tasks"]}
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v

    walk(d, "")
    return flat


def changed_settings(base: Config, best: Config) -> dict[str, list[Any]]:
    """Every setting ``best`` holds differently from ``base``: dotted key -> ``[base value, best value]``
    (None where one of them does not set it); the data path is left out (``best.yaml`` leaves it empty)."""
    a, b = _flat_settings(base), _flat_settings(best)
    keys = sorted((a.keys() | b.keys()) - {"data.path"})
    return {k: [a.get(k), b.get(k)] for k in keys if a.get(k) != b.get(k)}


def summarize(
    data: Path, served_run: Path, trained: dict[str, Any], tuned: dict[str, Any], tune_base: Config, out: Path
) -> dict[str, Any]:
    """What the demo found: the SERVED run's test AUC per task beside the oracle's, the training run's,
    and the search's best trial with every setting it changed."""
    from mtrec.config import load_preset
    from mtrec.data.synthetic import oracle_metrics
    from mtrec_train.trainer import resolve_config

    served = json.loads((served_run / "metrics.json").read_text())["test"]
    oracle = oracle_metrics(data, "test")
    best = tuned["best"]  # a search without one raised
    changed = changed_settings(resolve_config(tune_base, data), load_preset(str(out / "tune" / "result" / "best.yaml")))
    return {
        "served_run": str(served_run),
        "served_from": "tune" if served_run.is_relative_to(out / "tune") else "train",
        "test_auc": {t: m["auc"] for t, m in served.items() if "auc" in m},
        "oracle_auc": {t: m["auc"] for t, m in oracle.items() if "auc" in m},
        "train": {
            "test_auc": {t: m["auc"] for t, m in trained["test"].items() if "auc" in m},
            "samples_per_s": trained["train"]["samples_per_s"],
        },
        "tune": {
            "trials": tuned["trials"],
            "best": best["trial_id"],
            "best_score": best["score"],
            "baseline": (tuned.get("baseline") or {}).get("trial_id"),
            "baseline_score": (tuned.get("baseline") or {}).get("score"),
            "pareto_front": tuned.get("pareto_front"),
            "changed": changed,
        },
    }


def group_outcome(counts: dict[str, Any] | None, values: dict[str, float], guarded: list[str]) -> dict[str, Any]:
    """One group's outcome: impressions, the north-star value per impression and the rate of each
    ``guarded`` task, each ``[estimate, low, high]`` with a normal 95 % interval (the value's variance
    bounded by :func:`mtrec.fusion.stats.value_variance`, as the controller bounds it; None without
    impressions). ``counts``: ``{"impressions": n, "events": {task: n}}`` (:class:`~mtrec_app.traffic.TrafficReport`)."""
    n = (counts or {}).get("impressions", 0)
    if n <= 0:
        return {"impressions": 0, "value": None, "rates": dict.fromkeys(guarded)}
    rates = {t: counts["events"].get(t, 0) / n for t in values}
    v, r = np.array(list(values.values())), np.array(list(rates.values()))

    def interval(mean: float, variance: float) -> list[float]:
        half = _Z95 * math.sqrt(variance / n)
        return [mean, mean - half, mean + half]

    return {
        "impressions": n,
        "value": interval(float(weighted_sum(r, v)), value_variance(v, r)),
        "rates": {t: interval(rates[t], rates[t] * (1 - rates[t])) for t in guarded},
    }


def impressions_to_detect(lift: float, value: float, variance: float, holdout: float, tau: float) -> int | None:
    """The impressions (all arms, ``holdout`` of them in the holdout) after which the controller's
    always-valid 95 % interval on the value per impression of the other traffic minus the holdout's
    (:meth:`mtrec.fusion.stats.Evidence.interval`, mixture scale ``tau``) is at most ``lift * value`` on
    each side, so that a true lift of ``lift`` shows as one about as often as not. ``variance``: the
    value's per-impression variance. None when ``value`` or ``variance`` is not positive."""
    if not (value > 0 and variance > 0 and tau > 0):
        return None
    per_impression = variance * (1 / holdout + 1 / (1 - holdout))  # the difference's variance, times impressions

    def radius(n: float) -> float:
        low, high = Evidence(tau, info=n / per_impression).interval(0.05)
        return (high - low) / 2

    target, high = lift * value, 1.0
    while radius(high) > target:
        high *= 2
    low = high / 2
    while high - low > 1:  # the radius falls as impressions grow
        mid = (low + high) / 2
        low, high = (mid, high) if radius(mid) > target else (low, mid)
    return math.ceil(high)


def against_holdout(
    groups: dict[str, Any], values: dict[str, float], report: dict[str, Any], params: dict[str, Any]
) -> dict[str, Any]:
    """The adaptive traffic against the holdout: each side's outcome (:func:`group_outcome`) from the
    simulated users' counts ``groups`` (group -> counts), the controller's ``report`` (its
    ``Decision.report``: the main arm's lift over the holdout with its always-valid 95 % interval, and
    each guardrail's ratio, lower bound and state), the verdict that interval gives, and the impressions
    a lift of :data:`DETECT` would take to show (:func:`impressions_to_detect`, with the controller's
    holdout share, its mixture scale ``effect`` times the value, and the variance of the value at the
    rates of all the traffic). ``values`` and ``params``: the policy's (its values of one event of each
    task, its parameters)."""
    guarded = list(params["guardrails"])
    sides = {g: group_outcome(groups.get(g), values, guarded) for g in (ADAPTIVE_TRAFFIC, HOLDOUT)}
    n = sum(c["impressions"] for c in groups.values())
    pooled = np.array([sum(c["events"].get(t, 0) for c in groups.values()) / max(n, 1) for t in values])
    v = np.array(list(values.values()))
    value, variance = float(weighted_sum(pooled, v)), value_variance(v, pooled)
    tau = params["effect"] * value
    lift = dict(report.get("lift_vs_holdout") or {})
    low, high = lift.get("low"), lift.get("high")
    verdict = (
        VERDICTS[0] if low is not None and low > 0 else VERDICTS[2] if high is not None and high < 0 else VERDICTS[1]
    )
    return {
        **sides,
        "lift": lift,
        "guardrails": report.get("guardrails", {}),
        "verdict": verdict,
        "impressions": n,
        "value": value,
        "variance": variance,
        "holdout_share": params["holdout"],
        "tau": tau,
        "impressions_to_detect": impressions_to_detect(DETECT, value, variance, params["holdout"], tau),
    }


def _value(v: Any) -> str:
    return "unset" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def summary_lines(s: dict[str, Any], out: Path) -> list[str]:
    """The summary block (between two rules), as the terminal shows it last."""
    t = s["tune"]
    best = trial_label(t["best"])
    served = f"tune's best trial {best}" if s["served_from"] == "tune" else "the 2-worker training run"
    lines = [
        RULE,
        f"ray-mtrec demo finished in {s['seconds']:.0f} s; everything it started is stopped",
        f"served model: {served} ({Path(s['served_run']).relative_to(out)})",
        "  test AUC, served (oracle): "
        + ", ".join(f"{task} {auc:.3f} ({s['oracle_auc'][task]:.3f})" for task, auc in s["test_auc"].items()),
    ]
    versus = f"; equal weights {trial_label(t['baseline'])}: {t['baseline_score']:.4f}" if t["baseline"] else ""
    lines.append(f"tuning: {t['trials']} trials; best {best}, mean valid AUC {t['best_score']:.4f}{versus}")
    changes = ", ".join(f"{k} {_value(a)} -> {_value(b)}" for k, (a, b) in t["changed"].items()) or "nothing"
    lines += textwrap.wrap(f"{best} changed: {changes}", 120, initial_indent="  ", subsequent_indent="    ")
    v = s["serving"]
    lines += [
        f"serving: {v['requests']} requests, {v['failed']} failed, p50 {v['p50_ms']:.0f} ms, p99 {v['p99_ms']:.0f} ms;"
        f" controller's last step: {s['controller_reason']}",
        f"fusion weights of the main arm ({s['main_arm']}), before -> after traffic: "
        + ", ".join(f"{k} {w:.3f} -> {s['weights_after'][k]:.3f}" for k, w in s["weights_before"].items()),
        *holdout_lines(s["holdout"], s["expected"]),
        f"plots in {out}: "
        + ", ".join(str(Path(p).relative_to(out)) for p in s["plots"])
        + f"; Ray's own output: {s['log']}",
        RULE,
    ]
    return lines


def _ci(x: list[float] | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x[0]:.{digits}f} [{x[1]:.{digits}f}, {x[2]:.{digits}f}]"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def _number(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def holdout_lines(h: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The outcome against the holdout, as the summary block shows it (see :func:`against_holdout`)."""
    a, o = h[ADAPTIVE_TRAFFIC], h[HOLDOUT]
    lines = [
        f"north star per impression (95 % CI): adaptive {_ci(a['value'])} on {a['impressions']:,} impressions;"
        f" {h['holdout_share']:.0%} holdout {_ci(o['value'])} on {o['impressions']:,}"
    ]
    for task, g in h["guardrails"].items():
        lines.append(
            f"guardrail {task} rate: adaptive {_ci(a['rates'][task])}; holdout {_ci(o['rates'][task])};"
            f" controller: ratio {_number(g['ratio'])}, low {_number(g['low'])}, least {g['least']:g}: {g['state']}"
        )
    lift = h["lift"]
    lines.append(
        f"verdict: {h['verdict']} (controller: lift of {lift.get('arm', '?')} over the holdout"
        f" {_percent(lift.get('estimate'))} [{_percent(lift.get('low'))}, {_percent(lift.get('high'))}],"
        f" always valid, 95 %, {lift.get('windows', 0)} windows)"
    )
    need = h["impressions_to_detect"]
    lines.append(
        f"a {DETECT:.0%} lift takes about {need:,} impressions to show against the holdout; this run served {h['impressions']:,}"
        if need
        else f"a {DETECT:.0%} lift: too few events to tell how many impressions it would take"
    )
    change = expected["after"] / expected["before"] - 1 if expected["before"] > 0 else math.nan
    lines.append(
        f"exact expected north star per impression on the same {expected['requests']} requests (true probabilities):"
        f" before {expected['before']:.4f}, after {expected['after']:.4f} ({change:+.2%})"
    )
    return lines
