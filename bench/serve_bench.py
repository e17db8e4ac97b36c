"""Serving latency and throughput through HTTP, against two references measured in the same run.

- ``full``: ``POST /v1/recommend`` with 100 catalog candidates through the whole graph (proxy ->
  Ingress -> TaskHeads -> fusion), at concurrency 1, 8 and 32;
- ``heads_in_ingress``: the same graph with ``heads_in_ingress`` (the heads' forward in the Ingress
  replica: one hop less);
- ``echo``: a deployment that returns its JSON body, on the same Serve: the floor of HTTP + proxy +
  one replica;
- ``in-process``: :meth:`mtrec.inference.Scorer.score` of the same request on the same bundle, no Ray.

Target (issue #6) at concurrency 8: full p50 <= echo p50 + 2 x in-process time. The Embedder's call
count must stay 0: the text encoder is not on the path for catalog items. Each series also records the
CPU time per request of every process (proxy, replicas, the client): where the host has fewer cores than
concurrent requests, that sum, not the hops' wall time, sets the latency.

    python -m bench.serve_bench [--requests 200] [--out-bundle DIR]

The bundle: the packaged MiniLM (frozen) under the default multi-task model, trained one epoch on a
synthetic ecommerce dataset of 1,000 items. Results: ``bench/results/serving.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, median_time, save_results

CONCURRENCY = (1, 8, 32)
CANDIDATES = 100
APP, LOCAL, ECHO = "mtrec-bench", "mtrec-bench-local", "echo-bench"


def build_bundle(root: Path) -> Path:
    from mtrec.config import Config
    from mtrec.data.synthetic import generate
    from mtrec.engine import fit

    data = generate("ecommerce", root / "data", num_users=500, num_items=1000, num_interactions=20_000, seed=0)
    cfg = Config().override(["train.epochs=1", f"encoder.cache_dir={root / 'vectors'}"])
    result = fit(cfg, data, work_dir=root / "work")
    return result.save_bundle(root / "bundle", cfg)


def requests_for(bundle: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` recommend bodies: a random known user, 5 history items and 100 catalog candidates each."""
    from mtrec.inference import Catalog

    meta = Catalog.load(bundle).meta
    rng = np.random.default_rng(seed)
    ids, users = meta.item_ids, meta.users.values
    return [
        {
            "user_id": users[int(rng.integers(len(users)))],
            "history": [ids[i] for i in rng.choice(len(ids), 5, replace=False)],
            "candidates": [ids[i] for i in rng.choice(len(ids), CANDIDATES, replace=False)],
            "k": 10,
        }
        for _ in range(n)
    ]


def post(url: str, body: dict[str, Any]) -> float:
    """Seconds for one POST; raises on a non-200 answer."""
    data = json.dumps(body).encode()
    start = time.perf_counter()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
    return time.perf_counter() - start


def serve_processes(apps: list[str]) -> dict[str, int]:
    """Process ids of the HTTP proxy and of every replica of ``apps`` (``app:Deployment`` -> pid), and
    of this client process."""
    import psutil

    found = {"client": os.getpid()}
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or []) or proc.info["name"] or ""
        if title.startswith("ray::ProxyActor"):
            found["proxy"] = proc.info["pid"]
        for app in apps:
            prefix = f"ray::ServeReplica:{app}:"
            if title.startswith(prefix):
                found[f"{app}:{title[len(prefix) :].split()[0]}"] = proc.info["pid"]
    return found


def _cpu_s(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = float("nan")
    return out


def load(url: str, bodies: list[dict[str, Any]], concurrency: int, pids: dict[str, int]) -> dict[str, Any]:
    """p50/p99 latency (ms) and throughput (requests/s) of ``bodies`` sent by ``concurrency`` clients,
    and the CPU time each process in ``pids`` spent per request meanwhile (ms)."""
    for b in bodies[:concurrency]:  # warm-up: connections, replicas' first batches
        post(url, b)
    before = _cpu_s(pids)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = list(pool.map(lambda b: post(url, b), bodies))
    wall = time.perf_counter() - start
    after = _cpu_s(pids)
    ms = np.array(lat) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "rps": len(bodies) / wall,
        "requests": len(bodies),
        "cpu_ms_per_request": {k: 1000 * (after[k] - before[k]) / len(bodies) for k in pids},
    }


