"""Builds and runs a Ray Train ``TorchTrainer`` from a :class:`~mtrec.config.Config`.

Three steps, each usable on its own (Ray Tune calls :func:`build_trainer` with its own callbacks):

1. :func:`prepare` — on the driver: examples Parquet per split, and in ``frozen`` mode the item and
   context vectors, encoded once by one Ray task and shared with every worker through the object store.
2. :func:`build_trainer` — the ``TorchTrainer``: scaling, storage, checkpoints, failure handling,
   Ray Data datasets streamed from the examples Parquet (one shard per worker).
3. :func:`finalize` — from the best checkpoint: the bundle, ``metrics.json`` and ``curves.png``.

``RUN/metrics.json`` is written last: a run directory without it is not complete.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from mtrec.bundle import save_bundle
from mtrec.config import Config, save_config
from mtrec.data.contract import read_tasks
from mtrec.engine import batches, evaluate, fusion_scales, text_inputs
from mtrec.features import ExampleSet, collate, prepare_examples
from mtrec.io import atomic_write_text
from mtrec_train.checkpoint import STATE, load_model_weights
from mtrec_train.curves import plot_run
from mtrec_train.local import LocalShard, LocalTrainer
from mtrec_train.loop import OBJECTIVE_KEY, build_run_model, train_func


@dataclass
class TrainingInputs:
    """What every worker needs, made once on the driver by :func:`prepare`."""

    cfg: Config
    examples: ExampleSet
    item_vectors: Any = (
        None  # ObjectRef of a (num_items + 1, D) float32 array (the array itself without Ray), frozen mode
    )
    context_vectors: Any = None  # ObjectRef of a (num_contexts + 1, D) array (or the array), or None


def _encode(cfg: Config, examples_root: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Frozen mode: every item (and context) text through the language model, once per run."""
    item_vectors, context_vectors, _ = text_inputs(cfg, ExampleSet.load(examples_root).meta)
    return item_vectors.numpy(), None if context_vectors is None else context_vectors.numpy()


@ray.remote(num_cpus=1, num_returns=2)
def _encode_once(cfg_dict: dict[str, Any], examples_root: str) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`_encode` as one Ray task: its arrays reach every worker through the object store."""
    return _encode(Config.from_dict(cfg_dict), examples_root)


def resolve_config(cfg: Config, data_dir: str | Path) -> Config:
    """The config with the dataset's path and, unless the config names them, its tasks."""
    cfg = Config.from_dict(cfg.to_dict())
    cfg.data.path = str(Path(data_dir).resolve())
    if not cfg.tasks:
        cfg.tasks = read_tasks(data_dir)
    return cfg


def prepare(cfg: Config, data_dir: str | Path, work_dir: str | Path) -> TrainingInputs:
    cfg = resolve_config(cfg, data_dir)
    examples = prepare_examples(data_dir, cfg, Path(work_dir).resolve() / "examples")
    inputs = TrainingInputs(cfg, examples)
    if cfg.encoder.mode == "frozen" and ray.is_initialized():
        inputs.item_vectors, inputs.context_vectors = _encode_once.remote(cfg.to_dict(), str(examples.root))
    elif cfg.encoder.mode == "frozen":  # in-process training (train.num_workers=0) without a Ray
        inputs.item_vectors, inputs.context_vectors = _encode(cfg, str(examples.root))
    # fail here, once, not in every worker on every retry; a finetune model would load the language model
    if cfg.encoder.mode != "finetune":
        build_run_model(cfg, examples.meta, inputs.item_vectors, inputs.context_vectors)
    return inputs


def run_name(cfg: Config) -> str:
    """Same config and data → same name, so a rerun (a retried job) resumes instead of starting over."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return f"train-{digest}"


MATERIALIZE_BELOW_BYTES = 64 * 1024**2  # small splits are read once, by the driver, into the object store


def _dataset(path: Path) -> ray.data.Dataset:
    """A split as a Ray Dataset, streamed from Parquet; a small one is read once by the driver and put in
    the object store, since re-reading and re-planning tiny files every epoch (or starting read tasks
    to materialise them, ~5 s here) costs more than the epoch's training."""
    if path.stat().st_size < MATERIALIZE_BELOW_BYTES:
        return ray.data.from_arrow(pq.read_table(path))
    return ray.data.read_parquet(str(path))


