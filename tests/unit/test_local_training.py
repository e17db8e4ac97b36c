"""``train.num_workers=0``: the Ray Train worker loop in this process, with Ray Train's storage habits
(published checkpoints, the best few kept, a rerun resumes from the latest reported one), and no Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtrec.config import Config
from mtrec.data.synthetic import generate

OVERRIDES = [
    "train.num_workers=0",
    "encoder.mode=none",
    "model.proj_dim=16",
    "model.expert_dim=16",
    "train.batch_size=128",
    "train.num_to_keep=1",
    "train.early_stop_patience=0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("local")
    return generate("ecommerce", root / "data", num_users=200, num_items=80, num_interactions=6000, seed=4)


class Reports:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.rows.append({**metrics[0], "checkpoint": checkpoint})


def test_mtrec_train_with_no_workers_starts_no_ray_and_learns(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mtrec_train.run", "--data", str(data), "--out", str(out), *OVERRIDES]
    done = subprocess.run([*cmd, "train.epochs=2", "train.lr=0.005"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Started a local Ray instance" not in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["num_workers"] == 0
    aucs = {t: m["auc"] for t, m in metrics["test"].items()}
    assert sum(aucs.values()) / len(aucs) > 0.58, aucs  # well above chance on 6k rows, without text
    assert (out / "bundle").is_dir()
    runs = list((out / "ray").iterdir())
    assert len(runs) == 1
    reported = sorted(p for p in runs[0].glob("checkpoint_*") if p.is_dir())
    # num_to_keep=1: the best and the latest (a rerun resumes from it) stay; each with its report
    assert 1 <= len(reported) <= 2 and all(p.with_name(p.name + ".json").exists() for p in reported)
    assert json.loads(reported[-1].with_name(reported[-1].name + ".json").read_text())["epoch"] == 2


def test_a_rerun_resumes_from_the_latest_reported_checkpoint(data, tmp_path):
    from mtrec_train.trainer import build_trainer, prepare

    cfg = Config().override([*OVERRIDES, "train.epochs=1"])
    inputs = prepare(cfg, data, tmp_path / "work")
    first = Reports()
    result = build_trainer(inputs, tmp_path / "store", "run", [first]).fit()
    assert [r["epoch"] for r in first.rows] == [1] and result.checkpoint is not None
    # a checkpoint published but never reported (the process stopped in between) does not count
    orphan = tmp_path / "store" / "run" / "checkpoint_000007"
    orphan.mkdir()

    inputs.cfg.train.epochs = 3
    again = Reports()
    result = build_trainer(inputs, tmp_path / "store", "run", [again]).fit()
    assert [r["epoch"] for r in again.rows] == [2, 3]  # epoch 1 was not trained again
    assert not orphan.exists()
    assert [r["restarts"] for r in again.rows] == [1, 1]
    assert max(m["objective"] for _, m in result.best_checkpoints) == max(
        r["objective"] for r in again.rows + first.rows
    )


def test_num_workers_below_zero_is_refused():
    from mtrec.errors import ConfigError

    with pytest.raises(ConfigError, match="train.num_workers=-1"):
        Config().override(["train.num_workers=-1"])
