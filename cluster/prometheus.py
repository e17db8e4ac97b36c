"""A local Prometheus server that scrapes Ray's metrics: its config, start (until ready) and stop.

Ray's head writes the service-discovery file ``<session dir>/prom_metrics_service_discovery.json``
listing every node's metrics endpoints (``/tmp/ray/prom_metrics_service_discovery.json`` is a link
to the *latest* session on the host, which on a shared host may be someone else's: use the session
directory of the Ray this process is connected to, :func:`service_discovery_file`). A config either
watches that file (nodes that join later are scraped too) or lists explicit targets.

The server is the Debian package's binary (``/usr/bin/prometheus``; ``MTREC_PROMETHEUS`` overrides),
listening on 127.0.0.1 only, in its own process group, with its pid in ``DATA_DIR/prometheus.pid``
so that a later command (``mtrec cluster down``) can stop it by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mtrec.errors import ConfigError, MtrecError
from mtrec.io import atomic_write_text
from mtrec_cluster.ray_env import free_port

SD_FILE = "prom_metrics_service_discovery.json"
DEFAULT_BINARY = "/usr/bin/prometheus"
PID_FILE = "prometheus.pid"


def service_discovery_file(session_dir: str | Path | None = None) -> Path:
    """The service-discovery file of ``session_dir``, or of the session of the Ray this process is connected to."""
    if session_dir is None:
        import ray

        if not ray.is_initialized():
            raise MtrecError("service_discovery_file: Ray is not initialised here; pass session_dir")
        session_dir = ray._private.worker.global_worker.node.get_session_dir_path()  # no public API for it
    return Path(session_dir) / SD_FILE


def ray_metrics_targets() -> list[str]:
    """``host:port`` of the metrics export endpoint of every alive node of the connected Ray."""
    import ray

    return [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n.get("Alive")]


def write_prometheus_config(
    path: str | Path,
    *,
    targets: list[str] | None = None,
    sd_file: str | Path | None = None,
    scrape_interval_s: float = 5.0,
    job: str = "ray",
) -> Path:
    """Write a Prometheus config scraping ``targets`` (``host:port``) and/or the nodes ``sd_file`` lists."""
    if not targets and sd_file is None:
        raise ConfigError("write_prometheus_config: give targets (host:port) or a Ray service-discovery file")
    if not scrape_interval_s > 0:
        raise ConfigError(f"write_prometheus_config: scrape_interval_s={scrape_interval_s!r} must be positive")
    interval = f"{int(round(scrape_interval_s * 1000))}ms"
    scrape: dict = {"job_name": job, "scrape_interval": interval, "scrape_timeout": interval}
    if targets:
        scrape["static_configs"] = [{"targets": list(targets)}]
    if sd_file is not None:
        scrape["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": interval}]
    doc = {"global": {"scrape_interval": interval, "evaluation_interval": interval}, "scrape_configs": [scrape]}
    return atomic_write_text(path, json.dumps(doc, indent=2))  # JSON is YAML


@dataclass
class PrometheusServer:
    """A started server: ``url`` answers the HTTP API; ``stop()`` ends it."""

    pid: int
    port: int
    config: Path
    data_dir: Path
    log: Path
    _process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_prometheus(self.pid, timeout_s)
        if self._process is not None:
            self._process.wait(timeout=timeout_s)  # reap it: no zombie left behind


def start_prometheus(
    config: str | Path,
    port: int | None = None,
    data_dir: str | Path | None = None,
    binary: str | None = None,
    timeout_s: float = 60.0,
) -> PrometheusServer:
    """Start Prometheus with ``config`` on 127.0.0.1:``port`` (a free one by default), storing its data
    and log in ``data_dir`` (default: beside the config), and wait until ``/-/ready`` answers 200.

    MtrecError when the binary is missing, or the server exits or is not ready within ``timeout_s``
    (the message carries the end of its log).
    """
    exe = binary or os.environ.get("MTREC_PROMETHEUS") or DEFAULT_BINARY
    if not (Path(exe).is_file() and os.access(exe, os.X_OK)) and shutil.which(exe) is None:
        raise MtrecError(
            f"Prometheus binary {exe!r} not found: install the Debian package "
            "(apt-get install -y --no-install-recommends prometheus) or set MTREC_PROMETHEUS"
        )
    port = port or free_port()
    config = Path(config)
    data = Path(data_dir) if data_dir is not None else config.parent / "prometheus-data"
    data.mkdir(parents=True, exist_ok=True)
    log = data / "prometheus.log"
    cmd = [
        exe,
        f"--config.file={config}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.tsdb.path={data}",
        "--storage.tsdb.retention.time=1d",
        "--log.level=warn",
    ]
    with log.open("ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    (data / PID_FILE).write_text(str(process.pid))
    server = PrometheusServer(process.pid, port, config, data, log, process)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MtrecError(f"Prometheus exited with code {process.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    server.stop()
    raise MtrecError(f"Prometheus on port {port} not ready after {timeout_s:.0f} s: {_tail(log)}")


def stop_prometheus(pid: int | str | Path, timeout_s: float = 10.0) -> bool:
    """Stop the Prometheus with ``pid`` (or the pid in a ``prometheus.pid`` file or its data folder):
    SIGTERM, then SIGKILL after ``timeout_s``. False when no Prometheus runs with that pid (a pid
    the system gave to another program since is left alone)."""
    if isinstance(pid, (str, Path)) and not str(pid).isdigit():
        path = Path(pid)
        path = path / PID_FILE if path.is_dir() else path
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            return False
    pid = int(pid)
    if not _is_prometheus(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _is_prometheus(pid):
        time.sleep(0.1)
    if _is_prometheus(pid):
        os.kill(pid, signal.SIGKILL)
    return True


def _is_prometheus(pid: int) -> bool:
    """Whether ``pid`` runs (not a zombie) a prometheus binary."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return b"prometheus" in Path(cmdline.decode(errors="replace")).name.encode() and state != "Z"


def _tail(log: Path, chars: int = 1500) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {log})"
