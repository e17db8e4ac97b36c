"""Training checkpoints: model and weighting tensors as safetensors, optimizer state loaded with
``weights_only=True``, progress as JSON. Nothing here unpickles arbitrary objects."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mtrec.bundle import load_persisted_state, persisted_state
from mtrec.config import Config

MODEL, WEIGHTING, OPTIMIZER, STATE = "model.safetensors", "weighting.safetensors", "optimizer.pt", "state.json"


@dataclass
class TrainState:
    """Progress that must survive a restart."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # batches of the current epoch already trained (mid-epoch checkpoints)
    best: float = -math.inf
    bad_epochs: int = 0
    stopped: bool = False
    restarts: int = 0  # times this run resumed from a checkpoint after a failure
    history: list[dict[str, Any]] = field(default_factory=list)

    def record(self, value: float, patience: int) -> None:
        """Early stopping on the validation objective (higher is better)."""
        if value > self.best:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
            self.stopped = patience > 0 and self.bad_epochs >= patience


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_checkpoint(
    d: Path, cfg: Config, model: torch.nn.Module, weighting: torch.nn.Module, optimizer, state: TrainState
) -> None:
    save_file(_contiguous(persisted_state(model, cfg)), str(d / MODEL))  # LoRA: no frozen base weights
    save_file(_contiguous(weighting.state_dict()) or {"_empty": torch.zeros(0)}, str(d / WEIGHTING))
    torch.save(optimizer.state_dict(), d / OPTIMIZER)
    (d / STATE).write_text(json.dumps(asdict(state)))


def load_checkpoint(d: Path, cfg: Config, model: torch.nn.Module, weighting: torch.nn.Module, optimizer) -> TrainState:
    load_model_weights(d, cfg, model)
    w = load_file(str(d / WEIGHTING))
    w.pop("_empty", None)
    weighting.load_state_dict(w)
    if optimizer is not None and (d / OPTIMIZER).exists():
        optimizer.load_state_dict(torch.load(d / OPTIMIZER, weights_only=True))
    return TrainState(**json.loads((d / STATE).read_text()))


def load_model_weights(d: Path, cfg: Config, model: torch.nn.Module) -> None:
    load_persisted_state(model, load_file(str(d / MODEL)), cfg)
