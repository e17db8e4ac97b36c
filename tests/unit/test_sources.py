"""Metric sources against a tiny local HTTP server: parsing, differencing, and every failure turned stale."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time

import pytest

from mtrec.errors import ConfigError
from mtrec_serve.sources import (
    CounterDeltas,
    PrometheusSource,
    ScrapeSource,
    SourceError,
    build_source,
    complete,
    observation,
)

IMP, EV, PRED = "ray_mtrec_impressions_total", "ray_mtrec_feedback_events_total", "ray_mtrec_predicted_events_total"


class FakeEndpoint:
    """Answers every GET with the next canned (status, body, delay); the last one repeats."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, bytes, float]] = []
        self.paths: list[str] = []
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.paths.append(self.path)
                status, body, delay = endpoint.answers.pop(0) if len(endpoint.answers) > 1 else endpoint.answers[0]
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, *answers: tuple[int, bytes | str, float]) -> None:
        self.answers = [(s, b.encode() if isinstance(b, str) else b, d) for s, b, d in answers]


@pytest.fixture
def endpoint():
    e = FakeEndpoint()
    yield e
    e.server.shutdown()
    e.server.server_close()


def prom(result: list[tuple], at: float = 1e12) -> str:
    """A Prometheus answer to a range query: per ``(labels, value[, time])`` a series whose latest
    sample has that value, at that time (default ``at``)."""
    items = []
    for labels, value, *when in result:
        t = when[0] if when else at
        items.append({"metric": labels, "values": [[t - 1.0, "0"], [t, value]]})
    return json.dumps({"status": "success", "data": {"resultType": "matrix", "result": items}})


def exposition(
    imp: dict[str, float],
    ev: dict[tuple[str, str], float],
    replica: str = "r1",
    dep: str = "dep",
    pred: dict[tuple[str, str], float] | None = None,
) -> str:
    lines = [f"# TYPE {IMP} counter"]
    lines += [f'{IMP}{{deployment_id="{dep}",arm="{a}",replica="{replica}"}} {n}' for a, n in imp.items()]
    lines += [f"# TYPE {EV} counter"]
    lines += [f'{EV}{{deployment_id="{dep}",arm="{a}",task="{t}",replica="{replica}"}} {n}' for (a, t), n in ev.items()]
    if pred:
        lines += [f"# TYPE {PRED} counter"]
        lines += [
            f'{PRED}{{deployment_id="{dep}",arm="{a}",task="{t}",replica="{replica}"}} {n}'
            for (a, t), n in pred.items()
        ]
    lines += ['ray_other_total{arm="main"} 99', ""]
    return "\n".join(lines)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        self.t += 10
        return self.t


def test_counter_deltas_baseline_reset_and_new_series():
    d = CounterDeltas()
    a, b = (IMP, (("arm", "main"), ("replica", "1"))), (IMP, (("arm", "main"), ("replica", "2")))
    assert d.update([]) == {} and not d.primed  # nothing scraped yet: not a baseline
    assert d.update([(a, 100.0)]) == {} and d.primed  # baseline
    assert d.update([(a, 130.0)]) == {a: 30.0}
    assert d.update([(a, 5.0), (b, 7.0)]) == {a: 5.0, b: 7.0}  # a restarted (reset); b is new since the baseline
    assert d.update([(b, 9.0)]) == {b: 2.0}  # a missing this time: remembered...
    assert d.update([(a, 8.0), (b, 9.0)]) == {a: 3.0, b: 0.0}  # ...and differenced when it returns


def test_observation_sums_series_by_arm_and_task_and_complete_fills_zeros():
    deltas = {
        (IMP, (("arm", "a0"), ("replica", "1"))): 10.0,
        (IMP, (("arm", "a0"), ("replica", "2"))): 5.0,
        (EV, (("arm", "a0"), ("replica", "1"), ("task", "click"))): 3.0,
        (EV, (("arm", "a0"), ("replica", "2"), ("task", "click"))): 1.0,
        (EV, (("replica", "2"), ("task", "click"))): 50.0,  # no arm label: not ours to count
    }
    obs = complete(observation(deltas, 5.0), ["a0", "a1"], ["click", "buy"])
    assert obs.arms["a0"].impressions == 15 and obs.arms["a0"].events == {"click": 4.0, "buy": 0.0}
    assert obs.arms["a1"].impressions == 0 and obs.arms["a1"].events == {"click": 0.0, "buy": 0.0}
    assert obs.arms["a0"].predicted == {} and obs.arms["a1"].predicted == {}  # none reported: none made up
    deltas[(PRED, (("arm", "a0"), ("replica", "1"), ("task", "click")))] = 2.5
    deltas[(PRED, (("arm", "a0"), ("replica", "2"), ("task", "click")))] = 0.5
    obs = complete(observation(deltas, 5.0), ["a0", "a1"], ["click", "buy"])
    assert obs.arms["a0"].predicted == {"click": 3.0, "buy": 0.0}  # reported: a series not yet exported is 0
    assert obs.arms["a1"].predicted == {"click": 0.0, "buy": 0.0}


