"""`mtrec cluster up|status|down` and `mtrec submit` on a real local Ray cluster, with token authentication on
(the product default) and the real Prometheus scraping it.

This starts its own multi-process cluster (`ray start --head` in separate sessions), not the session's
embedded `ray_cluster`: that is the thing under test. Free ports throughout, every listener on 127.0.0.1,
and the module fixture stops exactly what `up` recorded, even when a test fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from polling import wait_until

from mtrec_cluster import local
from mtrec_cluster.prometheus import stop_prometheus

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("manifest_checks", ROOT / "tests" / "unit" / "test_manifests.py")
manifest_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(manifest_checks)  # the dashboard / alert-rule readers of the offline tests

# Records every serving metric once, from a detached actor that keeps exporting after the job ends.
EMIT = """
import ray
ray.init()

@ray.remote(num_cpus=0)
class Emitter:
    def emit(self):
        from mtrec_serve import metrics as m
        m.scope("test.mtrec")
        for arm in ("main", "explore"):
            m.record_impressions(arm, 40)
            for task in ("click", "purchase"):
                m.record_feedback(task, arm, 1.0)
        for status in (200, 500):
            m.record_requests("/v1/recommend", status)
        for stage in m.STAGES:
            m.observe_latency(stage, 12.0)
        m.observe_predictions("click", [0.1, 0.4])
        m.observe_fused([0.5, 1.2])
        m.set_weights({"main": {"click": 1.0, "purchase": 2.0}}, {"main": 0.9, "explore": 0.1}, [])
        m.set_staleness(3.0)
        m.record_rejected_read("stale")
        m.record_update("hold")
        m.set_report({
            "lift_vs_holdout": {"estimate": 0.02, "low": -0.01, "high": 0.05},
            "guardrails": {"click": {"ratio": 1.0, "low": 0.97, "least": 0.98, "state": "uncertain"}},
        })
        return True

