"""``mtrec_serve.app:build_app``: the serving graph of a bundle, the ``import_path`` of every Serve config.

::

    HTTP -> Ingress (FastAPI) --> Embedder         texts the bundle lacks -> vectors (batched, LRU cache)
                             \\-> TaskHeads        prepared requests -> per-task predictions (batched;
                                                  with ``heads_in_ingress``, inside the Ingress instead)
                             \\-> WeightController fusion weights per arm, moved by live feedback

``build_app(args)`` validates ``args`` as :class:`AppArgs` and loads the bundle once, as the
replicas will (:func:`mtrec.bundle.load_bundle`): a missing, corrupt or incompatible bundle is a
BundleError naming the file before anything is deployed, so a bad bundle offered to a running app
(``mtrec_serve.run``, ``serve deploy``, a RayService update: each calls this builder first) never replaces
it. Embedder and TaskHeads autoscale with the defaults of :data:`mtrec_serve.config.AUTOSCALING` (a Serve
config's ``deployments`` override them). The controller reads feedback from Prometheus when
``prometheus_url`` is given, else by scraping Ray's metrics endpoint (``metrics_url``, or the head
node's export port when Ray runs here).

Every metric the app emits carries its deployment id (``deployment_id``; default: derived from the
Kubernetes namespace and the Serve application name, :func:`mtrec_serve.metrics.deployment_id`), the
controller reads only that deployment's series and keeps its state in a file of its own
(:func:`mtrec_serve.controller.state_file`): deployments sharing a Prometheus or a volume stay apart.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray
import ray.serve
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mtrec.bundle import load_bundle
from mtrec.errors import ConfigError
from mtrec_serve.config import AUTOSCALING
from mtrec_serve.metrics import DEPLOYMENT_ID
from mtrec_serve.sources import DEFAULT_SCRAPE_INTERVAL_S

logger = logging.getLogger("ray.serve")


class AppArgs(BaseModel):
    """The application's arguments (the ``args`` of its Serve config)."""

    model_config = ConfigDict(extra="forbid")

    bundle: str  # the bundle directory training wrote (RUN/bundle)
    prometheus_url: str | None = None  # e.g. http://127.0.0.1:9090; None: scrape Ray's metrics endpoint
    metrics_url: str | None = None  # Ray's metrics endpoint to scrape (default: the head's export port)
    # Prometheus's scrape interval of Ray's metrics targets: a sample older than twice this is stale
    scrape_interval_s: float = Field(default=DEFAULT_SCRAPE_INTERVAL_S, gt=0)
    # the label on every metric, the filter of every query and the state file's suffix; None: derived
    # from the Kubernetes namespace and the Serve application name (mtrec_serve.metrics.deployment_id)
    deployment_id: str | None = Field(default=None, pattern=f"^{DEPLOYMENT_ID.pattern}$")
    policy: str = "static"  # a name of mtrec.fusion.POLICIES
    policy_params: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, float] = Field(default_factory=dict)  # mtrec.fusion.Limits fields
    # where the controller persists its state, with the deployment id before the suffix (None: not persisted)
    state_path: str | None = None
    period_s: float = Field(default=10.0, gt=0)  # seconds between controller updates
    window_s: float = Field(default=60.0, gt=0)  # metrics window the controller reads
    max_candidates: int = Field(default=500, ge=1, le=10_000)
    max_text_chars: int = Field(default=2000, ge=1, le=100_000)
    max_body_bytes: int = Field(default=2**21, ge=1024)
    cache_size: int = Field(default=10_000, ge=0)  # texts in the Embedder's LRU
    auth_token_env: str | None = None  # env var holding the bearer token of /v1/* (None: no auth)
    feedback_ttl_s: float = Field(default=3600.0, gt=0)  # how long a request accepts feedback
    max_served_requests: int = Field(default=100_000, ge=1)  # requests the feedback ledger remembers
    # the task heads inside the Ingress replica: no TaskHeads deployment, no second hop per request
    # (small CPU models, where that hop costs more than the forward); default: the autoscaled TaskHeads
    heads_in_ingress: bool = False

    @model_validator(mode="after")
    def _window_holds_fresh_samples(self) -> AppArgs:
        if self.prometheus_url and self.window_s < 2 * self.scrape_interval_s:
            raise ValueError(
                f"window_s={self.window_s:g} must be at least twice scrape_interval_s={self.scrape_interval_s:g}, "
                "so that a fresh sample falls in the window the controller reads"
            )
        return self


