"""Faults and hostile input for a running service, shared by the reliability tests and the soak benchmark.

- :class:`FakePrometheus`: a stand-in for the Prometheus URL the weight controller reads, switchable
  between good answers and the ways a real server misbehaves (not JSON, an error status, a wrong
  shape, NaN or negative counts, HTTP 500, answering slower than the controller waits);
- :func:`under_load`: steady traffic of :class:`mtrec_app.traffic.SimulatedUsers` from several client
  threads while a fault is injected, counted in one :class:`~mtrec_app.traffic.TrafficReport`;
- :func:`kill_replica`: ``ray.kill`` one replica of a Serve deployment (Serve starts a new one);
- :func:`bad_bundles`: corrupt, newer and misshapen copies of a bundle, to offer for redeployment.

Fuzzing the API (schemathesis and hypothesis, which the shipped package does not depend on) lives
in ``bench/fuzz.py``.

Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mtrec_app.traffic import SimulatedUsers, TrafficReport

BAD_MODES = ("not-json", "error-status", "wrong-shape", "nan", "negative", "http-500", "slow")


class FakePrometheus:
    """An HTTP server on a free 127.0.0.1 port answering ``/api/v1/query`` as set by ``mode``.

    ``good``: the impressions and events counters of arm ``main`` of deployment ``app`` (growing at
    every read, each sample timestamped now);
    one of :data:`BAD_MODES`: a misbehaving server (``slow`` answers after ``slow_s``). ``reads``
    counts the queries answered. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, app: str, tasks: list[str], slow_s: float = 8.0) -> None:
        from mtrec_serve.sources import EVENTS, IMPRESSIONS

        self.mode = "good"
        self.reads = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server hook's name)
                fake.reads += 1
                query = self.path.partition("?")[2]
                if fake.mode == "slow":
                    time.sleep(slow_s)
                status, body = fake._answer(EVENTS if EVENTS in query else IMPRESSIONS, EVENTS, app, tasks)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the controller gave up waiting (the slow mode)
                    pass

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _answer(self, name: str, events_name: str, app: str, tasks: list[str]) -> tuple[int, bytes]:
        from mtrec_serve.metrics import DEPLOYMENT_LABEL

        mode, n = self.mode, self.reads
        if mode == "not-json":
            return 200, b"<html>upstream proxy error</html>"
        if mode == "error-status":
            return 200, b'{"status": "error", "errorType": "timeout", "error": "query timed out"}'
        if mode == "wrong-shape":
            return 200, b'{"status": "success", "data": {"resultType": "vector", "result": {}}}'
        if mode == "http-500":
            return 500, b'{"status": "error"}'
        value = {"nan": "NaN", "negative": "-5"}.get(mode, str(100 * n))
        labels = [{"arm": "main"}] if name != events_name else [{"arm": "main", "task": t} for t in tasks]
        result = [
            {"metric": {"__name__": name, DEPLOYMENT_LABEL: app, **lab}, "values": [[time.time(), value]]}
            for lab in labels
        ]
        return 200, json.dumps({"status": "success", "data": {"resultType": "matrix", "result": result}}).encode()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakePrometheus:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def under_load(
    users: SimulatedUsers,
    fault: Callable[[], Any] | None,
    *,
    clients: int = 4,
    before_s: float = 2.0,
    after_s: float = 8.0,
    start: int = 0,
) -> tuple[TrafficReport, Any]:
    """Closed-loop traffic (recommend, then feedback for what was shown) from ``clients`` threads:
    ``before_s`` of it, then ``fault()`` (traffic goes on meanwhile), then ``after_s`` more.
    Returns the report of every request sent and what ``fault`` returned."""
    report = TrafficReport()
    stop = threading.Event()
    queries = itertools.count(start)

    def client() -> None:
        while not stop.is_set():
            users.one(next(queries), report)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    try:
        time.sleep(before_s)
        outcome = fault() if fault is not None else None
        time.sleep(after_s)
    finally:
        stop.set()
        for t in threads:
            t.join()
    report.seconds = time.perf_counter() - t0
    return report, outcome


def replica_names(app: str, deployment: str) -> list[str]:
    """Actor names of the live replicas of ``deployment`` in Serve application ``app``."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def kill_replica(app: str, deployment: str) -> str:
    """Kill one replica of ``deployment`` as a crash would (no restart of that actor: Serve's controller
    notices and starts a replacement). Returns the killed actor's name."""
    import ray

    names = replica_names(app, deployment)
    if not names:
        raise LookupError(f"no replica of {deployment!r} in application {app!r}")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def bad_bundles(good: Path, out: Path) -> dict[str, tuple[Path, str, str]]:
    """Copies of bundle ``good`` under ``out`` that must never be deployed: ``{name: (bundle, the file
    the error must name, a fragment of the message)}``: ``corrupt`` (a flipped byte in the weights:
    checksum), ``newer`` (a format version this code does not read), ``misshapen`` (checksums right,
    but the first weight's shape does not fit the model the config describes)."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    bundles = {name: out / name for name in ("corrupt", "newer", "misshapen")}
    for path in bundles.values():
        shutil.copytree(good, path)
    weights = bundles["corrupt"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    manifest = json.loads((good / "bundle.json").read_text())
    (bundles["newer"] / "bundle.json").write_text(json.dumps({**manifest, "version": 99}))
    weights = bundles["misshapen"] / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = torch.zeros(*(s + 1 for s in tensors[name].shape))
    save_file(tensors, weights)
    manifest["files"]["model.safetensors"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (bundles["misshapen"] / "bundle.json").write_text(json.dumps(manifest))
    return {
        "corrupt": (bundles["corrupt"], "model.safetensors", "checksum mismatch"),
        "newer": (bundles["newer"], "bundle.json", "version 99"),
        "misshapen": (bundles["misshapen"], "model.safetensors", "does not fit"),
    }