emitter = Emitter.options(name="mtrec-test-emitter", lifetime="detached").remote()
assert ray.get(emitter.emit.remote())
"""


def mtrec(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtrec_app.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def get_json(url: str, headers: dict[str, str] | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
        return json.load(r)


def promql(prometheus: str, expr: str) -> dict:
    return get_json(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster")
    # token auth on, as users get it; Ray's default metrics export interval (conftest shortens the session's)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_metrics_report_interval_ms")}
    env["MTREC_CLUSTER_DIR"] = str(state_dir)
    recorded: list[dict] = []
    try:
        up = mtrec(["cluster", "up", "--free-ports", "--num-cpus", "2"], env, timeout=300)
        state = local.read_state(state_dir)
        if state:
            recorded.append(state)
        assert up.returncode == 0, up.stdout + up.stderr
        yield state_dir, env, state
    finally:
        mtrec(["cluster", "down", "--grace", "20"], env, timeout=120)
        for state in recorded:  # backstop: whatever `up` recorded is gone, whatever happened above
            for node in state["nodes"]:
                local.stop_session(node["pid"], grace_s=1)
            if state.get("prometheus"):
                stop_prometheus(state["prometheus"]["pid"])
            shutil.rmtree(state["temp_dir"], ignore_errors=True)  # the nodes' logs and sockets


def test_status_reports_a_healthy_loopback_cluster_with_token_auth(local_cluster):
    _, env, state = local_cluster
    done = mtrec(["cluster", "status", "--json"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)
    assert status["auth_mode"] == "token" and status["alive_nodes"] == 1 and status["prometheus"]["ok"]
    assert status["nodes"][0]["processes"] >= 5
    url = f"{state['dashboard_url']}/api/version"
    with pytest.raises(urllib.error.HTTPError) as refused:
        get_json(url)
    assert refused.value.code == 401
    assert get_json(url, local.token_headers())["ray_version"]
    if shutil.which("ss"):  # every listener of the node's processes is on loopback
        pids = set(local.session_members(state["nodes"][0]["pid"]))
        listeners = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
        ours = [line.split()[3] for line in listeners if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids]
        assert ours and all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for a in ours), ours


def test_prometheus_scrapes_the_cluster(local_cluster):
    _, _, state = local_cluster
    prometheus = state["prometheus"]["url"]

    def targets_up():
        active = get_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
        return active if active and all(t["health"] == "up" for t in active) else None

    active = wait_until(targets_up, 60, "every scrape target up", poll_s=1.0)
    assert f"127.0.0.1:{state['ports']['metrics']}" in {t["labels"]["instance"] for t in active}
    result = wait_until(
        lambda: promql(prometheus, "ray_node_cpu_count")["data"]["result"], 60, "ray_node_cpu_count", poll_s=1.0
    )
    assert float(result[0]["value"][1]) == 2.0


def test_dashboard_and_alert_queries_read_live_series(local_cluster):
    import ray.job_submission

    from mtrec_cluster.submit import runtime_env

    _, _, state = local_cluster
    client = ray.job_submission.JobSubmissionClient(state["dashboard_url"], headers=local.token_headers())
    job = client.submit_job(entrypoint=f"python -c {shlex.quote(EMIT)}", runtime_env=runtime_env())
    status = wait_until(
        lambda: client.get_job_status(job).is_terminal() and client.get_job_status(job), 120, "job", poll_s=1.0
    )
    assert status.value == "SUCCEEDED", client.get_job_logs(job)

    prometheus = state["prometheus"]["url"]
    board = manifest_checks.dashboard()
    # the app's series (Ray Serve's own replica gauges are read in test_serve, where Serve runs)
    exprs = [e for e in manifest_checks.dashboard_exprs(board) + manifest_checks.rule_exprs() if "ray_serve_" not in e]
    for name in sorted(set().union(*map(manifest_checks.metric_names, exprs))):
        wait_until(lambda n=name: promql(prometheus, f"count({n})")["data"]["result"], 90, f"series {name}", poll_s=1.0)
    values = {"$__rate_interval": "1m", "$cluster": ".*", "$deployment": "test.mtrec"}
    values |= {"$ctr_task": "click", "$cvr_task": "purchase"}
    for expr in [e for e in exprs if e in manifest_checks.dashboard_exprs(board)]:
        for var, value in values.items():
            expr = expr.replace(var, value)
        # rate() needs two samples of a series: a panel may answer empty until the next scrape
        answer = wait_until(lambda e=expr: _answered(promql(prometheus, e)), 60, f"an answer to {expr}", poll_s=1.0)
        assert answer["status"] == "success" and answer["data"]["result"], expr


def _answered(answer: dict) -> dict | None:
    """A PromQL answer that holds series, else None (a failed query raises in promql)."""
    return answer if answer["status"] == "success" and answer["data"]["result"] else None


def test_submit_train_runs_the_job_and_writes_a_bundle(local_cluster, tmp_path):
    from mtrec.bundle import load_bundle
    from mtrec.data.synthetic import generate

    _, env, _ = local_cluster
    data = generate("ecommerce", tmp_path / "data", num_users=200, num_items=100, num_interactions=3000, seed=0)
    run = tmp_path / "run"
    args = ["--data", str(data), "--out", str(run), "--preset", "synthetic-ecommerce"]
    args += ["train.num_workers=0", "train.epochs=1"]  # the job's path is tested here; Ray Train's in test_train
    done = mtrec(["submit", "train", "--", *args], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUCCEEDED" in done.stderr and "Running entrypoint" in done.stdout  # logs were streamed
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["test"]) == {"click", "add_to_cart", "purchase", "ad_click"}
    bundle = load_bundle(run / "bundle")  # the job's own run: the preset under the arguments passed
    assert [t.name for t in bundle.meta.tasks] == list(metrics["test"])
    assert bundle.cfg.model.arch == "mmoe" and (bundle.cfg.train.num_workers, bundle.cfg.train.epochs) == (0, 1)


def test_submit_exits_with_the_jobs_failure(local_cluster, tmp_path):
    _, env, _ = local_cluster
    done = mtrec(["submit", "train", "--", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")], env)
    assert done.returncode != 0
    assert "FAILED" in done.stderr


def test_down_stops_exactly_what_up_started(local_cluster):
    state_dir, env, state = local_cluster
    done = mtrec(["cluster", "down", "--grace", "20"], env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(local.session_members(n["pid"]) == [] for n in state["nodes"])
    assert stop_prometheus(state["prometheus"]["pid"]) is False  # no Prometheus runs with that pid any more
    assert not (state_dir / local.STATE_FILE).exists()
    assert mtrec(["cluster", "status"], env).returncode == 1