def build_trainer(
    inputs: TrainingInputs,
    storage_path: str | Path,
    name: str | None = None,
    callbacks: list | None = None,
) -> TorchTrainer | LocalTrainer:
    """A ``TorchTrainer``, or with ``train.num_workers=0`` a :class:`~mtrec_train.local.LocalTrainer`
    running the same loop in this process; both store their checkpoints under ``STORAGE/NAME``."""
    cfg = inputs.cfg
    loop_config = {
        "cfg": cfg.to_dict(),
        "examples_dir": str(inputs.examples.root),
        "item_vectors": inputs.item_vectors,
        "context_vectors": inputs.context_vectors,
    }
    name = name or run_name(cfg)
    if cfg.train.num_workers == 0:
        shards = {s: LocalShard(inputs.examples.arrays(s)) for s in ("train", "valid")}
        return LocalTrainer(loop_config, shards, cfg.train.num_to_keep, Path(storage_path).resolve() / name, callbacks)
    resources = {"CPU": 1, **({"GPU": 1} if cfg.train.use_gpu else {})}
    datasets = {s: _dataset(inputs.examples.path(s)) for s in ("train", "valid")}
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.num_to_keep,
                checkpoint_score_attribute=OBJECTIVE_KEY,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )


def best_checkpoint(result: Any) -> Any:
    """The checkpoint with the best validation objective (the latest when none was scored)."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(OBJECTIVE_KEY) == m.get(OBJECTIVE_KEY)]
    if scored:
        return max(scored, key=lambda cm: cm[1][OBJECTIVE_KEY])[0]
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint (error: {result.error})")
    return result.checkpoint


def finalize(inputs: TrainingInputs, checkpoint: Any, out: str | Path, wall_s: float) -> dict[str, Any]:
    """Bundle, metrics.json and plots (:func:`mtrec_train.curves.plot_run`) from one checkpoint; returns
    the metrics."""
    cfg, examples, out = inputs.cfg, inputs.examples, Path(out)
    model, item_vectors, context_vectors = build_run_model(
        cfg, examples.meta, inputs.item_vectors, inputs.context_vectors
    )
    with checkpoint.as_directory() as d:
        load_model_weights(Path(d), cfg, model)
        history = json.loads((Path(d) / STATE).read_text())["history"]
    model.eval()

    metrics: dict[str, Any] = {}
    for split in ("valid", "test"):
        arrays = examples.arrays(split)
        metrics[split] = evaluate(model, (collate(b) for b in batches(arrays, 4096)), cfg.tasks)
    rates = [h["samples_per_s"] for h in history if "samples_per_s" in h]
    waits = [h["input_wait_frac"] for h in history if "input_wait_frac" in h]
    metrics["train"] = {
        # steady state: the first epoch also pays for start-up (first batches, allocator, data warm-up)
        "samples_per_s": float(np.median(rates[1:] or rates)) if rates else 0.0,
        "first_epoch_samples_per_s": rates[0] if rates else 0.0,
        "input_wait_frac": float(np.median(waits[1:] or waits)) if waits else 0.0,  # rank 0 waiting for batches
        "wall_s": wall_s,
        "epochs": len(history),
        "num_workers": cfg.train.num_workers,
    }
    metrics["history"] = history

    out.mkdir(parents=True, exist_ok=True)
    scales = fusion_scales(model, (collate(b) for b in batches(examples.arrays("valid"), 4096)))
    save_bundle(out / "bundle", cfg, examples.meta, model, scales, item_vectors, context_vectors)
    save_config(cfg, out / "config.yaml")
    plot_run(cfg, history, metrics["test"], out)
    atomic_write_text(
        out / "metrics.json", json.dumps(metrics, indent=2, default=float)
    )  # last: marks the run complete
    return metrics


def run_training(
    cfg: Config, data_dir: str | Path, out: str | Path, callbacks: list[ray.train.UserCallback] | None = None
) -> dict[str, Any]:
    """prepare → fit → finalize, on the Ray this process is connected to (``callbacks``: Ray Train's);
    with ``train.num_workers=0``, in this process (no Ray needed)."""
    out = Path(out).resolve()  # workers run in other directories (and on other nodes)
    (out / "metrics.json").unlink(missing_ok=True)
    start = time.perf_counter()
    inputs = prepare(cfg, data_dir, out)
    result = build_trainer(inputs, out / "ray", callbacks=callbacks).fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    return finalize(inputs, best_checkpoint(result), out, time.perf_counter() - start)
