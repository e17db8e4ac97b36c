"""The multi-task recommendation model: towers, a multi-task architecture and one head per task.

features = [user, item, user ⊙ item, context, interaction numbers]  (B, D)
        -> architecture (shared-bottom | MMoE | PLE)                 task -> (B, expert_dim)
        -> one head per task                                         task -> (B,)

Binary heads give probabilities; a task with ``depends_on`` is chained ESMM-style (Ma et al.,
SIGIR 2018): p(child) = p(parent) · p(child | parent). Regression heads give values in the label's
unit (the head's output is scaled by the label's train std and shifted by its mean).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from mtrec.config import Config, TaskSpec
from mtrec.errors import ConfigError
from mtrec.features import FeatureMeta
from mtrec.models.architectures import ARCHITECTURES
from mtrec.models.losses import parents_first
from mtrec.models.towers import ExtraItems, ItemTower, TextVectors, UserTower, mlp

if TYPE_CHECKING:
    from mtrec.encoders import TextEncoder


class MultiTaskModel(nn.Module):
    """``model(batch) -> {task: (B,)}``; see :func:`mtrec.features.collate` for the batch."""

    def __init__(
        self,
        cfg: Config,
        meta: FeatureMeta,
        item_text: TextVectors | None,
        context_text: TextVectors | None,
        text_dim: int,
        encoder: TextEncoder | None,
    ) -> None:
        super().__init__()
        m = cfg.model
        self.tasks: list[TaskSpec] = list(meta.tasks)
        self._order: list[tuple[int, TaskSpec]] = [(self.tasks.index(t), t) for t in parents_first(self.tasks)]
        self.encoder = encoder  # a submodule only in finetune mode
        n_items = meta.num_items + 1
        item_cat = _table(meta.item_cat_values, (n_items, len(meta.item_cat)), torch.long)
        item_num = _table(meta.item_num_values, (n_items, len(meta.item_num)), torch.float32)
        self.item_tower = ItemTower(
            m,
            torch.as_tensor(meta.item_id_rows()),
            meta.items.num_rows,
            1 + len(meta.items.values),
            item_cat,
            [v.num_rows for v in meta.item_cat.values()],
            item_num,
            item_text,
            text_dim,
        )
        self.user_tower = UserTower(
            m,
            meta.users.num_rows,
            1 + len(meta.users.values),
            [v.num_rows for v in meta.user_cat.values()],
            len(meta.user_num),
            meta.max_history,
        )
        self._use_history = m.history != "none"
        self.context_text = context_text
        self.context_proj = nn.Linear(text_dim, m.proj_dim) if context_text is not None else None
        in_dim = 3 * m.proj_dim + (m.proj_dim if context_text is not None else 0) + len(meta.inter_num)
        if m.arch not in ARCHITECTURES:
            raise ConfigError(f"model.arch: {m.arch!r} is not one of {', '.join(ARCHITECTURES)}")
        self.arch = ARCHITECTURES[m.arch](in_dim, [t.name for t in self.tasks], m)
        self.heads = nn.ModuleDict({t.name: mlp([m.expert_dim, m.tower_dim, 1], m.dropout) for t in self.tasks})
        stats = [meta.label_stats.get(t.name, (0.0, 1.0)) for t in self.tasks]
        self.register_buffer("label_mean", torch.tensor([s[0] for s in stats], dtype=torch.float32))
        self.register_buffer("label_std", torch.tensor([s[1] for s in stats], dtype=torch.float32))
        self.gates: dict[str, Tensor] = {}

    def forward(
        self, batch: dict[str, Tensor], extra_items: ExtraItems | None = None, extra_contexts: Tensor | None = None
    ) -> dict[str, Tensor]:
        """A collated batch -> per task ``(B,)``: a probability (binary, after the ESMM chain) or a value.

        Serving only: ``extra_items`` are items outside the catalog (item indexes ``num_items + 1 ..``),
        ``extra_contexts`` (X, D) raw text vectors of contexts outside the bundle's table (context
        indexes ``num_contexts + 1 ..``). Without them this is the training computation, unchanged.
        """
        item = batch["item"]
        history = batch["history"] if self._use_history else item.new_zeros(len(item), 0)
        vectors = self.item_tower(torch.cat([item.unsqueeze(1), history], dim=1), self.encoder, extra_items)
        target = vectors[:, 0]
        user = self.user_tower(batch["user"], batch["user_cat"], batch["user_num"], vectors[:, 1:], history > 0, target)
        features = [user, target, user * target]
        if self.context_text is not None:
            context = self.context_text(batch["context"], self.encoder, extra_contexts)
            features.append(self.context_proj(context))
        features.append(batch["inter_num"])
        reps = self.arch(torch.cat(features, dim=-1))
        self.gates = self.arch.gates
        out: dict[str, Tensor] = {}
        for j, t in self._order:
            z = self.heads[t.name](reps[t.name]).squeeze(-1)
            if t.kind == "regression":
                out[t.name] = z * self.label_std[j] + self.label_mean[j]
            else:
                p = torch.sigmoid(z)
                out[t.name] = p * out[t.depends_on] if t.depends_on is not None else p
        return {t.name: out[t.name] for t in self.tasks}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters every task's loss reaches (all but gates, task experts and heads)."""
        specific = {id(p) for p in self.arch.task_specific_parameters()} | {id(p) for p in self.heads.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in specific]

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The language model's trainable parameters (finetune mode), for their own learning rate."""
        return [] if self.encoder is None else [p for p in self.encoder.parameters() if p.requires_grad]

    @property
    def loss_scales(self) -> Tensor:
        """(T,) the scale each task's loss is measured in (label std for regression, 1 for binary)."""
        return self.label_std


