"""Distributed joint training on a real local Ray: 2 DDP workers, the real packaged MiniLM (frozen),
a dynamic weighting under DDP, the bundle, and recovery from a killed worker.

Every test reads the same run (a Ray Train fit costs ~40 s of start-up here): one of its two workers is
killed (SIGKILL) once Ray Train has registered the first checkpoint, so the run restarts from it,
and what it learns, writes and reloads is what a run that survived a fault gives."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from mtrec.bundle import load_bundle
from mtrec.config import load_preset
from mtrec.data.synthetic import generate, oracle_metrics
from mtrec.engine import batches, predict
from mtrec.features import ExampleSet, collate

OVERRIDES = [
    "train.num_workers=2",
    "train.epochs=4",
    "train.batch_size=256",
    "train.weighting=uncertainty",  # learnable state that must stay identical on both ranks
    "train.checkpoint_every_steps=40",
    "train.early_stop_patience=0",
    "train.log_every_steps=40",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ecommerce"
    return generate("ecommerce", out, num_users=1500, num_items=600, num_interactions=60_000, seed=1)


def _config():
    return load_preset("synthetic-ecommerce").override(OVERRIDES)


def _train_workers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "name"]):
        title = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        if "RayTrainWorker" in title:
            found.append(p)
    return found


@pytest.fixture(scope="module")
def run(ray_cluster, dataset, tmp_path_factory):
    """The run's directory, its metrics and the pids of the workers killed during it."""
    from mtrec_train.trainer import run_training

    out = tmp_path_factory.mktemp("runs") / "run"
    killed: list[int] = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            # Ray Train's controller writes this snapshot once it has registered a checkpoint, so a
            # restart can use it (a checkpoint folder on disk alone may not be registered yet)
            if list((out / "ray").glob("*/checkpoint_manager_snapshot.json")):
                workers = _train_workers()
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    killed.append(workers[-1].pid)
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    metrics = run_training(_config(), dataset, out)
    killer.join(timeout=1)
    return out, metrics, killed


def test_two_workers_learn_every_task(run, dataset):
    out, metrics, _ = run
    oracle = oracle_metrics(dataset, split="test")
    for task, m in metrics["test"].items():
        best = oracle[task]["auc"]
        # at least 60% of the achievable lift over chance, on every task
        assert m["auc"] - 0.5 >= 0.6 * (best - 0.5), (task, m["auc"], best)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["test"].keys() == metrics["test"].keys()
    assert on_disk["train"]["samples_per_s"] > 0 and on_disk["train"]["num_workers"] == 2
    assert (out / "curves.png").stat().st_size > 10_000


def test_ranks_stay_identical_under_dynamic_weighting(run):
    _, metrics, _ = run
    history = metrics["history"]
    assert len(history) == 4
    # the loop compares parameter + weighting-state fingerprints of both ranks every epoch and raises on drift
    assert all(h["ranks_in_sync"] for h in history)
    weights = [list(h["task_weights"].values()) for h in history]
    assert weights[0] != weights[-1], "uncertainty weights should move during training"


def test_bundle_reloads_bit_identically(run):
    out, _, _ = run
    bundle = load_bundle(out / "bundle")
    examples = ExampleSet.load(out / "examples")
    arrays = examples.arrays("test")
    first = predict(bundle.model, (collate(b) for b in batches(arrays, 2048)))["preds"]
    again = load_bundle(out / "bundle")
    second = predict(again.model, (collate(b) for b in batches(arrays, 2048)))["preds"]
    assert np.array_equal(first, second)
    # and the bundle's predictions are the ones metrics.json was computed from
    from mtrec.metrics import auc

    reported = json.loads((out / "metrics.json").read_text())["test"]
    labels = collate(arrays)["labels"].numpy()
    for j, t in enumerate(bundle.meta.tasks):
        seen = ~np.isnan(labels[:, j])
        assert auc(labels[seen, j], first[seen, j]) == pytest.approx(reported[t.name]["auc"], abs=1e-9)
    assert torch.equal(bundle.item_vectors, again.item_vectors)


def test_killed_worker_resumes_from_the_checkpoint(run):
    _, metrics, killed = run
    history = metrics["history"]
    assert killed, "no training worker was found to kill"
    # the restored training state counts restarts: 1 or more means the run went on from a checkpoint
    assert history[-1]["restarts"] >= 1
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # every epoch trained the same number of steps: the resumed epoch skipped what the checkpoint held
    # and trained the rest once (a lost or repeated batch would change its count)
    steps = np.diff([0] + [h["step"] for h in history])
    assert steps[0] > 0 and all(s == steps[0] for s in steps), steps
