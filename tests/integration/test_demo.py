"""The README's main command in its reduced mode, end to end: every stage on a real Ray, real HTTP
through Ray Serve, a real Prometheus when the Debian binary is installed (as in CI).

The demo runs in its own process with its own embedded Ray (it starts and stops everything itself,
Serve included, which must not touch the session cluster other tests share), started in the background
with the session's first integration test (``conftest.demo_process``); these tests run last."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

SERVING = re.compile(r"\[demo [0-9:]+\] serving on (\S+) ")
MAX_LINES = 40
RULE = "-" * 72
TASKS = {"click", "add_to_cart", "purchase", "ad_click"}


@pytest.fixture(scope="module")
def demo(demo_process):
    """The quick demo with ``--keep-serving`` (started in the background by the session's
    ``demo_process``): once it says it is serving, the service answers over HTTP; then Ctrl-C (SIGINT)
    ends it cleanly (exit 0), everything it started is stopped, and the summary comes last."""
    proc, terminal, out = demo_process
    deadline = time.monotonic() + 900
    serving = None
    while serving is None and proc.poll() is None and time.monotonic() < deadline:
        lines = terminal.read_text(errors="replace").splitlines()
        serving = next((m for m in map(SERVING.match, lines) if m), None)
        if serving is None:
            time.sleep(1)
    try:
        assert serving, terminal.read_text(errors="replace")[-3000:] + _log_tail(out)
        with urllib.request.urlopen(serving.group(1) + "/healthz", timeout=10) as r:
            assert r.status == 200  # --keep-serving: still up
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = terminal.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:] + _log_tail(out)
    return out, json.loads((out / "summary.json").read_text()), text


def _log_tail(out) -> str:
    log = out / "logs" / "demo.log"
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def test_every_stage_ran_and_the_summary_is_honest(demo):
    out, s, _ = demo
    assert set(s["test_auc"]) == set(s["oracle_auc"]) == TASKS
    for task, auc in s["test_auc"].items():
        assert 0.55 < auc <= 1.0 and 0.55 < s["oracle_auc"][task] <= 1.0, (task, s["test_auc"], s["oracle_auc"])
    served = json.loads((Path(s["served_run"]) / "metrics.json").read_text())["test"]
    assert s["test_auc"] == {t: served[t]["auc"] for t in TASKS}  # the served run's, not the first training's
    assert s["served_run"] in (str(out / "train"), str(out / "tune" / "result" / "best"))
    t = s["tune"]
    assert t["trials"] == 2 and t["best"] and t["best_score"] >= t["baseline_score"]
    if t["best"] != t["baseline"]:  # a drawn trial: its learning rate is drawn too, not only its weighting
        assert "train.lr" in t["changed"], t["changed"]
    v = s["serving"]
    assert v["requests"] == 300 and v["failed"] == 0, v
    assert 0 < v["p50_ms"] <= v["p99_ms"]
    assert v["impressions"] == 5 * v["requests"] and v["events"]["click"] > 0
    assert [p.rsplit("/", 1)[-1] for p in s["plots"]] == ["curves.png", "oracle.png", "pareto.png", "weights.png"]
    for p in s["plots"]:
        assert os.path.getsize(p) > 0, p


def test_the_terminal_is_quiet_and_the_summary_comes_last(demo):
    out, s, terminal = demo
    lines = [line.split("\r")[-1] for line in terminal.splitlines()]  # as a terminal shows redraws
    assert len(lines) <= MAX_LINES, terminal
    for noise in ("INFO", "WARNING", "CALL ", "TrainingReport(", "(pid=", "[train]", "Trial status"):
        assert noise not in terminal, (noise, terminal)
    epochs = [line.split(":")[0].strip() for line in lines if line.strip().startswith("epoch")]
    assert epochs == ["epoch 1/2", "epoch 2/2"], terminal  # 1-based, each once
    assert sum(line.strip().startswith("trial #") for line in lines) == 2, terminal

    assert lines[-1] == RULE and RULE in lines[:-1], terminal
    block = lines[len(lines) - 1 - lines[::-1].index(RULE, 1) :]  # from the opening rule of the last block
    assert block[1].startswith("ray-mtrec demo finished"), block
    assert any(line.startswith("served model:") for line in block), block
    for task in TASKS:
        cell = f"{task} {s['test_auc'][task]:.3f} ({s['oracle_auc'][task]:.3f})"
        assert any(line.startswith("  test AUC, served (oracle): ") and cell in line for line in block), (cell, block)
    verdict = f"verdict: {s['holdout']['verdict']} (controller: lift of {s['main_arm']} over the holdout"
    assert any(line.startswith(verdict) for line in block), (verdict, block)
    serving = next(i for i, line in enumerate(lines) if SERVING.match(line))
    assert serving < lines.index(block[0])  # stopped first (after Ctrl-C), then the summary

    log = (out / "logs" / "demo.log").read_text(errors="replace")
    assert "[train] epoch" in log  # the workers' own output went to the log, not to the terminal


def test_the_adaptive_traffic_is_measured_against_the_holdout(demo):
    """The controller runs the adaptive policy with its permanent holdout; the summary sets the adaptive
    traffic against the holdout, takes its verdict from the controller's always-valid interval, and
    names the exact expected north star of the weights before and after on the requests sent."""
    from mtrec.fusion.stats import Evidence, value_variance

    _, s, _ = demo
    h, v, params = s["holdout"], s["serving"], s["policy"]["params"]
    assert s["policy"]["name"] == "calibrated" and params["holdout"] == h["holdout_share"] == 0.05
    # every impression counted once, on its side; the holdout's users are about 5 % of them
    assert h["adaptive"]["impressions"] + h["holdout"]["impressions"] == h["impressions"] == v["impressions"]
    assert 0 < h["holdout"]["impressions"] < 0.2 * v["impressions"], h
    for side in ("adaptive", "holdout"):
        value, low, high = h[side]["value"]
        assert low <= value <= high and set(h[side]["rates"]) == set(params["guardrails"]) == {"click"}
        for rate, low, high in h[side]["rates"].values():
            assert low <= rate <= high and 0 <= rate <= 1
    # the controller's own report: its lift interval holds its estimate, and gives the verdict
    lift = h["lift"]
    assert lift["arm"] == s["main_arm"] and lift["windows"] > 0, (lift, s["controller_reason"])
    assert lift["low"] <= lift["estimate"] <= lift["high"], lift
    verdict = "helped" if lift["low"] > 0 else "hurt" if lift["high"] < 0 else "no detectable difference"
    assert h["verdict"] == verdict
    assert set(h["guardrails"]) == {"click"} and h["guardrails"]["click"]["state"] in ("held", "uncertain", "broken")
    # the impressions a 1 % lift takes: from the variance of the value at the rates the users produced
    values = params["values"]
    rates = np.array([v["events"][t] / v["impressions"] for t in values])
    assert h["variance"] == pytest.approx(value_variance(np.array(list(values.values())), rates))
    need, per_impression = h["impressions_to_detect"], h["variance"] * (1 / 0.05 + 1 / 0.95)
    radius = [Evidence(h["tau"], info=n / per_impression).interval(0.05) for n in (need, 0.9 * need)]
    assert need > 0 and (radius[0][1] - radius[0][0]) / 2 <= 0.01 * h["value"] < (radius[1][1] - radius[1][0]) / 2
    # the exact expected value per impression of the main arm's weights, on the requests sent
    e, before, after = s["expected"], s["weights_before"], s["weights_after"]
    assert e["requests"] == v["requests"] and all(np.isfinite(e[k]) and e[k] > 0 for k in ("before", "after")), e
    if after == before:
        assert e["after"] == e["before"]  # the same requests, ranked the same way
    assert set(before) == set(after) == TASKS and abs(sum(after.values()) - 1) < 1e-6


def test_the_demo_left_nothing_running(demo):
    out, s, _ = demo
    with pytest.raises(OSError):
        urllib.request.urlopen(s["url"] + "/healthz", timeout=3)
    if s["prometheus"]:
        with pytest.raises(OSError):
            urllib.request.urlopen(s["prometheus"] + "/-/ready", timeout=3)
