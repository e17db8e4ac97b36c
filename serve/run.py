"""``mtrec serve``: run the app locally, or write its Serve config.

::

    mtrec serve --bundle RUN/bundle [--port 8000] [--host 127.0.0.1] [--prometheus URL] [--policy NAME]
                [--policy-param KEY=VALUE ...] [--autoscale TaskHeads.max_replicas=8 ...] [--address ADDR]
    mtrec serve config --bundle B [--out FILE] [--rayservice] [--name mtrec] [--port 8000] [--host H]
                [--prometheus URL] [--policy NAME] [--policy-param KEY=VALUE ...] [--state-path P]
                [--autoscale Embedder.max_replicas=4 ...] [--auth-token-env VAR]

The first starts an embedded Ray on 127.0.0.1 (or joins ``--address``), deploys the app, prints a line
whenever a deployment's running replicas change, and blocks until Ctrl-C or SIGTERM, then shuts Serve
(and the Ray it started) down. The second writes the
config YAML for ``serve deploy``; with ``--rayservice`` only the ``applications:`` block, as a
KubeRay RayService's ``serveConfigV2`` wants it. Both check the policy and its parameters first
(against the bundle's tasks when the bundle is on this machine), before anything starts.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from mtrec.cli_help import HelpFormatter
from mtrec.errors import ConfigError
from mtrec.fusion import POLICIES, check_policy, policy_class
from mtrec.io import atomic_write_text

APP = "mtrec"  # the Serve application's name


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="the bundle directory training wrote (RUN/bundle)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of Serve's proxy")
    p.add_argument("--host", default="127.0.0.1", help="address Serve's proxy binds (0.0.0.0: every interface)")
    p.add_argument("--prometheus", default=None, help="Prometheus URL the controller reads (default: scrape Ray)")
    p.add_argument("--policy", default="static", help=f"weight-control policy ({', '.join(POLICIES)})")
    p.add_argument(
        "--policy-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter of the policy, VALUE in YAML, e.g. targets='{purchase: 0.05}' (target policy)",
    )
    p.add_argument(
        "--heads-in-ingress",
        action="store_true",
        help="run the task heads inside the Ingress (no TaskHeads deployment: one hop less; small CPU models)",
    )
    p.add_argument(
        "--autoscale",
        action="append",
        default=[],
        metavar="DEPLOYMENT.KEY=VALUE",
        help="an autoscaling_config field of Embedder or TaskHeads, e.g. TaskHeads.max_replicas=8 (repeatable; "
        "defaults: README, Autoscaling)",
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


def _policy_params(items: list[str]) -> dict[str, Any]:
    """``["gain=2"]`` -> ``{"gain": 2}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--policy-param {item!r}: expected KEY=VALUE, e.g. targets='{{purchase: 0.05}}'")
        out[key] = yaml.safe_load(value)
    return out


def _check_policy(args: argparse.Namespace) -> dict[str, Any]:
    """The policy parameters, once the weight controller would accept them (for the bundle's tasks when
    the bundle is here: one for a remote cluster may live on a volume this machine lacks)."""
    params = _policy_params(args.policy_param)
    policy_class(args.policy, params)  # a bad name fails here, before the bundle is read
    tasks = None
    if Path(args.bundle).is_dir():
        from mtrec.bundle import read_description  # imports torch: only once the names are known good

        tasks = read_description(Path(args.bundle))[1].tasks
    check_policy(args.policy, params, tasks)
    return params


def write_serve_config(argv: list[str]) -> int:
    """``mtrec serve config``: write the Serve config YAML of the app (or print it)."""
    from mtrec_serve.config import serve_config

    p = argparse.ArgumentParser(
        prog="mtrec serve config",
        description="write the app's Serve config YAML, for `serve deploy FILE` on a running Ray cluster",
        formatter_class=HelpFormatter,
    )
    _common(p)
    p.add_argument("--out", default=None, help="file to write (default: stdout)")
    p.add_argument("--rayservice", action="store_true", help="only the applications block (RayService serveConfigV2)")
    p.add_argument("--name", default=APP, help="the application's name")
    p.add_argument("--state-path", default=None, help="where the controller persists its state")
    p.add_argument("--auth-token-env", default=None, help="env var holding the bearer token of /v1/* (default: none)")
    args = p.parse_args(argv)
    doc = serve_config(
        args.bundle,
        name=args.name,
        host=args.host,
        port=args.port,
        prometheus_url=args.prometheus,
        policy=args.policy,
        policy_params=_check_policy(args),
        state_path=args.state_path,
        autoscaling=_autoscale(args.autoscale),
        auth_token_env=args.auth_token_env,
        heads_in_ingress=args.heads_in_ingress,
    )
    text = yaml.safe_dump({"applications": doc["applications"]} if args.rayservice else doc, sort_keys=False)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def run(argv: list[str]) -> int:
    """``mtrec serve``: deploy the app on a local Ray (or ``--address``) until Ctrl-C or SIGTERM."""
    p = argparse.ArgumentParser(
        prog="mtrec serve",
        description="serve a bundle with Ray Serve until Ctrl-C",
        epilog="`mtrec serve config` writes the Serve config YAML instead (with --autoscale), for `serve deploy` "
        "on a running cluster: see `mtrec serve config --help`",
        formatter_class=HelpFormatter,
    )
    _common(p)
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    args = p.parse_args(argv)
    if not Path(args.bundle).is_dir():
        raise ConfigError(f"--bundle {args.bundle}: not a directory (training writes RUN/bundle)")
    overrides = _autoscale(args.autoscale)
    params = _check_policy(args)  # before anything imports Ray: a bad policy name fails in a second
    from mtrec_serve.config import autoscaling_blocks

    blocks = autoscaling_blocks(overrides, args.heads_in_ingress)  # every check before anything starts
    from mtrec_cluster.ray_env import local_ray

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with local_ray(args.address, export_metrics=True):
        import ray.serve

        from mtrec_serve.app import app_args, graph
        from mtrec_serve.replicas import ReplicaWatch

        try:
            ray.serve.start(http_options={"host": args.host, "port": args.port})
            app = graph(
                app_args(
                    {
                        "bundle": args.bundle,
                        "prometheus_url": args.prometheus,
                        "policy": args.policy,
                        "policy_params": params,
                        "heads_in_ingress": args.heads_in_ingress,
                    }
                ),
                {name: {"autoscaling_config": block} for name, block in blocks.items()},
            )
            ray.serve.run(app, name=APP, route_prefix="/")
            print(f"serving {args.bundle} on http://{args.host}:{args.port} (docs: /docs); Ctrl-C stops", flush=True)
            # autoscaling as it happens: a line per change of a deployment's running replicas
            with ReplicaWatch(APP, lambda line: print(f"[serve] {line}", flush=True), period_s=2.0):
                stop.wait()
        finally:
            ray.serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "config":
        return write_serve_config(argv[1:])
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
