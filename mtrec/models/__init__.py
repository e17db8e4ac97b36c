"""Multi-task recommendation models: towers, architectures (shared-bottom, MMoE, PLE), ESMM heads, losses."""

from mtrec.models.architectures import ARCHITECTURES
from mtrec.models.losses import task_losses
from mtrec.models.multitask import MultiTaskModel, build_model
from mtrec.models.towers import ExtraItems, TextVectors

__all__ = ["ARCHITECTURES", "ExtraItems", "MultiTaskModel", "TextVectors", "build_model", "task_losses"]
