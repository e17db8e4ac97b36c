"""The serving graph on a real Ray Serve, over real HTTP: ranking, cold items, feedback, that every
bad input is a 4xx with a message (never a 5xx), and autoscaling: under load TaskHeads gets a second
replica and, after it, goes back to one, with no request failing meanwhile; the counts reach the
operator's log line by line and Prometheus as the dashboard reads them.

TaskHeads autoscales with the defaults' keys but short delays and windows (the defaults wait tens of
seconds; ``python -m bench autoscale`` runs them, with cold texts that load the Embedder too); the
Embedder stays pinned at one replica, as the tests of its cache want.
"""

from __future__ import annotations

import importlib.util
import threading
import time
import urllib.parse
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from polling import call_json, scrape_health, wait_until

pytestmark = pytest.mark.timeout(300)

APP = "mtrec-serve-test"
PREFIX = "/serve-test"
TOKEN = "s3cret-test-token"
LIMITS = {"max_candidates": 50, "max_text_chars": 300, "max_body_bytes": 32 * 1024}
ONE_CPU_QUARTER = {"ray_actor_options": {"num_cpus": 0.25}}
PINNED = {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}
FAST = {  # the autoscaling defaults' keys, shortened so that the test takes seconds
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2,
}
CLIENTS = 12  # about 12 requests in flight against a target of 2 per replica

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
    args = AppArgs(bundle=str(bundle), auth_token_env="MTREC_TEST_TOKEN", period_s=5.0, **LIMITS)
    options = {
        "Ingress": {"ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": {"MTREC_TEST_TOKEN": TOKEN}}}},
        "Embedder": {**ONE_CPU_QUARTER, "autoscaling_config": PINNED},
        "TaskHeads": {**ONE_CPU_QUARTER, "autoscaling_config": FAST},
        "WeightController": ONE_CPU_QUARTER,
    }
    ray.serve.run(graph(args, options), name=APP, route_prefix=PREFIX)
    items = pq.read_table(data / "items.parquet").to_pylist()
    yield {"url": serve_http + PREFIX, "items": items}
    ray.serve.delete(APP)


def call(app, method: str, path: str, body=None, raw: bytes | None = None, token: str | None = TOKEN):
    """(status, JSON answer) of one HTTP call to the app."""
    return call_json(app["url"] + path, method, body, raw, token)


def embedder_stats() -> dict:
    import ray.serve

    return ray.serve.get_deployment_handle("Embedder", APP).stats.remote().result()


def test_recommend_ranks_catalog_items_without_the_language_model(app):
    ids = [it["item_id"] for it in app["items"][:30]]
    status, out = call(app, "POST", "/v1/recommend", {"user_id": 3, "history": ids[:3], "candidates": ids, "k": 7})
    assert status == 200, out
    assert len(out["items"]) == 7 and out["request_id"] and set(out) == {"request_id", "items"}  # no arm
    scores = [it["score"] for it in out["items"]]
    assert scores == sorted(scores, reverse=True)
    tasks = {"click", "add_to_cart", "purchase", "ad_click"}
    for it in out["items"]:
        assert set(it["predictions"]) == tasks and all(0 <= p <= 1 for p in it["predictions"].values())
        assert it["item_id"] in ids
    # /v1/score gives every candidate, in order, with the same fused scores under the same weights
    status, scored = call(app, "POST", "/v1/score", {"user_id": 3, "history": ids[:3], "candidates": ids})
    assert status == 200 and [it["item_id"] for it in scored["items"]] == ids
    by_id = {it["item_id"]: it["score"] for it in scored["items"]}
    assert max(by_id, key=by_id.get) == out["items"][0]["item_id"]
    assert embedder_stats()["calls"] == 0  # catalog items never reach the language model


def test_a_cold_item_is_served_through_its_text(app):
    known = app["items"][0]
    cold = {"item_id": "new-item-1", "text": known["text"]}
    status, out = call(app, "POST", "/v1/score", {"user_id": "new-user", "candidates": [known["item_id"], cold]})
    assert status == 200, out
    a, b = (it["predictions"] for it in out["items"])
    assert all(abs(a[t] - b[t]) < 0.2 for t in a)  # same text; only the id embedding differs
    stats = embedder_stats()
    assert stats["calls"] == 1 and stats["cache_misses"] == 1
    call(app, "POST", "/v1/score", {"user_id": "new-user", "candidates": [cold]})
    assert embedder_stats()["cache_hits"] == 1  # the second time from the LRU cache


