"""The WeightController on a real Ray Serve, reading a real Prometheus that scrapes Ray's metrics port.

Feedback is recorded through mtrec_serve.metrics by a small deployment in the same application (what the
Ingress does per request), so it travels the real path: replica -> Ray's metrics export port ->
Prometheus scrape -> PromQL -> controller -> policy. One test walks the whole story, because each
phase needs the state the previous one left (a Serve deploy and Ray's metric export cost seconds):

1. feedback gives click a rate 15 times buy's: under the proportional policy (whose every window moves
   the weights, where the target policy would soon call an unresponsive rate unreachable and hold) the
   click weight rises, buy falls;
2. Prometheus stopped: the controller holds the weights, its staleness (decision and gauge) rises,
   and the requests that read the weights keep succeeding;
3. the controller replica killed (still without Prometheus): Serve restarts it, and it resumes with
   the persisted version and weights;
4. Prometheus back: the controller reads again and moves the weights on.

A second application with its own deployment id, the same state path and the same Prometheus then
shows that deployments do not count each other's traffic and keep separate state files.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from polling import wait_until

pytestmark = pytest.mark.timeout(300)

APP, APP_B = "mtrec-controller-test", "mtrec-controller-test-b"
DEP_A, DEP_B = "dep-a", "dep-b"
TASKS = ["click", "buy"]
PERIOD_S = 1.5
SCRAPE_S = 5.0  # the controller's scrape interval: a margin over the fixture's 4 s scrapes on a loaded machine
# fed rates: click 0.3, buy 0.02: the proportional policy moves the click weight up by max_step a window


def _sample(metrics_url: str, name: str, **labels: str) -> float | None:
    """The value of series ``name`` of deployment A with ``labels`` on Ray's metrics endpoint (None: not
    exported yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.items() >= ({"application": APP, "deployment_id": DEP_A} | labels).items():
                return s.value
    return None


def _emitter():
    """A deployment that records feedback for its deployment id and reads the weights, as the Ingress does."""
    import ray.serve

    @ray.serve.deployment
    class FeedbackEmitter:
        def __init__(self, controller, deployment_id: str) -> None:
            from mtrec_serve import metrics

            metrics.scope(deployment_id)
            self._controller = controller

        async def emit(self, impressions: int, events: dict[str, int], arm: str | None = None) -> dict:
            from mtrec_serve import metrics

            decision = await self._controller.decision.remote()
            arm = arm or decision["main"]
            metrics.record_impressions(arm, impressions)
            for task, n in events.items():
                metrics.record_feedback(task, arm, n)
            return decision

    return FeedbackEmitter


def _controller(prometheus_url: str, state: str, deployment_id: str):
    """The controller under test (proportional policy, 1.5 s period, Prometheus source) of ``deployment_id``."""
    from mtrec_serve.controller import WeightController

    return WeightController.bind(
        TASKS,
        {"click": 1.0, "buy": 1.0},
        policy="proportional",
        limits={"min_events": 20, "max_step": 0.05, "smoothing": 0.5},
        source={"kind": "prometheus", "url": prometheus_url, "timeout_s": 2.0, "scrape_interval_s": SCRAPE_S},
        state_path=state,
        period_s=PERIOD_S,
        window_s=30.0,
        deployment_id=deployment_id,
    )


@pytest.fixture(scope="module")
def controller_app(ray_cluster, prometheus_server, tmp_path_factory):
    """Deployment A: its controller and its feedback emitter."""
    import ray.serve

    from mtrec_cluster.ray_env import free_port

    ray.serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    state = tmp_path_factory.mktemp("controller") / "state.json"
    controller = _controller(prometheus_server.url, str(state), DEP_A)
    handle = ray.serve.run(_emitter().bind(controller, DEP_A), name=APP, route_prefix=None)
    controller_handle = ray.serve.get_deployment_handle("WeightController", app_name=APP)
    yield handle, controller_handle, state
    ray.serve.delete(APP)


