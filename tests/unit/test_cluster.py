"""cluster/: the pieces of `mtrec cluster` and `mtrec submit` that need no Ray cluster."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from mtrec.errors import MtrecError
from mtrec_cluster import local, submit

ROOT = Path(__file__).resolve().parents[2]


def test_entrypoint_is_the_module_with_quoted_arguments():
    cmd = submit.entrypoint("train", ["--data", "/d ir", "--out", "/o", "model.arch=mmoe"])
    assert shlex.split(cmd) == ["python", "-m", "mtrec_train.run", "--data", "/d ir", "--out", "/o", "model.arch=mmoe"]
    assert submit.entrypoint("tune", []).startswith("python -m mtrec_tune.run")
    with pytest.raises(MtrecError, match="unknown job kind 'serve'"):
        submit.entrypoint("serve", [])


def test_job_arguments_after_the_double_dash_pass_untouched():
    ns, args = submit.parse_args(["train", "--address", "http://h:1", "--", "--data", "d", "--address", "x"])
    assert ns.kind == "train" and ns.address == "http://h:1"
    assert args == ["--data", "d", "--address", "x"]
    with pytest.raises(MtrecError, match="KEY=VALUE"):
        submit.parse_args(["tune", "--env", "NOEQUALS"])
    with pytest.raises(SystemExit):
        submit.parse_args(["serve", "--", "x"])


@pytest.mark.parametrize(
    "status, code, expected", [("SUCCEEDED", 0, 0), ("FAILED", 3, 3), ("FAILED", None, 1), ("STOPPED", None, 1)]
)
def test_exit_code_follows_the_job(status, code, expected):
    assert submit.exit_code(status, code) == expected


def test_address_order(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert submit.resolve_address(None, tmp_path) == submit.DEFAULT_ADDRESS
    (tmp_path / local.STATE_FILE).write_text(json.dumps({"dashboard_url": "http://127.0.0.1:1234", "nodes": []}))
    assert submit.resolve_address(None, tmp_path) == "http://127.0.0.1:1234"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://env:1")
    assert submit.resolve_address(None, tmp_path) == "http://env:1"
    assert submit.resolve_address("http://flag:2", tmp_path) == "http://flag:2"


def test_working_dir_package_has_the_code_and_not_the_heavy_parts(tmp_path):
    from ray._private.runtime_env.packaging import create_package  # what JobSubmissionClient uploads

    env = submit.runtime_env()
    assert env["working_dir"] == str(ROOT) and env["env_vars"]["RAY_worker_niceness"] == "0"
    target = tmp_path / "pkg.zip"
    create_package(env["working_dir"], target, include_gitignore=True, excludes=env["excludes"])
    names = set(zipfile.ZipFile(target).namelist())
    for needed in ("mtrec/data/contract.py", "train/run.py", "serve/app.py", "cluster/submit.py", "pyproject.toml"):
        assert needed in names, needed
    for heavy in (".venv/", "bench/results/", ".git/", "out/"):
        assert not any(n.startswith(heavy) for n in names), heavy
    assert not any("__pycache__" in n for n in names)
    assert target.stat().st_size < 20 * 1024**2


def _session(cmd: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", cmd], start_new_session=True)


def test_stop_session_stops_the_whole_session_and_only_it():
    polite = _session("sleep 60 & sleep 60 & wait")
    stubborn = _session("trap '' TERM; sleep 60 & sleep 60; wait")  # ignores SIGTERM: needs the SIGKILL
    try:
        deadline = time.monotonic() + 10
        while len(local.session_members(stubborn.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(local.session_members(polite.pid)) == 3
        assert local.stop_session(polite.pid, grace_s=5) == 2  # bash exits on TERM; its two sleeps are SIGKILLed
        assert local.session_members(polite.pid) == []
        assert len(local.session_members(stubborn.pid)) == 3  # untouched
        assert local.stop_session(stubborn.pid, grace_s=0.5) == 3
        assert local.session_members(stubborn.pid) == []
        assert os.getsid(0) not in (polite.pid, stubborn.pid)
    finally:
        for p in (polite, stubborn):
            for pid in local.session_members(p.pid):
                os.kill(pid, signal.SIGKILL)
            p.wait(timeout=10)


def test_no_cluster_recorded(tmp_path, capsys):
    assert local.status(tmp_path) is None and not local.healthy(None)
    assert local.down(tmp_path) is None
    assert local.main(["--state-dir", str(tmp_path), "status"]) == 1
    assert "no cluster recorded" in capsys.readouterr().out


def test_a_corrupt_state_file_is_named(tmp_path):
    (tmp_path / local.STATE_FILE).write_text("{not json")
    with pytest.raises(MtrecError, match=r"cluster\.json: not a cluster state file"):
        local.read_state(tmp_path)


def test_up_refuses_while_a_recorded_cluster_runs(tmp_path):
    alive = _session("sleep 60")
    try:
        state = {"nodes": [{"role": "head", "pid": alive.pid}], "dashboard_url": "http://127.0.0.1:1"}
        (tmp_path / local.STATE_FILE).write_text(json.dumps(state))
        with pytest.raises(MtrecError, match="is running: `mtrec cluster down` first"):
            local.up(tmp_path, prometheus=False)
        stopped = local.down(tmp_path, grace_s=5)
        assert stopped["nodes"][0]["killed"] == 0 and not (tmp_path / local.STATE_FILE).exists()
        assert alive.wait(timeout=5) == -signal.SIGTERM
    finally:
        if alive.poll() is None:
            alive.kill()


def test_the_loopback_setting_holds_when_ray_was_imported_first():
    """Ray reads its binding flag once, at import: a process that imported ray before the local
    environment was applied must still start its Ray on loopback (seen in the full test suite)."""
    import sys

    code = (
        "import os, ray._private.ray_constants as c; assert c.ENABLE_RAY_CLUSTER;"
        "from mtrec_cluster.ray_env import apply_local_env; apply_local_env();"
        "from ray._private.services import get_node_ip_address; print(c.ENABLE_RAY_CLUSTER, get_node_ip_address())"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "127.0.0.1"]