def in_process(bundle: Path, bodies: list[dict[str, Any]]) -> float:
    """Median ms of one request scored in this process (the Scorer, no Ray, one thread as a replica has)."""
    import torch

    from mtrec.bundle import load_bundle
    from mtrec.inference import Candidate, Scorer, ScoreRequest

    torch.set_num_threads(1)
    scorer = Scorer(load_bundle(bundle))
    reqs = [ScoreRequest(b["user_id"], [Candidate(c) for c in b["candidates"]], b["history"]) for b in bodies[:50]]
    times = [median_time(lambda r=r: scorer.score(r), repeats=3)[0] for r in reqs]
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    p.add_argument("--bundle", default=None, help="an existing bundle (default: build one)")
    args = p.parse_args(argv)

    import ray.serve

    from mtrec_cluster.ray_env import free_port, local_ray
    from mtrec_serve.app import AppArgs, graph

    tmp = tempfile.TemporaryDirectory()
    bundle = Path(args.bundle) if args.bundle else build_bundle(Path(tmp.name))
    bodies = requests_for(bundle, args.requests)
    model_ms = in_process(bundle, bodies)
    print(f"in-process model: {model_ms:.2f} ms per request of {CANDIDATES} candidates")

    port = free_port()
    with local_ray(num_cpus=4, export_metrics=True):
        try:
            ray.serve.start(http_options={"host": "127.0.0.1", "port": port})

            @ray.serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.25})
            class Echo:
                async def __call__(self, request: Any) -> Any:
                    return await request.json()

            ray.serve.run(Echo.bind(), name=ECHO, route_prefix="/echo")
            pinned = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16}}
            ray.serve.run(graph(AppArgs(bundle=str(bundle)), {"TaskHeads": pinned}), name=APP, route_prefix="/")
            local = AppArgs(bundle=str(bundle), heads_in_ingress=True)
            ray.serve.run(graph(local), name=LOCAL, route_prefix="/local")
            base = f"http://127.0.0.1:{port}"
            urls = {
                "echo": base + "/echo",
                "full": base + "/v1/recommend",
                "heads_in_ingress": base + "/local/v1/recommend",
            }
            pids = serve_processes([ECHO, APP, LOCAL])
            results: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in urls}
            for c in CONCURRENCY:
                for name, url in urls.items():
                    results[name][str(c)] = load(url, bodies, c, pids)
                    r = results[name][str(c)]
                    cpu = sum(v for k, v in r["cpu_ms_per_request"].items())
                    print(
                        f"concurrency {c:>2} {name:>16}: p50 {r['p50_ms']:6.1f} ms, {r['rps']:6.1f} req/s, CPU {cpu:.1f} ms/req"
                    )
            embedder = ray.serve.get_deployment_handle("Embedder", APP).stats.remote().result()
        finally:
            ray.serve.shutdown()
            tmp.cleanup()

    echo8, bound = results["echo"]["8"]["p50_ms"], results["echo"]["8"]["p50_ms"] + 2 * model_ms
    full8, local8 = results["full"]["8"]["p50_ms"], results["heads_in_ingress"]["8"]["p50_ms"]
    target = {
        "full_p50_ms": full8,
        "heads_in_ingress_p50_ms": local8,
        "bound_ms": bound,
        "met": full8 <= bound,
        "met_heads_in_ingress": local8 <= bound,
        "embedder_calls": embedder["calls"],
        "encoder_off_path": embedder["calls"] == 0,
    }
    # CPU time of every process per request (proxy, replicas, this client): on a host with fewer cores
    # than concurrent requests, latency grows with it (Little's law), whatever the hops' wall time
    target["cpu_ms_per_request"] = {
        name: sum(v for k, v in results[name]["8"]["cpu_ms_per_request"].items() if not k.startswith(other))
        for name, other in (("echo", ("mtrec",)), ("full", (ECHO, LOCAL)), ("heads_in_ingress", (ECHO, APP + ":")))
    }
    print(
        f"target at concurrency 8: full {full8:.1f} / heads in Ingress {local8:.1f} ms <= {echo8:.1f} + 2 x {model_ms:.2f} ms"
    )
    print(f"CPU per request at concurrency 8 (all processes): {target['cpu_ms_per_request']}")
    print(f"Embedder calls during the run: {embedder['calls']}")
    payload = {
        "candidates": CANDIDATES,
        "in_process_ms": model_ms,
        "http": results,
        "target_concurrency_8": target,
        "embedder": embedder,
    }
    path = save_results("serving", payload)
    plot(results, model_ms, RESULTS / "serving.png")
    print(f"wrote {path}")
    return 0


def plot(results: dict[str, dict[str, dict[str, float]]], model_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    levels = [int(c) for c in results["full"]]
    for name, style in (("full", "o-"), ("heads_in_ingress", "^-"), ("echo", "s--")):
        a.plot(levels, [results[name][str(c)]["p50_ms"] for c in levels], style, label=f"{name} p50")
        a.plot(levels, [results[name][str(c)]["p99_ms"] for c in levels], style, alpha=0.4, label=f"{name} p99")
        b.plot(levels, [results[name][str(c)]["rps"] for c in levels], style, label=name)
    a.axhline(model_ms, color="grey", lw=0.8, label="in-process model")
    a.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="latency (ms)", title="latency, 100 candidates")
    b.set(xscale="log", xlabel="concurrency", ylabel="requests / s", title="throughput")
    for ax in (a, b):
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
