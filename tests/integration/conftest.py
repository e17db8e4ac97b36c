"""One real local Ray cluster per test session (each TorchTrainer.fit costs ~40 s of start-up here)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mtrec_cluster.ray_env import apply_local_env

apply_local_env()  # before any test module imports ray (Ray reads some of it once, at import)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only test cluster; the product keeps token auth on
# Ray's metrics reach its export port every 10 s by default; every live test on the session's Ray (and
# the demo's) waits on that pipeline (Prometheus scrapes every few seconds), so they export every 2 s; the
# cluster test_cluster_live starts by command keeps the default, as a user's would
FAST_EXPORT = "RAY_metrics_report_interval_ms"
SCRAPE_S = 4.0  # the session Prometheus's scrape interval (prometheus_server)
os.environ.setdefault(FAST_EXPORT, "2000")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).parent


DEMO_TESTS = HERE / "test_demo.py"


def pytest_collection_modifyitems(items):
    """Every test in this folder is marked ``integration`` (``-m "not integration"`` leaves them out).
    The demo's tests go last: the demo runs in the background meanwhile (:func:`demo_process`)."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)
    items.sort(key=lambda item: item.path == DEMO_TESTS)  # stable: every other test keeps its place


@pytest.fixture(scope="session")
def demo_process(tmp_path_factory):
    """The quick demo (``mtrec demo --quick --keep-serving``) in its own process with its own embedded
    Ray, started once per session; its terminal output (stdout and stderr together, as a terminal shows
    them) goes to a file, which is not a terminal either, so the demo draws no bars. Returns
    ``(process, output file, --out folder)``; the demo's tests wait for it and end it."""
    from mtrec_cluster.ray_env import free_port

    root = tmp_path_factory.mktemp("demo")
    out, terminal = root / "out", root / "terminal.txt"
    cmd = [sys.executable, "-m", "mtrec_app.cli", "demo", "--quick", "--keep-serving", "--out", str(out)]
    cmd += ["--port", str(free_port())]
    with terminal.open("w") as sink:
        proc = subprocess.Popen(
            cmd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            env=os.environ.copy(),
            # Ctrl-C as in a terminal: a test run started in the background (`make test &`, some CI
            # runners) ignores SIGINT, and the demo would inherit that
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    yield proc, terminal, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session", autouse=True)
def _demo_in_the_background(request):
    """When the demo's tests are selected, the demo starts with the first integration test and runs
    beside the others (most of them wait on HTTP, Prometheus and controllers) instead of after them.
    The session's Ray starts first when other tests need it: two Rays starting at once would both find
    Ray's usual dashboard port free, and the second to bind it fails."""
    if any(item.path == DEMO_TESTS for item in request.session.items):
        if any(item.path != DEMO_TESTS and "ray_cluster" in item.fixturenames for item in request.session.items):
            request.getfixturevalue("ray_cluster")
        request.getfixturevalue("demo_process")


@pytest.fixture(scope="session")
def ray_cluster():
    from mtrec_cluster.ray_env import local_ray

    with local_ray(num_cpus=4):
        import ray

        yield ray


@pytest.fixture(scope="session")
def prometheus_server(ray_cluster, tmp_path_factory):
    """A real Prometheus (the Debian binary) on a free 127.0.0.1 port, scraping the session Ray's
    metrics export port every 4 s (a scrape's timeout is its interval; Ray's export page holds every
    series the session's earlier tests left, 0.5 MB and more, and took up to 1 s to answer on a loaded
    2-core machine early in the suite: 1 s scrapes failed there, and 2 s ones late in it). A test may stop and restart it (same port and data folder,
    ``mtrec_cluster.prometheus.start_prometheus(server.config, server.port, server.data_dir)``); teardown
    stops whichever process the pid file names."""
    from mtrec_cluster.prometheus import (
        ray_metrics_targets,
        start_prometheus,
        stop_prometheus,
        write_prometheus_config,
    )

    root = tmp_path_factory.mktemp("prometheus")
    config = write_prometheus_config(root / "prometheus.yml", targets=ray_metrics_targets(), scrape_interval_s=SCRAPE_S)
    server = start_prometheus(config, data_dir=root / "data")
    yield server
    stop_prometheus(server.data_dir)


@pytest.fixture(scope="session")
def serve_http(ray_cluster):
    """Ray Serve's HTTP proxy on 127.0.0.1: its base URL (a free port when this call starts Serve; the
    port of the Serve already running otherwise, since Serve keeps its first HTTP options)."""
    import ray.serve
    from ray.serve.context import _get_global_client  # the running Serve's HTTP options (no public getter)

    from mtrec_cluster.ray_env import free_port

    ray.serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    return f"http://127.0.0.1:{_get_global_client().http_config.port}"


@pytest.fixture(scope="session")
def serve_bundle(tmp_path_factory):
    """A small bundle for the serving tests: the packaged MiniLM (frozen) under a small multi-task model
    trained one epoch in-process on a small synthetic ecommerce dataset. Returns (bundle dir, data dir)."""
    from mtrec.config import Config
    from mtrec.data.synthetic import generate
    from mtrec.engine import fit

    root = tmp_path_factory.mktemp("serve-bundle")
    data = generate("ecommerce", root / "data", num_users=80, num_items=60, num_interactions=4000, seed=5)
    cfg = Config().override(
        [
            "train.epochs=1",
            "data.max_history=5",
            "model.id_buckets=11",
            "model.proj_dim=32",
            "model.expert_dim=32",
            f"encoder.cache_dir={root / 'vectors'}",
        ]
    )
    result = fit(cfg, data, work_dir=root / "work")
    bundle = result.save_bundle(root / "bundle", cfg)
    return bundle, data
