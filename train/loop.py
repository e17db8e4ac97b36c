"""The per-worker training loop. Ray Train runs :func:`train_func` once on every worker; with
``train.num_workers=0`` the same loop runs in the calling process (:mod:`mtrec_train.local`).

Reads top to bottom: build the model and the weighting, restore the latest checkpoint if this is
a restart, wrap the model for DDP, then for each epoch stream this worker's shard, step, validate
and report. Everything the loop asks of its surroundings (rank, device, checkpoint to resume, shards,
report) goes through a :class:`WorkerSession`; :func:`ray_session` is Ray Train's.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mtrec.config import Config
from mtrec.engine import evaluate, make_optimizer, make_scheduler, objective_value, text_inputs, train_step
from mtrec.features import ExampleSet, FeatureMeta, collate
from mtrec.models import MultiTaskModel, build_model
from mtrec.weighting import StepContext, build_weighting
from mtrec_train.checkpoint import TrainState, load_checkpoint, save_checkpoint

OBJECTIVE_KEY = "objective"  # the reported metric that ranks checkpoints (higher is better)


def _allreduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all ranks (the reduce hook every weighting uses)."""
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


def _gather(x: np.ndarray) -> np.ndarray:
    """One evaluation array concatenated over all ranks, on every rank."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x)
    return np.concatenate(parts)


def _fetch_vectors(ref: Any) -> torch.Tensor | None:
    """A vector table from the object store or, in-process, the array itself (a writable copy), or None
    when there is none."""
    value = ref if ref is None or isinstance(ref, np.ndarray) else ray.get(ref)
    return None if value is None else torch.from_numpy(np.array(value, dtype=np.float32))


def build_run_model(
    cfg: Config, meta: FeatureMeta, item_vectors_ref: Any, context_vectors_ref: Any
) -> tuple[MultiTaskModel, torch.Tensor | None, torch.Tensor | None]:
    """The run's model (on the CPU) with its text inputs set up by :func:`~mtrec.engine.text_inputs`;
    frozen mode's vectors come from the object store (``*_ref``: ObjectRefs the driver encoded once per
    run, or None). Returns ``(model, item_vectors, context_vectors)``: the bundle stores the vectors."""
    stored = _fetch_vectors(item_vectors_ref), _fetch_vectors(context_vectors_ref)
    item_vectors, context_vectors, encoder = text_inputs(cfg, meta, vectors=stored)
    return build_model(cfg, meta, item_vectors, encoder, context_vectors), item_vectors, context_vectors


def _check_in_sync(model: torch.nn.Module, weighting: torch.nn.Module) -> None:
    """Every rank must hold the same parameters and weighting state; fail loudly if they drift."""
    with torch.no_grad():
        tensors = [
            t.detach().double().flatten() for t in (*model.state_dict().values(), *weighting.state_dict().values())
        ]
        flat = torch.cat(tensors)
        fingerprint = torch.stack([flat.sum(), flat.abs().sum()]).cpu()
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, fingerprint.tolist())
    if any(f != everyone[0] for f in everyone):
        raise RuntimeError(f"ranks diverged: parameter fingerprints {everyone}")


@dataclass
class WorkerSession:
    """What the loop needs from where it runs."""

    rank: int
    world: int
    device: torch.device
    checkpoint: Any  # a ``ray.train.Checkpoint`` to resume from (a restart), or None on a fresh run
    shard: Callable[[str], Any]  # split -> this worker's part, with Ray Data's ``iter_batches``
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module]  # DDP wrapping, or nothing
    report: Callable[[dict[str, Any], Path | None], None]  # metrics, a checkpoint folder (rank 0) or None


def ray_session() -> WorkerSession:
    """This Ray Train worker's session."""
    # Ray: who am I, and how many of us are there
    ctx = ray.train.get_context()

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        # Ray: a barrier every rank calls; only rank 0 hands over the checkpoint
        ray.train.report(
            metrics, checkpoint=None if checkpoint is None else ray.train.Checkpoint.from_directory(checkpoint)
        )

    return WorkerSession(
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        # Ray: the latest checkpoint when this is a restart after a failure (None on a fresh run)
        checkpoint=ray.train.get_checkpoint(),
        # Ray: this worker's shard of each split (streamed from Parquet by Ray Data)
        shard=ray.train.get_dataset_shard,
        # Ray: move to this worker's device and wrap in DistributedDataParallel (gloo on CPU, NCCL on
        # GPU); buffers (the item-vector and token tables) are identical on every rank: never re-broadcast
        prepare_model=lambda m: ray.train.torch.prepare_model(m, parallel_strategy_kwargs={"broadcast_buffers": False}),
        report=report,
    )


