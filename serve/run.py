"""``mtrec serve``: run the app locally, or write its Serve config.

::

    mtrec serve --bundle RUN/bundle [--port 8000] [--host 127.0.0.1] [--prometheus URL] [--policy NAME]
                [--address ADDR]
    mtrec serve config --bundle B [--out FILE] [--rayservice] [--name mtrec] [--port 8000] [--host H]
                [--prometheus URL] [--policy NAME] [--state-path P] [--autoscale Embedder.max_replicas=4 ...]
                [--auth-token-env VAR]

The first starts an embedded Ray on 127.0.0.1 (or joins ``--address``), deploys the app and blocks
until Ctrl-C or SIGTERM, then shuts Serve (and the Ray it started) down. The second writes the
config YAML for ``serve deploy``; with ``--rayservice`` only the ``applications:`` block, as a
KubeRay RayService's ``serveConfigV2`` wants it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import yaml

from mtrec.errors import ConfigError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="the bundle directory training wrote (RUN/bundle)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--prometheus", default=None, help="Prometheus URL the controller reads (default: scrape Ray)")
    p.add_argument("--policy", default="static", help="weight-control policy (static, proportional, target, bandit)")
    p.add_argument(
        "--heads-in-ingress",
        action="store_true",
        help="run the task heads inside the Ingress (no TaskHeads deployment: one hop less; small CPU models)",
    )


def _autoscale(items: list[str]) -> dict[str, dict]:
    """``["Embedder.max_replicas=4"]`` -> ``{"Embedder": {"max_replicas": 4}}``."""
    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        name, dot, field = key.partition(".")
        if not eq or not dot:
            raise ConfigError(f"--autoscale {item!r}: expected DEPLOYMENT.KEY=VALUE, e.g. Embedder.max_replicas=4")
        out.setdefault(name, {})[field] = yaml.safe_load(value)
    return out


def write_config(argv: list[str]) -> int:
    from mtrec_serve.config import serve_config

    p = argparse.ArgumentParser(prog="mtrec serve config", description="write the app's Serve config YAML")
    _common(p)
    p.add_argument("--out", default=None, help="file to write (default: stdout)")
    p.add_argument("--rayservice", action="store_true", help="only the applications block (RayService serveConfigV2)")
    p.add_argument("--name", default="mtrec")
    p.add_argument("--state-path", default=None, help="where the controller persists its state")
    p.add_argument("--autoscale", action="append", default=[], metavar="DEPLOYMENT.KEY=VALUE")
    p.add_argument("--auth-token-env", default=None, help="env var holding the bearer token of /v1/* (default: none)")
    args = p.parse_args(argv)
    doc = serve_config(
        args.bundle,
        name=args.name,
        host=args.host,
        port=args.port,
        prometheus_url=args.prometheus,
        policy=args.policy,
        state_path=args.state_path,
        autoscaling=_autoscale(args.autoscale),
        auth_token_env=args.auth_token_env,
        heads_in_ingress=args.heads_in_ingress,
    )
    text = yaml.safe_dump({"applications": doc["applications"]} if args.rayservice else doc, sort_keys=False)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mtrec serve", description="serve a bundle with Ray Serve until Ctrl-C")
    _common(p)
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    args = p.parse_args(argv)
    from mtrec_cluster.ray_env import ensure_ray, free_port

    started = ensure_ray(args.address, metrics_export_port=None if args.address else free_port())
    import ray
    import ray.serve

    from mtrec_serve.app import build_app

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        ray.serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(
            {
                "bundle": args.bundle,
                "prometheus_url": args.prometheus,
                "policy": args.policy,
                "heads_in_ingress": args.heads_in_ingress,
            }
        )
        ray.serve.run(app, name="mtrec", route_prefix="/")
        print(f"serving {args.bundle} on http://{args.host}:{args.port} (docs: /docs); Ctrl-C stops", flush=True)
        stop.wait()
    finally:
        ray.serve.shutdown()
        if started:
            ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "config":
        return write_config(argv[1:])
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
