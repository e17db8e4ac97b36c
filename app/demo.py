"""``mtrec demo``: the whole system on one machine, end to end, in a few minutes.

1. data     the synthetic ``ecommerce`` scenario (click -> add_to_cart -> purchase, ad_click), whose true
            probabilities are known;
2. train    the ``synthetic-ecommerce`` preset (frozen MiniLM item vectors, MMoE) with 2 Ray Train workers;
3. tune     a short Ray Tune search over the loss weighting (at most 4 trials);
4. serve    the better of the two bundles on Ray Serve at http://127.0.0.1:PORT, the controller reading
            a real Prometheus when the binary is installed (else Ray's metrics endpoint directly);
5. traffic  simulated users send requests and feedback drawn from the true probabilities; the
            controller (``target`` policy: holds the purchase rate per impression near a target) moves
            the fusion weights;
6. summary  per-task test AUC, the best trial, serving latency, the weights before and after, and the
            plots (training curves, Pareto front, weight trajectory) in the output folder.

Everything it starts (Ray, Serve, Prometheus) is stopped at the end or on Ctrl-C; ``--keep-serving``
leaves the service up and prints its URL until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from mtrec.io import atomic_write_text

FULL = {"users": 2000, "items": 1000, "interactions": 100_000, "epochs": 4, "trials": 4, "requests": 1500}
MAX_TRIALS = 4  # the demo's search stays short; `mtrec tune` runs longer ones
QUICK = {"users": 300, "items": 200, "interactions": 12_000, "epochs": 2, "trials": 2, "requests": 300}


@contextmanager
def keeps_ctrl_c() -> Iterator[None]:
    """Ray Train's and Tune's ``fit()`` install SIGINT handlers of their own and leave them behind; put
    back the one before, so that Ctrl-C in a later stage still stops the demo."""
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def get(url: str, timeout: float = 10.0) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_healthy(url: str, timeout_s: float = 180.0) -> None:
    """Until ``GET /healthz`` answers 200 (replicas load the model first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            get(url + "/healthz", timeout=5)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}/healthz did not answer within {timeout_s:.0f} s") from None
            time.sleep(1)


def main_weights(decision: dict[str, Any]) -> dict[str, float]:
    return decision["weights"][decision.get("main", "main")]


