"""The weighting search: Ray Tune over Ray Train, on the Ray this process is connected to.

Each trial is a driver function that builds the ``TorchTrainer`` of :mod:`mtrec_train.trainer` for its
point of the space and fits it; the trainer's ``TuneReportCallback`` forwards every epoch's rank-0
metrics to Tune, with the search objective added (:class:`ObjectiveReport`). ASHA stops trials whose
validation objective trails at a rung. The examples (and, in ``frozen`` mode, the item vectors) are
prepared once on the driver and shared by every trial.

``OUT`` holds ``examples/``, ``ray/search`` (the Tune experiment), ``train/`` (each trial's Train
run) and, once the search has finished, ``result/`` (published atomically): ``trials.parquet`` and
``trials.csv``, ``pareto.json`` and ``pareto.png``, ``best.yaml`` (a preset: ``mtrec train --preset
OUT/result/best.yaml``), ``best/`` (the best trial's bundle, metrics.json, curves.png) and
``summary.json``. Running the same search again on an interrupted one resumes it
(``Tuner.restore``): finished trials are kept, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import ray
import ray.train
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from mtrec.config import Config, save_config
from mtrec.errors import ConfigError, MtrecError
from mtrec.io import atomic_dir, atomic_write_text
from mtrec_train.trainer import TrainingInputs, build_trainer, finalize, prepare, resolve_config
from mtrec_tune.objective import Objective
from mtrec_tune.pareto import non_dominated, plot_front, trial_label
from mtrec_tune.spaces import (
    USES_TASK_WEIGHTS,
    effective_point,
    equal_weights,
    search_space,
    trial_config,
)

SCORE = "score"
EXPERIMENT = "search"
DRIVER_CPUS = 1  # each trial's driver function holds one CPU while its trainer runs


class SearchInterrupted(MtrecError):
    """The search stopped before every trial finished; running it again resumes it."""


class ObjectiveReport(TuneReportCallback):
    """``TuneReportCallback`` that adds the search objective (``score``, ``feasible``, ``violation``,
    ``value``) computed from each report's ``valid`` metrics. Mid-epoch checkpoint reports carry no
    validation metrics: their score is NaN, which ASHA ignores."""

    def __init__(self, objective: Objective) -> None:
        super().__init__()
        self._objective: Objective = objective

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        super().after_report(run_context, [scored(self._objective, metrics[0]), *metrics[1:]], checkpoint)


def scored(objective: Objective, row: dict[str, Any]) -> dict[str, Any]:
    """A report with the search objective added (NaN score for a report without validation metrics)."""
    row = dict(row)
    if "valid" in row:
        row.update(objective.score(row["valid"]))
    else:
        row.update(score=math.nan, feasible=False, violation=math.nan, value=math.nan)
    return row


class InProcessReport:
    """What :class:`ObjectiveReport` does for a trial that trains in its own process
    (``train.num_workers=0``): each report, scored, with its checkpoint's path, to this trial."""

    def __init__(self, objective: Objective) -> None:
        self._objective = objective

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        row = scored(self._objective, metrics[0])
        if checkpoint is not None:
            row["checkpoint_path"] = checkpoint.path
        ray.tune.report(row)


