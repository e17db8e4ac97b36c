"""Pieces every weighting strategy shares: masking unobserved tasks, rank-averaged losses, per-task
gradients on the shared parameters, a rank-identical random generator and number checks."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor, nn

from mtrec.errors import ConfigError
from mtrec.weighting.base import Reduce, StepContext


def observed_mask(losses: Tensor, ctx: StepContext) -> Tensor:
    """``(T,) bool``: which tasks had labels in this batch (all of them when ``ctx.observed`` is None)."""
    if ctx.observed is None:
        return torch.ones(losses.shape, dtype=torch.bool, device=losses.device)
    if ctx.observed.shape != losses.shape:
        raise ValueError(f"StepContext.observed has shape {tuple(ctx.observed.shape)}, losses {tuple(losses.shape)}")
    return ctx.observed.to(device=losses.device, dtype=torch.bool)


def observed_losses(losses: Tensor, observed: Tensor) -> Tensor:
    """``(T,)``: ``losses`` with those of unobserved tasks exactly zero, even a NaN, for
    :func:`~mtrec.weighted.weighted_sum`; their heads stay in the graph (so data-parallel wrappers see
    every parameter used)."""
    return torch.where(observed, losses, 0.0)


def rank_mean_losses(losses: Tensor, observed: Tensor, reduce: Reduce) -> tuple[Tensor, Tensor]:
    """Mean loss per task over the ranks that observed it, with one ``reduce`` call.

    Returns ``(mean (T,) float, NaN where no rank observed the task; seen (T,) bool)``; both are the
    same on every rank.
    """
    packed = torch.stack([torch.where(observed, losses.detach().float(), 0.0), observed.float()])
    total, count = reduce(packed)  # averages over ranks: total / count is unaffected
    seen = count > 0
    return torch.where(seen, total / count.clamp_min(1e-12), math.nan), seen


def trainable(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters that take gradients (a frozen encoder layer among the shared ones is skipped)."""
    return [p for p in params if p.requires_grad]


def task_grads(losses: Tensor, observed: Tensor, params: list[nn.Parameter]) -> Tensor:
    """``(T, P) float``: this rank's gradient of each task loss on ``params``, flattened.

    Rows of unobserved tasks (and of losses with no graph) are zero. Uses ``torch.autograd.grad`` with
    ``retain_graph=True``, so the caller can still run ``backward`` on the same graph.
    """
    if not params:
        raise ValueError("a gradient weighting needs StepContext.shared_params; got an empty list")
    size = sum(p.numel() for p in params)
    rows = []
    for t in range(losses.shape[0]):
        if bool(observed[t]) and losses[t].requires_grad:
            grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True, materialize_grads=True)
            rows.append(torch.cat([g.reshape(-1).float() for g in grads]))
        else:
            rows.append(torch.zeros(size, device=params[0].device))
    return torch.stack(rows)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded by ``(seed, step)``: every rank draws the same numbers at the same step
    without communicating, and a resumed run draws what the original run would have. The pair is
    hashed to the 32 bits the CPU generator (mt19937) actually uses."""
    digest = hashlib.blake2b(f"{seed}/{step}".encode(), digest_size=4).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def number(strategy: str, name: str, value: float, *, allow_zero: bool = False) -> float:
    """``value`` as a float; ConfigError unless it is a positive (or, with ``allow_zero``, non-negative)
    finite number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"weighting {strategy!r}: parameter {name!r} must be a {kind} number, got {value!r}")
    return float(value)
