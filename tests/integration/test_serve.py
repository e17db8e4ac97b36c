"""The serving graph on a real Ray Serve, over real HTTP: ranking, cold items, feedback, and that every
bad input is a 4xx with a message (never a 5xx)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from polling import call_json

pytestmark = pytest.mark.timeout(300)

APP = "mtrec-serve-test"
PREFIX = "/serve-test"
TOKEN = "s3cret-test-token"
LIMITS = {"max_candidates": 50, "max_text_chars": 300, "max_body_bytes": 32 * 1024}
ONE_CPU_QUARTER = {"ray_actor_options": {"num_cpus": 0.25}}
PINNED = {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}


@pytest.fixture(scope="module")
def app(ray_cluster, serve_http, serve_bundle):
    import ray.serve

    from mtrec_serve.app import AppArgs, graph

    bundle, data = serve_bundle
    args = AppArgs(bundle=str(bundle), auth_token_env="MTREC_TEST_TOKEN", period_s=5.0, **LIMITS)
    options = {
        "Ingress": {"ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": {"MTREC_TEST_TOKEN": TOKEN}}}},
        "Embedder": {**ONE_CPU_QUARTER, "autoscaling_config": PINNED},
        "TaskHeads": {**ONE_CPU_QUARTER, "autoscaling_config": PINNED},
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
