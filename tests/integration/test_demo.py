"""The README's main command in its reduced mode, end to end: every stage on a real Ray, real HTTP
through Ray Serve, a real Prometheus when the Debian binary is installed (as in CI).

The demo runs in its own process with its own embedded Ray (it starts and stops everything itself,
Serve included, which must not touch the session cluster other tests share)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from mtrec_cluster.ray_env import free_port

SERVING = re.compile(r"\[demo [0-9:]+\] serving on (\S+) ")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The quick demo with ``--keep-serving``: once it says it is serving, the service answers over
    HTTP; then Ctrl-C (SIGINT) ends it cleanly (exit 0) and everything it started is stopped."""
    out = tmp_path_factory.mktemp("demo") / "out"
    cmd = [sys.executable, "-m", "mtrec_app.demo", "--quick", "--keep-serving", "--out", str(out)]
    cmd += ["--port", str(free_port())]
    err = out.parent / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=stderr,
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
            assert serving, kept[-3000:] + err.read_text()[-3000:]
            url = serving.group(1)
            with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
                assert r.status == 200  # --keep-serving: still up after the summary
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, kept[-3000:] + err.read_text()[-3000:]
    return out, json.loads((out / "summary.json").read_text()), kept + rest


def test_every_stage_ran_and_the_summary_is_sane(demo):
    out, s, stdout = demo
    assert set(s["test_auc"]) == {"click", "add_to_cart", "purchase", "ad_click"}
    assert all(0.55 < auc <= 1.0 for auc in s["test_auc"].values()), s["test_auc"]  # well above chance
    t = s["tune"]
    assert t["trials"] == 2 and t["best"] and t["best_score"] >= t["baseline_score"]
    v = s["serving"]
    assert v["requests"] == 300 and v["failed"] == 0, v
    assert 0 < v["p50_ms"] <= v["p99_ms"]
    assert v["impressions"] == 5 * v["requests"] and v["events"]["click"] > 0
    for p in s["plots"]:
        assert os.path.getsize(p) > 0, p
    assert "ray-mtrec demo finished" in stdout and "weights after:" in stdout


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
