"""A bad name fails before Ray starts: the installed ``mtrec`` command exits 2 within 5 seconds with one
line on stderr naming what is valid.

Each command runs with a ``ray`` package first on ``PYTHONPATH`` that records being imported and
refuses to load: a command that never imports Ray cannot have started it (and one that did would fail
differently, or leave the record behind).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

MTREC = Path(sys.executable).with_name("mtrec")  # the console script of this environment
LIMIT_S = 5.0
RAY_TRAP = """import os, pathlib
pathlib.Path(os.environ["RAY_IMPORT_RECORD"]).touch()
raise ImportError("ray was imported before the checks")
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A small synthetic dataset (``data/``), a bundle trained on it (``bundle/``) and the Ray trap (``trap/``)."""
    from mtrec.config import Config
    from mtrec.data.synthetic import generate
    from mtrec.engine import fit

    root = tmp_path_factory.mktemp("fail-early")
    data = generate("ecommerce", root / "data", num_users=60, num_items=40, num_interactions=600, seed=0)
    cfg = Config().override(["train.epochs=1", "encoder.mode=none", "model.proj_dim=8", "model.expert_dim=8"])
    fit(cfg, data, work_dir=root / "work").save_bundle(root / "bundle", cfg)
    (root / "trap" / "ray").mkdir(parents=True)
    (root / "trap" / "ray" / "__init__.py").write_text(RAY_TRAP)
    (root / "empty").mkdir()
    return root


def mtrec(work: Path, *args: str) -> tuple[int, str, float]:
    """Run ``mtrec ARGS`` (``{w}`` in an argument is the work folder): exit code, stderr, seconds of CPU
    the command used (user + system). On a quiet machine that is its wall time (one thread importing and
    checking); unlike wall time it does not grow when the suite's other work shares the 2 cores."""
    record = work / "ray-imported"
    record.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(work / "trap"), "RAY_IMPORT_RECORD": str(record)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [str(MTREC), *(a.format(w=work) for a in args)], env=env, capture_output=True, text=True, timeout=60
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    elapsed = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert not record.exists(), f"mtrec {' '.join(args)} imported ray: {done.stderr[-2000:]}"
    return done.returncode, done.stderr, elapsed


TRAIN = ("train", "--data", "{w}/data", "--out", "{w}/run")
SERVE = ("serve", "--bundle", "{w}/bundle")
CONFIG = ("serve", "config", "--bundle", "{w}/bundle")
WEIGHTINGS = "valid weightings: static, uncertainty, dwa, gradnorm, rlw, famo, pcgrad"
POLICIES = "unknown policy 'banditt'; valid policies: static, proportional, target, calibrated"
CASES = {
    "train, no data": (
        ("train", "--data", "{w}/missing", "--out", "{w}/run"),
        "dataset directory does not exist (a dataset holds interactions.parquet, items.parquet and tasks.yaml",
    ),
    "train, not a dataset": (
        ("train", "--data", "{w}/empty", "--out", "{w}/run"),
        "empty/tasks.yaml: file is missing; {w}/empty/interactions.parquet: file is missing;",
    ),
    "tune, no data": (
        ("tune", "--data", "{w}/missing", "--out", "{w}/search"),
        "{w}/missing: dataset directory does not exist",
    ),
    "unknown weighting": ((*TRAIN, "train.weighting=gradnrom"), f"unknown weighting 'gradnrom'; {WEIGHTINGS}"),
    "unknown weighting parameter": (
        (*TRAIN, "train.weighting=gradnorm", "train.weighting_params.alpah=1.5"),
        "weighting 'gradnorm': unknown parameter 'alpah'; valid parameters: alpha, lr",
    ),
    "unknown objective": (
        (*TRAIN, "train.objective=purchse.auc"),
        "train.objective 'purchse.auc' is not one of mean_auc, click.auc, click.logloss,",
    ),
    "tune, unknown objective": (
        ("tune", "--data", "{w}/data", "--out", "{w}/search", "--objective", "purchase.acu"),
        "objective 'purchase.acu': term 'purchase.acu' is not one of mean_auc, click.auc,",
    ),
    "serve, unknown policy": ((*SERVE, "--policy", "banditt"), POLICIES),
    "serve config, unknown policy": ((*CONFIG, "--policy", "banditt"), POLICIES),
    "serve config, unknown policy parameter": (
        (*CONFIG, "--policy", "proportional", "--policy-param", "gian=2"),
        "policy 'proportional': unknown parameter 'gian'; valid parameters: power",
    ),
    "serve, missing policy parameter": (
        (*SERVE, "--policy", "target"),
        "targets (task -> rate per impression) must name at least one task (the bundle's tasks: click, add_to_cart",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_name_exits_2_in_seconds_with_one_line_naming_the_valid_ones(work, case):
    args, message = CASES[case]
    code, err, elapsed = mtrec(work, *args)
    assert (code, err.count("\n")) == (2, 1), err[-2000:]
    assert err.startswith("error: ") and message.format(w=work) in err, err
    assert elapsed < LIMIT_S, f"mtrec {' '.join(args)} used {elapsed:.1f} s of CPU"


def test_serve_config_writes_a_policy_that_passes_the_checks(work):
    """Good names pass the same checks; the config carries the policy's parameters."""
    import yaml

    from mtrec_serve.run import main

    out = work / "serve.yaml"
    config = [a.format(w=work) for a in CONFIG[1:]]
    assert main([*config, "--policy", "target", "--policy-param", "targets={purchase: 0.05}", "--out", str(out)]) == 0
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    assert (args["policy"], args["policy_params"]) == ("target", {"targets": {"purchase": 0.05}})