def test_weights_follow_feedback_hold_without_prometheus_and_survive_a_restart(
    ray_cluster, prometheus_server, controller_app
):
    from mtrec_cluster.prometheus import ray_metrics_targets, start_prometheus, stop_prometheus
    from mtrec_serve.controller import state_file

    emitter, controller, state = controller_app
    metrics_url = f"http://{ray_metrics_targets()[0]}/metrics"
    start = controller.decision.remote().result()
    assert start["weights"]["main"] == {"click": 0.5, "buy": 0.5} and start["policy"] == "proportional"

    # 1. feedback moves the weights in the direction it implies
    def moved():
        emitter.emit.remote(1000, {"click": 300, "buy": 20}).result()
        d = controller.decision.remote().result()
        return d if d["weights"]["main"]["click"] > 0.599 else None

    moved_d = wait_until(moved, 90, "the click weight to rise from 0.5 to 0.6")
    assert moved_d["weights"]["main"]["buy"] < 0.401 and moved_d["version"] >= 2
    assert "proportional to live rates" in moved_d["reason"]
    history = controller.history.remote(100).result()
    assert any(h["action"] == "update" for h in history)

    # 2. Prometheus stopped: the weights hold, staleness rises, requests still succeed
    assert stop_prometheus(prometheus_server.data_dir)
    held = wait_until(
        lambda: (d := controller.decision.remote().result())["action"] == "hold" and d,
        20,
        "the controller to hold",
    )
    time.sleep(3 * PERIOD_S)
    for _ in range(3):
        served = emitter.emit.remote(1000, {"click": 300, "buy": 20}).result()  # keeps answering
        assert served["weights"] == held["weights"]
    later = controller.decision.remote().result()
    assert later["action"] == "hold" and later["weights"] == held["weights"] and later["version"] == held["version"]
    assert "ConnectionRefusedError" in later["reason"]
    assert later["staleness_s"] > held["staleness_s"] + 2 * PERIOD_S
    gauge = wait_until(
        lambda: (g := _sample(metrics_url, "ray_mtrec_controller_staleness_s")) is not None and g > 3 * PERIOD_S and g,
        30,
        "the staleness gauge to rise on Ray's metrics endpoint",
    )
    assert gauge > 3 * PERIOD_S
    rejected = wait_until(
        lambda: _sample(metrics_url, "ray_mtrec_controller_rejected_reads_total", reason="unreachable"),
        30,
        "the rejected reads to be counted on Ray's metrics endpoint",
    )
    assert rejected >= 1

    # 3. kill the controller replica: Serve restarts it from the persisted state
    before = controller.decision.remote().result()
    replicas = [
        a["name"]
        for a in ray_cluster.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#WeightController#")
    ]
    assert len(replicas) == 1
    ray_cluster.kill(ray_cluster.get_actor(replicas[0], namespace="serve"), no_restart=True)

    def restarted():
        names = [a["name"] for a in ray_cluster.util.list_named_actors(all_namespaces=True)]
        if replicas[0] in names or not any(n.startswith(f"SERVE_REPLICA::{APP}#WeightController#") for n in names):
            return None
        try:
            return controller.decision.remote().result(timeout_s=5)
        except Exception:  # the new replica is still starting
            return None

    after = wait_until(restarted, 60, "a new WeightController replica", poll_s=1.0)
    assert json.loads(state_file(str(state), DEP_A).read_text())["version"] == before["version"]
    assert after["version"] == before["version"] and after["weights"] == before["weights"]
    assert after["staleness_s"] >= before["staleness_s"]  # the last good read is part of the state

    # 4. Prometheus back on the same port: the controller reads again and moves on
    start_prometheus(prometheus_server.config, prometheus_server.port, prometheus_server.data_dir)

    def resumed():
        emitter.emit.remote(1000, {"click": 300, "buy": 20}).result()
        d = controller.decision.remote().result()
        return d if d["version"] > after["version"] else None

    again = wait_until(resumed, 90, "the restarted controller to update from Prometheus again")
    assert again["weights"]["main"]["click"] > after["weights"]["main"]["click"]
    assert again["staleness_s"] < later["staleness_s"]


