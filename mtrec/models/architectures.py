"""Multi-task architectures: features ``(B, D)`` in, one representation per task ``(B, expert_dim)`` out.

Every architecture sets ``gates``: per task, the gate weights of its last forward ``(B, E)`` (rows
sum to 1; empty for shared-bottom), and splits its parameters into shared and task-specific ones
(``task_specific_parameters``), which gradient-based weightings need.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtrec.config import ModelConfig
from mtrec.models.towers import mlp


def expert(in_dim: int, cfg: ModelConfig) -> nn.Module:
    """One expert (or the shared bottom): a two-layer ReLU network."""
    return nn.Sequential(mlp([in_dim, cfg.expert_dim, cfg.expert_dim], cfg.dropout), nn.ReLU())


class SharedBottom(nn.Module):
    """One bottom network every task reads (Caruana, 1997)."""

    def __init__(self, in_dim: int, tasks: list[str], cfg: ModelConfig) -> None:
        super().__init__()
        self._tasks = list(tasks)
        self.bottom = expert(in_dim, cfg)
        self.gates: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.bottom(x)
        return {t: h for t in self._tasks}

    def task_specific_parameters(self) -> list[nn.Parameter]:
        return []


class MMoE(nn.Module):
    """Multi-gate mixture of experts (Ma et al., KDD 2018): shared experts, one softmax gate per task."""

    def __init__(self, in_dim: int, tasks: list[str], cfg: ModelConfig) -> None:
        super().__init__()
        self._tasks = list(tasks)
        self.experts = nn.ModuleList(expert(in_dim, cfg) for _ in range(cfg.num_experts))
        self.gate = nn.ModuleDict({t: nn.Linear(in_dim, cfg.num_experts) for t in tasks})
        self.gates: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # (B, E, H)
        out = {}
        for t in self._tasks:
            g = torch.softmax(self.gate[t](x), dim=-1)
            self.gates[t] = g.detach()
            out[t] = torch.einsum("be,beh->bh", g, experts)
        return out

    def task_specific_parameters(self) -> list[nn.Parameter]:
        return list(self.gate.parameters())


class CGC(nn.Module):
    """One customized gate control level of PLE: task-specific and shared experts.

    Task ``t``'s gate mixes its own experts (fed with its input) and the shared experts (fed with the
    shared input); with ``shared_gate``, a further gate over all experts gives the shared output that
    the next level reads.
    """

    def __init__(self, in_dim: int, tasks: list[str], cfg: ModelConfig, shared_gate: bool) -> None:
        super().__init__()
        self._tasks = list(tasks)
        k, s = cfg.specific_experts, cfg.num_experts
        self.specific = nn.ModuleDict({t: nn.ModuleList(expert(in_dim, cfg) for _ in range(k)) for t in tasks})
        self.shared = nn.ModuleList(expert(in_dim, cfg) for _ in range(s))
        self.gate = nn.ModuleDict({t: nn.Linear(in_dim, k + s) for t in tasks})
        self.shared_gate = nn.Linear(in_dim, len(tasks) * k + s) if shared_gate else None

    def forward(self, task_in: dict[str, Tensor], shared_in: Tensor) -> tuple[dict, Tensor | None, dict]:
        shared = [e(shared_in) for e in self.shared]
        specific = {t: [e(task_in[t]) for e in self.specific[t]] for t in self._tasks}
        out, gates = {}, {}
        for t in self._tasks:
            g = torch.softmax(self.gate[t](task_in[t]), dim=-1)
            gates[t] = g
            out[t] = torch.einsum("be,beh->bh", g, torch.stack(specific[t] + shared, dim=1))
        shared_out = None
        if self.shared_gate is not None:
            everything = [h for t in self._tasks for h in specific[t]] + shared
            g = torch.softmax(self.shared_gate(shared_in), dim=-1)
            shared_out = torch.einsum("be,beh->bh", g, torch.stack(everything, dim=1))
        return out, shared_out, gates


class PLE(nn.Module):
    """Progressive layered extraction (Tang et al., RecSys 2020): ``ple_levels`` stacked CGC levels.

    ``gates`` holds the task gates of the last level (over the task's own and the shared experts).
    """

    def __init__(self, in_dim: int, tasks: list[str], cfg: ModelConfig) -> None:
        super().__init__()
        self._tasks = list(tasks)
        n = max(cfg.ple_levels, 1)
        self.levels = nn.ModuleList(
            CGC(in_dim if i == 0 else cfg.expert_dim, tasks, cfg, shared_gate=i < n - 1) for i in range(n)
        )
        self.gates: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        task_in: dict[str, Tensor] = {t: x for t in self._tasks}
        shared_in: Tensor | None = x
        for level in self.levels:
            task_in, shared_in, gates = level(task_in, shared_in)
        self.gates = {t: g.detach() for t, g in gates.items()}
        return task_in

    def task_specific_parameters(self) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        for level in self.levels:
            out += list(level.specific.parameters()) + list(level.gate.parameters())
        return out


ARCHITECTURES: dict[str, type[nn.Module]] = {"shared_bottom": SharedBottom, "mmoe": MMoE, "ple": PLE}
