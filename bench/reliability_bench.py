"""Soak and faults of the serving app (issue #9): a steady request rate with feedback for minutes,
then each fault under load, then the fuzz of the HTTP API.

1. **soak**: ``--rate`` recommend requests per second (open loop: each is sent at its scheduled time,
   whatever the previous ones do), each followed by the feedback that
   :class:`mtrec_app.traffic.SimulatedUsers` draws from the synthetic truth, for ``--minutes``. Per
   minute: requests, errors, p50 / p99 latency, the worst lag of a send behind its schedule. Every
   ``--sample-s``: the RSS of each process of the app (Ingress, Embedder, TaskHeads and
   WeightController replicas, Serve's proxy and controller). Memory growth: the mean RSS of the last
   minute against that of the first minute after the warm-up minute (bar: under 5%);
2. **faults** under load from 4 client threads (:mod:`mtrec_app.faults`): a TaskHeads replica killed
   (one of two); the controller's Prometheus answering garbage, errors and slowly; a corrupt, a newer
   and a misshapen bundle offered for redeployment. Requests sent and failed under each;
3. **fuzz**: :func:`bench.fuzz.fuzz_api` (schemathesis from ``/openapi.json``, valid, invalid and
   servable bodies, plus the hand-written hostile requests): cases tried, 5xx seen.

The controller reads a stand-in Prometheus (:class:`mtrec_app.faults.FakePrometheus`, good answers
except during fault 2); the real feedback path is measured by ``bench.policy_bench`` and the demo.

    python -m bench.reliability_bench [--minutes 5] [--rate 20] [--fuzz-examples 50]

Results: ``bench/results/reliability.json`` and ``reliability.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import RESULTS, save_results

APP = "mtrec-soak"
TOKEN = "soak-token"
TOKEN_ENV = "MTREC_SOAK_TOKEN"
LIMITS = {"max_candidates": 50, "max_text_chars": 500, "max_body_bytes": 64 * 1024}
GROWTH_BAR = 0.05


def app_processes() -> dict[str, int]:
    """``{label: pid}`` of the app's replicas and of Serve's proxy and controller (Ray's State API)."""
    import ray.util.state

    out: dict[str, int] = {}
    for a in ray.util.state.list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        cls = a.class_name or ""
        if cls.startswith(f"ServeReplica:{APP}:"):
            role = cls.rsplit(":", 1)[1]
        elif cls in ("ProxyActor", "ServeController"):
            role = cls
        else:
            continue
        out[f"{role} {a.pid}"] = a.pid
    return out


class MemorySampler:
    """RSS (MB) of each process of :func:`app_processes`, every ``period_s`` seconds, in a thread."""

    def __init__(self, period_s: float) -> None:
        self.samples: list[tuple[float, dict[str, float]]] = []  # (seconds since start, {label: MB})
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        import psutil

        procs = app_processes()
        while not self._stop.is_set():
            rss = {}
            for label, pid in procs.items():
                try:
                    rss[label] = psutil.Process(pid).memory_info().rss / 2**20
                except psutil.NoSuchProcess:
                    continue
            self.samples.append((time.perf_counter() - self._t0, rss))
            self._stop.wait(self._period_s)

    def __enter__(self) -> MemorySampler:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def growth(self, warmup_s: float) -> dict[str, dict[str, float]]:
        """Per process: mean RSS of the minute after ``warmup_s`` and of the last minute, and the growth."""
        end = self.samples[-1][0]
        out = {}
        for label in self.samples[0][1]:
            first = [s[label] for t, s in self.samples if warmup_s <= t < warmup_s + 60 and label in s]
            last = [s[label] for t, s in self.samples if t >= end - 60 and label in s]
            if first and last:
                a, b = statistics.mean(first), statistics.mean(last)
                out[label] = {"after_warmup_mb": round(a, 1), "end_mb": round(b, 1), "growth": round(b / a - 1, 4)}
        return out


def soak(users: Any, rate: float, seconds: float) -> list[dict[str, Any]]:
    """Open-loop traffic at ``rate`` requests/s for ``seconds``; one summary per minute."""
    from mtrec_app.traffic import TrafficReport

    minutes = int(seconds // 60) + (seconds % 60 > 0)
    reports = [TrafficReport() for _ in range(minutes)]
    lags: list[list[float]] = [[] for _ in range(minutes)]

    def job(q: int, due: float, minute: int) -> None:
        lags[minute].append(time.perf_counter() - due)
        users.one(q, reports[minute])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(64) as pool:
        for q in range(int(rate * seconds)):
            due = t0 + q / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            pool.submit(job, q, due, int((due - t0) // 60))
    out = []
    for minute, (report, lag) in enumerate(zip(reports, lags)):
        report.seconds = 60.0
        s = report.summary()
        out.append(
            {
                "minute": minute + 1,
                "requests": s["requests"],
                "failed": s["failed"],
                "errors": s["errors"],
                "feedback_failed": s["feedback_failed"],
                "error_rate": s["failed"] / max(1, s["requests"]),
                "p50_ms": round(s["p50_ms"], 1),
                "p99_ms": round(s["p99_ms"], 1),
                "max_send_lag_ms": round(1000 * max(lag, default=0.0), 1),
            }
        )
        print(f"soak minute {minute + 1}: {out[-1]}", flush=True)
    return out


def faults(users: Any, bundle: Path, fake: Any, work: Path) -> dict[str, dict[str, Any]]:
    """Each fault of :mod:`mtrec_app.faults` under load: requests sent and failed, and what it did."""
    import ray.serve

    from mtrec.errors import BundleError
    from mtrec_app.faults import BAD_MODES, bad_bundles, kill_replica, under_load
    from mtrec_serve.app import build_app

    out: dict[str, dict[str, Any]] = {}

    def record(name: str, report: Any, outcome: Any) -> None:
        s = report.summary()
        out[name] = {"sent": s["requests"], "failed": s["failed"], "errors": s["errors"], "p99_ms": s["p99_ms"]}
        out[name]["feedback_failed"] = s["feedback_failed"]
        out[name]["outcome"] = outcome
        print(f"fault {name}: {out[name]}", flush=True)

    record("replica_killed", *under_load(users, lambda: kill_replica(APP, "TaskHeads"), before_s=5, after_s=20))

    handle = ray.serve.get_deployment_handle("WeightController", APP)

    def misbehave() -> dict[str, Any]:
        steps = {}
        for mode in BAD_MODES:
            fake.mode = mode
            d = handle.step.remote().result(timeout_s=60)
            steps[mode] = {"action": d["action"], "version": d["version"], "staleness_s": round(d["staleness_s"], 1)}
        fake.mode = "good"
        return steps

    record("prometheus_misbehaving", *under_load(users, misbehave, before_s=2, after_s=2))

    def offer_bad_bundles() -> dict[str, str]:
        refused = {}
        for name, (bad, _, _) in bad_bundles(bundle, work).items():
            try:
                ray.serve.run(build_app({"bundle": str(bad), **LIMITS}), name=APP, route_prefix="/")
                refused[name] = "DEPLOYED (not refused)"
            except BundleError as e:
                refused[name] = str(e)[:200]
        return refused

    record("bad_bundle_offered", *under_load(users, offer_bad_bundles, before_s=2, after_s=5))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0, help="soak length (the first minute is warm-up)")
    p.add_argument("--rate", type=float, default=20.0, help="recommend requests per second (each with feedback)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--fuzz-examples", type=int, default=50, help="generated cases per operation and mode")
    p.add_argument("--bundle", default=None, help="an existing bundle with its data beside it (default: build one)")
    args = p.parse_args(argv)

    import ray.serve

    from bench.fuzz import fuzz_api, hostile_requests
    from bench.serve_bench import build_bundle
    from mtrec.inference import Catalog
    from mtrec_app.faults import FakePrometheus
    from mtrec_app.traffic import SimulatedUsers
    from mtrec_cluster.ray_env import free_port, local_ray
    from mtrec_serve.app import AppArgs, graph

    tmp = tempfile.TemporaryDirectory()
    work = Path(tmp.name)
    bundle = Path(args.bundle) if args.bundle else build_bundle(work)
    data = bundle.parent / "data"
    port = free_port()
    with local_ray(num_cpus=4, export_metrics=True):
        try:
            ray.serve.start(http_options={"host": "127.0.0.1", "port": port})
            catalog = Catalog.load(bundle)
            fake = FakePrometheus(APP, catalog.tasks)
            app_args = AppArgs(
                bundle=str(bundle), prometheus_url=fake.url, auth_token_env=TOKEN_ENV, period_s=5.0, **LIMITS
            )
            pinned = lambda n: {"autoscaling_config": {"min_replicas": n, "max_replicas": n}}  # noqa: E731
            options = {
                "Ingress": {"ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": {TOKEN_ENV: TOKEN}}}},
                "TaskHeads": pinned(2),  # fault 1 kills one of two
                "Embedder": pinned(1),
            }
            ray.serve.run(graph(app_args, options), name=APP, route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            users = SimulatedUsers(data, url, candidates=30, k=5, timeout_s=10.0, token=TOKEN)
            print(f"soak: {args.rate:g} requests/s for {args.minutes:g} min", flush=True)
            with MemorySampler(args.sample_s) as memory:
                minutes = soak(users, args.rate, 60 * args.minutes)
            growth = memory.growth(warmup_s=60.0)
            fault_runs = faults(users, bundle, fake, work)
            items = list(catalog.meta.item_ids[:50])
            fuzz = fuzz_api(
                url,
                TOKEN,
                examples=args.fuzz_examples,
                hostile=hostile_requests(items, LIMITS),
                catalog=(items, catalog.tasks, LIMITS["max_candidates"]),
            ).summary()
            print(f"fuzz: {fuzz}", flush=True)
            fake.close()
        finally:
            ray.serve.shutdown()
            tmp.cleanup()

    steady = minutes[1:] or minutes  # after the warm-up minute
    sent = sum(m["requests"] for m in steady)
    failed = sum(m["failed"] for m in steady)
    worst = max(growth.items(), key=lambda kv: kv[1]["growth"]) if growth else ("none", {"growth": float("nan")})
    headline = {
        "soak requests/s (target)": args.rate,
        "soak minutes": args.minutes,
        "soak error rate after warm-up": failed / max(1, sent),
        "soak worst-minute p99 ms after warm-up": max(m["p99_ms"] for m in steady),
        f"largest memory growth after warm-up ({worst[0].split()[0]})": worst[1]["growth"],
        f"every process grows under {GROWTH_BAR:.0%}": all(g["growth"] < GROWTH_BAR for g in growth.values()),
    }
    for name, run in fault_runs.items():
        headline[f"{name}: failed / sent"] = f"{run['failed']} / {run['sent']}"
    headline |= {"fuzz cases": fuzz["cases"], "fuzz 5xx": fuzz["5xx"]}
    doc = {
        "setting": {
            "rate": args.rate,
            "minutes": args.minutes,
            "candidates": 30,
            "k": 5,
            "tasks": catalog.tasks,
            "note": "2 shared CPU cores (other work ran on the same machine); Ray on num_cpus=4",
        },
        "soak": minutes,
        "memory": {"growth": growth, "samples": memory.samples},
        "faults": fault_runs,
        "fuzz": fuzz,
        "headline": headline,
    }
    save_results("reliability", doc)
    plot(minutes, memory.samples, RESULTS / "reliability.png")
    print(json.dumps(headline, indent=1))
    return doc


def plot(minutes: list[dict[str, Any]], samples: list[tuple[float, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = [m["minute"] for m in minutes]
    a.plot(x, [m["p50_ms"] for m in minutes], "o-", label="p50")
    a.plot(x, [m["p99_ms"] for m in minutes], "s-", label="p99")
    a.set(xlabel="minute", ylabel="recommend latency (ms)", title="soak latency per minute")
    errors = a.twinx()
    errors.bar(x, [100 * m["error_rate"] for m in minutes], alpha=0.2, color="red")
    errors.set_ylabel("errors (%)")
    a.legend(fontsize=8)
    for label in samples[0][1] if samples else []:
        points = [(t / 60, s[label]) for t, s in samples if label in s]
        b.plot([p[0] for p in points], [p[1] for p in points], label=label)
    b.axvline(1.0, color="grey", lw=0.8, ls="--")  # end of the warm-up minute
    b.set(xlabel="minute", ylabel="RSS (MB)", title="memory per process")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
