"""Autoscaled serving, shown: a load step, and the replicas of the Embedder and TaskHeads following it.

    python -m bench autoscale -- [--rate 30] [--idle-rate 2] [--idle-s 30] [--step-s 120] [--after-s 150]
                                 [--cold-share 0.8] [--json PATH] [--no-knee]

On a local Ray with room for several replicas (8 logical CPUs), the app runs with the autoscaling
defaults of ``mtrec serve`` (:data:`mtrec_serve.config.AUTOSCALING`, the RayService's too). Open-loop
traffic (a request every ``1 / rate`` seconds, whatever the answers do) goes idle -> step -> idle:
``--idle-rate`` requests per second, then ``--rate`` for ``--step-s``, then ``--idle-rate`` again for
``--after-s``. Each request scores 50 catalog candidates; ``--cold-share`` of the requests add three
cold items whose texts were never seen, so the Embedder encodes them (the LRU cache cannot help), and
the rest only loads TaskHeads (every request goes through TaskHeads too). The running replicas of every deployment are read once a second
(:class:`mtrec_serve.replicas.ReplicaWatch`).

Recorded (``bench/results/autoscale.json``, and ``--json PATH``): the timeline of replicas and the
requests in 5-second bins by send time (offered rate, answered, failed, p50, p99); per autoscaled deployment ``min_replicas`` and
``max_replicas`` observed, ``scale_up_s`` (step start -> first added replica running) and
``scale_down_s`` (step end -> back at its minimum for good); ``failed_share`` (answers other than
200, 503s included); ``p99_ms_idle`` (the first idle phase) and ``p99_ms_during`` (requests of the
step sent once every autoscaled deployment had reached the most replicas it got in the step). Targets
(issue #21): both deployments scale up during the step and are back at their minimum within their
``downscale_delay_s`` + 60 s; ``failed_share`` 0; ``p99_ms_during`` <= 3 x ``p99_ms_idle``. The plot
(``autoscale.png``): replicas per deployment over time above p99 latency and offered rate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, save_results
from mtrec.io import atomic_write_text

APP = "mtrec-autoscale"
SCALED = ("Embedder", "TaskHeads")
CANDIDATES, COLD = 50, 3
P99_RATIO, DOWN_MARGIN_S = 3.0, 60.0  # the targets
KNEE_LEVELS = (1, 2, 4, 8, 16)


def _bodies(bundle: Path, n: int, cold_share: float, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` recommend bodies; ``cold_share`` of them with COLD items whose texts nobody sent before."""
    from mtrec.inference import Catalog

    meta = Catalog.load(bundle).meta
    rng = np.random.default_rng(seed)
    ids, users = meta.item_ids, meta.users.values
    out = []
    for _ in range(n):
        candidates: list[Any] = [ids[i] for i in rng.choice(len(ids), CANDIDATES, replace=False)]
        if rng.random() < cold_share:
            candidates += [
                {"item_id": f"cold-{uuid.uuid4().hex[:12]}", "text": f"new arrival {uuid.uuid4().hex} in store"}
                for _ in range(COLD)
            ]
        out.append({"user_id": users[int(rng.integers(len(users)))], "candidates": candidates, "k": 10})
    return out