def test_feedback_counts_each_event_once(app):
    ids = [it["item_id"] for it in app["items"][:10]]
    _, out = call(app, "POST", "/v1/recommend", {"user_id": 1, "candidates": ids, "k": 3})
    rid, item = out["request_id"], out["items"][0]["item_id"]
    status, first = call(app, "POST", "/v1/feedback", {"request_id": rid, "item_id": item, "events": {"click": 1}})
    assert status == 200 and first == {"recorded": ["click"], "duplicates": []}
    events = {"click": 1, "purchase": 0}
    status, again = call(app, "POST", "/v1/feedback", {"request_id": rid, "item_id": str(item), "events": events})
    assert status == 200 and again == {"recorded": ["purchase"], "duplicates": ["click"]}
    not_served = next(i for i in ids if i not in {it["item_id"] for it in out["items"]})
    status, err = call(app, "POST", "/v1/feedback", {"request_id": rid, "item_id": not_served, "events": events})
    assert status == 404 and "was not served" in err["detail"]


def test_weights_and_health_answer(app):
    status, w = call(app, "GET", "/v1/weights")
    assert status == 200 and set(w["weights"]["main"]) == {"click", "add_to_cart", "purchase", "ad_click"}
    assert abs(sum(w["traffic"].values()) - 1) < 1e-9
    status, h = call(app, "GET", "/healthz", token=None)  # health needs no token
    assert status == 200 and h["status"] == "ok"
    status, spec = call(app, "GET", "/openapi.json", token=None)  # the OpenAPI docs (/docs renders them)
    assert status == 200 and "/v1/recommend" in spec["paths"]


def bad_requests(app) -> list[tuple[str, str, dict | None, bytes | None, str | None, int, str]]:
    """(what, path, body, raw body, token, expected status, a fragment of the message)."""
    ids = [it["item_id"] for it in app["items"][:5]]
    ok = {"user_id": 1, "candidates": ids}
    return [
        ("too many candidates", "/v1/recommend", {**ok, "candidates": list(range(1, 52))}, None, TOKEN, 422, "at most 50"),
        ("text too long", "/v1/score", {**ok, "candidates": [{"item_id": "x", "text": "a" * 301}]}, None, TOKEN, 422, "at most 300"),
        ("body too large", "/v1/score", {**ok, "history": ["h" * 200] * 200}, None, TOKEN, 413, "at most"),
        ("malformed JSON", "/v1/recommend", None, b'{"user_id": 1, "candidates": [', TOKEN, 422, "JSON"),
        ("NaN", "/v1/score", None, b'{"user_id": 1, "candidates": [{"item_id": 1, "features": {"discount": NaN}}]}', TOKEN, 422, "finite"),
        ("unknown field", "/v1/recommend", {**ok, "colour": "red"}, None, TOKEN, 422, "colour"),
        ("k out of range", "/v1/recommend", {**ok, "k": 0}, None, TOKEN, 422, "k"),
        ("cold item without text", "/v1/score", {**ok, "candidates": ["nope"]}, None, TOKEN, 422, "not in the catalog"),
        ("duplicate candidate", "/v1/score", {**ok, "candidates": [1, 1]}, None, TOKEN, 422, "more than once"),
        ("unknown feature", "/v1/score", {**ok, "candidates": [{"item_id": 1, "features": {"zz": 1}}]}, None, TOKEN, 422, "zz"),
        ("unknown task", "/v1/feedback", {"request_id": "r", "item_id": 1, "events": {"like": 1}}, None, TOKEN, 422, "like"),
        ("binary event not 0/1", "/v1/feedback", {"request_id": "r", "item_id": 1, "events": {"click": 2}}, None, TOKEN, 422, "0 or 1"),
        ("unknown request id", "/v1/feedback", {"request_id": "r", "item_id": 1, "events": {"click": 1}}, None, TOKEN, 404, "no such request"),
        ("wrong token", "/v1/recommend", ok, None, "wrong", 401, "bearer token"),
        ("no token", "/v1/weights", None, None, None, 401, "bearer token"),
    ]  # fmt: skip


