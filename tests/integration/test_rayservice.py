"""The RayService's own ``serveConfigV2`` (k8s/base/rayservice.serve.yaml) starts on a real local Ray.

The applications block is deployed as written, through Ray Serve's declarative config path (the one
KubeRay drives through the dashboard: ``ServeDeploySchema`` -> the Serve controller's ``apply_config``,
which imports the ``import_path`` and builds the app from ``args``), with only what points into the
Kubernetes pod made local: the bundle path, the Prometheus URL, the controller's state path, and the
bearer token the pod takes from a Secret (here the application's runtime environment). Every
deployment must come up healthy and ``/v1/recommend`` answer; the policy and autoscaling the manifest
asks for must be the ones in force."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from polling import call_json, wait_until

pytestmark = pytest.mark.timeout(300)

MANIFEST = Path(__file__).resolve().parents[2] / "k8s" / "base" / "rayservice.serve.yaml"
TOKEN = "rayservice-test-token"


def manifest_applications() -> list[dict]:
    """The applications of the RayService's ``serveConfigV2``, as the manifest writes them."""
    (doc,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d.get("kind") == "RayService"]
    return yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]


def made_local(app: dict, bundle: Path, prometheus_url: str, state_dir: Path) -> dict:
    """``app`` with the paths and URL that point into the pod pointing here instead, and the pod's
    token (a Secret in the pod's environment) in the application's runtime environment."""
    args = app["args"]
    for key in ("bundle", "prometheus_url", "state_path"):
        assert key in args, f"{MANIFEST}: serveConfigV2 args have no {key!r}; this test rewrites it"
    local = {
        **app,
        "args": {
            **args,
            "bundle": str(bundle),
            "prometheus_url": prometheus_url,
            "state_path": str(state_dir / Path(args["state_path"]).name),
        },
    }
    if args.get("auth_token_env"):
        runtime_env = dict(app.get("runtime_env") or {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), args["auth_token_env"]: TOKEN}
        local["runtime_env"] = runtime_env
    return local


@pytest.fixture(scope="module")
def rayservice(ray_cluster, serve_http, serve_bundle, prometheus_server, tmp_path_factory):
    import ray.serve
    from ray.serve.context import _get_global_client  # the Serve controller's client (no public getter)
    from ray.serve.schema import ServeDeploySchema

    bundle, data = serve_bundle
    (app,) = manifest_applications()
    local = made_local(app, bundle, prometheus_server.url, tmp_path_factory.mktemp("rayservice"))
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[local]))
    try:
        items = pq.read_table(data / "items.parquet", columns=["item_id"]).column("item_id").to_pylist()
        yield {"app": app, "url": serve_http + app["route_prefix"].rstrip("/"), "items": items}
    finally:
        ray.serve.delete(app["name"])


def call(url: str, body: dict | None = None, token: str | None = TOKEN) -> tuple[int, dict]:
    return call_json(url, "POST" if body else "GET", body, token=token, timeout=30)


def test_every_deployment_of_the_manifest_comes_up_healthy_and_serves(rayservice):
    import ray.serve
    from ray.serve.context import _get_global_client

    app = rayservice["app"]
    expected = {d["name"] for d in app["deployments"]}

    def running():
        status = ray.serve.status().applications.get(app["name"])
        if status is None or status.status == "DEPLOY_FAILED":
            raise AssertionError(f"application {app['name']!r}: {status}")  # fail at once, with Serve's message
        healthy = {name for name, d in status.deployments.items() if d.status == "HEALTHY"}
        return status.status == "RUNNING" and healthy == set(status.deployments) and status

    status = wait_until(running, 120, f"application {app['name']!r} of {MANIFEST.name} to run")
    assert set(status.deployments) == expected, status.deployments

    # the deployments' settings are the manifest's (its autoscaling overrides the app's defaults)
    details = _get_global_client().get_serve_details()["applications"][app["name"]]["deployments"]
    for d in app["deployments"]:
        config = details[d["name"]]["deployment_config"]
        if "autoscaling_config" in d:
            for key, value in d["autoscaling_config"].items():
                assert config["autoscaling_config"][key] == value, (d["name"], key, config["autoscaling_config"])
        else:
            assert config["num_replicas"] == d["num_replicas"], (d["name"], config)

    url, ids = rayservice["url"], rayservice["items"][:20]
    status_code, out = call(url + "/v1/recommend", {"user_id": 7, "candidates": ids, "k": 5})
    assert status_code == 200 and len(out["items"]) == 5 and out["request_id"], out
    assert {it["item_id"] for it in out["items"]} <= set(ids)
    status_code, _ = call(url + "/v1/recommend", {"user_id": 7, "candidates": ids, "k": 5}, token=None)
    assert status_code == 401  # the manifest's bearer token is in force

    # the controller runs the manifest's policy: a permanent holdout of the manifest's share
    status_code, weights = call(url + "/v1/weights")
    params = app["args"]["policy_params"]
    assert status_code == 200 and weights["policy"] == app["args"]["policy"], weights
    assert weights["traffic"]["holdout"] == pytest.approx(params["holdout"]) and weights["main"] in weights["traffic"]