def _send(url: str, body: dict[str, Any]) -> tuple[float, int]:
    """(seconds, HTTP status) of one POST; 0 for no answer (refused, reset, timed out)."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = 0
    return time.perf_counter() - start, status


def open_loop(url: str, phases: list[tuple[str, float, float]], bodies: list[dict], t0: float) -> list[dict]:
    """Send at the phases' rates (``(name, rate per s, seconds)``) whatever the answers do; every request's
    phase, send time (seconds since ``t0``), latency (ms) and status."""
    records: list[dict] = []
    lock = threading.Lock()

    def one(phase: str, sent: float, body: dict) -> None:
        seconds, status = _send(url, body)
        with lock:
            records.append({"phase": phase, "t": sent, "ms": 1000 * seconds, "status": status})

    k = 0
    with ThreadPoolExecutor(max_workers=256) as pool:
        start = time.monotonic()
        for name, rate, seconds in phases:
            end, n = start + seconds, 0
            while True:
                due = start + n / rate
                if due >= end:
                    break
                time.sleep(max(0.0, due - time.monotonic()))
                pool.submit(one, name, time.monotonic() - t0, bodies[k % len(bodies)])
                k, n = k + 1, n + 1
            start = end
    return sorted(records, key=lambda r: r["t"])


def closed_loop(url: str, bodies: list[dict], clients: int, seconds: float) -> tuple[list[float], float]:
    """``clients`` clients sending back to back for ``seconds``: the latencies (s) of the 200 answers, wall time."""
    stop, answered, lock = time.monotonic() + seconds, [], threading.Lock()

    def client(offset: int) -> None:
        k = offset
        while time.monotonic() < stop:
            latency, status = _send(url, bodies[k % len(bodies)])
            if status == 200:
                with lock:
                    answered.append(latency)
            k += clients

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answered, time.monotonic() - start


def knee(
    url: str, bodies: Callable[[int], list[dict]], levels: tuple[int, ...] = KNEE_LEVELS, seconds: float = 8.0
) -> dict[str, Any]:
    """Closed-loop load at each concurrency of ``levels`` for ``seconds`` (``bodies(seed)``: fresh request
    bodies for each level, so no cold text repeats into the Embedder's cache): requests/s and p50 (ms)
    each, and the knee: the least concurrency whose throughput is within 10 % of the best one's (more
    requests in flight only wait in the queue)."""
    rows = {}
    for c in levels:
        ok, wall = closed_loop(url, bodies(c), c, seconds)
        rows[str(c)] = {"rps": len(ok) / wall, "p50_ms": 1000 * float(np.median(ok)) if ok else None}
    best = max(r["rps"] for r in rows.values())
    at = next(int(c) for c, r in rows.items() if r["rps"] >= 0.9 * best)
    return {"levels": rows, "knee_concurrency": at, "knee_rps": rows[str(at)]["rps"]}


def summarize(
    timeline: list[tuple[float, dict[str, int]]],
    records: list[dict],
    step: tuple[float, float],
    blocks: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The figures of the module docstring from the replica timeline and the requests (times in seconds
    since the start; ``step`` = (start, end) of the step)."""
    start, end = step
    out: dict[str, Any] = {"min_replicas": {}, "max_replicas": {}, "scale_up_s": {}, "scale_down_s": {}}
    full_at = start
    for d in SCALED:
        series = [(t, n.get(d, 0)) for t, n in timeline if d in n]
        counts = [c for _, c in series]
        out["min_replicas"][d], out["max_replicas"][d] = min(counts), max(counts)
        before = max([c for t, c in series if t <= start] or [counts[0]])
        up = next((t for t, c in series if start < t <= end and c > before), None)
        out["scale_up_s"][d] = None if up is None else up - start
        peak = max([c for t, c in series if start <= t <= end] or [before])
        reached = next((t for t, c in series if start <= t <= end and c == peak), end)
        full_at = max(full_at, reached)
        floor = blocks[d]["min_replicas"]
        after = [(t, c) for t, c in series if t >= end]
        # back at the minimum for good: the first reading after which every reading is at the minimum
        down = next((t for i, (t, _) in enumerate(after) if all(c == floor for _, c in after[i:])), None)
        out["scale_down_s"][d] = None if down is None or not after or after[-1][1] != floor else max(0.0, down - end)
    ok = [r for r in records if r["status"] == 200]
    out["requests"] = len(records)
    out["failed_share"] = 1 - len(ok) / len(records) if records else 1.0
    out["statuses"] = {str(s): sum(r["status"] == s for r in records) for s in sorted({r["status"] for r in records})}
    idle = [r["ms"] for r in ok if r["phase"] == "idle"]
    during = [r["ms"] for r in ok if r["phase"] == "step" and r["t"] >= full_at]
    out["p99_ms_idle"] = float(np.percentile(idle, 99)) if idle else None
    out["p99_ms_during"] = float(np.percentile(during, 99)) if during else None
    out["p50_ms_during"] = float(np.percentile(during, 50)) if during else None
    out["during_from_s"] = full_at - start
    out["met"] = {
        "scaled_up": all(out["scale_up_s"][d] is not None for d in SCALED),  # during the step
        "scaled_down": all(
            out["scale_down_s"][d] is not None
            and out["scale_down_s"][d] <= blocks[d]["downscale_delay_s"] + DOWN_MARGIN_S
            for d in SCALED
        ),
        "failed_share": out["failed_share"] == 0,
        "p99_ms_during": bool(idle and during) and out["p99_ms_during"] <= P99_RATIO * out["p99_ms_idle"],
    }
    return out


def bins(records: list[dict], width: float = 5.0) -> list[dict[str, Any]]:
    """The requests by send time in ``width``-second bins: start, offered requests/s, answered, failed,
    p50 and p99 latency (ms) of the answered ones (None where none was)."""
    if not records:
        return []
    t = np.array([r["t"] for r in records])
    out = []
    for start in np.arange(0.0, t.max() + width, width):
        inside = [r for r in records if start <= r["t"] < start + width]
        ok = [r["ms"] for r in inside if r["status"] == 200]
        out.append(
            {
                "t": float(start),
                "offered_rps": len(inside) / width,
                "answered": len(ok),
                "failed": len(inside) - len(ok),
                "p50_ms": float(np.percentile(ok, 50)) if ok else None,
                "p99_ms": float(np.percentile(ok, 99)) if ok else None,
            }
        )
    return out


