"""Training and evaluation in plain torch: the step logic, and a single-process ``fit``.

``train_step`` and ``evaluate`` are what the Ray Train worker loop calls too, with a
DistributedDataParallel-wrapped model (forward goes through the wrapper; model attributes are read
from ``model.module``, see :func:`unwrap`), a weighting built with the ranks' ``reduce``, and a
``gather`` that concatenates evaluation arrays over ranks. ``fit`` is the one-process loop that tests,
benchmarks and notebooks use.
"""

from __future__ import annotations

import copy
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from mtrec.config import Config, TaskSpec
from mtrec.errors import ConfigError
from mtrec.features import ExampleSet, FeatureMeta, collate, prepare_examples
from mtrec.fusion import fit_scales
from mtrec.metrics import task_metrics
from mtrec.models import MultiTaskModel, build_model, task_losses
from mtrec.weighting import StepContext, Weighting, build_weighting

if TYPE_CHECKING:
    from mtrec.encoders import TextEncoder

GRAD_CLIP = 5.0  # max global gradient norm of the model's parameters
Gather = Callable[[np.ndarray], np.ndarray]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> MultiTaskModel:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def make_optimizer(model: nn.Module, weighting: Weighting, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; the language model's trainable layers get their own, lower learning rate."""
    m = unwrap(model)
    encoder = {id(p) for p in m.encoder_parameters()}
    rest = [p for p in m.parameters() if p.requires_grad and id(p) not in encoder]
    groups = [{"params": rest, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}]
    if encoder:
        groups.append(
            {"params": m.encoder_parameters(), "lr": cfg.train.encoder_lr, "weight_decay": cfg.train.weight_decay}
        )
    if any(True for _ in weighting.parameters()):
        groups.append({"params": list(weighting.parameters()), "lr": cfg.train.lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, fused=True)  # fused: one kernel per step, also on the CPU


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay of every group's learning rate to zero over ``total_steps`` (one step per batch):
    the noisy late updates shrink, so the last epochs settle instead of wandering."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
    )


def batches(
    arrays: dict[str, np.ndarray], batch_size: int, rng: np.random.Generator | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Slices of example columns (shuffled when ``rng`` is given), ready for :func:`collate`."""
    n = len(arrays["user"])
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        yield {k: v[rows] for k, v in arrays.items()}


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(
    model: nn.Module,
    weighting: Weighting,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    ctx: StepContext,
    amp: bool = False,
) -> dict[str, float | list[float]]:
    """One optimisation step on a collated batch; returns ``loss`` and per-task ``losses`` and ``weights``.

    forward -> task losses (T,) -> weighting -> backward -> weighting.after_backward -> clip -> step.
    ``amp``: bfloat16 autocast (GPU).
    """
    m = unwrap(model)
    model.train()
    with torch.autocast(device_type=batch["labels"].device.type, dtype=torch.bfloat16, enabled=amp):
        preds = model(batch)
        losses, observed = task_losses(preds, batch["labels"], m.tasks, m.loss_scales)
    ctx.observed = observed
    if weighting.needs_shared_grads and not ctx.shared_params:
        ctx.shared_params = m.shared_parameters()
    loss, weights = weighting(losses, ctx)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    weighting.after_backward()
    torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.grad is not None], GRAD_CLIP)
    optimizer.step()
    return {"loss": float(loss.detach()), "losses": losses.detach().tolist(), "weights": weights.detach().tolist()}


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, np.ndarray]:
    """``labels`` (N, T), ``preds`` (N, T), ``cold`` (N,), ``user`` (N,) over the given batches."""
    m = unwrap(model)
    model.eval()
    out: dict[str, list[np.ndarray]] = {"labels": [], "preds": [], "cold": [], "user": []}
    for b in batches:
        p = model(b)
        out["preds"].append(torch.stack([p[t.name] for t in m.tasks], dim=1).float().cpu().numpy())
        out["labels"].append(b["labels"].cpu().numpy())
        out["cold"].append(b["cold"].cpu().numpy())
        out["user"].append(b["user"].cpu().numpy())
    width = {"labels": (len(m.tasks),), "preds": (len(m.tasks),), "cold": (), "user": ()}
    return {k: np.concatenate(v) if v else np.zeros((0, *width[k])) for k, v in out.items()}


def evaluate(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], tasks: list[TaskSpec], gather: Gather | None = None
) -> dict[str, dict[str, float]]:
    """:func:`mtrec.metrics.task_metrics` of the model's predictions (with cold-item metrics; the user
    groups rows for NDCG/HR). ``gather`` concatenates each array over ranks before the metrics."""
    arrays = predict(model, batches)
    if gather is not None:
        arrays = {k: gather(v) for k, v in arrays.items()}
    return task_metrics(tasks, arrays["labels"], arrays["preds"], cold=arrays["cold"], groups=arrays["user"])


def fusion_scales(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """Each task's reference scale for serving's score fusion (:func:`mtrec.fusion.fit_scales`): its mean
    prediction over the batches (every row, labelled or not: a sample of what serving scores); 1.0 for
    a task whose mean is not positive (a regression task centred on zero) or when there are no rows."""
    preds = predict(model, batches)["preds"]  # (N, T)
    scales = {}
    for j, task in enumerate(unwrap(model).tasks):
        try:
            scales.update(fit_scales({task.name: preds[:, j]}))
        except ValueError:
            scales[task.name] = 1.0
    return scales


def objective_value(metrics: dict[str, dict[str, float]], objective: str) -> float:
    """Higher is better. ``mean_auc``: mean AUC of the binary tasks (minus the mean RMSE when no task
    is binary); ``<task>.<metric>``: one metric, negated for losses and errors."""
    if objective == "mean_auc":
        aucs = [m["auc"] for m in metrics.values() if "auc" in m and not math.isnan(m["auc"])]
        return float(np.mean(aucs)) if aucs else -float(np.mean([m["rmse"] for m in metrics.values() if "rmse" in m]))
    task, _, name = objective.partition(".")
    if task not in metrics or name not in metrics[task]:
        valid = ["mean_auc"] + [f"{t}.{k}" for t, m in metrics.items() for k in m]
        raise ConfigError(f"train.objective {objective!r} is not one of {', '.join(valid)}")
    value = metrics[task][name]
    return -value if name in ("logloss", "rmse", "mae", "cold_rmse") else value


def text_inputs(
    cfg: Config,
    meta: FeatureMeta,
    encoder: TextEncoder | None = None,
    vectors: tuple[Tensor | None, Tensor | None] | None = None,
) -> tuple[Tensor | None, Tensor | None, TextEncoder | None]:
    """What :func:`build_model` needs for ``cfg.encoder.mode``: ``(item_vectors, context_vectors, encoder)``.
    Training, its Ray workers and bundle loading all set a model's text inputs up here.

    ``frozen``: the vectors ``(num_items + 1, D)`` of every item text (and ``(num_contexts + 1, D)`` of
    every context, or None), row 0 zeros, the encoder not kept: ``vectors`` when they were encoded
    already (the object store, a bundle), else encoded now through the cache. ``finetune``: ``encoder``,
    or the one ``cfg.encoder`` names. ``none``: nothing. ``vectors`` is read in frozen mode only.
    """
    if cfg.encoder.mode == "none":
        return None, None, None
    if cfg.encoder.mode == "frozen" and vectors is not None:
        return *vectors, None
    from mtrec.encoders import TextEncoder, encode_cached

    encoder = encoder or TextEncoder.from_config(cfg.encoder)
    if cfg.encoder.mode == "finetune":
        return None, None, encoder
    table = lambda texts: torch.as_tensor(  # noqa: E731
        np.concatenate(
            [
                np.zeros((1, encoder.dim), np.float32),
                encode_cached(encoder, texts, cfg.encoder.cache_dir or None, cfg.encoder.batch_size),
            ]
        )
    )
    return table(meta.item_texts), table(meta.contexts) if meta.contexts else None, None


@dataclass
class FitResult:
    """A trained model, what it was built from, and its metrics per split."""

    model: MultiTaskModel
    meta: FeatureMeta
    item_vectors: Tensor | None
    context_vectors: Tensor | None
    metrics: dict[str, dict[str, dict[str, float]]]  # split -> task -> metric
    history: list[dict] = field(default_factory=list)  # one entry per epoch
    samples_per_s: float = 0.0
    fusion_scales: dict[str, float] = field(default_factory=dict)  # task -> :func:`fusion_scales` on valid

    def save_bundle(self, path: str | Path, cfg: Config) -> Path:
        """This model as a serving bundle at ``path`` (``cfg``: the config it was trained with)."""
        from mtrec.bundle import save_bundle

        meta, model = self.meta, self.model
        return save_bundle(path, cfg, meta, model, self.fusion_scales, self.item_vectors, self.context_vectors)


def fit(
    cfg: Config,
    data: str | Path | ExampleSet,
    work_dir: str | Path | None = None,
    encoder: TextEncoder | None = None,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Train on the train split with early stopping on the valid split; evaluate valid and test.

    ``data``: a dataset directory (examples are prepared into ``work_dir/examples``, or a temporary
    directory) or prepared examples. ``encoder``: a TextEncoder to use instead of loading
    ``cfg.encoder`` (tests pass tiny ones). AdamW with a cosine learning-rate decay over
    ``cfg.train.epochs`` (:func:`make_scheduler`). The returned model holds the best epoch's weights.
    """
    seed_everything(cfg.train.seed)
    if isinstance(data, ExampleSet):
        examples = data
        splits = {s: examples.arrays(s) for s in ("train", "valid", "test")}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            examples = prepare_examples(data, cfg, Path(work_dir or tmp) / "examples")
            splits = {s: examples.arrays(s) for s in ("train", "valid", "test")}
    meta = examples.meta
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    amp = cfg.train.bf16 and device.type == "cuda"
    item_vectors, context_vectors, text_encoder = text_inputs(cfg, meta, encoder)
    model = build_model(cfg, meta, item_vectors, text_encoder, context_vectors).to(device)
    weighting = build_weighting(cfg.train.weighting, meta.tasks, **cfg.train.weighting_params).to(device)
    optimizer = make_optimizer(model, weighting, cfg)
    steps_per_epoch = -(-len(splits["train"]["user"]) // cfg.train.batch_size)
    scheduler = make_scheduler(optimizer, cfg.train.epochs * steps_per_epoch)
    rng = np.random.default_rng(cfg.train.seed)
    eval_batches = lambda s: (to_device(collate(b), device) for b in batches(splits[s], 4 * cfg.train.batch_size))  # noqa: E731

    best, best_state, stale, history, ctx = -math.inf, None, 0, [], StepContext()
    num_tasks = len(meta.tasks)
    for epoch in range(cfg.train.epochs):
        ctx.epoch, start, seen, loss_steps = epoch, time.perf_counter(), 0, []
        loss_sum, observed, weight_sum = np.zeros(num_tasks), np.zeros(num_tasks), np.zeros(num_tasks)
        for b in batches(splits["train"], cfg.train.batch_size, rng):
            out = train_step(model, weighting, optimizer, to_device(collate(b), device), ctx, amp)
            scheduler.step()
            mask = ctx.observed.cpu().numpy()
            loss_sum += np.asarray(out["losses"]) * mask
            observed += mask
            weight_sum += out["weights"]
            loss_steps.append(out["loss"])
            seen, ctx.step = seen + len(b["user"]), ctx.step + 1
        seconds = time.perf_counter() - start
        losses = np.where(observed > 0, loss_sum / np.maximum(observed, 1), np.nan)  # over batches with labels
        weighting.end_epoch(torch.as_tensor(losses, dtype=torch.float32, device=device))
        valid = evaluate(model, eval_batches("valid"), meta.tasks)
        score = objective_value(valid, cfg.train.objective)
        history.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(loss_steps)) if loss_steps else math.nan,
                "losses": losses.tolist(),
                "weights": (weight_sum / max(len(loss_steps), 1)).tolist(),
                "valid": valid,
                "objective": score,
                "samples_per_s": seen / seconds,
                "seconds": seconds,
            }
        )
        if log:
            log(
                f"epoch {epoch}: {cfg.train.objective} {score:.4f}, {seen / seconds:.0f} samples/s, losses {np.round(losses, 4).tolist()}"
            )
        if score > best:
            best, best_state, stale = score, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if cfg.train.early_stop_patience and stale >= cfg.train.early_stop_patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    metrics = {s: evaluate(model, eval_batches(s), meta.tasks) for s in ("valid", "test")}
    speed = float(np.mean([h["samples_per_s"] for h in history])) if history else 0.0
    scales = fusion_scales(model, eval_batches("valid"))
    return FitResult(model, meta, item_vectors, context_vectors, metrics, history, speed, scales)