def test_bad_inputs_are_4xx_with_a_message(app):
    failures = []
    for what, path, body, raw, token, expected, fragment in bad_requests(app):
        method = "GET" if path == "/v1/weights" else "POST"
        status, out = call(app, method, path, body, raw, token)
        if status != expected or fragment.lower() not in str(out.get("detail", "")).lower():
            failures.append(f"{what}: {status} {out}")
    assert not failures, "\n".join(failures)
    status, _ = call(app, "GET", "/healthz", token=None)
    assert status == 200  # and the service still answers


def test_heads_in_the_ingress_predict_as_the_task_heads_deployment(app, serve_http, serve_bundle):
    """``heads_in_ingress``: no TaskHeads deployment, and the same predictions for catalog and cold items."""
    import ray.serve

    from mtrec_serve.app import AppArgs, graph

    name, prefix = APP + "-local", PREFIX + "-local"
    args = AppArgs(bundle=str(serve_bundle[0]), heads_in_ingress=True, period_s=5.0)
    options = {k: ONE_CPU_QUARTER for k in ("Ingress", "Embedder", "WeightController")}
    ray.serve.run(graph(args, options), name=name, route_prefix=prefix)
    try:
        assert set(ray.serve.status().applications[name].deployments) == {"Ingress", "Embedder", "WeightController"}
        ids = [it["item_id"] for it in app["items"][:20]]
        body = {
            "user_id": 5,
            "history": ids[:2],
            "candidates": [*ids, {"item_id": "new-1", "text": "red running shoes"}],
        }
        here, there = (
            call({"url": serve_http + prefix}, "POST", "/v1/score", body, token=None),
            call(app, "POST", "/v1/score", body),
        )
        assert here[0] == there[0] == 200, (here, there)
        for a, b in zip(here[1]["items"], there[1]["items"], strict=True):
            assert a["item_id"] == b["item_id"]
            assert a["predictions"] == pytest.approx(b["predictions"], rel=1e-5, abs=1e-7)
    finally:
        ray.serve.delete(name)


def _load(app, stop: threading.Event, statuses: list[int]) -> None:
    """One client: requests back to back, 20 catalog candidates each."""
    ids = [it["item_id"] for it in app["items"][:20]]
    while not stop.is_set():
        statuses.append(call(app, "POST", "/v1/recommend", {"user_id": 1, "candidates": ids, "k": 5})[0])


def test_task_heads_follow_the_load_up_and_back_down(app, prometheus_server):
    from mtrec_serve.replicas import ReplicaWatch, running_replicas

    assert running_replicas(APP)["TaskHeads"] == 1
    lines: list[str] = []
    stop, statuses = threading.Event(), []
    with ReplicaWatch(APP, lines.append, period_s=0.5):
        clients = [threading.Thread(target=_load, args=(app, stop, statuses)) for _ in range(CLIENTS)]
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
    assert up["TaskHeads"] == 2 and running_replicas(APP)["TaskHeads"] == 1, up
    assert statuses and set(statuses) == {200}, f"{len(statuses)} requests: {sorted(set(statuses))}"
    assert lines[:4].count("TaskHeads: 1 replica running") == 1, lines  # the first reading names every deployment
    assert lines.index("TaskHeads: 1 -> 2 replicas running") < lines.index("TaskHeads: 2 -> 1 replica running")

    # the dashboard's replica panel reads Ray Serve's own gauges: every deployment of the app has series
    values = {"$cluster": ".*", "$application": APP}
    exprs = [e for e in manifest_checks.dashboard_exprs(manifest_checks.dashboard()) if "ray_serve_" in e]
    assert exprs, "the dashboard has no panel on Ray Serve's replica metrics"
    for expr in exprs:
        for var, value in values.items():
            expr = expr.replace(var, value)

        def answered(e=expr):
            url = f"{prometheus_server.url}/api/v1/query?" + urllib.parse.urlencode({"query": e})
            status, body = call_json(url)
            found = {r["metric"].get("deployment") for r in body["data"]["result"]} if status == 200 else set()
            return found >= {"Embedder", "TaskHeads"}

        what = f"series of Embedder and TaskHeads for {expr}; scrapes:\n{scrape_health(prometheus_server.url)}"
        wait_until(answered, 60, what, poll_s=1.0)


def test_replica_counts_name_every_deployment_of_the_app(app):
    """``running_replicas`` reads every deployment of the app; an app that is not deployed reads empty."""
    from mtrec_serve.replicas import running_replicas

    assert set(running_replicas(APP)) == {"Ingress", "Embedder", "TaskHeads", "WeightController"}
    assert running_replicas(f"no-such-app-{time.time_ns()}") == {}