def build_model(
    cfg: Config,
    meta: FeatureMeta,
    item_vectors: Tensor | None = None,
    encoder: TextEncoder | None = None,
    context_vectors: Tensor | None = None,
) -> MultiTaskModel:
    """The model for ``cfg.encoder.mode``.

    ``none``: ids and side features only. ``frozen``: ``item_vectors`` (num_items + 1, D) cached text
    vectors, row 0 zeros (and ``context_vectors`` (num_contexts + 1, D) when the data has contexts).
    ``finetune``: ``encoder``, whose top ``cfg.encoder.finetune_layers`` layers train with the model,
    whole (``encoder.finetune=top_layers``) or through LoRA adapters (``lora``); item and context texts
    are tokenized once here (``meta.item_texts``).
    """
    mode = cfg.encoder.mode
    has_context = bool(meta.contexts)
    if mode == "none":
        return MultiTaskModel(cfg, meta, None, None, 0, None)
    if mode == "frozen":
        _check_table("item_vectors", item_vectors, meta.num_items + 1)
        if has_context:
            _check_table("context_vectors", context_vectors, len(meta.contexts) + 1)
        dim = item_vectors.shape[1]
        ctx = TextVectors(vectors=context_vectors) if has_context else None
        return MultiTaskModel(cfg, meta, TextVectors(vectors=item_vectors), ctx, dim, None)
    if mode != "finetune":
        raise ConfigError(f"encoder.mode: {mode!r} is not one of 'frozen', 'finetune', 'none'")
    if encoder is None:
        raise ConfigError("encoder.mode=finetune needs a TextEncoder")
    encoder.prepare_finetuning(cfg.encoder)
    items = token_table(encoder, meta.item_texts, meta.num_items + 1, cfg.encoder.max_length)
    ctx = None
    if has_context:
        contexts = token_table(encoder, meta.contexts, len(meta.contexts) + 1, cfg.encoder.max_length)
        ctx = TextVectors(tokens=contexts, encoder=encoder)
    return MultiTaskModel(cfg, meta, TextVectors(tokens=items, encoder=encoder), ctx, encoder.dim, encoder)


def token_table(encoder: TextEncoder, texts: list[str] | None, rows: int, width: int) -> dict[str, Tensor]:
    """Tokenized texts as ``input_ids`` / ``attention_mask`` tables ``(rows, width)``, row 0 empty.

    Without ``texts`` (a model about to load a bundle) the tables are zeros of the same shape.
    Padding goes on the tokenizer's own side, so last-token pooling still reads the last real token.
    """
    out = {k: torch.zeros(rows, width, dtype=torch.long) for k in ("input_ids", "attention_mask")}
    if texts is None:
        return out
    if len(texts) != rows - 1:
        raise ValueError(f"token_table: {len(texts)} texts for {rows - 1} rows")
    left = getattr(getattr(encoder, "tokenizer", None), "padding_side", "right") == "left"
    for start in range(0, len(texts), 4096):
        tok = encoder.tokenize(texts[start : start + 4096])
        for k in out:
            t = tok[k][:, -width:] if left else tok[k][:, :width]
            rows_ = slice(1 + start, 1 + start + len(t))
            if left:
                out[k][rows_, width - t.shape[1] :] = t
            else:
                out[k][rows_, : t.shape[1]] = t
    return out


def _table(values: np.ndarray | None, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    if values is None:
        return torch.zeros(shape, dtype=dtype)
    return torch.as_tensor(values, dtype=dtype)


def _check_table(name: str, t: Tensor | None, rows: int) -> None:
    if t is None:
        raise ConfigError(f"encoder.mode=frozen needs {name}: a ({rows}, D) table (row 0 zeros)")
    if t.ndim != 2 or t.shape[0] != rows:
        raise ConfigError(f"{name} has shape {tuple(t.shape)}; expected ({rows}, D) (row 0 zeros)")
