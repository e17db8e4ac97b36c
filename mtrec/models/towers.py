"""User and item towers: ids, side features, LLM text vectors and the user's history.

The item tower turns item indexes into vectors ``(..., proj_dim)`` from the id embedding, the item's
side features and its text vector (read from a fixed table of cached vectors in ``frozen`` mode,
computed by the language model on the batch's unique items in ``finetune`` mode). The user tower
pools the vectors of the user's history items, attending to the target item, and joins them with the
user's id embedding and side features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtrec.config import ModelConfig
from mtrec.errors import ConfigError

if TYPE_CHECKING:
    from mtrec.encoders import TextEncoder

EMBEDDING_STD = 0.02  # small, so that ids start as a light touch on the text and side features


def mlp(dims: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers with ReLU and dropout between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def embedding(rows: int, dim: int, trained_rows: int | None = None) -> nn.Embedding:
    """An embedding table with small random rows ``1 .. trained_rows - 1`` and zero rows elsewhere.

    Row 0 is padding. The rows after ``trained_rows`` are the hashed buckets of ids unseen in
    training: they start at zero, so an unseen id adds nothing until some training data has it.
    """
    emb = nn.Embedding(rows, dim, padding_idx=0)
    with torch.no_grad():
        emb.weight.normal_(0.0, EMBEDDING_STD)
        emb.weight[0] = 0
        emb.weight[trained_rows or rows :] = 0
    return emb


def drop_ids(vectors: Tensor, p: float, training: bool) -> Tensor:
    """``vectors`` (U, D) id embeddings, each zeroed with probability ``p`` in training (an unseen id's
    row is zero: the network learns to score without the id); unchanged in evaluation."""
    if not training or p <= 0.0:
        return vectors
    keep = torch.rand(vectors.shape[0], 1, device=vectors.device) >= p
    return vectors * keep.to(vectors.dtype)


def cat_dim(id_dim: int) -> int:
    """Embedding size of a categorical side feature."""
    return max(4, id_dim // 4)


@dataclass
class ExtraItems:
    """Items met at serving that are not in the catalog (cold start), appended after its rows: item
    index ``N + 1 + e`` is row ``e``. ``id_rows`` (E,) long: their id-embedding rows (hashed buckets for
    unseen ids); ``cat`` (E, C) long and ``num`` (E, F) float: side features (0: unknown / the mean);
    ``text`` (E, D) float: raw text vectors from the language model (None for an ID-only model)."""

    id_rows: Tensor
    cat: Tensor
    num: Tensor
    text: Tensor | None = None


class TextVectors(nn.Module):
    """Index ``(...)`` -> text vector ``(..., D)``, standardised per dimension; index 0 gives zeros.

    ``frozen``: rows of a fixed table ``(N + 1, D)`` of cached vectors (a non-persistent buffer: a
    bundle stores it beside the weights, and its cost does not depend on the language model's size).
    ``finetune``: the encoder runs once per call on the unique indexes, from a token table built when
    the model is (persistent buffers ``(N + 1, S)``), so the top layers train with the heads.

    Language-model vectors share a large common direction and vary little around it; centring and
    scaling each dimension by catalogue statistics (``mean``, ``std`` buffers; in finetune mode taken
    from the untrained encoder on up to ``STATS_SAMPLE`` items) makes the projection learn much faster.
    """

    STATS_SAMPLE = 1024

    def __init__(
        self,
        vectors: Tensor | None = None,
        tokens: dict[str, Tensor] | None = None,
        encoder: TextEncoder | None = None,
    ) -> None:
        super().__init__()
        self.finetune = tokens is not None
        if tokens is not None:
            self.register_buffer("input_ids", tokens["input_ids"])
            self.register_buffer("attention_mask", tokens["attention_mask"])
            if encoder is None:
                raise ValueError("finetune text vectors need the encoder")
            dim = encoder.dim
            rows = torch.nonzero(tokens["attention_mask"].any(1)).flatten()[: self.STATS_SAMPLE]
            was_training = encoder.training
            with torch.no_grad():
                sample = self._encode(rows, encoder.eval())
            encoder.train(was_training)
        elif vectors is not None:
            self.register_buffer("vectors", vectors.float(), persistent=False)
            dim, sample = vectors.shape[1], self.vectors[1:]
        else:
            raise ValueError("TextVectors needs a vector table (frozen) or a token table (finetune)")
        ok = len(sample) > 1  # else placeholders (a model about to load a bundle)
        self.register_buffer("mean", sample.mean(0) if ok else torch.zeros(dim))
        # a near-constant dimension (MiniLM has one with std ~1e-32) would blow up any vector that moves
        # along it (fine-tuning, a cold item's text): floor each std at 1% of the median dimension's
        std = sample.std(0) if ok else torch.ones(dim)
        self.register_buffer("std", std.clamp(min=max(1e-6, 0.01 * float(std.median()))) if ok else std)

    @torch.no_grad()
    def table(self, encoder: TextEncoder | None = None, batch_size: int = 256) -> Tensor:
        """``(N + 1, D)`` the raw vector of every index, row 0 zeros (finetune: encoded now, in batches)."""
        if not self.finetune:
            return self.vectors
        rows = torch.arange(len(self.input_ids), device=self.input_ids.device)
        return torch.cat([self._encode(rows[i : i + batch_size], encoder) for i in range(0, len(rows), batch_size)])

    @property
    def rows(self) -> int:
        """N + 1: the indexes this table holds (serving appends extra rows after them)."""
        return len(self.input_ids if self.finetune else self.vectors)

    def forward(self, idx: Tensor, encoder: TextEncoder | None = None, extra: Tensor | None = None) -> Tensor:
        """``idx`` (...) -> ``(..., D)``. ``extra`` (E, D): raw vectors of texts outside the table (serving),
        addressed as indexes ``rows .. rows + E - 1``."""
        if extra is None:
            raw = self.vectors[idx] if not self.finetune else self._encode(idx, encoder)
        else:
            inside = idx < self.rows
            raw = extra.new_empty((*idx.shape, extra.shape[1]))
            raw[inside] = self.vectors[idx[inside]] if not self.finetune else self._encode(idx[inside], encoder)
            raw[~inside] = extra[idx[~inside] - self.rows]
        return (raw - self.mean) / self.std * (idx > 0).unsqueeze(-1)

    def _encode(self, idx: Tensor, encoder: TextEncoder | None) -> Tensor:
        """Finetune mode: raw vectors ``(..., D)`` of ``idx``, each unique item encoded once."""
        if encoder is None:
            raise ValueError("finetune text vectors need the encoder")
        uniq, inverse = torch.unique(idx, return_inverse=True)
        keep = uniq > 0
        mask = self.attention_mask[uniq[keep]]
        columns = mask.any(0)  # drop the columns that are padding in every row
        table = torch.zeros(len(uniq), encoder.dim, device=idx.device)
        if keep.any():
            table[keep] = encoder(self.input_ids[uniq[keep]][:, columns], mask[:, columns]).float()
        return F.embedding(inverse, table)


class ItemTower(nn.Module):
    """Item index ``(...)`` -> item vector ``(..., proj_dim)`` from id, side features and text.

    ``id_vocab_rows`` rows of id embeddings, of which the first ``id_trained_rows`` are padding and
    ids seen in training (see :class:`mtrec.features.Vocab`). Buffers: ``id_rows`` (N + 1,) the
    id-embedding row of each item index, ``cat`` (N + 1, C) side categorical indexes, ``num``
    (N + 1, F) standardised side numbers.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        id_rows: Tensor,
        id_vocab_rows: int,
        id_trained_rows: int,
        cat: Tensor,
        cat_sizes: list[int],
        num: Tensor,
        text: TextVectors | None,
        text_dim: int,
    ) -> None:
        super().__init__()
        self.register_buffer("id_rows", id_rows)
        self.register_buffer("cat", cat)
        self.register_buffer("num", num)
        self.id_emb = embedding(id_vocab_rows, cfg.id_dim, id_trained_rows) if cfg.use_item_ids else None
        self.id_dropout = cfg.id_dropout
        self.cat_emb = nn.ModuleList(embedding(n, cat_dim(cfg.id_dim)) for n in cat_sizes)
        self.text = text
        self.text_proj = nn.Linear(text_dim, cfg.proj_dim) if text is not None else None
        width = (cfg.id_dim if cfg.use_item_ids else 0) + len(cat_sizes) * cat_dim(cfg.id_dim) + num.shape[1]
        width += cfg.proj_dim if text is not None else 0
        if width == 0:
            raise ConfigError("the item tower has no input: enable model.use_item_ids, a text encoder or side features")
        self.out = nn.Linear(width, cfg.proj_dim)

    def forward(self, idx: Tensor, encoder: TextEncoder | None = None, extra: ExtraItems | None = None) -> Tensor:
        """``extra``: items outside the catalog (serving), addressed as indexes ``N + 1 .. N + E``."""
        # the target and history items of a batch repeat a lot: compute each item once
        uniq, inverse = torch.unique(idx, return_inverse=True)
        id_rows, cat, num = (
            (self.id_rows[uniq], self.cat[uniq], self.num[uniq]) if extra is None else self._with_extra(uniq, extra)
        )
        parts = [] if self.id_emb is None else [drop_ids(self.id_emb(id_rows), self.id_dropout, self.training)]
        parts += [emb(cat[:, j]) for j, emb in enumerate(self.cat_emb)]
        parts.append(num)
        if self.text is not None:
            parts.append(self.text_proj(self.text(uniq, encoder, None if extra is None else extra.text)))
        return F.embedding(inverse, self.out(torch.cat(parts, dim=-1)))  # a gather with a deterministic backward

    def _with_extra(self, uniq: Tensor, extra: ExtraItems) -> tuple[Tensor, Tensor, Tensor]:
        """Id rows (U,), side categories (U, C) and numbers (U, F) of catalog and extra items."""
        inside, n = uniq < len(self.id_rows), len(self.id_rows)
        out = []
        for table, more in ((self.id_rows, extra.id_rows), (self.cat, extra.cat), (self.num, extra.num)):
            rows = table.new_empty((len(uniq), *table.shape[1:]))
            rows[inside] = table[uniq[inside]]
            rows[~inside] = more[uniq[~inside] - n]
            out.append(rows)
        return out[0], out[1], out[2]


