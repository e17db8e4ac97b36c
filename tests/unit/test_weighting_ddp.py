"""Every weighting strategy under a real two-process gloo group with DistributedDataParallel: after
each step all ranks hold identical weights, weighting state and model parameters, although each rank
sees different data (and one task is missing on one rank at some steps)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_weighting import TASKS, SharedBottom  # the same toy network and tasks
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mtrec.weighting import WEIGHTINGS, StepContext, build_weighting, project_conflicting
from mtrec.weighting.common import step_generator

WORLD = 2
STEPS = 6


def _mean_over_ranks(x: Tensor) -> Tensor:
    y = x.clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


def _same_on_all_ranks(what: str, x: Tensor) -> None:
    gathered = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(gathered, x.contiguous())
    same = torch.allclose(gathered[0], gathered[1], rtol=0.0, atol=0.0, equal_nan=True)  # bitwise, NaN == NaN
    assert same, f"{what} differs across ranks: {gathered}"


def _losses(logits: Tensor, y: Tensor) -> Tensor:
    """``(B, 3)`` outputs and labels -> ``(3,)``: BCE, MSE, BCE."""
    bce = nn.functional.binary_cross_entropy_with_logits
    mse = ((logits[:, 1] - y[:, 1]) ** 2).mean()
    return torch.stack([bce(logits[:, 0], y[:, 0]), mse, bce(logits[:, 2], y[:, 2])])


def _flat_grad(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])


def _run_strategy(name: str, rank: int) -> None:
    torch.manual_seed(0)  # same initial model on every rank (DDP also broadcasts rank 0's)
    model = SharedBottom()
    ddp = DistributedDataParallel(model)
    weighting = build_weighting(name, TASKS, reduce=_mean_over_ranks)
    shared = list(model.bottom.parameters())
    optimizer = torch.optim.Adam(list(ddp.parameters()) + list(weighting.parameters()), lr=0.05)
    data = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    for step in range(STEPS):
        x = torch.randn(32, 4, generator=data)
        y = torch.stack([(x[:, 0] > 0).float(), 3 * x[:, 1] + rank, (x[:, 2] > 0.5).float()], 1)
        observed = torch.tensor([True, True, rank == 0 or step % 2 == 0])  # buy missing on rank 1
        ctx = StepContext(shared_params=shared, observed=observed, step=step, epoch=step // 2)
        losses = _losses(ddp(x), y)
        if name == "pcgrad":  # what the shared gradient must be: PCGrad of the rank-averaged task grads
            local = torch.stack([_flat_grad(weighting.prior[t] * losses[t] * observed[t], shared) for t in range(3)])
            expected = project_conflicting(_mean_over_ranks(local), step_generator(0, step))
        loss, weights = weighting(losses, ctx)
        optimizer.zero_grad()
        loss.backward()
        weighting.after_backward()
        if name == "pcgrad":
            got = torch.cat([p.grad.reshape(-1) for p in shared])
            assert torch.allclose(got, expected, atol=1e-5), f"pcgrad step {step}: {got} != {expected}"
        optimizer.step()
        if step % 2 == 1:  # an "epoch" of two steps ends: its mean losses, averaged over ranks
            weighting.end_epoch(_mean_over_ranks(losses.detach()))
        _same_on_all_ranks(f"{name} weights at step {step}", weights)
        for key, value in weighting.state_dict().items():
            _same_on_all_ranks(f"{name} state {key} at step {step}", value)
        for key, value in model.state_dict().items():
            _same_on_all_ranks(f"{name} model {key} at step {step}", value)
    if name in ("uncertainty", "gradnorm", "famo", "dwa"):  # the state really moved
        moved = [v for k, v in weighting.state_dict().items() if k in ("log_var", "_weights", "_logits")]
        assert any(not torch.allclose(v, v.flatten()[0].expand_as(v)) for v in moved), f"{name} state did not move"


def _worker(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for name in WEIGHTINGS:
            _run_strategy(name, rank)
        dist.barrier()  # neither rank tears gloo down while the other is still in a collective (SIGABRT)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_strategy_keeps_ranks_identical_under_ddp() -> None:
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
