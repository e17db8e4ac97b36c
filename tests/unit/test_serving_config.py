"""The Serve config document, the app's arguments and the request limits (no Ray cluster needed)."""

from __future__ import annotations

import pytest
import yaml

from mtrec.errors import ConfigError
from mtrec.inference import Candidate, ScoreRequest
from mtrec_serve.config import AUTOSCALING, serve_config
from mtrec_serve.run import main
from mtrec_serve.schemas import CandidateIn, RecommendBody, check_limits


def test_serve_config_validates_and_merges_autoscaling_overrides():
    doc = serve_config(
        "/runs/b", prometheus_url="http://127.0.0.1:9090", autoscaling={"TaskHeads": {"max_replicas": 8}}
    )
    app = doc["applications"][0]
    assert app["import_path"] == "mtrec_serve.app:build_app" and doc["http_options"]["host"] == "127.0.0.1"
    assert app["args"] == {"bundle": "/runs/b", "policy": "static", "prometheus_url": "http://127.0.0.1:9090"}
    blocks = {d["name"]: d.get("autoscaling_config") for d in app["deployments"]}
    assert set(blocks) == {"Ingress", "Embedder", "TaskHeads", "WeightController"}
    assert blocks["TaskHeads"]["max_replicas"] == 8 and blocks["Embedder"] == AUTOSCALING["Embedder"]
    assert AUTOSCALING["TaskHeads"]["max_replicas"] != 8  # the defaults are not changed by an override


def test_the_rayservice_autoscales_as_mtrec_serve_does():
    """One set of autoscaling settings: the RayService's blocks are the defaults of ``mtrec serve``."""
    from pathlib import Path

    manifest = Path(__file__).resolve().parents[2] / "k8s" / "base" / "rayservice.serve.yaml"
    (app,) = yaml.safe_load(yaml.safe_load(manifest.read_text())["spec"]["serveConfigV2"])["applications"]
    blocks = {d["name"]: d["autoscaling_config"] for d in app["deployments"] if "autoscaling_config" in d}
    assert blocks == AUTOSCALING


def test_heads_in_ingress_leaves_out_the_task_heads_deployment():
    from mtrec_serve.app import AppArgs

    app = serve_config("/runs/b", heads_in_ingress=True)["applications"][0]
    assert {d["name"] for d in app["deployments"]} == {"Ingress", "Embedder", "WeightController"}
    assert AppArgs.model_validate(app["args"]).heads_in_ingress
    with pytest.raises(ConfigError, match="no TaskHeads deployment"):
        serve_config("/runs/b", heads_in_ingress=True, autoscaling={"TaskHeads": {"max_replicas": 2}})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"Ingress": {"max_replicas": 2}}, "'Ingress' does not autoscale"),
        ({"Embedder": {"max_replica": 2}}, "autoscaling.Embedder: unknown key 'max_replica'; valid keys: "),
        ({"Embedder": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling.Embedder"),
        ({"TaskHeads": {"target_ongoing_requests": -1}}, "autoscaling.TaskHeads"),
    ],
)
def test_bad_autoscaling_is_a_config_error_naming_the_deployment(overrides, message):
    with pytest.raises(ConfigError, match=message):
        serve_config("/runs/b", autoscaling=overrides)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--autoscale", "TaskHeads.max_replica=3"], "autoscaling.TaskHeads: unknown key 'max_replica'"),
        (["--autoscale", "TaskHeads=3"], "expected DEPLOYMENT.KEY=VALUE"),
        (["--heads-in-ingress", "--autoscale", "TaskHeads.max_replicas=3"], "there is no TaskHeads deployment"),
    ],
)
def test_mtrec_serve_refuses_bad_autoscaling_before_ray_starts(tmp_path, monkeypatch, extra, message):
    import ray

    import mtrec_serve.run

    monkeypatch.setattr(mtrec_serve.run, "_check_policy", lambda args: {})  # no bundle here; tested elsewhere
    with pytest.raises(ConfigError, match=message):
        main(["--bundle", str(tmp_path), *extra])
    assert not ray.is_initialized()


def test_serve_config_command_writes_the_rayservice_block(tmp_path, capsys):
    out = tmp_path / "serve.yaml"
    assert (
        main(["config", "--bundle", "/b", "--out", str(out), "--rayservice", "--autoscale", "Embedder.max_replicas=3"])
        == 0
    )
    doc = yaml.safe_load(out.read_text())
    assert list(doc) == ["applications"]
    embedder = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "Embedder")
    assert embedder["autoscaling_config"]["max_replicas"] == 3
    with pytest.raises(ConfigError, match="DEPLOYMENT.KEY=VALUE"):
        main(["config", "--bundle", "/b", "--autoscale", "max_replicas=3"])


def test_a_body_converts_to_the_core_request_field_by_field():
    body = RecommendBody(
        user_id="u1",
        candidates=[7, CandidateIn(item_id="new", text="a red bike", features={"discount": 0.2})],
        history=[3, "x"],
        context="bikes",
        user_features={"age": 31},
        k=5,
    )
    assert body.request() == ScoreRequest(
        user_id="u1",
        candidates=[Candidate(7), Candidate("new", "a red bike", {"discount": 0.2})],
        history=[3, "x"],
        context="bikes",
        user_features={"age": 31},
    )
    # one definition of the request: the HTTP bodies hold the core request's fields under the same names
    assert set(ScoreRequest.__dataclass_fields__) <= set(RecommendBody.model_fields)
    assert set(Candidate.__dataclass_fields__) == set(CandidateIn.model_fields)


def test_request_limits_name_the_field():
    limits = dict(max_candidates=3, max_text_chars=5)

    def check(**body) -> str | None:
        return check_limits(RecommendBody(user_id=1, **body).request(), **limits)

    assert check(candidates=[1, 2, 3]) is None
    assert "at most 3" in check(candidates=[1, 2, 3, 4])
    assert check(candidates=[CandidateIn(item_id="n", text="abcdef")]) == "candidates[0].text: 6 characters; at most 5"
    blank = check(candidates=[1], context=" \t\u200b")
    assert blank.startswith("context: ") and "holds no words" in blank
    assert "appears more than once" in check(candidates=[2, "2"])
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        RecommendBody(user_id=1, candidates=[1], colour="red")
    with pytest.raises(ValueError, match="finite"):
        RecommendBody(user_id=1, candidates=[CandidateIn(item_id=1, features={"x": float("nan")})])