def trial_slots(cluster: dict[str, float], num_workers: int, use_gpu: bool) -> int:
    """How many trials fit at once: each takes a driver CPU plus one CPU (and GPU) per worker; a trial
    that trains in its driver (``num_workers=0``) takes the driver's CPU (and one GPU) only."""
    per_trial, gpus = DRIVER_CPUS + num_workers, max(num_workers, 1)
    slots = int(cluster.get("CPU", 0) // per_trial)
    if use_gpu:
        slots = min(slots, int(cluster.get("GPU", 0) // gpus))
    if slots < 1:
        raise ConfigError(
            f"one trial needs {per_trial} CPUs{f' and {gpus} GPUs' if use_gpu else ''} "
            f"(train.num_workers={num_workers}); the cluster has {cluster}"
        )
    return slots


def search_trial(config: dict[str, Any], prepared: TrainingInputs, objective: Objective, storage: str) -> None:
    """One trial: this point's config, its TorchTrainer (named after the trial, so a restored trial's
    trainer resumes from its own checkpoints), fitted to the end."""
    cfg = trial_config(prepared.cfg, config)
    # Ray: the trial id names the Train run; the callback forwards the workers' reports to this trial
    name = f"train-{ray.tune.get_context().get_trial_id()}"
    report = InProcessReport(objective) if cfg.train.num_workers == 0 else ObjectiveReport(objective)
    trainer = build_trainer(dataclasses.replace(prepared, cfg=cfg), storage, name, [report])
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"trial {name} failed: {result.error}") from result.error


def run_search(
    base: Config,
    data_dir: str | Path,
    out: str | Path,
    trials: int,
    objective: Objective | str = "mean_auc",
    strategies: list[str] | None = None,
    archs: list[str] | None = None,
    lr_range: tuple[float, float] | None = (3e-4, 1e-2),
    points: list[dict[str, Any]] | None = None,
    baseline: bool = True,
    seed: int = 0,
    concurrency: int | None = None,
    grace_epochs: int = 1,
    callbacks: list[ray.tune.Callback] | None = None,
) -> dict[str, Any]:
    """Search ``trials`` points (the equal-weights baseline first when ``baseline``, then ``points``, then
    random draws from :func:`mtrec_tune.spaces.search_space`) on the Ray this process is connected to.

    Returns the summary written to ``OUT/result/summary.json``. Raises :class:`SearchInterrupted` when the
    search stopped early (e.g. SIGINT); calling again with the same arguments resumes it.
    """
    out = Path(out).resolve()
    objective = Objective.parse(objective) if isinstance(objective, str) else objective
    cfg = resolve_config(base, data_dir)
    names = [t.name for t in cfg.tasks]
    objective.check(cfg.tasks)
    cfg.train.objective = objective.primary  # each trial ranks checkpoints and stops early by it
    # the baseline: equal static weights at the base config's learning rate and architecture
    untuned = {**equal_weights(names), **({"lr": cfg.train.lr} if lr_range else {})}
    untuned |= {"arch": cfg.model.arch} if archs else {}
    fixed = ([untuned] if baseline else []) + list(points or [])
    if trials < len(fixed):
        raise ConfigError(f"--trials {trials} is fewer than the {len(fixed)} fixed points (baseline and points)")
    space = search_space(names, strategies, lr_range, archs)
    space["seed"] = cfg.train.seed  # fixed, so that a point may set it (repeat runs)
    for p in fixed:  # a bad point fails here, not in a trial
        trial_config(cfg, p)
        if set(p) - set(space):
            raise ConfigError(f"point {p} sets {sorted(set(p) - set(space))}, which this search does not vary")
    request = {
        "config": cfg.to_dict(),
        "trials": trials,
        "objective": objective.text,
        "strategies": strategies,
        "archs": archs,
        "lr_range": list(lr_range) if lr_range else None,
        "points": fixed,
        "seed": seed,
    }
    experiment = out / "ray" / EXPERIMENT
    restoring = ray.tune.Tuner.can_restore(experiment)
    _check_request(out / "request.json", request, restoring)
    stale = [out / "result"] + ([] if restoring else [experiment, out / "train"])
    for path in stale:  # a result that does not describe this search, or what a lost search left
        shutil.rmtree(path, ignore_errors=True)

    start = time.perf_counter()
    prepared = prepare(cfg, data_dir, out)  # examples and item vectors, once for every trial
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(search_trial, prepared=prepared, objective=objective, storage=str(out / "train")),
        {"CPU": DRIVER_CPUS, **({"GPU": 1} if cfg.train.use_gpu and cfg.train.num_workers == 0 else {})},
    )
    if restoring:
        tuner = ray.tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
    else:
        slots = concurrency or trial_slots(ray.cluster_resources(), cfg.train.num_workers, cfg.train.use_gpu)
        tuner = ray.tune.Tuner(
            trainable,
            param_space=space,
            tune_config=ray.tune.TuneConfig(
                num_samples=trials,  # each fixed point replaces one random draw
                # max_concurrent_trials is ignored with a search generator: the generator limits instead
                search_alg=BasicVariantGenerator(points_to_evaluate=fixed, random_state=seed, max_concurrent=slots),
                scheduler=ASHAScheduler(
                    metric=SCORE,
                    mode="max",
                    time_attr="epoch",
                    max_t=cfg.train.epochs,
                    grace_period=min(grace_epochs, cfg.train.epochs),
                    # a trial at max_t ends by itself: stopping it would kill its Train controller while it
                    # shuts down, leaving the worker placement group to Train's cleaner actor
                    stop_last_trials=False,
                ),
            ),
            run_config=ray.tune.RunConfig(
                name=EXPERIMENT, storage_path=str(out / "ray"), callbacks=callbacks or None, verbose=1
            ),
        )
    results = tuner.fit()
    unfinished = trials - _finished(experiment)
    if unfinished > 0:
        raise SearchInterrupted(
            f"search in {out} stopped with {unfinished} of {trials} trials unfinished; run the same command "
            "again to resume it"
        )
    return _publish(prepared, objective, results, out, time.perf_counter() - start)


def _finished(experiment: Path) -> int:
    """Trials the experiment state on disk records as TERMINATED or ERROR: what a resume will not run
    again. (Not the ResultGrid's: after Ctrl-C Tune stops the pending trials and marks them TERMINATED
    in memory, and a trial restored as finished may lack ``done`` in its last result.)"""
    trials = ray.tune.ExperimentAnalysis(str(experiment)).trials
    return sum(1 for t in trials if t.status in ("TERMINATED", "ERROR"))


def _check_request(path: Path, request: dict[str, Any], restoring: bool) -> None:
    """A search resumes only with the arguments it started with; a new one records them."""
    if restoring and path.exists():
        before = json.loads(path.read_text())
        changed = [
            k for k in request if json.dumps(before.get(k), sort_keys=True) != json.dumps(request[k], sort_keys=True)
        ]
        if changed:
            raise ConfigError(
                f"{path.parent} holds a search started with different {', '.join(changed)}; "
                "use another --out or the same arguments"
            )
        return
    atomic_write_text(path, json.dumps(request, indent=2, default=str))


def _flat(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _task_metric(kind: str) -> str:
    return "auc" if kind == "binary" else "rmse"


def trial_rows(prepared: TrainingInputs, results: ray.tune.ResultGrid) -> list[dict[str, Any]]:
    """One row per trial at its best epoch (by score): config, normalised task weights, validation
    metrics per task, objective, status, and the checkpoint of that epoch."""
    rows = []
    for r in results:
        cfg = trial_config(prepared.cfg, r.config)
        row: dict[str, Any] = {"trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name}
        row["status"] = "ERROR" if r.error is not None else "TERMINATED"
        row |= _flat(effective_point(r.config), "config.")
        if cfg.train.weighting in USES_TASK_WEIGHTS:
            row |= {f"loss_weight.{t.name}": t.loss_weight for t in cfg.tasks}
        df = r.metrics_dataframe
        epochs = df[df[SCORE].notna()] if df is not None and SCORE in df else None
        if epochs is None or epochs.empty:
            row |= {SCORE: math.nan, "feasible": False, "epochs": 0}
            rows.append(row)
            continue
        best = epochs.loc[epochs[SCORE].idxmax()]
        row |= {SCORE: float(best[SCORE]), "feasible": bool(best["feasible"]), "violation": float(best["violation"])}
        row |= {"value": float(best["value"]), "epochs": int(epochs["epoch"].max()), "best_epoch": int(best["epoch"])}
        for t in prepared.cfg.tasks:
            for m in ("auc", "logloss", "rmse", "mae"):
                col = f"valid/{t.name}/{m}"
                if col in best.index and not _isnan(best[col]):
                    row[f"valid.{t.name}.{m}"] = float(best[col])
        row["checkpoint_path"] = _existing_checkpoint(epochs, best)
        rows.append(row)
    return rows


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _existing_checkpoint(epochs: Any, best: Any) -> str | None:
    """The best epoch's checkpoint, or the best-scored one still on disk (Train keeps ``num_to_keep``,
    ranked by the trial's ``train.objective``, which a weighted objective does not match exactly)."""
    if "checkpoint_path" not in epochs:
        return None
    ranked = [best, *[row for _, row in epochs.sort_values(SCORE, ascending=False).iterrows()]]
    for row in ranked:
        path = row.get("checkpoint_path")
        if isinstance(path, str) and Path(path).exists():
            return path
    return None


def pareto(rows: list[dict[str, Any]], prepared: TrainingInputs) -> dict[str, Any]:
    """The non-dominated trials over each task's validation metric (AUC, or RMSE negated)."""
    names = [f"{t.name}.{_task_metric(t.kind)}" for t in prepared.cfg.tasks]
    sign = np.array([1.0 if t.kind == "binary" else -1.0 for t in prepared.cfg.tasks])
    points = np.array([[r.get(f"valid.{n}", math.nan) for n in names] for r in rows], dtype=np.float64) * sign
    front = non_dominated(points.reshape(len(rows), len(names)))
    return {
        "metrics": names,
        "higher_is_better": [bool(s > 0) for s in sign],
        "front": [
            {"trial_id": r["trial_id"], **{n: r.get(f"valid.{n}") for n in names}} for r, f in zip(rows, front) if f
        ],
        "dominated": [r["trial_id"] for r, f in zip(rows, front) if not f],
        "_points": points,
        "_front": front,
    }


def _publish(
    prepared: TrainingInputs, objective: Objective, results: ray.tune.ResultGrid, out: Path, wall_s: float
) -> dict[str, Any]:
    """Everything under ``OUT/result``, published at once (``summary.json`` describes it)."""
    rows = trial_rows(prepared, results)
    front = pareto(rows, prepared)
    ranked = [r for r in rows if r["status"] == "TERMINATED" and r["feasible"] and r.get("checkpoint_path")]
    best = max(ranked, key=lambda r: r[SCORE]) if ranked else None
    base = next((r for r in rows if r.get("config.weighting") == "static" and _is_equal(r, prepared)), None)
    summary: dict[str, Any] = {
        "objective": objective.text,
        "trials": len(rows),
        "errored": sum(r["status"] == "ERROR" for r in rows),
        "feasible": sum(bool(r["feasible"]) for r in rows),
        "wall_s": wall_s,
        "best": None if best is None else {k: v for k, v in best.items() if not k.startswith("config.")},
        "baseline": None if base is None else {"trial_id": base["trial_id"], SCORE: base[SCORE]},
        "pareto_front": [p["trial_id"] for p in front["front"]],
    }
    with atomic_dir(out / "result") as tmp:
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, tmp / "trials.parquet")
        pyarrow.csv.write_csv(table, tmp / "trials.csv")
        (tmp / "pareto.json").write_text(
            json.dumps({k: v for k, v in front.items() if not k.startswith("_")}, indent=2, default=float)
        )
        if len(front["metrics"]) > 1:
            plot_front(
                front["_points"],
                front["_front"],
                front["metrics"],
                [trial_label(r["trial_id"], r.get("config.weighting")) for r in rows],
                tmp / "pareto.png",
                baseline=None if base is None else rows.index(base),
                stopped=np.array([0 < r["epochs"] < prepared.cfg.train.epochs for r in rows], dtype=bool),
            )
        if best is not None:
            best_cfg = trial_config(prepared.cfg, results[rows.index(best)].config)
            metrics = finalize(
                dataclasses.replace(prepared, cfg=best_cfg),
                ray.train.Checkpoint(best["checkpoint_path"]),
                tmp / "best",
                wall_s,
            )
            summary["best"]["test"] = metrics["test"]
            preset = Config.from_dict(best_cfg.to_dict())
            preset.data.path = ""  # `mtrec train --data` names the data
            save_config(preset, tmp / "best.yaml")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    if best is None:
        raise MtrecError(f"no trial finished within the guardrails of {objective.text!r}; see {out / 'result'}")
    return summary


def _is_equal(row: dict[str, Any], prepared: TrainingInputs) -> bool:
    weights = [row.get(f"loss_weight.{t.name}") for t in prepared.cfg.tasks]
    return all(w is not None and abs(w - 1.0) < 1e-9 for w in weights)
