"""``train.num_workers=0``: the Ray Train worker loop (:func:`mtrec_train.loop.run_loop`) in this process.

A small dataset trains faster without Ray Train: no controller, worker group, process group or Ray
Data split to start (about 20 s of a 2-core machine per fit). :class:`LocalTrainer` stands where a
``TorchTrainer`` stands (``fit()`` returns a result with ``checkpoint``, ``best_checkpoints`` and
``error``) and keeps Ray Train's storage habits, so the rest of the pipeline cannot tell them apart:
checkpoints under ``STORAGE/NAME/checkpoint_NNNNNN`` (each published whole, its reported metrics
beside it), the ``num_to_keep`` best by the objective kept, and a rerun under the same name resumes
from the latest one. It needs no running Ray.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.train import Checkpoint

from mtrec.io import atomic_dir, atomic_write_text
from mtrec_train.loop import OBJECTIVE_KEY, WorkerSession, run_loop

CHECKPOINT_PREFIX = "checkpoint_"


class LocalShard:
    """One split held in memory, batched like Ray Data's ``iter_batches`` (numpy format). Shuffling is
    a full permutation per epoch, seeded by ``local_shuffle_seed``."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self._arrays = arrays
        self._rows = len(arrays["user"])

    def iter_batches(
        self,
        batch_size: int,
        batch_format: str = "numpy",
        drop_last: bool = False,
        local_shuffle_buffer_size: int | None = None,
        local_shuffle_seed: int | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        shuffle = bool(local_shuffle_buffer_size)
        order = np.random.default_rng(local_shuffle_seed).permutation(self._rows) if shuffle else None
        stop = self._rows - self._rows % batch_size if drop_last else self._rows
        for start in range(0, stop, batch_size):
            rows = slice(start, start + batch_size) if order is None else order[start : start + batch_size]
            yield {k: v[rows] for k, v in self._arrays.items()}


@dataclass
class LocalResult:
    """What ``TorchTrainer.fit()`` returns, as far as this project reads it."""

    checkpoint: Checkpoint | None
    best_checkpoints: list[tuple[Checkpoint, dict[str, Any]]] = field(default_factory=list)
    error: BaseException | None = None


def _score(metrics: dict[str, Any]) -> float:
    value = metrics.get(OBJECTIVE_KEY, math.nan)
    return -math.inf if value is None or value != value else float(value)


class LocalTrainer:
    """The run in this process; ``callbacks`` get ``after_report(None, [metrics], checkpoint)`` as Ray
    Train's user callbacks do (``checkpoint``: the published ``ray.train.Checkpoint`` or None)."""

    def __init__(
        self,
        config: dict[str, Any],
        shards: dict[str, LocalShard],
        num_to_keep: int,
        run_dir: Path,
        callbacks: list | None = None,
    ) -> None:
        self._config, self._shards, self._keep, self._dir = config, shards, max(1, num_to_keep), Path(run_dir)
        self._callbacks = list(callbacks or [])

    def _saved(self) -> list[tuple[int, Path, dict[str, Any]]]:
        """The published checkpoints, oldest first: (index, folder, reported metrics)."""
        out = []
        for d in self._dir.glob(f"{CHECKPOINT_PREFIX}*"):
            report = d.with_name(d.name + ".json")
            if d.is_dir() and report.exists():
                out.append((int(d.name[len(CHECKPOINT_PREFIX) :]), d, json.loads(report.read_text())))
        return sorted(out, key=lambda c: c[0])

    def _publish(self, folder: Path) -> Path:
        """A checkpoint folder published whole under the next index (not yet counted: no report)."""
        saved = self._saved()
        dest = self._dir / f"{CHECKPOINT_PREFIX}{saved[-1][0] + 1 if saved else 0:06d}"
        with atomic_dir(dest) as tmp:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
        return dest

    def _record(self, dest: Path, metrics: dict[str, Any]) -> None:
        """``dest`` counts from now on (its report beside it); only the best few and the latest stay."""
        atomic_write_text(dest.with_name(dest.name + ".json"), json.dumps(metrics, default=float))
        saved = self._saved()
        kept = {i for i, _, _ in sorted(saved, key=lambda c: _score(c[2]), reverse=True)[: self._keep]}
        for i, d, _ in saved[:-1]:
            if i not in kept:
                d.with_name(d.name + ".json").unlink(missing_ok=True)
                shutil.rmtree(d, ignore_errors=True)

    def fit(self) -> LocalResult:
        self._dir.mkdir(parents=True, exist_ok=True)
        for d in self._dir.glob(f"{CHECKPOINT_PREFIX}*"):  # published, but the run stopped before reporting it
            if d.is_dir() and not d.with_name(d.name + ".json").exists():
                shutil.rmtree(d)
        saved = self._saved()

        def report(metrics: dict[str, Any], folder: Path | None) -> None:
            # publish, tell the callbacks (a Tune trial's report), then count it: a run stopped in
            # between retrains that epoch instead of resuming past a report nobody received
            dest = None if folder is None else self._publish(folder)
            checkpoint = None if dest is None else Checkpoint.from_directory(str(dest))
            for cb in self._callbacks:
                cb.after_report(None, [metrics], checkpoint)
            if dest is not None:
                self._record(dest, metrics)

        cfg = self._config["cfg"]["train"]
        session = WorkerSession(
            rank=0,
            world=1,
            device=torch.device("cuda" if cfg["use_gpu"] and torch.cuda.is_available() else "cpu"),
            checkpoint=Checkpoint.from_directory(str(saved[-1][1])) if saved else None,
            shard=self._shards.__getitem__,
            prepare_model=lambda m: m,
            report=report,
        )
        run_loop(self._config, session)
        saved = self._saved()
        return LocalResult(
            checkpoint=Checkpoint.from_directory(str(saved[-1][1])) if saved else None,
            best_checkpoints=[(Checkpoint.from_directory(str(d)), m) for _, d, m in saved],
        )
