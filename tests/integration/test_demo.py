"""The README's main command in its reduced mode, end to end: every stage on a real Ray, real HTTP
through Ray Serve, a real Prometheus when the Debian binary is installed (as in CI).

The demo runs in its own process with its own embedded Ray (it starts and stops everything itself,
Serve included, which must not touch the session cluster other tests share). Its stdout and stderr
share one pipe, as a terminal shows them; a pipe is not a terminal, so the demo draws no bars there."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mtrec_cluster.ray_env import free_port

SERVING = re.compile(r"\[demo [0-9:]+\] serving on (\S+) ")
MAX_LINES = 40
RULE = "-" * 72
TASKS = {"click", "add_to_cart", "purchase", "ad_click"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The quick demo with ``--keep-serving``: once it says it is serving, the service answers over
    HTTP; then Ctrl-C (SIGINT) ends it cleanly (exit 0), everything it started is stopped, and the
    summary comes last."""
    out = tmp_path_factory.mktemp("demo") / "out"
    cmd = [sys.executable, "-m", "mtrec_app.cli", "demo", "--quick", "--keep-serving", "--out", str(out)]
    cmd += ["--port", str(free_port())]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
        # Ctrl-C as in a terminal: a test run started in the background (`make test &`, some CI
        # runners) ignores SIGINT, and the demo would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines, deadline = [], time.monotonic() + 900
    try:
        for line in proc.stdout:  # the demo prints a line per stage: this loop ends at "serving on"
            lines.append(line)
            if SERVING.match(line) or time.monotonic() > deadline:
                break
        kept = "".join(lines)
        serving = SERVING.match(lines[-1]) if lines else None
        assert serving, kept[-3000:] + _log_tail(out)
        url = serving.group(1)
        with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
            assert r.status == 200  # --keep-serving: still up
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, kept[-3000:] + _log_tail(out)
    return out, json.loads((out / "summary.json").read_text()), kept + rest


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
        row = f"  {task:<14}{s['test_auc'][task]:>8.3f}{s['oracle_auc'][task]:>8.3f}"
        assert row in block, (row, block)
    serving = next(i for i, line in enumerate(lines) if SERVING.match(line))
    assert serving < lines.index(block[0])  # stopped first (after Ctrl-C), then the summary

    log = (out / "logs" / "demo.log").read_text(errors="replace")
    assert "[train] epoch" in log  # the workers' own output went to the log, not to the terminal


def test_the_controller_moved_the_weights_from_the_feedback(demo):
    _, s, _ = demo
    before, after = s["weights_before"], s["weights_after"]
    assert set(before) == set(after) and abs(sum(after.values()) - 1) < 1e-6
    assert max(abs(after[t] - before[t]) for t in before) > 0.01, (before, after, s["controller_reason"])
    assert "purchase" in s["controller_reason"]  # the target policy's reason names the rate it holds


def test_the_demo_left_nothing_running(demo):
    out, s, _ = demo
    with pytest.raises(OSError):
        urllib.request.urlopen(s["url"] + "/healthz", timeout=3)
    if s["prometheus"]:
        with pytest.raises(OSError):
            urllib.request.urlopen(s["prometheus"] + "/-/ready", timeout=3)
