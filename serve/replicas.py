"""Replica counts of a Serve application, as operators see autoscaling: read once, or watched and logged.

:func:`running_replicas` reads Serve's own status (the controller's view: replicas in the RUNNING
state, per deployment). :class:`ReplicaWatch` polls it in a thread and reports every change, e.g.
``TaskHeads: 1 -> 2 replicas running`` (``mtrec serve`` prints these; the bench records the timeline).
The same counts reach Prometheus as Ray's ``ray_serve_deployment_replica_healthy`` (healthy replicas
per deployment) and ``ray_serve_autoscaling_target_replicas`` (what the autoscaler aims at), which
the Grafana dashboard plots.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def running_replicas(app: str) -> dict[str, int]:
    """Deployment name -> replicas RUNNING, for Serve application ``app`` (empty while it is not deployed)."""
    import ray.serve

    status = ray.serve.status().applications.get(app)
    if status is None:
        return {}
    return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in status.deployments.items()}


class ReplicaWatch:
    """Poll :func:`running_replicas` every ``period_s`` in a daemon thread; ``on_change(line)`` for each
    deployment whose count changed (the first reading included). With ``keep``, ``timeline`` holds every
    reading as ``(seconds since t0, {deployment: running})`` (``t0``: a ``time.monotonic()`` value; default:
    when the watch starts). A failed reading (Serve restarting) is skipped."""

    def __init__(
        self,
        app: str,
        on_change: Callable[[str], None] | None = None,
        period_s: float = 1.0,
        keep: bool = False,
        t0: float | None = None,
    ) -> None:
        self.app, self.period_s, self.keep, self.t0 = app, period_s, keep, t0
        self.on_change = on_change or (lambda line: None)
        self.timeline: list[tuple[float, dict[str, int]]] = []
        self._last: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"replica-watch-{app}", daemon=True)

    def start(self) -> ReplicaWatch:
        if self.t0 is None:
            self.t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10 * self.period_s)

    def __enter__(self) -> ReplicaWatch:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                counts = running_replicas(self.app)
            except Exception:  # noqa: BLE001 -- Serve's controller restarting: try again next period
                counts = None
            if counts:
                if self.keep:
                    self.timeline.append((time.monotonic() - self.t0, counts))
                for name, n in counts.items():
                    before = self._last.get(name)
                    if before != n:
                        was = "" if before is None else f"{before} -> "
                        self.on_change(f"{name}: {was}{n} replica{'s' if n != 1 else ''} running")
                self._last = counts
            self._stop.wait(self.period_s)