def test_series_that_sum_past_the_largest_float_are_refused():
    huge = {
        (EV, (("arm", "a0"), ("replica", "1"), ("task", "dwell"))): 1e308,
        (EV, (("arm", "a0"), ("replica", "2"), ("task", "dwell"))): 1e308,
    }
    with pytest.raises(SourceError, match="dwell events sum to inf") as e:
        observation(huge, 5.0)
    assert e.value.reason == "non_finite"


def test_prometheus_source_differences_cumulative_counters_of_its_deployment(endpoint):
    first = [({"__name__": IMP, "arm": "main", "replica": "r1"}, "100")]
    first += [({"__name__": EV, "arm": "main", "task": "click", "replica": "r1"}, "10")]
    first += [({"__name__": PRED, "arm": "main", "task": "click", "replica": "r1"}, "12.5")]
    second = [({"__name__": IMP, "arm": "main", "replica": "r1"}, "160")]
    second += [({"__name__": EV, "arm": "main", "task": "click", "replica": "r1"}, "16")]
    second += [({"__name__": PRED, "arm": "main", "task": "click", "replica": "r1"}, "20")]
    endpoint.answer(*[(200, prom([series]), 0) for series in first + second])
    src = PrometheusSource(endpoint.url, "dep-a", window_s=30, scrape_interval_s=5, clock=Clock())
    assert src.read() is None and src.problem is None  # baseline
    obs = src.read()
    assert not obs.stale and obs.arms["main"].impressions == 60 and obs.arms["main"].events == {"click": 6.0}
    assert obs.arms["main"].predicted == {"click": 7.5}
    assert src.queries() == [f'{name}{{deployment_id="dep-a"}}[30s]' for name in (IMP, EV, PRED)]
    assert endpoint.paths[0].startswith(f"/api/v1/query?query={IMP}%7Bdeployment_id%3D%22dep-a%22%7D%5B30s%5D")
    assert src.newest_sample_at == 1e12


@pytest.mark.parametrize(
    "answer, why, reason",
    [
        ((500, "internal error", 0.0), "HTTP 500", "unreachable"),
        ((200, "<html>not json</html>", 0.0), "not JSON", "malformed"),
        ((200, json.dumps({"status": "error", "error": "parse error"}), 0.0), "parse error", "malformed"),
        (
            (200, json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}), 0.0),
            "matrix",
            "malformed",
        ),
        ((200, prom([({"arm": "main"}, "NaN")]), 0.0), "not a finite count", "non_finite"),
        ((200, prom([({"arm": "main"}, "+Inf")]), 0.0), "not a finite count", "non_finite"),
        ((200, prom([({"arm": "main"}, "-3")]), 0.0), "not a finite count", "malformed"),
        ((200, prom([({"arm": "main"}, "abc")]), 0.0), "not a number", "malformed"),
        (
            (200, json.dumps({"status": "success", "data": {"resultType": "matrix", "result": [{"x": 1}]}}), 0),
            "malformed",
            "malformed",
        ),
        ((200, prom([]), 1.5), "timed out", "unreachable"),
    ],
)
def test_prometheus_source_failures_give_stale_observations(endpoint, answer, why, reason):
    endpoint.answer(answer)
    src = PrometheusSource(endpoint.url, "dep", timeout_s=0.5, clock=Clock())
    obs = src.read()
    assert obs is not None and obs.stale and obs.arms == {}
    assert why in src.problem and endpoint.url in src.problem and src.reason == reason


def test_prometheus_source_unreachable_and_series_vanishing(endpoint):
    good = prom([({"__name__": IMP, "arm": "main"}, "5")])
    endpoint.answer((200, good, 0), (200, good, 0), (200, good, 0), (200, good, 0), (200, prom([]), 0))
    src = PrometheusSource(endpoint.url, "dep", clock=Clock())
    assert src.read() is None
    assert not src.read().stale
    obs = src.read()  # Prometheus answers, but our series are gone: a target that stopped being scraped
    assert obs.stale and "no mtrec counter series" in src.problem and src.reason == "stale"
    endpoint.server.shutdown()
    endpoint.server.server_close()
    obs = src.read()
    assert obs.stale and "ConnectionRefusedError" in src.problem and src.reason == "unreachable"