def plot_weights(trajectory: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    t0 = trajectory[0]["t"]
    for task in trajectory[0]["weights"]:
        ax.plot([p["t"] - t0 for p in trajectory], [p["weights"][task] for p in trajectory], marker=".", label=task)
    ax.set(xlabel="seconds of traffic", ylabel="fusion weight (main arm)", title="controller weights", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_data(out: Path, size: dict[str, int], seed: int) -> Path:
    from mtrec.data.synthetic import generate

    say(f"1/6 data: synthetic ecommerce, {size['interactions']:,} interactions -> {out / 'data'}")
    return generate("ecommerce", out / "data", size["users"], size["items"], size["interactions"], seed)


def stage_train(data: Path, out: Path, size: dict[str, int]) -> dict[str, Any]:
    from mtrec.config import load_preset
    from mtrec_train.trainer import run_training

    cfg = load_preset("synthetic-ecommerce").override([f"train.epochs={size['epochs']}"])
    say(f"2/6 train: {cfg.model.arch}, {cfg.encoder.name} {cfg.encoder.mode}, {cfg.train.num_workers} workers")
    return run_training(cfg, data, out / "train")


def stage_tune(data: Path, out: Path, size: dict[str, int]) -> dict[str, Any]:
    from mtrec.config import load_preset
    from mtrec_tune.run import SearchInterrupted, run_search

    cfg = load_preset("synthetic-ecommerce").override([f"train.epochs={size['epochs']}", "train.num_workers=1"])
    say(f"3/6 tune: {size['trials']} trials over the loss weighting (equal weights first)")
    try:
        return run_search(
            cfg, data, out / "tune", size["trials"], "mean_auc", strategies=["static", "uncertainty", "dwa"]
        )
    except SearchInterrupted as e:
        # Ctrl-C reaches Tune's own handler, which ends the search early; the demo stops as a whole
        # (its next run starts afresh, so there is nothing to resume)
        raise KeyboardInterrupt("tuning interrupted") from e


def stage_serve(bundle: Path, out: Path, port: int, prometheus_url: str | None, targets: dict[str, float]) -> str:
    import ray
    import ray.serve

    from mtrec_serve.app import build_app

    free = ray.available_resources().get("CPU", 0.0)
    say(f"4/6 serve: {bundle} on http://127.0.0.1:{port} ({free:g} logical CPUs free)")
    ray.serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "bundle": str(bundle),
        "prometheus_url": prometheus_url,
        "policy": "target",
        "policy_params": {"targets": targets, "gain": 2.0},
        "limits": {"min_events": 10, "max_step": 0.1, "smoothing": 0.5},
        "state_path": str(out / "controller" / "state.json"),
        "period_s": 4.0,
        "window_s": 30.0,
    }
    ray.serve.run(build_app(args), name="mtrec", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return url


def stage_traffic(data: Path, url: str, requests: int, rounds: int = 6) -> tuple[dict[str, Any], list[dict]]:
    from mtrec_app.traffic import SimulatedUsers, TrafficReport

    users = SimulatedUsers(data, url, tasks=["click", "add_to_cart", "purchase"], candidates=20, k=5)
    say(f"5/6 traffic: {requests} requests from simulated users ({', '.join(users.tasks)} feedback)")
    trajectory = [{"t": time.time(), **_weights(url)}]
    per_round = max(1, requests // rounds)
    reports = []
    for r in range(rounds):
        reports.append(users.run(per_round, concurrency=4, start=r * per_round))
        time.sleep(5)  # a controller period or so: metrics reach it
        trajectory.append({"t": time.time(), **_weights(url)})
        s = reports[-1].summary()
        w = ", ".join(f"{k} {v:.2f}" for k, v in trajectory[-1]["weights"].items())
        say(f"   round {r + 1}/{rounds}: p50 {s['p50_ms']:.0f} ms, failed {s['failed']}; weights {w}")
    s = TrafficReport.merge(reports).summary()
    total = {k: s[k] for k in ("requests", "failed", "errors", "p50_ms", "p99_ms", "impressions")}
    total["events"] = {t: s["events"].get(t, 0) for t in users.tasks}
    return total, trajectory


def _weights(url: str) -> dict[str, Any]:
    d = get(url + "/v1/weights")
    return {"weights": main_weights(d), "version": d["version"], "action": d.get("action"), "reason": d.get("reason")}


def purchase_targets(data: Path) -> dict[str, float]:
    """The controller's target: 2.5x the purchase rate per impression of the logged data (the shop
    wants more purchases than the logged traffic made; the priors' ranking reaches about 1.9x)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rate = pc.mean(pq.read_table(data / "interactions.parquet", columns=["purchase"]).column("purchase")).as_py()
    return {"purchase": 2.5 * rate}


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from mtrec_cluster.prometheus import ray_metrics_targets, start_prometheus, write_config
    from mtrec_cluster.ray_env import ensure_ray, free_port

    size = dict(QUICK if args.quick else FULL)
    size.update({k: v for k, v in (("trials", args.trials), ("requests", args.requests)) if v is not None})
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)  # summary.json, written last, marks a finished demo
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    with ExitStack() as stack:
        started = ensure_ray(args.address, num_cpus=args.num_cpus, metrics_export_port=free_port())
        import ray
        import ray.serve

        if started:
            stack.callback(ray.shutdown)
        stack.callback(_shutdown_serve)
        prom_url = None
        if shutil.which(os.environ.get("MTREC_PROMETHEUS", "prometheus")) and not args.no_prometheus:
            config = write_config(
                out / "prometheus" / "prometheus.yml", targets=ray_metrics_targets(), scrape_interval_s=2
            )
            server = start_prometheus(config, data_dir=out / "prometheus" / "data")
            stack.callback(server.stop)
            prom_url = server.url
            say(f"0/6 prometheus: {prom_url} scraping Ray's metrics every 2 s")
        else:
            say("0/6 prometheus: not installed; the controller scrapes Ray's metrics endpoint directly")

        data = stage_data(out, size, args.seed)
        with keeps_ctrl_c():
            trained = stage_train(data, out, size)
        with keeps_ctrl_c():
            tuned = stage_tune(data, out, size)
        train_obj, tune_obj = _objective(trained), (tuned.get("best") or {}).get("score", float("-inf"))
        bundle = out / "tune" / "result" / "best" / "bundle" if tune_obj > train_obj else out / "train" / "bundle"
        url = stage_serve(bundle, out, args.port, prom_url, purchase_targets(data))
        traffic, trajectory = stage_traffic(data, url, size["requests"])
        plot_weights(trajectory, out / "weights.png")
        summary = {
            "seconds": time.perf_counter() - t0,
            "test_auc": {t: m["auc"] for t, m in trained["test"].items() if "auc" in m},
            "train_samples_per_s": trained["train"]["samples_per_s"],
            "tune": {
                "trials": tuned["trials"],
                "best": (tuned.get("best") or {}).get("trial_id"),
                "best_score": tune_obj,
                "baseline_score": (tuned.get("baseline") or {}).get("score"),
                "pareto_front": tuned.get("pareto_front"),
            },
            "served_bundle": str(bundle),
            "url": url,
            "prometheus": prom_url,
            "serving": traffic,
            "weights_before": trajectory[0]["weights"],
            "weights_after": trajectory[-1]["weights"],
            "controller_reason": trajectory[-1]["reason"],
            "plots": [
                str(p)
                for p in (out / "train" / "curves.png", out / "tune" / "result" / "pareto.png", out / "weights.png")
            ],
        }
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=float))
        print_summary(summary)
        if args.keep_serving:
            say(f"serving on {url} (docs: {url}/docs); Ctrl-C stops")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
    return summary


def _objective(trained: dict[str, Any]) -> float:
    aucs = [m["auc"] for m in trained["valid"].values() if "auc" in m]
    return sum(aucs) / len(aucs) if aucs else float("-inf")


def _shutdown_serve() -> None:
    import ray
    import ray.serve

    if ray.is_initialized():
        ray.serve.shutdown()


def print_summary(s: dict[str, Any]) -> None:
    line = "-" * 72
    print(line)
    print(f"ray-mtrec demo finished in {s['seconds']:.0f} s")
    print("test AUC (2-worker training): " + ", ".join(f"{t} {v:.3f}" for t, v in s["test_auc"].items()))
    t = s["tune"]
    print(
        f"tuning: {t['trials']} trials, best {t['best']} (mean valid AUC {t['best_score']:.4f}; equal weights {t['baseline_score']:.4f})"
    )
    v = s["serving"]
    print(
        f"serving: {v['requests']} requests, {v['failed']} failed, p50 {v['p50_ms']:.0f} ms, p99 {v['p99_ms']:.0f} ms"
    )
    print("weights before: " + ", ".join(f"{k} {w:.3f}" for k, w in s["weights_before"].items()))
    print("weights after:  " + ", ".join(f"{k} {w:.3f}" for k, w in s["weights_after"].items()))
    print(f"controller: {s['controller_reason']}")
    print("plots: " + ", ".join(s["plots"]))
    print(line, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mtrec demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/demo", help="output folder (replaced)")
    p.add_argument("--port", type=int, default=8000, help="Serve HTTP port on 127.0.0.1")
    p.add_argument("--quick", action="store_true", help="a small, fast run (the integration test's mode)")
    p.add_argument(
        "--trials", type=_trials, default=None, help=f"tuning trials, 1 to {MAX_TRIALS} (default 4; 2 with --quick)"
    )
    p.add_argument("--requests", type=int, default=None, help="simulated requests")
    p.add_argument("--keep-serving", action="store_true", help="leave the service up at the end until Ctrl-C")
    p.add_argument("--no-prometheus", action="store_true", help="scrape Ray's metrics directly, even if installed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", default=None, help="Ray address to join (default: an embedded local Ray)")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the embedded local Ray")
    return p.parse_args(argv)


def _trials(value: str) -> int:
    n = int(value)
    if not 1 <= n <= MAX_TRIALS:
        raise argparse.ArgumentTypeError(
            f"{n}: the demo's search runs 1 to {MAX_TRIALS} trials (use `mtrec tune` for a longer search)"
        )
    return n


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # stop the same clean way as Ctrl-C
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        run_demo(args)
    except KeyboardInterrupt:
        say("interrupted: everything the demo started has been stopped")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
