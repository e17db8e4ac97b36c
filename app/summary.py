"""The demo's summary: what it found (``OUT/summary.json``) and the block the terminal shows last.

Honest about what is served: the test AUC per task is the SERVED run's (Tune's best trial, or the
training run when that was better on validation), beside the oracle's (the synthetic scenario's true
probabilities: :func:`mtrec.data.synthetic.oracle_metrics`), and the best trial's settings are listed
wherever they differ from the config the search started from, not only its weighting.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from mtrec.config import Config
from mtrec_tune.pareto import trial_label

RULE = "-" * 72


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
        f"  {'test AUC':<14}{'served':>8}{'oracle':>8}",
        *(f"  {task:<14}{auc:>8.3f}{s['oracle_auc'][task]:>8.3f}" for task, auc in s["test_auc"].items()),
    ]
    versus = f"; equal weights {trial_label(t['baseline'])}: {t['baseline_score']:.4f}" if t["baseline"] else ""
    lines.append(f"tuning: {t['trials']} trials; best {best}, mean valid AUC {t['best_score']:.4f}{versus}")
    changes = ", ".join(f"{k} {_value(a)} -> {_value(b)}" for k, (a, b) in t["changed"].items()) or "nothing"
    lines += textwrap.wrap(f"{best} changed: {changes}", 120, initial_indent="  ", subsequent_indent="    ")
    v = s["serving"]
    lines += [
        f"serving: {v['requests']} requests, {v['failed']} failed, p50 {v['p50_ms']:.0f} ms, p99 {v['p99_ms']:.0f} ms",
        "fusion weights, before -> after traffic: "
        + ", ".join(f"{k} {w:.3f} -> {s['weights_after'][k]:.3f}" for k, w in s["weights_before"].items()),
        f"controller: {s['controller_reason']}",
        f"plots in {out}: " + ", ".join(str(Path(p).relative_to(out)) for p in s["plots"]),
        f"Ray's, Tune's and Serve's own output: {s['log']}",
        RULE,
    ]
    return lines
