"""The Serve config document of the app: for ``serve deploy``, a RayService's ``serveConfigV2`` and the demo.

:func:`serve_config` returns the whole document (``proxy_location``, ``http_options``,
``applications``), checked by Ray's own ``ServeDeploySchema``. Ray accepts unknown deployment keys and
``min_replicas > max_replicas`` silently, so every autoscaling block is also built as a
``ray.serve.config.AutoscalingConfig`` and every deployment key checked against the schema's fields.
:data:`AUTOSCALING` holds the defaults, which ``mtrec_serve.app`` applies too (one source of truth).
"""

from __future__ import annotations

import copy
from typing import Any

from mtrec.errors import ConfigError, check_names

IMPORT_PATH = "mtrec_serve.app:build_app"
DEPLOYMENTS = ("Ingress", "Embedder", "TaskHeads", "WeightController")

# Embedder and TaskHeads scale with load; the Ingress holds the per-replica feedback ledger (see
# mtrec_serve.app) and the WeightController is one actor by design, so both stay at one replica.
# The RayService (k8s/base/rayservice.serve.yaml) carries the same blocks (a unit test holds them equal).
# target_ongoing_requests from `python -m bench autoscale`'s one-replica knee (bench/results/autoscale.json):
# with cold texts (3 per request) an Embedder replica gives about 85 % of its best throughput at 4 requests
# in flight and mostly queues beyond; with catalog items only, the path through TaskHeads is within 10 % of
# its best at 4 to 8 (README, Autoscaling).
AUTOSCALING: dict[str, dict[str, Any]] = {
    "Embedder": {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 4,
        "upscale_delay_s": 5,
        "downscale_delay_s": 60,
    },
    "TaskHeads": {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 8,
        "upscale_delay_s": 5,
        "downscale_delay_s": 60,
    },
}


def autoscaling_blocks(
    overrides: dict[str, dict[str, Any]] | None = None, heads_in_ingress: bool = False
) -> dict[str, dict[str, Any]]:
    """:data:`AUTOSCALING` with ``overrides`` (deployment -> keys) merged in, each block validated;
    without TaskHeads when ``heads_in_ingress`` (the heads run in the Ingress).

    ConfigError naming the deployment and the problem: an unknown deployment, an unknown key, values
    Ray's ``AutoscalingConfig`` refuses (or ``min_replicas > max_replicas``), or TaskHeads overridden
    when there is no TaskHeads deployment.
    """
    if heads_in_ingress and "TaskHeads" in (overrides or {}):
        raise ConfigError("autoscaling.TaskHeads: with heads_in_ingress there is no TaskHeads deployment")
    from ray.serve.config import AutoscalingConfig

    out = copy.deepcopy(AUTOSCALING)
    if heads_in_ingress:
        del out["TaskHeads"]
    for name, block in (overrides or {}).items():
        if name not in out:
            raise ConfigError(f"autoscaling: {name!r} does not autoscale; valid deployments: {', '.join(out)}")
        if not isinstance(block, dict):
            raise ConfigError(f"autoscaling.{name}: expected a mapping, got {block!r}")
        out[name].update(block)
    valid = sorted(AutoscalingConfig.model_fields)
    for name, block in out.items():
        check_names(f"autoscaling.{name}", block, valid, noun="key")
        try:
            AutoscalingConfig(**block)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"autoscaling.{name}: {e}") from e
        if block["min_replicas"] > block["max_replicas"]:
            raise ConfigError(
                f"autoscaling.{name}: min_replicas={block['min_replicas']} > max_replicas={block['max_replicas']}"
            )
    return out


def serve_config(
    bundle: str,
    *,
    name: str = "mtrec",
    route_prefix: str = "/",
    host: str = "127.0.0.1",
    port: int = 8000,
    prometheus_url: str | None = None,
    policy: str = "static",
    policy_params: dict[str, Any] | None = None,
    state_path: str | None = None,
    autoscaling: dict[str, dict] | None = None,
    runtime_env: dict | None = None,
    auth_token_env: str | None = None,
    heads_in_ingress: bool = False,
) -> dict[str, Any]:
    """The Serve config document of the app serving ``bundle`` (see the module docstring).

    ``prometheus_url`` None: the controller scrapes Ray's metrics endpoint directly (one node; use
    Prometheus on a cluster). ``policy_params``: the policy's parameters (:func:`mtrec.fusion.build_policy`).
    ``autoscaling``: overrides of :data:`AUTOSCALING` per deployment.
    ``auth_token_env``: the environment variable holding the bearer token of ``/v1/*`` (None: no auth).
    ``heads_in_ingress``: the heads run inside the Ingress (no TaskHeads deployment; see ``AppArgs``).
    """
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    args: dict[str, Any] = {"bundle": bundle, "policy": policy}
    if policy_params:
        args["policy_params"] = dict(policy_params)
    if prometheus_url:
        args["prometheus_url"] = prometheus_url
    if state_path:
        args["state_path"] = state_path
    if auth_token_env:
        args["auth_token_env"] = auth_token_env
    if heads_in_ingress:
        args["heads_in_ingress"] = True
    blocks = autoscaling_blocks(autoscaling, heads_in_ingress)
    deployments = [{"name": "Ingress", "num_replicas": 1}]
    deployments += [{"name": d, "autoscaling_config": block} for d, block in blocks.items()]
    deployments.append({"name": "WeightController", "num_replicas": 1})
    valid = sorted(DeploymentSchema.model_fields)
    for d in deployments:
        check_names(f"deployment {d['name']}", d, valid, noun="key")
    app: dict[str, Any] = {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": IMPORT_PATH,
        "args": args,
        "deployments": deployments,
    }
    if runtime_env:
        app["runtime_env"] = runtime_env
    doc = {"proxy_location": "HeadOnly", "http_options": {"host": host, "port": port}, "applications": [app]}
    try:
        ServeDeploySchema(**doc)
    except ValueError as e:
        raise ConfigError(f"the Serve config does not validate: {e}") from e
    return doc
