"""``mtrec cluster up|down|status``: a local multi-process Ray cluster (and a Prometheus) that outlives the command.

``up`` starts a Ray head (``ray start --head --block``), optional extra worker nodes on the same host
(``ray start --address``) and, when the Debian binary is there, a Prometheus scraping every node
(:mod:`mtrec_cluster.prometheus`, fed by the head's service-discovery file). What it started — pids, ports,
addresses — goes to a state file (``~/.cache/mtrec/cluster/cluster.json``, or ``--state-dir``), so
``down`` stops exactly those processes and ``status`` reports them. Nothing here calls ``ray stop``,
which would stop every Ray on the host, other users' included.

Each node runs in its own session (``start_new_session``): ``down`` sends SIGTERM to the node's
``ray start --block`` process, which drains the node and stops its processes, then SIGKILLs any
process still in that session after a grace period. The cluster has its own temp dir, so its
``ray_current_cluster`` and service-discovery files are its own. A single-node cluster keeps every
listener on 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``); Ray refuses extra worker nodes in that
mode, so ``--workers`` switches to multi-node mode, where the GCS and raylets listen on all interfaces
(the dashboard stays on 127.0.0.1; token authentication guards the rest).

Token authentication stays on (Ray 2.60's default once a token exists): ``up`` makes sure a token exists
(``ray get-auth-token --generate``: ``~/.ray/auth_token`` unless ``RAY_AUTH_TOKEN`` /
``RAY_AUTH_TOKEN_PATH`` say otherwise). ``mtrec submit`` sends it by itself; Ray's own CLI needs
``RAY_AUTH_MODE=token`` in the environment to send it. ``RAY_AUTH_MODE=disabled`` is honoured, with a warning.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mtrec.cli_help import HelpFormatter
from mtrec.errors import MtrecError
from mtrec.io import atomic_write_text
from mtrec_cluster.prometheus import (
    free_port,
    service_discovery_file,
    start_prometheus,
    stop_prometheus,
    write_prometheus_config,
)
from mtrec_cluster.ray_env import CLUSTER_FLAG, LOCAL_ENV

STATE_FILE = "cluster.json"
DEFAULT_PORTS = {  # Ray's own defaults; --free-ports picks free ones instead (shared hosts, tests)
    "gcs": 6379,
    "dashboard": 8265,
    "metrics": 8080,
    "client": 10001,
    "dashboard_agent": 52365,
    "autoscaler_metrics": 44217,
    "dashboard_metrics": 44227,
}


def default_state_dir() -> Path:
    return Path(os.environ.get("MTREC_CLUSTER_DIR", "~/.cache/mtrec/cluster")).expanduser()


def token_headers() -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` when a Ray token is found (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``), else ``{}``. A cluster with auth disabled ignores it."""
    # Read here, in the order Ray looks: Ray's own loader is a process-wide singleton that, once it holds a
    # token, makes this process's Ray RPCs carry it, which breaks a later Ray started without auth.
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


