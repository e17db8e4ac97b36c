"""The whole loop through the real app: HTTP recommendations and feedback -> the Ingress's metrics ->
Ray's metrics port -> a real Prometheus -> the WeightController -> the weights the Ingress serves.

Feedback clicks on far fewer impressions than the click target asks for, so the target policy must
raise the click weight; with Prometheus stopped, the weights hold and requests keep succeeding. A
regression event beyond what training saw is refused, so the weights stay finite. The bundle is an
ID-only model of the synthetic search scenario: a binary task (click) and a regression task
(dwell_time)."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request

import pyarrow.parquet as pq
import pytest
from polling import scrape_health, wait_until

pytestmark = pytest.mark.timeout(300)

APP = "mtrec-feedback-test"
DEPLOYMENT = "feedback-test"
PREFIX = "/feedback-test"
PERIOD_S = 1.5
SCRAPE_S = 5.0  # the controller's scrape interval: a margin over the fixture's 4 s scrapes on a loaded machine
QUARTER = {"ray_actor_options": {"num_cpus": 0.25}}
PINNED = {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def weights(url: str) -> dict:
    with urllib.request.urlopen(url + "/v1/weights", timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def search_bundle(tmp_path_factory):
    """A small ID-only bundle of the search scenario (click and dwell_time), trained in-process (seconds)."""
    from mtrec.config import Config
    from mtrec.data.synthetic import generate
    from mtrec.engine import fit

    root = tmp_path_factory.mktemp("search-bundle")
    data = generate("search", root / "data", num_users=80, num_items=60, num_interactions=4000, seed=5)
    cfg = Config().override(
        ["train.epochs=1", "data.max_history=5", "model.id_buckets=11", "model.proj_dim=32", "model.expert_dim=32"]
        + ["encoder.mode=none"]
    )
    return fit(cfg, data, work_dir=root / "work").save_bundle(root / "bundle", cfg), data


@pytest.fixture(scope="module")
def app(ray_cluster, serve_http, search_bundle, prometheus_server, tmp_path_factory):
    import ray.serve

    from mtrec_serve.app import AppArgs, graph

    bundle, data = search_bundle
    args = AppArgs(
        bundle=str(bundle),
        prometheus_url=prometheus_server.url,
        scrape_interval_s=SCRAPE_S,
        deployment_id=DEPLOYMENT,
        policy="target",
        policy_params={"targets": {"click": 0.5}, "gain": 2.0},
        limits={"min_events": 5, "max_step": 0.1, "smoothing": 0.0},
        state_path=str(tmp_path_factory.mktemp("feedback") / "state.json"),
        period_s=PERIOD_S,
        window_s=30.0,
    )
    options = {
        "Embedder": {**QUARTER, "autoscaling_config": PINNED},
        "TaskHeads": {**QUARTER, "autoscaling_config": PINNED},
    }
    ray.serve.run(
        graph(args, {**options, "Ingress": QUARTER, "WeightController": QUARTER}), name=APP, route_prefix=PREFIX
    )
    items = [r["item_id"] for r in pq.read_table(data / "items.parquet", columns=["item_id"]).to_pylist()]
    yield serve_http + PREFIX, items, bundle
    ray.serve.delete(APP)


def promql(prometheus_url: str, query: str) -> list[dict]:
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def traffic(url: str, items: list, requests: int, click_every: int) -> int:
    """``requests`` recommendations of 5 items; a click on the top item of every ``click_every``-th.
    Returns the number of requests that did not answer 200."""
    failed = 0
    for q in range(requests):
        status, body = post(url + "/v1/recommend", {"user_id": q % 50 + 1, "candidates": items[:20], "k": 5})
        if status != 200:
            failed += 1
            continue
        if q % click_every == 0:
            top = body["items"][0]["item_id"]
            status, _ = post(
                url + "/v1/feedback", {"request_id": body["request_id"], "item_id": top, "events": {"click": 1}}
            )
            failed += status != 200
    return failed


def test_feedback_over_http_moves_the_weights_and_they_hold_without_prometheus(app, prometheus_server):
    from mtrec_cluster.prometheus import start_prometheus, stop_prometheus

    url, items, _ = app
    start = weights(url)
    click0 = start["weights"][start["main"]]["click"]

    # click rate 1 in 50 impressions (one click per 10 requests of 5) against a target of 0.5: click must gain
    deadline, moved = time.monotonic() + 120, None
    while time.monotonic() < deadline and moved is None:
        assert traffic(url, items, 20, click_every=10) == 0
        d = weights(url)
        if d["version"] > start["version"] and d["weights"][d["main"]]["click"] > click0 + 0.05:
            moved = d
    assert moved is not None, (
        f"the click weight did not rise from {click0:.3f}: {weights(url)}\n{scrape_health(prometheus_server.url)}"
    )
    assert "click" in moved["reason"] and "vs targets" in moved["reason"]
    # every series the Ingress emits carries the app's deployment id, the one the controller's queries read
    ours = promql(prometheus_server.url, f'ray_mtrec_requests_total{{application="{APP}"}}')
    assert ours and {s["metric"].get("deployment_id") for s in ours} == {DEPLOYMENT}

    assert stop_prometheus(prometheus_server.data_dir)
    try:
        deadline = time.monotonic() + 30
        while weights(url)["action"] != "hold":
            assert time.monotonic() < deadline, "the controller did not hold without Prometheus"
            time.sleep(0.5)
        held = weights(url)
        assert traffic(url, items, 20, click_every=10) == 0  # requests keep succeeding
        time.sleep(3 * PERIOD_S)
        later = weights(url)
        assert later["weights"] == held["weights"] and later["version"] == held["version"]
        assert later["staleness_s"] > held["staleness_s"]
    finally:
        start_prometheus(prometheus_server.config, prometheus_server.port, prometheus_server.data_dir)


def test_regression_feedback_beyond_the_training_range_is_refused_and_the_weights_stay_finite(app):
    from mtrec.bundle import load_bundle

    url, items, bundle = app
    low, high = load_bundle(bundle).meta.label_range["dwell_time"]
    status, body = post(url + "/v1/recommend", {"user_id": 7, "candidates": items[:20], "k": 5})
    assert status == 200 and set(body) == {"request_id", "items"}, body  # no arm, no weights version
    top = body["items"][0]["item_id"]

    def feedback(value: float) -> tuple[int, dict]:
        return post(
            url + "/v1/feedback", {"request_id": body["request_id"], "item_id": top, "events": {"dwell_time": value}}
        )

    status, out = feedback(1e308)
    assert status == 422 and "dwell_time" in out["detail"] and "1e+308" in out["detail"], out
    assert f"[{low:g}, {high:g}]" in out["detail"], out
    assert feedback(high * 1.01)[0] == 422 and feedback(low - 1.0)[0] == 422
    status, out = feedback(high)
    assert status == 200 and out["recorded"] == ["dwell_time"], out

    time.sleep(4 * PERIOD_S)  # a few controller steps over the counts that include it
    d = weights(url)
    assert all(math.isfinite(w) for arm in d["weights"].values() for w in arm.values()), d
    for q in range(5):
        status, body = post(url + "/v1/recommend", {"user_id": q, "candidates": items[:20], "k": 5})
        assert status == 200 and all(
            isinstance(it["score"], float) and math.isfinite(it["score"]) for it in body["items"]
        )


CALIBRATED_APP, CALIBRATED_DEPLOYMENT, CALIBRATED_PREFIX = (
    "mtrec-calibrated-test",
    "calibrated-test",
    "/calibrated-test",
)


@pytest.fixture(scope="module")
def calibrated_app(ray_cluster, serve_http, search_bundle, prometheus_server, tmp_path_factory):
    """The app under the calibrated policy (holdout 20 %, so a few users land there), heads in the
    Ingress (one deployment fewer), ``min_events`` out of reach so the arms stay holdout and a0."""
    import ray.serve

    from mtrec_serve.app import AppArgs, graph

    bundle, data = search_bundle
    args = AppArgs(
        bundle=str(bundle),
        prometheus_url=prometheus_server.url,
        scrape_interval_s=SCRAPE_S,
        deployment_id=CALIBRATED_DEPLOYMENT,
        policy="calibrated",
        policy_params={"holdout": 0.2},
        limits={"min_events": 1e6},
        period_s=PERIOD_S,
        window_s=30.0,
        heads_in_ingress=True,
    )
    options = {"Embedder": {**QUARTER, "autoscaling_config": PINNED}, "Ingress": QUARTER, "WeightController": QUARTER}
    ray.serve.run(graph(args, options), name=CALIBRATED_APP, route_prefix=CALIBRATED_PREFIX)
    items = [r["item_id"] for r in pq.read_table(data / "items.parquet", columns=["item_id"]).to_pylist()]
    yield serve_http + CALIBRATED_PREFIX, items
    ray.serve.delete(CALIBRATED_APP)


def test_calibrated_arms_are_sticky_per_user_and_get_predicted_counts(calibrated_app, prometheus_server):
    """Each user's impressions land on the arm the sticky hash of its id picks (holdout first in the
    layout); the Ingress's predicted-events counters reach the controller's source for every arm, and
    the calibrated policy, given them, calibrates (instead of waiting for predictions)."""
    from mtrec.arms import choose_arm
    from mtrec_serve.ingress import DECISION_REFRESH_S
    from mtrec_serve.sources import PrometheusSource

    url, items = calibrated_app
    start = weights(url)
    assert start["policy"] == "calibrated" and list(start["traffic"]) == ["holdout", "a0"], start
    time.sleep(2 * DECISION_REFRESH_S)  # the Ingress has the controller's arms
    users = range(1, 41)
    expected = {arm: 0.0 for arm in start["traffic"]}
    for user in users:
        expected[choose_arm(str(user), start["traffic"])] += 5.0
    assert all(expected.values()), expected  # both arms have users

    source = PrometheusSource(prometheus_server.url, CALIBRATED_DEPLOYMENT, window_s=30, scrape_interval_s=SCRAPE_S)
    post(url + "/v1/recommend", {"user_id": 1, "candidates": items[:20], "k": 5})  # the series exist (baseline)
    counted = {arm: {"impressions": 0.0, "click": 0.0, "dwell_time": 0.0} for arm in expected}

    def read() -> bool:
        obs = source.read()
        if obs is not None and not obs.stale:
            for arm, c in obs.arms.items():
                counted[arm]["impressions"] += c.impressions
                for task in ("click", "dwell_time"):
                    counted[arm][task] += c.predicted.get(task, 0.0)
        return source.problem is None and obs is None  # the baseline

    wait_until(read, 60, "the baseline of the calibrated app's series", poll_s=1.0)
    for user in users:
        status, body = post(url + "/v1/recommend", {"user_id": user, "candidates": items[:20], "k": 5})
        assert status == 200, body
        if user % 4 == 0:
            top = body["items"][0]["item_id"]
            post(url + "/v1/feedback", {"request_id": body["request_id"], "item_id": top, "events": {"click": 1}})
    wait_until(
        lambda: read() or all(counted[a]["impressions"] >= n for a, n in expected.items()),
        60,
        f"{expected} impressions per arm (counted {counted})",
        poll_s=1.0,
    )
    assert {a: c["impressions"] for a, c in counted.items()} == expected, counted  # sticky per user
    for arm, c in counted.items():
        assert c["click"] > 0 and c["dwell_time"] >= 0, (arm, counted)  # predicted events, per arm

    def calibrated() -> dict | None:
        d = weights(url)
        calibration = (d.get("report") or {}).get("calibration") or {}
        return d if calibration.get("click") is not None else None

    d = wait_until(calibrated, 30, "the calibrated policy to calibrate on the predicted events", poll_s=1.0)
    assert "no predictions reported" not in d["reason"], d
    assert d["report"]["calibration"]["click"] > 0, d["report"]
