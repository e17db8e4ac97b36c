"""``mtrec submit train|tune [--address URL] -- ARGS``: run training or tuning as a Ray job.

The job's entrypoint is ``python -m mtrec_train.run ARGS`` (or ``mtrec_tune.run``); its runtime environment's
``working_dir`` is this repository, uploaded by Ray (without the virtualenv, benchmark results, run
outputs and local data). The command streams the job's logs and exits with the job's status:
0 when it SUCCEEDED, the driver's exit code (or 1) when it FAILED, 1 when it was STOPPED; Ctrl-C
stops the job. ``--no-wait`` prints the submission id and returns at once.

The address is, in order: ``--address``, ``RAY_API_SERVER_ADDRESS``, the dashboard that
``mtrec cluster up`` recorded, ``http://127.0.0.1:8265``. The Ray token (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) is sent when one is found.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from mtrec.cli_help import HelpFormatter
from mtrec.errors import MtrecError
from mtrec_cluster.local import read_state, token_headers

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINTS = {"train": "mtrec_train.run", "tune": "mtrec_tune.run"}
# gitignore syntax, anchored at the working_dir ("/data", not "data": mtrec/data is code). Ray also honours .gitignore.
EXCLUDES = ["/.git", "/.venv", "/bench/results", "/data", "/out", "/runs", "**/__pycache__", "*.egg-info"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def entrypoint(kind: str, args: list[str]) -> str:
    """The job's shell command: ``python -m mtrec_train.run ARGS`` (arguments quoted for the shell)."""
    if kind not in ENTRYPOINTS:
        raise MtrecError(f"submit: unknown job kind {kind!r}; valid: {', '.join(ENTRYPOINTS)}")
    return shlex.join(["python", "-m", ENTRYPOINTS[kind], *args])


def runtime_env(working_dir: str | Path = REPO, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime environment: the repository as ``working_dir`` (so ``python -m mtrec_train.run`` resolves
    on every node) and the environment variables a Ray on a shared host needs."""
    from mtrec_cluster.ray_env import CLUSTER_FLAG, LOCAL_ENV

    env = {k: v for k, v in LOCAL_ENV.items() if k != CLUSTER_FLAG}  # a node setting
    return {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": {**env, **(env_vars or {})}}


def resolve_address(address: str | None = None, state_dir: str | Path | None = None) -> str:
    if address:
        return address
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return os.environ["RAY_API_SERVER_ADDRESS"]
    state = read_state(state_dir)
    return state["dashboard_url"] if state else DEFAULT_ADDRESS


def exit_code(status: str, driver_exit_code: int | None) -> int:
    """The process exit code for a finished job: 0 SUCCEEDED, the driver's code (or 1) FAILED, 1 STOPPED."""
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED" and driver_exit_code:
        return int(driver_exit_code)
    return 1


async def _stream(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit(
    kind: str,
    args: list[str],
    *,
    address: str | None = None,
    working_dir: str | Path = REPO,
    env_vars: dict[str, str] | None = None,
    submission_id: str | None = None,
    wait: bool = True,
    state_dir: str | Path | None = None,
) -> int:
    """Submit ``kind`` (train | tune) with ``args``; with ``wait``, stream its logs and return :func:`exit_code`."""
    import ray.job_submission

    address = resolve_address(address, state_dir)
    command = entrypoint(kind, args)
    try:
        client = ray.job_submission.JobSubmissionClient(address, headers=token_headers())
    except (ConnectionError, RuntimeError) as e:
        raise MtrecError(
            f"submit: no Ray jobs API at {address} ({e}); is the cluster up (`mtrec cluster status`)?"
        ) from e
    job_id = client.submit_job(
        entrypoint=command, runtime_env=runtime_env(working_dir, env_vars), submission_id=submission_id
    )
    print(f"[submit] {job_id} on {address}: {command}", file=sys.stderr)
    if not wait:
        print(job_id)
        return 0
    try:
        asyncio.run(_stream(client, job_id))
    except KeyboardInterrupt:
        client.stop_job(job_id)
        print(f"[submit] stopped {job_id}", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    while not info.status.is_terminal():  # the log stream can close a moment before the status is final
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    code = exit_code(info.status.value, info.driver_exit_code)
    print(f"[submit] {job_id} {info.status.value}" + (f": {info.message}" if code else ""), file=sys.stderr)
    return code


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and the job's own arguments (everything after ``--``, passed on untouched)."""
    parser = argparse.ArgumentParser(
        prog="mtrec submit",
        description=__doc__.split("\n")[0],
        usage="mtrec submit {train,tune} [options] -- [arguments of mtrec_train.run / mtrec_tune.run]",
        epilog="example: mtrec submit train -- --data /data/ecommerce --out /shared/runs/r1 model.arch=mmoe",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("kind", choices=sorted(ENTRYPOINTS), help="the entrypoint the job runs")
    parser.add_argument(
        "--address",
        default=None,
        help=f"jobs API URL (default: $RAY_API_SERVER_ADDRESS, the cluster `mtrec cluster up` recorded, {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--working-dir", default=str(REPO), help="uploaded as the job's working_dir (default: the repo)"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="an environment variable of the job"
    )
    parser.add_argument("--submission-id", default=None, help="the job's id (default: one Ray makes up)")
    parser.add_argument("--no-wait", action="store_true", help="return after submitting; print the submission id")
    parser.add_argument("--state-dir", default=None, help="state dir of `mtrec cluster up` (for the default address)")
    split = argv.index("--") if "--" in argv else len(argv)
    ns = parser.parse_args(argv[:split])
    bad = [e for e in ns.env if "=" not in e]
    if bad:
        raise MtrecError(f"submit: --env takes KEY=VALUE, got {bad}")
    return ns, argv[split + 1 :]


def main(argv: list[str] | None = None) -> int:
    ns, args = parse_args(list(sys.argv[1:] if argv is None else argv))
    return submit(
        ns.kind,
        args,
        address=ns.address,
        working_dir=ns.working_dir,
        env_vars=dict(e.split("=", 1) for e in ns.env),
        submission_id=ns.submission_id,
        wait=not ns.no_wait,
        state_dir=ns.state_dir,
    )