def test_scrape_source_counts_exactly_what_replicas_recorded(ray_cluster, controller_app):
    """The embedded default's source on Ray's real exposition text: the differenced counters add up
    to exactly the impressions and events recorded, however Ray's export splits them over reads."""
    from mtrec_cluster.prometheus import ray_metrics_targets
    from mtrec_serve.sources import ScrapeSource

    emitter, _, _ = controller_app
    source = ScrapeSource(f"http://{ray_metrics_targets()[0]}/metrics", DEP_A)
    assert source.read() is None, source.problem  # baseline
    arm = "scrape-test"  # an arm of its own: nothing recorded before the baseline can arrive late
    for response in [emitter.emit.remote(500, {"click": 40, "buy": 3}, arm) for _ in range(4)]:
        response.result()
    totals = {"impressions": 0.0, "click": 0.0, "buy": 0.0}

    def counted():
        obs = source.read()
        assert obs is not None and not obs.stale, source.problem
        if arm in obs.arms:
            totals["impressions"] += obs.arms[arm].impressions
            for task in ("click", "buy"):
                totals[task] += obs.arms[arm].events.get(task, 0.0)
        return totals["impressions"] >= 2000 and totals["click"] >= 160 and totals["buy"] >= 12

    wait_until(counted, 60, "Ray to export the recorded counters", poll_s=2.0)
    assert totals == {"impressions": 2000.0, "click": 160.0, "buy": 12.0}


def test_two_deployments_sharing_prometheus_count_only_their_own_traffic(
    ray_cluster, prometheus_server, controller_app
):
    """Deployment B runs the same code against the same Prometheus and state path. While A's heavy traffic
    reaches Prometheus, B's source counts exactly B's own events, B's controller (whose own few events are
    too few to act on) never moves, and each deployment keeps its own state file."""
    import ray.serve

    from mtrec_serve.controller import state_file
    from mtrec_serve.sources import PrometheusSource

    emitter_a, _, state = controller_app
    emitter_b = ray.serve.run(
        _emitter().bind(_controller(prometheus_server.url, str(state), DEP_B), DEP_B), name=APP_B, route_prefix=None
    )
    controller_b = ray.serve.get_deployment_handle("WeightController", app_name=APP_B)
    try:
        emitter_b.emit.remote(10, {"click": 1}).result()  # B's series exist: its sources take a baseline
        sources = {
            d: PrometheusSource(prometheus_server.url, d, window_s=30, scrape_interval_s=SCRAPE_S)
            for d in (DEP_A, DEP_B)
        }
        for d, source in sources.items():
            wait_until(lambda s=source: s.read() is None and s.problem is None, 60, f"{d}'s baseline in Prometheus")
        counted = {d: {"impressions": 0.0, "click": 0.0, "buy": 0.0} for d in sources}

        def count() -> None:
            emitter_a.emit.remote(1000, {"click": 300, "buy": 20}).result()
            for d, source in sources.items():
                obs = source.read()
                if obs is None or obs.stale:  # a late scrape on a loaded machine: counted at the next read
                    continue
                for counts in obs.arms.values():
                    counted[d]["impressions"] += counts.impressions
                    counted[d]["click"] += counts.events.get("click", 0.0)
                    counted[d]["buy"] += counts.events.get("buy", 0.0)

        emitter_b.emit.remote(100, {"click": 7, "buy": 1}).result()
        try:
            wait_until(
                lambda: count() or (counted[DEP_A]["impressions"] >= 3000 and counted[DEP_B]["impressions"] >= 100),
                90,
                "A's traffic and B's to reach Prometheus",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}; counted {counted}") from None
        for _ in range(3):  # A's traffic keeps arriving: B still counts only its own
            count()
            time.sleep(PERIOD_S)
        assert counted[DEP_B] == {"impressions": 100.0, "click": 7.0, "buy": 1.0}, counted
        assert counted[DEP_A]["impressions"] >= 3000 and counted[DEP_A]["buy"] >= 60, counted

        b = controller_b.decision.remote().result()
        assert b["version"] == 0 and b["weights"]["main"] == {"click": 0.5, "buy": 0.5}, b
        file_a, file_b = state_file(str(state), DEP_A), state_file(str(state), DEP_B)
        saved_a, saved_b = json.loads(file_a.read_text()), json.loads(file_b.read_text())
        assert saved_a["version"] > 0 and saved_b["version"] == 0, (saved_a["version"], saved_b["version"])
    finally:
        ray.serve.delete(APP_B)