# ------------------------------------------------------------------------------ processes


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state, ppid, pgrp, session, ...), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def session_members(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes of session ``sid``: a node's processes, however deep.
    A session id cannot be reused while any of its processes lives, so this never names a stranger."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and fields[0] != "Z" and fields[3] == str(sid):
                members.append(int(entry.name))
    return members


def stop_session(sid: int, grace_s: float = 30.0) -> int:
    """Stop the node whose ``ray start --block`` process is ``sid``: SIGTERM to it (it drains the node and
    stops what it started), then SIGKILL to whatever of the session is left after ``grace_s``.
    Returns the number of processes that had to be killed."""
    if sid in session_members(sid):
        os.kill(sid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and session_members(sid):
        time.sleep(0.2)
    left = session_members(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously: return once they are gone
    while time.monotonic() < deadline and session_members(sid):
        time.sleep(0.05)
    return len(left)


def _ray_exe() -> str:
    sibling = Path(sys.executable).parent / "ray"  # the ray of this interpreter's environment first
    exe = str(sibling) if sibling.exists() else shutil.which("ray")
    if not exe:
        raise MtrecError("the `ray` command is not installed in this environment (pip install 'ray[default]')")
    return exe


def _node_env(auth_mode: str, ports: dict[str, int], multi_node: bool) -> dict[str, str]:
    # A SIGTERMed node first drains (up to 30 s by default) so that Serve can move replicas to other hosts;
    # on one host there is nowhere to move them, and an idle job supervisor would hold the drain to the end.
    env = {**LOCAL_ENV, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5", **os.environ, "RAY_AUTH_MODE": auth_mode}
    env[CLUSTER_FLAG] = "1" if multi_node else "0"
    env["AUTOSCALER_METRIC_PORT"] = str(ports["autoscaler_metrics"])
    env["DASHBOARD_METRIC_PORT"] = str(ports["dashboard_metrics"])
    return env


def _auth_mode() -> str:
    mode = os.environ.get("RAY_AUTH_MODE", "token").lower()
    if mode == "token":
        subprocess.run([_ray_exe(), "get-auth-token", "--generate"], check=True, capture_output=True)
    else:
        print(
            f"warning: RAY_AUTH_MODE={mode}: anyone who reaches the cluster's ports can run code on it",
            file=sys.stderr,
        )
    return mode


def _http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        req = urllib.request.Request(url, headers=token_headers())
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _alive_nodes(dashboard: str) -> int:
    req = urllib.request.Request(f"{dashboard}/api/v0/nodes?limit=1000&detail=false", headers=token_headers())
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            nodes = json.load(r)["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return 0
    return sum(1 for n in nodes if n.get("state") == "ALIVE")


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {path})"


# ------------------------------------------------------------------------------ state


def read_state(state_dir: str | Path | None = None) -> dict[str, Any] | None:
    path = Path(state_dir or default_state_dir()) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise MtrecError(f"{path}: not a cluster state file ({e}); remove it once its processes are stopped") from e


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_text(state_dir / STATE_FILE, json.dumps(state, indent=2))  # a reader sees the old or the new


def _start_node(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def up(
    state_dir: str | Path | None = None,
    *,
    num_cpus: int = 2,
    workers: int = 0,
    worker_cpus: int = 1,
    free_ports: bool = False,
    ports: dict[str, int] | None = None,
    prometheus: bool = True,
    prometheus_port: int | None = None,
    object_store_mb: int = 256,
    timeout_s: float = 180.0,
) -> dict[str, Any]:
    """Start the cluster; returns the state written to ``STATE_DIR/cluster.json``.

    MtrecError when a cluster recorded there is still running, or a node is not up within ``timeout_s``
    (whatever was started is stopped again; the message carries the end of the node's log).
    """
    state_dir = Path(state_dir or default_state_dir()).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    old = read_state(state_dir)
    if old and any(session_members(n["pid"]) for n in old["nodes"]):
        raise MtrecError(f"a cluster recorded in {state_dir / STATE_FILE} is running: `mtrec cluster down` first")
    p = {k: (free_port() if free_ports else v) for k, v in DEFAULT_PORTS.items()}
    p.update(ports or {})
    auth = _auth_mode()
    multi_node = workers > 0
    if multi_node:
        print(
            "warning: extra worker nodes need Ray's multi-node mode, where the GCS and raylets listen on all "
            f"interfaces of this host (auth: {auth}); without --workers every port stays on 127.0.0.1",
            file=sys.stderr,
        )
    env = _node_env(auth, p, multi_node)
    temp_dir = Path(f"/tmp/ray-mtrec-{p['gcs']}")  # short: Ray's socket paths must stay under 107 bytes
    dashboard = f"http://127.0.0.1:{p['dashboard']}"
    state: dict[str, Any] = {
        "created_at": time.time(),
        "auth_mode": auth,
        "gcs_address": f"127.0.0.1:{p['gcs']}",  # the node's own address in multi-node mode (read below)
        "dashboard_url": dashboard,
        "metrics_url": f"http://127.0.0.1:{p['metrics']}/metrics",
        "client_address": f"ray://127.0.0.1:{p['client']}",
        "ports": p,
        "temp_dir": str(temp_dir),
        "nodes": [],
        "prometheus": None,
    }
    common = [
        "--block",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--object-store-memory={object_store_mb * 1024**2}",
    ]
    head_cmd = [_ray_exe(), "start", "--head", *common, f"--port={p['gcs']}", "--dashboard-host=127.0.0.1"]
    head_cmd += [f"--dashboard-port={p['dashboard']}", f"--metrics-export-port={p['metrics']}"]
    head_cmd += [f"--ray-client-server-port={p['client']}", f"--dashboard-agent-listen-port={p['dashboard_agent']}"]
    head_cmd += [f"--num-cpus={num_cpus}"]
    address_file = temp_dir / "ray_current_cluster"  # written last by `ray start`: the node is fully up
    address_file.unlink(missing_ok=True)  # a previous cluster's, on the same port
    try:
        log = state_dir / "head.log"
        proc = _start_node(head_cmd, env, log)
        state["nodes"].append({"role": "head", "pid": proc.pid, "metrics_port": p["metrics"], "log": str(log)})
        _write_state(state_dir, state)  # recorded before waiting: `down` can stop a head that never came up
        _wait(lambda: address_file.exists() and _http_ok(f"{dashboard}/api/version"), proc, log, timeout_s, "head")
        state["gcs_address"] = address_file.read_text().strip()
        state["session_dir"] = str((temp_dir / "session_latest").resolve())
        _write_state(state_dir, state)
        for i in range(workers):
            log = state_dir / f"worker-{i}.log"
            metrics_port = free_port()
            cmd = [_ray_exe(), "start", f"--address={state['gcs_address']}", *common, f"--num-cpus={worker_cpus}"]
            cmd += [f"--metrics-export-port={metrics_port}", f"--dashboard-agent-listen-port={free_port()}"]
            proc = _start_node(cmd, env, log)
            state["nodes"].append({"role": "worker", "pid": proc.pid, "metrics_port": metrics_port, "log": str(log)})
            _write_state(state_dir, state)
            _wait(lambda n=i + 2: _alive_nodes(dashboard) >= n, proc, log, timeout_s, f"worker {i}")
        if prometheus and Path(os.environ.get("MTREC_PROMETHEUS", "/usr/bin/prometheus")).exists():
            sd_file = service_discovery_file(state["session_dir"])
            config = write_prometheus_config(state_dir / "prometheus.yml", sd_file=sd_file)
            server = start_prometheus(config, prometheus_port or (free_port() if free_ports else 9090))
            state["prometheus"] = {"pid": server.pid, "url": server.url, "config": str(config), "log": str(server.log)}
            _write_state(state_dir, state)
    except BaseException:
        down(state_dir)
        raise
    return state


def _wait(ready, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise MtrecError(f"Ray {what} exited with code {proc.returncode}; end of {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise MtrecError(f"Ray {what} not up after {timeout_s:.0f} s; end of {log}:\n{_tail(log)}")
        time.sleep(0.5)


def down(state_dir: str | Path | None = None, grace_s: float = 30.0) -> dict[str, Any] | None:
    """Stop what the state file records (Prometheus, workers, then the head) and remove the file.
    Returns the state it stopped, or None when no cluster was recorded."""
    state_dir = Path(state_dir or default_state_dir())
    state = read_state(state_dir)
    if state is None:
        return None
    if state.get("prometheus"):
        stop_prometheus(state["prometheus"]["pid"])
    for node in reversed(state["nodes"]):  # workers first: the head serves their GCS
        node["killed"] = stop_session(node["pid"], grace_s)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return state


def status(state_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The recorded state, with ``alive`` (process count per node), ``dashboard_ok``, ``alive_nodes``
    and ``prometheus_ok`` probed now; None when no cluster is recorded."""
    state = read_state(state_dir)
    if state is None:
        return None
    for node in state["nodes"]:
        node["processes"] = len(session_members(node["pid"]))
    state["dashboard_ok"] = _http_ok(f"{state['dashboard_url']}/api/version")
    state["alive_nodes"] = _alive_nodes(state["dashboard_url"]) if state["dashboard_ok"] else 0
    if state.get("prometheus"):
        state["prometheus"]["ok"] = _http_ok(f"{state['prometheus']['url']}/-/ready")
    return state


def healthy(state: dict[str, Any] | None) -> bool:
    if not state:
        return False
    prom_ok = state.get("prometheus") is None or state["prometheus"].get("ok", False)
    return state["dashboard_ok"] and state["alive_nodes"] == len(state["nodes"]) and prom_ok


def _describe(state: dict[str, Any]) -> str:
    lines = [
        f"dashboard  {state['dashboard_url']}   (jobs API: mtrec submit train --address {state['dashboard_url']} -- ...)",
        f"GCS        {state['gcs_address']}   (ray.init(address='{state['gcs_address']}'))",
        f"metrics    {state['metrics_url']}",
    ]
    if state.get("prometheus"):
        lines.append(f"prometheus {state['prometheus']['url']}   config {state['prometheus']['config']}")
    for n in state["nodes"]:
        extra = f", {n['processes']} processes" if "processes" in n else ""
        lines.append(f"{n['role']:<10} pid {n['pid']}, metrics :{n['metrics_port']}{extra}, log {n['log']}")
    if state["auth_mode"] == "token":
        lines.append(
            "auth       token (from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); mtrec submit sends it, "
            "Ray's CLI needs RAY_AUTH_MODE=token"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mtrec cluster", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--state-dir", default=None, help=f"where the state file lives (default {default_state_dir()})")
    sub = parser.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="start a local Ray head (+ workers, + Prometheus)", formatter_class=HelpFormatter)
    u.add_argument("--num-cpus", type=int, default=max(2, os.cpu_count() or 1), help="logical CPUs of the head")
    u.add_argument("--workers", type=int, default=0, help="extra worker nodes on this host")
    u.add_argument("--worker-cpus", type=int, default=1, help="logical CPUs of each worker node")
    u.add_argument("--free-ports", action="store_true", help="free ports instead of Ray's defaults (shared hosts)")
    for name, what in (
        ("port", "GCS port"),
        ("dashboard-port", "dashboard port"),
        ("metrics-export-port", "metrics port"),
    ):
        u.add_argument(
            f"--{name}",
            type=int,
            default=None,
            help=f"the head's {what} (default: Ray's; a free one with --free-ports)",
        )
    u.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus")
    u.add_argument("--prometheus-port", type=int, default=None, help="default 9090 (a free one with --free-ports)")
    d = sub.add_parser("down", help="stop what `up` started", formatter_class=HelpFormatter)
    d.add_argument("--grace", type=float, default=30.0, help="seconds a node may take to drain before SIGKILL")
    s = sub.add_parser("status", help="what runs; exit 1 when not up or unhealthy", formatter_class=HelpFormatter)
    s.add_argument("--json", action="store_true", help="print the state as JSON")
    args = parser.parse_args(argv)
    if args.cmd == "up":
        given = {"gcs": args.port, "dashboard": args.dashboard_port, "metrics": args.metrics_export_port}
        state = up(
            args.state_dir,
            num_cpus=args.num_cpus,
            workers=args.workers,
            worker_cpus=args.worker_cpus,
            free_ports=args.free_ports,
            ports={k: v for k, v in given.items() if v is not None},
            prometheus=not args.no_prometheus,
            prometheus_port=args.prometheus_port,
        )
        print(_describe(state))
        return 0
    if args.cmd == "down":
        state = down(args.state_dir, args.grace)
        if state is None:
            print("no cluster recorded", file=sys.stderr)
            return 0
        killed = sum(n["killed"] for n in state["nodes"])
        print(f"stopped {len(state['nodes'])} node(s)" + (f" ({killed} process(es) needed SIGKILL)" if killed else ""))
        return 0
    state = status(args.state_dir)
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        print(_describe(state) if state else "no cluster recorded")
    return 0 if healthy(state) else 1