def test_old_samples_are_stale_and_their_series_held(endpoint):
    """A dead target's last values, which Prometheus keeps returning for the whole window, are not a
    window without events: alone they make the read stale, beside fresh series they are held."""
    clock = Clock()  # reads at 1010, 1020, ...; scrape interval 5 s: samples older than 10 s are stale
    a = {"__name__": IMP, "arm": "main", "replica": "a"}
    b = {"__name__": IMP, "arm": "main", "replica": "b"}
    none = (200, prom([]), 0)  # the events and predicted events queries
    endpoint.answer(
        (200, prom([(a, "100"), (b, "50")], at=1009), 0),
        *[none, none],  # read 1: baseline
        (200, prom([(a, "100"), (b, "50")], at=1005), 0),
        *[none, none],  # read 2 at 1020: both 15 s old
        (200, prom([(a, "130")], at=1029), 0),
        *[none, none],  # read 3 at 1030: a fresh
    )
    src = PrometheusSource(endpoint.url, "dep", window_s=60, scrape_interval_s=5, clock=clock)
    assert src.read() is None
    obs = src.read()
    assert obs.stale and src.reason == "stale" and "15 s old, more than 10 s" in src.problem
    assert src.newest_sample_at == 1009  # the gauge's age: the newest sample ever read, not the read time
    obs = src.read()
    assert not obs.stale and obs.arms["main"].impressions == 30  # b held, not read as a zero window
    endpoint.answer((200, prom([(a, "130", 1039), (b, "60", 1000)]), 0), (200, prom([]), 0))
    obs = src.read()  # at 1040: a fresh and unchanged, b 40 s old: held (its 10 new are not counted yet)
    assert not obs.stale and obs.arms["main"].impressions == 0
    endpoint.answer((200, prom([(a, "130"), (b, "60")], at=1049), 0), (200, prom([]), 0))
    assert src.read().arms["main"].impressions == 10  # b fresh again: what it held is counted now


def test_scrape_source_parses_exposition_text_and_handles_resets(endpoint):
    endpoint.answer(
        (200, exposition({"main": 100}, {("main", "click"): 10}), 0),
        (200, exposition({"main": 150}, {("main", "click"): 14, ("main", "buy"): 2}, pred={("main", "buy"): 4}), 0),
        (200, exposition({"main": 20}, {("main", "click"): 3}, replica="r2"), 0),  # the replica restarted
    )
    clock = Clock()
    src = ScrapeSource(endpoint.url + "/metrics", "dep", clock=clock)
    assert src.read() is None
    obs = src.read()
    assert obs.arms["main"].impressions == 50 and obs.arms["main"].events == {"click": 4.0, "buy": 2.0}
    assert obs.arms["main"].predicted == {"buy": 4.0}  # new since the baseline: all of it counts
    assert src.newest_sample_at == clock.t  # a direct scrape is as fresh as the read
    obs = src.read()
    assert obs.arms["main"].impressions == 20 and obs.arms["main"].events == {"click": 3.0}


def test_scrape_source_counts_only_its_deployment_and_rejects_garbage(endpoint):
    other = exposition({"main": 1}, {}, dep="dep-b")
    endpoint.answer((200, exposition({"main": 1}, {}, dep="dep-a") + other, 0))
    src = ScrapeSource(endpoint.url, "dep-b", clock=Clock())
    assert src.read() is None
    endpoint.answer((200, exposition({"main": 9}, {}, dep="dep-a") + exposition({"main": 3}, {}, dep="dep-b"), 0))
    assert src.read().arms["main"].impressions == 2  # dep-a's 8 new impressions are not dep-b's
    endpoint.answer((200, exposition({"main": 1}, {}, dep="dep-a"), 0))
    src = ScrapeSource(endpoint.url, "dep-b", clock=Clock())
    assert src.read() is None and src.read() is None and "no mtrec counter series yet" in src.problem
    endpoint.answer((200, b"\xff\xfe garbage {{{", 0))
    obs = src.read()
    assert obs.stale and "exposition" in src.problem
    endpoint.answer((200, f'{IMP}{{deployment_id="dep",arm="main"}} NaN\n', 0))
    src = ScrapeSource(endpoint.url, "dep")
    assert src.read().stale and src.reason == "non_finite"