class DINPooling(nn.Module):
    """Target-aware attention over the history (DIN: Zhou et al., KDD 2018).

    An activation unit scores each history item against the target from ``[h, q, h - q, h * q]``;
    as in the paper the weights are not softmax-normalised, so the pooled vector keeps the strength
    of the user's interest; for stable training each weight is squashed to (0, 1) and the sum is
    divided by the history length L, which bounds the pooled vector by the largest item vector. The
    unit's first layer on that concatenation is computed in its equivalent split form
    ``A h + B q + C (h * q)``, which never materialises the (B, L, 4D) input.
    ``history`` (B, L, D), ``mask`` (B, L) bool, ``target`` (B, D) -> (B, D).
    """

    def __init__(self, dim: int, hidden: int = 36) -> None:
        super().__init__()
        self.history_in = nn.Linear(dim, hidden)  # h and the h part of h - q
        self.target_in = nn.Linear(dim, hidden, bias=False)  # q and the q part of h - q
        self.product_in = nn.Linear(dim, hidden, bias=False)
        self.unit = nn.Sequential(nn.PReLU(), nn.Linear(hidden, 1))

    def forward(self, history: Tensor, mask: Tensor, target: Tensor) -> Tensor:
        hidden = (
            self.history_in(history)
            + self.target_in(target).unsqueeze(1)
            + self.product_in(history * target.unsqueeze(1))
        )
        w = torch.sigmoid(self.unit(hidden).squeeze(-1)) * mask
        return (w.unsqueeze(-1) * history).sum(1) / max(history.shape[1], 1)


