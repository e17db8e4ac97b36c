"""mtrec_serve.metrics helpers that need no Ray: series names, labels, sampling, and recording through a fake."""

from __future__ import annotations

import numpy as np
import pytest

from mtrec_serve import metrics


class FakeMetric:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict | None]] = []

    def inc(self, value, tags=None):
        self.calls.append(("inc", value, tags))

    def set(self, value, tags=None):
        self.calls.append(("set", value, tags))

    def observe(self, value, tags=None):
        self.calls.append(("observe", value, tags))


DEP = {"deployment_id": "dev.mtrec"}


@pytest.fixture
def fake(monkeypatch):
    fakes: dict[str, FakeMetric] = {name: FakeMetric() for name in metrics.METRICS}
    monkeypatch.setattr(metrics, "_CACHE", fakes)
    monkeypatch.setattr(metrics, "_SCOPE", {})
    metrics.scope("dev.mtrec")
    return fakes


def test_exported_names_follow_rays_prometheus_naming():
    assert metrics.exported_name("mtrec_feedback_events") == "ray_mtrec_feedback_events_total"
    assert metrics.exported_name("mtrec_fusion_weight") == "ray_mtrec_fusion_weight"
    assert metrics.exported_name("mtrec_latency_ms", "bucket") == "ray_mtrec_latency_ms_bucket"
    with pytest.raises(ValueError, match="bucket, sum or count"):
        metrics.exported_name("mtrec_latency_ms")


def test_specs_are_valid_for_ray():
    for spec in metrics.METRICS.values():
        assert spec.kind in ("counter", "gauge", "histogram")
        assert not {"application", "deployment", "replica", metrics.DEPLOYMENT_LABEL} & set(spec.tags)  # added for us
        if spec.kind == "histogram":
            b = spec.boundaries
            assert b and all(x > 0 for x in b) and list(b) == sorted(set(b))  # Ray wants positive, increasing
    assert metrics.PREDICTION_BUCKETS[-1] == 1.0


def test_tags_are_strings_carry_the_deployment_and_are_checked(fake):
    assert metrics.tags("mtrec_requests", route="/v1/recommend", status=200) == {
        "route": "/v1/recommend",
        "status": "200",
        "deployment_id": "dev.mtrec",
    }
    with pytest.raises(ValueError, match=r"takes labels \['task', 'arm'\]"):
        metrics.tags("mtrec_feedback_events", task="click")


def test_recording_without_a_deployment_is_an_error(monkeypatch):
    monkeypatch.setattr(metrics, "_SCOPE", {})
    with pytest.raises(ValueError, match="no deployment id in this process"):
        metrics.tags("mtrec_impressions", arm="main")


def test_deployment_id_is_given_or_derived_from_namespace_and_app(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "K8S_NAMESPACE_FILE", tmp_path / "absent")
    assert metrics.deployment_id("prod-eu.mtrec", "mtrec") == "prod-eu.mtrec"
    assert metrics.deployment_id(None, "mtrec") == "mtrec"  # not in a Kubernetes pod: the app name
    assert metrics.deployment_id(None, "my app/v2") == "my_app_v2"
    namespace = tmp_path / "namespace"
    namespace.write_text("mtrec-dev\n")
    monkeypatch.setattr(metrics, "K8S_NAMESPACE_FILE", namespace)
    assert metrics.deployment_id(None, "mtrec") == "mtrec-dev.mtrec"  # dev and prod overlays differ
    with pytest.raises(ValueError, match="deployment_id 'a\"b'"):
        metrics.deployment_id('a"b', "mtrec")
    with pytest.raises(ValueError, match="no Serve application name"):
        metrics.deployment_id(None, None)


def test_sample_keeps_finite_values_and_bounds_the_count():
    rng = np.random.default_rng(0)
    values = np.r_[np.linspace(0, 1, 1000), np.nan, np.inf]
    s = metrics.sample(values, limit=64, rng=rng)
    assert s.shape == (64,) and np.isfinite(s).all() and len(set(s)) == 64
    assert metrics.sample([0.2, np.nan, 0.4]).tolist() == [0.2, 0.4]


def test_recording_goes_through_the_cache_with_labels(fake):
    metrics.record_feedback("click", "a1", 1)
    metrics.record_feedback("purchase", "a1", 0)  # a non-event: not counted
    metrics.record_feedback("watch", "a1", float("nan"))
    metrics.record_impressions("a1", 10)
    metrics.observe_latency("embed", 3.5)
    metrics.observe_predictions("click", np.full(200, 0.3))
    assert fake["mtrec_feedback_events"].calls == [("inc", 1.0, {"task": "click", "arm": "a1"} | DEP)]
    assert fake["mtrec_impressions"].calls == [("inc", 10.0, {"arm": "a1"} | DEP)]
    assert len(fake["mtrec_prediction"].calls) == metrics.MAX_OBSERVED
    with pytest.raises(ValueError, match="latency stage 'gpu'"):
        metrics.observe_latency("gpu", 1.0)


def test_predicted_events_sum_the_shown_items_predictions_per_task(fake):
    metrics.record_predicted("a1", {"click": np.array([0.25, 0.5, np.nan]), "dwell": np.array([-2.0, 3.0])})
    metrics.record_predicted("a1", {"click": np.zeros(3)})  # nothing to add: not counted
    assert fake["mtrec_predicted_events"].calls == [
        ("inc", 0.75, {"task": "click", "arm": "a1"} | DEP),
        ("inc", 3.0, {"task": "dwell", "arm": "a1"} | DEP),
    ]
    assert metrics.exported_name("mtrec_predicted_events") == "ray_mtrec_predicted_events_total"


def test_weights_of_retired_arms_are_zeroed(fake):
    metrics.set_weights({"a0": {"click": 0.6, "buy": 0.4}}, {"a0": 1.0}, gone=["a3"])
    sets = fake["mtrec_fusion_weight"].calls
    assert ("set", 0.6, {"arm": "a0", "task": "click"} | DEP) in sets
    assert ("set", 0.0, {"arm": "a3", "task": "buy"} | DEP) in sets
    assert ("set", 0.0, {"arm": "a3"} | DEP) in fake["mtrec_arm_traffic"].calls


def test_rejected_reads_are_counted_per_reason(fake):
    metrics.record_rejected_read("non_finite")
    metrics.set_staleness(12.5)
    assert fake["mtrec_controller_rejected_reads"].calls == [("inc", 1.0, {"reason": "non_finite"} | DEP)]
    assert fake["mtrec_controller_staleness_s"].calls == [("set", 12.5, DEP)]
    with pytest.raises(ValueError, match="reason 'nan'"):
        metrics.record_rejected_read("nan")