def test_build_source_validates():
    assert build_source(None, "app", 60) is None
    src = build_source({"kind": "prometheus", "url": "http://127.0.0.1:9", "scrape_interval_s": 10}, "dev.mtrec", 20)
    assert isinstance(src, PrometheusSource) and 'deployment_id="dev.mtrec"' in src.queries()[0]
    assert isinstance(build_source({"kind": "scrape", "url": "http://127.0.0.1:9/metrics"}, "a", 60), ScrapeSource)
    with pytest.raises(ConfigError, match="kind 'kafka'"):
        build_source({"kind": "kafka", "url": "http://x"}, "a", 60)
    with pytest.raises(ConfigError, match="url"):
        build_source({"kind": "scrape", "url": "127.0.0.1:9"}, "a", 60)
    with pytest.raises(ConfigError, match="unknown key"):
        build_source({"kind": "scrape", "url": "http://x", "scrape_interval_s": 3}, "a", 60)
    with pytest.raises(ConfigError, match="twice scrape_interval_s=15"):
        build_source({"kind": "prometheus", "url": "http://x"}, "a", 20)
    with pytest.raises(ConfigError, match="deployment_id='a\"b'"):
        build_source({"kind": "prometheus", "url": "http://x"}, 'a"b', 60)


def test_write_prometheus_config_and_missing_binary(tmp_path):
    from mtrec_cluster.prometheus import start_prometheus, stop_prometheus, write_prometheus_config

    path = write_prometheus_config(
        tmp_path / "p.yml", targets=["127.0.0.1:1"], sd_file=tmp_path / "sd.json", scrape_interval_s=1
    )
    job = json.loads(path.read_text())["scrape_configs"][0]
    assert job["scrape_interval"] == "1000ms" and job["static_configs"] == [{"targets": ["127.0.0.1:1"]}]
    assert job["file_sd_configs"][0]["files"] == [str(tmp_path / "sd.json")]
    with pytest.raises(ConfigError, match="targets"):
        write_prometheus_config(tmp_path / "q.yml")
    with pytest.raises(Exception, match="binary '/nonexistent/prometheus' not found"):
        start_prometheus(path, binary="/nonexistent/prometheus")
    assert stop_prometheus(os.getpid()) is False  # not a Prometheus: left alone


def test_prometheus_source_against_a_real_prometheus(endpoint, tmp_path):
    """PromQL, deployment scoping and staleness end to end: a real Prometheus scraping canned exposition
    text of two deployments; then the target dies and its last samples, which Prometheus still returns,
    make the reads stale instead of quiet."""
    from mtrec_cluster.prometheus import DEFAULT_BINARY, start_prometheus, write_prometheus_config

    if not os.path.exists(DEFAULT_BINARY):
        pytest.skip(f"{DEFAULT_BINARY} not installed")

    def both(ours: float, theirs: float) -> str:
        return exposition({"main": ours}, {("main", "click"): ours / 10}) + exposition(
            {"main": theirs}, {("main", "click"): theirs / 10}, dep="other"
        )

    endpoint.answer((200, both(100, 1000), 0))
    host = endpoint.url.removeprefix("http://")
    config = write_prometheus_config(tmp_path / "p.yml", targets=[host], scrape_interval_s=0.5)
    server = start_prometheus(config, timeout_s=30)
    try:
        src = PrometheusSource(server.url, "dep", window_s=10, scrape_interval_s=0.5)
        _until(lambda: src.read() is None and src.problem is None, "the baseline")  # set by the first scrape
        endpoint.answer((200, both(160, 5000), 0))
        seen = {"impressions": 0.0, "click": 0.0}

        def counted() -> bool:
            obs = src.read()
            assert not obs.stale, src.problem
            if "main" in obs.arms:
                seen["impressions"] += obs.arms["main"].impressions
                seen["click"] += obs.arms["main"].events["click"]
            return seen["impressions"] >= 60

        _until(counted, "the new counts")
        # neither ray_other_total, nor the other deployment's 4000, nor the baseline counted
        assert seen == {"impressions": 60.0, "click": 6.0}

        endpoint.answer((500, "target down", 0))  # the scrape fails from now on
        _until(lambda: src.read().stale and src.reason == "stale", "the dead target's samples to turn stale")
        assert "old, more than 1 s" in src.problem
        assert time.time() - src.newest_sample_at > 1.0  # the staleness gauge's age is the newest sample's
    finally:
        server.stop()


def _until(predicate, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")
