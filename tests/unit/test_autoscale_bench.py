"""The autoscale bench's figures from a replica timeline and a request log (pure; no Ray)."""

from __future__ import annotations

import pytest

from bench.autoscale_bench import bins, summarize

BLOCKS = {d: {"min_replicas": 1, "downscale_delay_s": 10} for d in ("Embedder", "TaskHeads")}
STEP = (10.0, 40.0)


def timeline(embedder: list[tuple[float, int]], heads: list[tuple[float, int]]) -> list[tuple[float, dict]]:
    """Readings once a second from 0 to 80 s; each deployment's count is the last (time, count) at or before."""

    def at(changes, t):
        return [c for s, c in changes if s <= t][-1]

    return [(float(t), {"Embedder": at(embedder, t), "TaskHeads": at(heads, t), "Ingress": 1}) for t in range(81)]


def requests(idle_ms: float, during_ms: float, failed_at: float | None = None) -> list[dict]:
    out = []
    for k in range(800):
        t = k * 0.1
        phase = "idle" if t < STEP[0] else "step" if t < STEP[1] else "after"
        out.append({"phase": phase, "t": t, "ms": during_ms if phase == "step" else idle_ms, "status": 200})
    if failed_at is not None:
        out[int(failed_at * 10)]["status"] = 503
    return out


def test_a_step_followed_up_and_back_down_meets_every_target():
    line = timeline([(0, 1), (15, 2), (55, 1)], [(0, 1), (20, 3), (60, 1)])
    s = summarize(line, requests(100.0, 250.0), STEP, BLOCKS)
    assert s["max_replicas"] == {"Embedder": 2, "TaskHeads": 3} and s["min_replicas"] == {"Embedder": 1, "TaskHeads": 1}
    assert s["scale_up_s"] == {"Embedder": 5.0, "TaskHeads": 10.0}
    assert s["scale_down_s"] == {"Embedder": 15.0, "TaskHeads": 20.0}
    assert s["during_from_s"] == 10.0  # both at their step's peak from 20 s
    assert s["p99_ms_idle"] == pytest.approx(100.0) and s["p99_ms_during"] == pytest.approx(250.0)
    assert s["failed_share"] == 0 and all(s["met"].values()), s["met"]


def test_each_target_can_fail():
    # TaskHeads only scales after the step, the Embedder never comes down, a 503, latency 10x the idle one
    line = timeline([(0, 1), (15, 2)], [(0, 1), (45, 2), (50, 1)])
    s = summarize(line, requests(100.0, 1000.0, failed_at=20.0), STEP, BLOCKS)
    assert s["scale_up_s"]["TaskHeads"] is None and s["scale_down_s"]["Embedder"] is None
    assert s["failed_share"] == pytest.approx(1 / 800)
    assert s["met"] == {"scaled_up": False, "scaled_down": False, "failed_share": False, "p99_ms_during": False}


def test_bins_count_every_request_once():
    log = requests(100.0, 250.0, failed_at=20.0)
    b = bins(log)
    assert sum(x["answered"] + x["failed"] for x in b) == len(log)
    assert b[0]["offered_rps"] == pytest.approx(10.0) and b[4]["failed"] == 1 and b[4]["p50_ms"] == 250.0