def plot(path: Path, timeline: list, per_bin: list[dict], step: tuple[float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for d in (*SCALED, "Ingress"):
        pts = [(t, n[d]) for t, n in timeline if d in n]
        if pts:
            top.step(*zip(*pts), where="post", label=d)
    for ax in (top, bottom):
        ax.axvspan(*step, color="0.9", zorder=0)
    top.set_ylabel("replicas running")
    top.legend(loc="upper right")
    top.set_title("Autoscaling under a load step (shaded), defaults of `mtrec serve`")
    answered = [b for b in per_bin if b["p99_ms"] is not None]
    x = [b["t"] + 2.5 for b in answered]
    bottom.plot(x, [b["p99_ms"] for b in answered], "o-", ms=3, label="p99 (5 s bins, by send time)")
    bottom.plot(x, [b["p50_ms"] for b in answered], ".-", ms=3, label="p50")
    bottom.set_yscale("log")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds")
    rate = bottom.twinx()
    rate.step([b["t"] for b in per_bin], [b["offered_rps"] for b in per_bin], where="post", color="0.5", lw=0.8)
    rate.set_ylabel("offered requests/s (grey)")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--rate",
        type=float,
        default=30.0,
        help="requests per second during the step (default: its cold requests, 24/s, are past one Embedder "
        "replica's knee, about 20/s on a 2-core host)",
    )
    p.add_argument("--idle-rate", type=float, default=2.0, help="requests per second before and after it")
    p.add_argument("--idle-s", type=float, default=30.0)
    p.add_argument("--step-s", type=float, default=120.0)
    p.add_argument("--after-s", type=float, default=150.0)
    p.add_argument("--cold-share", type=float, default=0.8, help="share of requests with cold texts")
    p.add_argument("--bundle", default=None, help="an existing bundle (default: build one)")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--no-knee", dest="knee", action="store_false", help="skip the one-replica knee measurement")
    args = p.parse_args(argv)

    import ray.serve

    from bench.serve_bench import build_bundle
    from mtrec_cluster.ray_env import free_port, local_ray
    from mtrec_serve.app import AppArgs, graph
    from mtrec_serve.config import AUTOSCALING
    from mtrec_serve.replicas import ReplicaWatch

    tmp = tempfile.TemporaryDirectory()
    bundle = Path(args.bundle) if args.bundle else build_bundle(Path(tmp.name))
    phases = [
        ("idle", args.idle_rate, args.idle_s),
        ("step", args.rate, args.step_s),
        ("after", args.idle_rate, args.after_s),
    ]
    total = sum(r * s for _, r, s in phases)
    bodies = _bodies(bundle, int(total) + 1, args.cold_share)
    port = free_port()
    with local_ray(num_cpus=8, export_metrics=True):
        try:
            ray.serve.start(http_options={"host": "127.0.0.1", "port": port})
            knees = {}
            if args.knee:  # one replica of each, pinned: where more requests in flight stop adding throughput
                pinned = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
                ray.serve.run(
                    graph(AppArgs(bundle=str(bundle)), dict.fromkeys(SCALED, pinned)), name=APP, route_prefix="/"
                )
                url = f"http://127.0.0.1:{port}/v1/recommend"
                for kind, share in (("catalog only (TaskHeads)", 0.0), ("all cold (Embedder)", 1.0)):
                    knees[kind] = knee(url, lambda seed, share=share: _bodies(bundle, 1500, share, seed=seed))
                    print(f"knee, {kind}: {json.dumps(knees[kind])}", flush=True)
                ray.serve.delete(APP)
            ray.serve.run(graph(AppArgs(bundle=str(bundle))), name=APP, route_prefix="/")
            url = f"http://127.0.0.1:{port}/v1/recommend"
            for body in _bodies(bundle, 5, 0.0, seed=1):  # warm-up: connections, first batches
                _send(url, body)
            t0 = time.monotonic()
            say = lambda line: print(f"[{time.monotonic() - t0:6.1f} s] {line}", flush=True)  # noqa: E731
            with ReplicaWatch(APP, say, keep=True, t0=t0) as watch:  # one clock for replicas and requests
                records = open_loop(url, phases, bodies, t0)
                time.sleep(1.5)
        finally:
            ray.serve.shutdown()
    step = (args.idle_s, args.idle_s + args.step_s)
    summary = summarize(watch.timeline, records, step, AUTOSCALING)
    result = {
        "revision": _revision(),
        "setting": {
            "rate": args.rate,
            "idle_rate": args.idle_rate,
            "phases_s": [s for _, _, s in phases],
            "cold_share": args.cold_share,
            "candidates": CANDIDATES,
            "cold_per_request": COLD,
            "autoscaling": {d: AUTOSCALING[d] for d in SCALED},
            "ray_logical_cpus": 8,
        },
        "knee": knees,
        **summary,
        "timeline": [{"t": t, "running": n} for t, n in watch.timeline],
        "requests_per_5s": bins(records),
    }
    out = save_results("autoscale", result)
    if args.json:
        atomic_write_text(args.json, out.read_text())
    plot(RESULTS / "autoscale.png", watch.timeline, result["requests_per_5s"], step)
    brief = {k: v for k, v in summary.items() if k not in ("statuses",)}
    print(json.dumps(brief, indent=2))
    return 0 if all(summary["met"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
