"""Starting or joining Ray the same way from every entry point (train, tune, serve, demo, bench, tests):
:func:`local_ray`, a context manager that stops only the Ray it started.

Settings that matter on a shared host (see the project's Ray notes):
- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every listener of a local Ray on 127.0.0.1;
- ``RAY_worker_niceness=0``: workers otherwise run at nice 15 and starve under load;
- ``address="local"`` starts a fresh embedded Ray: plain ``ray.init()`` would attach to any running
  cluster;
- the dashboard is required when Tune drives Train V2 (its State API cleans placement groups).
Token authentication stays as Ray sets it; only loopback tests turn it off (``RAY_AUTH_MODE``).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

DASHBOARD_PORT = 8265
CLUSTER_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOCAL_ENV = {
    CLUSTER_FLAG: "0",
    "RAY_worker_niceness": "0",
    "RAY_TRAIN_V2_ENABLED": "1",
}


def free_port(preferred: int = 0) -> int:
    """A TCP port free on 127.0.0.1 right now: ``preferred`` when it is free, else one the OS picks."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free TCP port on 127.0.0.1")


def apply_local_env() -> None:
    """Set the environment a local Ray needs, without overriding what the user set.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray`` is first imported: in a process
    that imported it before this call, Ray's copy is aligned with the environment here, or a Ray it
    then starts would bind its GCS, raylet and workers on every interface.
    """
    for k, v in LOCAL_ENV.items():
        os.environ.setdefault(k, v)
    import sys

    constants = sys.modules.get("ray._private.ray_constants")  # no public setting after import
    if constants is not None:
        flag = os.environ[CLUSTER_FLAG].lower() in ("1", "true")
        constants.ENABLE_RAY_CLUSTER = flag


@contextlib.contextmanager
def local_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    export_metrics: bool = False,
    object_store_mb: int = 512,
) -> Iterator[None]:
    """Ray for the body of a ``with`` block, started or joined the same way by every entry point.

    Joins the Ray this process is already connected to, else ``address`` (or ``RAY_ADDRESS``, as inside
    a Ray job), else starts an embedded local Ray on 127.0.0.1 with ``num_cpus`` logical CPUs (default:
    at least 4) and, with ``export_metrics``, its Prometheus endpoint on a free port. On leaving the
    block, also on an error or Ctrl-C, this process disconnects from a Ray this call connected to; one
    it started stops with it, a cluster it joined keeps running.
    """
    apply_local_env()
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            _start_local(num_cpus, export_metrics, object_store_mb)
        yield
    finally:  # also after a ray.init that Ctrl-C interrupted: it may have started processes already
        ray.shutdown()


def _start_local(num_cpus: int | None, export_metrics: bool, object_store_mb: int) -> None:
    import ray

    kwargs = {"_metrics_export_port": free_port()} if export_metrics else {}
    # Ray processes that look their cluster up by themselves (Train's placement-group cleaner uses the
    # State API) would find several on a shared host and fail: fix the GCS port and hand every process
    # of this cluster its address through the environment it inherits from the raylet.
    gcs = free_port()
    pinned = {"RAY_GCS_SERVER_PORT": str(gcs), "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    saved = {k: os.environ.get(k) for k in pinned}
    os.environ.update(pinned)
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus or max(4, os.cpu_count() or 1),
            object_store_memory=object_store_mb * 1024**2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=free_port(DASHBOARD_PORT),  # Ray's usual port, unless another Ray holds it
            **kwargs,
        )
    finally:  # this process must not take the address for one to join once the cluster is gone
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