def train_func(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's entry on every worker."""
    return run_loop(config, ray_session())


def run_loop(config: dict[str, Any], session: WorkerSession) -> dict[str, Any]:
    cfg = Config.from_dict(config["cfg"])
    tasks = cfg.tasks
    rank, world, device = session.rank, session.world, session.device
    distributed = world > 1 and dist.is_initialized()
    torch.manual_seed(cfg.train.seed)  # identical initial parameters on every rank

    meta = ExampleSet.load(config["examples_dir"]).meta
    # frozen mode's vectors, encoded once for the run, come from the object store
    model, _, _ = build_run_model(cfg, meta, config["item_vectors"], config["context_vectors"])
    model.to(device)
    weighting = build_weighting(
        cfg.train.weighting, tasks, reduce=_allreduce_mean if distributed else None, **cfg.train.weighting_params
    )
    weighting.to(device)
    optimizer = make_optimizer(model, weighting, cfg)
    state = TrainState()

    checkpoint = session.checkpoint
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d), cfg, model, weighting, optimizer)
        state.restarts += 1
        if rank == 0:
            print(f"[train] resumed in epoch {state.epoch + 1} at step {state.step}", file=sys.stderr, flush=True)

    ddp_model = session.prepare_model(model)
    shared = model.shared_parameters() if weighting.needs_shared_grads else []
    use_amp = cfg.train.use_gpu and cfg.train.bf16 and device.type == "cuda"

    train_shard, valid_shard = session.shard("train"), session.shard("valid")

    rows = meta.counts["train"]
    steps_per_epoch = max(1, rows // (cfg.train.batch_size * world))
    total_steps = steps_per_epoch * cfg.train.epochs
    every = cfg.train.checkpoint_every_steps
    scheduler = make_scheduler(optimizer, total_steps)  # cosine decay, a pure function of the step
    with warnings.catch_warnings():  # resumed: catch the schedule up with the restored step (no optimizer
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)  # step: on purpose)
        for _ in range(state.step):
            scheduler.step()

    def report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if with_checkpoint and rank == 0:
                save_checkpoint(Path(tmp), cfg, model, weighting, optimizer, state)
                ckpt = Path(tmp)
            session.report(metrics, ckpt)

    while state.epoch < cfg.train.epochs and not state.stopped:
        ddp_model.train()
        epoch_losses = torch.zeros(len(tasks), device=device)
        epoch_counts = torch.zeros(len(tasks), device=device)
        t0, seen, waited = time.perf_counter(), 0, 0.0
        batches = train_shard.iter_batches(
            batch_size=cfg.train.batch_size,
            batch_format="numpy",
            drop_last=True,  # equal batch counts on every rank: DDP all-reduces per step
            local_shuffle_buffer_size=cfg.train.batch_size * 8,
            local_shuffle_seed=cfg.train.seed * 1000 + state.epoch,
        )
        stream = iter(batches)
        for i in itertools.count():
            t_wait = time.perf_counter()
            raw = next(stream, None)  # the time spent here is the input pipeline's (Ray Data) share
            waited += time.perf_counter() - t_wait
            if raw is None:
                break
            if i < state.batch_in_epoch:  # resumed mid-epoch: these batches were already trained
                continue
            batch = {k: v.to(device) for k, v in collate(raw).items()}
            step_ctx = StepContext(shared_params=shared, step=state.step, epoch=state.epoch)
            out = train_step(ddp_model, weighting, optimizer, batch, step_ctx, amp=use_amp)
            scheduler.step()
            observed = step_ctx.observed.float()
            epoch_losses += torch.nan_to_num(torch.tensor(out["losses"], device=device)) * observed
            epoch_counts += observed
            state.step += 1
            state.batch_in_epoch = i + 1
            seen += len(batch["labels"])
            if rank == 0 and state.step % cfg.train.log_every_steps == 0:
                rate = seen * world / (time.perf_counter() - t0)
                _progress(state, total_steps, rate, cfg.train.batch_size * world, out, tasks)
            if every and state.step % every == 0:
                report({"epoch": state.epoch, "step": state.step, OBJECTIVE_KEY: math.nan}, True)

        # end of epoch: epoch-mean losses agree across ranks before the weighting sees them
        if distributed:
            epoch_losses, epoch_counts = _allreduce_mean(epoch_losses), _allreduce_mean(epoch_counts)
        mean_losses = torch.where(epoch_counts > 0, epoch_losses / epoch_counts.clamp(min=1e-9), torch.nan)
        weighting.end_epoch(mean_losses)
        if distributed:
            _check_in_sync(model, weighting)
        epoch_s = time.perf_counter() - t0
        train_rate = seen * world / epoch_s

        valid_batches = (collate(b) for b in valid_shard.iter_batches(batch_size=4096, batch_format="numpy"))
        metrics = evaluate(ddp_model, valid_batches, tasks, gather=_gather if distributed else None)
        value = objective_value(metrics, cfg.train.objective)
        state.epoch += 1
        state.batch_in_epoch = 0
        state.record(value, cfg.train.early_stop_patience)
        row = {
            "epoch": state.epoch,
            "step": state.step,
            OBJECTIVE_KEY: value,
            "samples_per_s": train_rate,
            "input_wait_frac": waited / epoch_s,  # this rank's share of the epoch spent waiting for batches
            "valid": metrics,
            "train_loss": dict(zip([t.name for t in tasks], mean_losses.tolist())),
            "task_weights": dict(zip([t.name for t in tasks], out["weights"])),
            "stopped": state.stopped,
            "restarts": state.restarts,
            "ranks_in_sync": distributed,
        }
        state.history.append(row)
        if rank == 0:
            print(f"[train] epoch {state.epoch}: {cfg.train.objective}={value:.4f} {json.dumps(metrics)}", flush=True)
        report(row, True)
    return {"history": state.history}


def _progress(
    state: TrainState, total: int, rate: float, samples_per_step: int, out: dict[str, Any], tasks: list
) -> None:
    losses = " ".join(f"{t.name}={v:.4f}" for t, v in zip(tasks, out["losses"]))
    eta = max(0, total - state.step) * samples_per_step / max(rate, 1e-9)
    print(
        f"[train] step {state.step}/{total} epoch {state.epoch + 1} {rate:,.0f} samples/s loss {losses} eta {eta:,.0f}s",
        flush=True,
    )