def build_app(args: dict[str, Any]) -> ray.serve.Application:
    """The application for ``args`` (see :class:`AppArgs`); ConfigError naming a bad field."""
    return graph(app_args(args))


def app_args(args: dict[str, Any]) -> AppArgs:
    """``args`` checked as :class:`AppArgs`; ConfigError naming a bad field."""
    try:
        return AppArgs.model_validate(args)
    except ValidationError as e:
        raise ConfigError(f"mtrec_serve.app args: {e}") from e


def graph(args: AppArgs, options: dict[str, dict[str, Any]] | None = None) -> ray.serve.Application:
    """The bound deployments. ``options``: deployment name -> ``.options(...)`` overrides (tests pin
    replica counts and give the Ingress its token's environment this way)."""
    from mtrec_serve.controller import WeightController
    from mtrec_serve.deployments import Embedder, TaskHeads
    from mtrec_serve.ingress import Ingress

    if not Path(args.bundle).is_dir():
        raise ConfigError(f"bundle: {args.bundle} is not a directory")
    # Every check the replicas will run (checksums, version, weight shapes), before Serve sees the app:
    # a bad bundle raises here, so a redeploy never replaces a serving app with one that cannot start.
    bundle = load_bundle(args.bundle)
    tasks = bundle.meta.tasks
    options = options or {}
    unknown = sorted(set(options) - {"Ingress", "Embedder", "TaskHeads", "WeightController"})
    if unknown:
        raise ConfigError(f"options for unknown deployment(s) {unknown}")
    opts = lambda name: {  # noqa: E731
        **({"autoscaling_config": AUTOSCALING[name]} if name in AUTOSCALING else {}),
        **options.get(name, {}),
    }
    embedder = Embedder.options(**opts("Embedder")).bind(args.bundle, args.cache_size)
    if args.heads_in_ingress and "TaskHeads" in options:
        raise ConfigError("options for TaskHeads, but heads_in_ingress runs the heads in the Ingress")
    heads = None if args.heads_in_ingress else TaskHeads.options(**opts("TaskHeads")).bind(args.bundle)
    controller = WeightController.options(**opts("WeightController")).bind(
        tasks=[t.name for t in tasks],
        weights={t.name: t.fusion_weight for t in tasks},
        policy=args.policy,
        policy_params=args.policy_params,
        limits=args.limits,
        source=_source(args),
        state_path=args.state_path,
        period_s=args.period_s,
        window_s=args.window_s,
        deployment_id=args.deployment_id,
        scales=dict(bundle.fusion_scales),  # the calibrated policy's (the Ingress divides by the same)
    )
    return Ingress.options(**opts("Ingress")).bind(embedder, heads, controller, args.model_dump())


def _source(args: AppArgs) -> dict[str, Any] | None:
    """The controller's metrics source: Prometheus, else a direct scrape of Ray's metrics endpoint."""
    if args.prometheus_url:
        return {"kind": "prometheus", "url": args.prometheus_url, "scrape_interval_s": args.scrape_interval_s}
    url = args.metrics_url or _head_metrics_url()
    if url is None:
        logger.warning("mtrec_serve.app: no Prometheus and no Ray metrics endpoint found: the weights will hold")
        return None
    return {"kind": "scrape", "url": url}


def _head_metrics_url() -> str | None:
    """``http://HEAD:PORT/metrics`` of the running Ray's head node (a direct scrape sees that node only)."""
    if not ray.is_initialized():
        return None
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if node.get("Alive") and port and "node:__internal_head__" in node.get("Resources", {}):
            return f"http://{node['NodeManagerAddress']}:{port}/metrics"
    return None
