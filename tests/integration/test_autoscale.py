"""Autoscaling seen on a real Serve: under load TaskHeads gets a second replica and, after it, goes back
to one; the Embedder, which the load does not reach (catalog items only), stays at one; no request fails
meanwhile; the counts reach the operator's log line by line and Prometheus as the dashboard reads them.

The app's autoscaling blocks have the defaults' keys with short delays and windows (the defaults wait
tens of seconds; ``python -m bench autoscale`` runs them, with cold texts that load the Embedder too):
12 clients keep about 12 requests in flight against a target of 2 per replica.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from polling import call_json, wait_until

pytestmark = pytest.mark.timeout(300)

APP, PREFIX = "mtrec-autoscale-test", "/autoscale-test"
SCALED = ("Embedder", "TaskHeads")  # the deployments that autoscale
FAST = {  # the autoscaling defaults' keys, shortened so that the test takes seconds
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2,
}
QUARTER = {"ray_actor_options": {"num_cpus": 0.25}}
CLIENTS = 12

_spec = importlib.util.spec_from_file_location(
    "manifest_checks", Path(__file__).resolve().parents[1] / "unit" / "test_manifests.py"
)
manifest_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(manifest_checks)  # the dashboard reader of the offline tests


@pytest.fixture(scope="module")
def app(ray_cluster, serve_http, serve_bundle):
    import ray.serve

    from mtrec_serve.app import AppArgs, graph

    bundle, data = serve_bundle
    options = {name: {**QUARTER, "autoscaling_config": FAST} for name in SCALED}
    options |= {"Ingress": QUARTER, "WeightController": QUARTER}
    ray.serve.run(graph(AppArgs(bundle=str(bundle)), options), name=APP, route_prefix=PREFIX)
    items = [r["item_id"] for r in pq.read_table(data / "items.parquet", columns=["item_id"]).to_pylist()]
    yield serve_http + PREFIX, items
    ray.serve.delete(APP)


def _load(url: str, items: list, stop: threading.Event, statuses: list[int]) -> None:
    """One client: requests back to back, 20 catalog candidates each."""
    while not stop.is_set():
        status, _ = call_json(url + "/v1/recommend", "POST", {"user_id": 1, "candidates": items[:20], "k": 5})
        statuses.append(status)


def test_replicas_follow_the_load_up_and_back_down(app, prometheus_server):
    from mtrec_serve.replicas import ReplicaWatch, running_replicas

    url, items = app
    assert {d: running_replicas(APP)[d] for d in SCALED} == {"Embedder": 1, "TaskHeads": 1}
    lines: list[str] = []
    stop, statuses = threading.Event(), []
    with ReplicaWatch(APP, lines.append, period_s=0.5):
        clients = [threading.Thread(target=_load, args=(url, items, stop, statuses)) for _ in range(CLIENTS)]
        for c in clients:
            c.start()
        try:
            up = wait_until(
                lambda: (n := running_replicas(APP)) and n["TaskHeads"] >= 2 and n,
                120,
                "a second TaskHeads replica under load",
            )
        finally:
            stop.set()
            for c in clients:
                c.join(timeout=90)
        # the log an operator reads says when it went back down
        wait_until(lambda: "TaskHeads: 2 -> 1 replica running" in lines, 90, "TaskHeads back to one replica")
    down = running_replicas(APP)
    assert up["TaskHeads"] == 2 and down["TaskHeads"] == 1 and up["Embedder"] == down["Embedder"] == 1, (up, down)
    assert statuses and set(statuses) == {200}, f"{len(statuses)} requests: {sorted(set(statuses))}"
    assert lines[:4].count("TaskHeads: 1 replica running") == 1, lines  # the first reading names every deployment
    assert lines.index("TaskHeads: 1 -> 2 replicas running") < lines.index("TaskHeads: 2 -> 1 replica running")
    assert not any(line.startswith("Embedder: 1 ->") for line in lines), lines

    # the dashboard's replica panel reads Ray's own Serve metrics; both deployments have series there
    values = {"$cluster": ".*", "$application": APP}
    board = manifest_checks.dashboard()
    exprs = [e for e in manifest_checks.dashboard_exprs(board) if "ray_serve_" in e]
    assert exprs, "the dashboard has no panel on Ray Serve's replica metrics"
    for expr in exprs:
        for var, value in values.items():
            expr = expr.replace(var, value)

        def answered(e=expr):
            result = _promql(prometheus_server.url, e)
            return result if {r["metric"].get("deployment") for r in result} >= set(SCALED) else None

        wait_until(answered, 60, f"series of {', '.join(SCALED)} for {expr}", poll_s=1.0)


def _promql(prometheus_url: str, expr: str) -> list[dict]:
    import urllib.parse

    status, body = call_json(f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert status == 200, body
    return body["data"]["result"]


def test_a_deployment_of_the_app_is_named_in_every_replica_count(app):
    """``running_replicas`` reads every deployment of the app; an app that is not deployed reads empty."""
    from mtrec_serve.replicas import running_replicas

    assert set(running_replicas(APP)) == {"Ingress", "Embedder", "TaskHeads", "WeightController"}
    assert running_replicas(f"no-such-app-{time.time_ns()}") == {}