class TransformerPooling(nn.Module):
    """A small transformer over the history (HLLM-style user modelling) read out at a learned token.

    The read-out token is always present, so an empty history still has something to attend to.
    ``history`` (B, L, D), ``mask`` (B, L) bool, ``target`` unused -> (B, D).
    """

    def __init__(self, dim: int, max_len: int, heads: int = 2, layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.readout = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = embedding(max_len + 1, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, history: Tensor, mask: Tensor, target: Tensor) -> Tensor:
        b, length, _ = history.shape
        x = torch.cat([self.readout.expand(b, 1, -1), history], dim=1)
        x = x + self.position(torch.arange(length + 1, device=x.device))
        pad = torch.cat([mask.new_zeros(b, 1), ~mask], dim=1)
        return self.encoder(x, src_key_padding_mask=pad)[:, 0]


class MeanPooling(nn.Module):
    """Masked mean of the history item vectors; zeros for an empty history."""

    def forward(self, history: Tensor, mask: Tensor, target: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(history.dtype)
        return (history * m).sum(1) / m.sum(1).clamp(min=1.0)


class UserTower(nn.Module):
    """User id, side features and pooled history -> user vector ``(B, proj_dim)``."""

    def __init__(
        self,
        cfg: ModelConfig,
        id_vocab_rows: int,
        id_trained_rows: int,
        cat_sizes: list[int],
        num_features: int,
        max_history: int,
    ) -> None:
        super().__init__()
        self.id_emb = embedding(id_vocab_rows, cfg.id_dim, id_trained_rows) if cfg.use_user_ids else None
        self.id_dropout = cfg.id_dropout
        self.cat_emb = nn.ModuleList(embedding(n, cat_dim(cfg.id_dim)) for n in cat_sizes)
        self.pooling: nn.Module | None = None
        if cfg.history == "din":
            self.pooling = DINPooling(cfg.proj_dim)
        elif cfg.history == "transformer":
            self.pooling = TransformerPooling(cfg.proj_dim, max_history, dropout=cfg.dropout)
        elif cfg.history == "mean":
            self.pooling = MeanPooling()
        width = (cfg.id_dim if cfg.use_user_ids else 0) + len(cat_sizes) * cat_dim(cfg.id_dim) + num_features
        width += cfg.proj_dim if self.pooling is not None else 0
        if width == 0:
            raise ConfigError("the user tower has no input: enable model.use_user_ids, a history or side features")
        self.out = nn.Linear(width, cfg.proj_dim)

    def forward(
        self, user: Tensor, cat: Tensor, num: Tensor, history: Tensor, history_mask: Tensor, target: Tensor
    ) -> Tensor:
        """``user`` (B,), ``cat`` (B, C), ``num`` (B, F), ``history`` (B, L, D) item vectors,
        ``history_mask`` (B, L) bool, ``target`` (B, D) the target item's vector."""
        parts = [] if self.id_emb is None else [drop_ids(self.id_emb(user), self.id_dropout, self.training)]
        parts += [emb(cat[:, j]) for j, emb in enumerate(self.cat_emb)]
        parts.append(num)
        if self.pooling is not None:
            parts.append(self.pooling(history, history_mask, target))
        return self.out(torch.cat(parts, dim=-1))
