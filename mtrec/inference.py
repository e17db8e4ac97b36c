"""The path from a recommendation request to the model's predictions (pure: no Ray, no HTTP).

A :class:`ScoreRequest` names a user, optionally their recent items, the candidates and a context
text. The :class:`Catalog` (the bundle's manifest and meta only, cheap enough for every Ingress
replica) turns it into model indexes, an :class:`IndexedRequest`:

- the user id -> its id-embedding row through the bundle's :class:`~mtrec.features.Vocab`: a user
  unseen in training shares a hashed bucket row (cold users work); optional side features of the
  user (the bundle keeps no user table: the caller passes them, as a feature store would) map through
  the same vocabularies and statistics as in training, unknown values to "unknown" (row 0 / the mean);
- history item ids -> catalog indexes, most recent last, the last ``max_history`` kept, left-padded
  to ``max_history`` exactly as in training (the DIN pooling divides by that length). Ids not in the
  catalog are dropped: the model has no vector for them and training histories never hold them;
- each candidate is a catalog item id (its catalog row; no text is encoded, and a text sent with a
  known id is ignored) or, for an item not in the catalog, ``{item_id, text}``: a cold item whose
  text vector comes from the language model and whose id embedding is the id's hashed bucket. Cold
  items have unknown side features;
- optional numbers of the impression (``position``, ``discount``...: the interaction columns the
  model was trained with), standardised with the training statistics; missing ones are the mean;
- the context text: its row in the bundle's context table when it was seen in training, else a text
  to encode (a model without contexts ignores it).

:class:`Scorer` holds the model and predicts batches of indexed requests in one forward (cold items
and unseen contexts become the model's ``extra_items`` / ``extra_contexts``: rows appended after
the bundle's tables). A finetune-mode bundle is served from its stored item-vector table (the
trained encoder's vectors), so the language model never runs for catalog items.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtrec.bundle import Bundle, read_description
from mtrec.config import Config
from mtrec.errors import BundleError, MtrecError
from mtrec.features import FeatureMeta, standardise
from mtrec.models import ExtraItems, MultiTaskModel, TextVectors


class RequestError(MtrecError, ValueError):
    """A request the model cannot serve (an unknown feature, a cold item without text); the message
    names the field and the value."""


@dataclass(frozen=True)
class Candidate:
    """A candidate item: a catalog id, or an id and its text for an item not in the catalog.
    ``features``: numbers of this impression (interaction columns of the training data)."""

    item_id: Any
    text: str | None = None
    features: Mapping[str, float] | None = None


@dataclass
class ScoreRequest:
    """One user's candidates to score."""

    user_id: Any
    candidates: Sequence[Candidate]
    history: Sequence[Any] = ()
    context: str | None = None
    user_features: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class IndexedRequest:
    """A request as model indexes; cold items and an unseen context still need text vectors.

    ``items`` (N,) int64: catalog index (>= 1), or ``-(1 + e)`` for the cold item ``texts[e]``;
    ``cold_id_rows`` (E,) the cold items' id-embedding rows; ``history`` (max_history,) int64;
    ``context``: context index (0: none), or -1 for the unseen context text ``texts[-1]``;
    ``inter_num`` (N, G) float32; ``texts``: the texts whose vectors :meth:`Scorer.predict` needs,
    in this order (E cold items, then the context when it is -1).
    """

    user: int
    user_cat: np.ndarray
    user_num: np.ndarray
    history: np.ndarray
    items: np.ndarray
    cold_id_rows: np.ndarray
    context: int
    inter_num: np.ndarray
    texts: list[str]


class Catalog:
    """A bundle's vocabularies, catalog and fusion scales: raw request -> :class:`IndexedRequest` (see
    the module docstring). ``fusion_scales``: task -> the mean prediction training measured
    (:func:`mtrec.engine.fusion_scales`), which divides each task's predictions before fusion."""

    def __init__(self, cfg: Config, meta: FeatureMeta, fusion_scales: Mapping[str, float]) -> None:
        self.cfg = cfg
        self.meta = meta
        self.fusion_scales = dict(fusion_scales)
        self.tasks: list[str] = [t.name for t in meta.tasks]
        self.reads_text: bool = cfg.encoder.mode != "none"
        self._item_index: dict[Any, int] = {item: i + 1 for i, item in enumerate(meta.item_ids)}
        self._context_index: dict[str, int] = {c: i + 1 for i, c in enumerate(meta.contexts)}
        self._int_ids = all(isinstance(i, int) for i in meta.item_ids)
        self._int_users = all(isinstance(u, int) for u in meta.users.values)

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        """From a bundle directory's manifest and meta alone (no weights: the Ingress needs no model).
        The checksums are checked where the model loads (:func:`mtrec.bundle.load_bundle`)."""
        return cls(*read_description(Path(path)))

    def item_index(self, item_id: Any) -> int:
        """The catalog index of a raw item id (``"12"`` finds item 12 of an integer-id catalog); 0 if absent."""
        return self._item_index.get(_as_id(item_id, self._int_ids), 0)

    def prepare(self, request: ScoreRequest) -> IndexedRequest:
        """Map a request to model indexes (see the module docstring). RequestError on an unknown
        feature name or a cold item without text (for a model that reads text)."""
        meta = self.meta
        if not request.candidates:
            raise RequestError("candidates: at least one candidate is needed")
        user = int(meta.users.lookup(np.array([_as_id(request.user_id, self._int_users)], dtype=object))[0])
        unknown = sorted(set(request.user_features) - set(meta.user_cat) - set(meta.user_num))
        if unknown:
            raise RequestError(
                f"user_features: unknown feature(s) {unknown}; this model reads "
                f"{sorted(meta.user_cat) + sorted(meta.user_num) or 'none'}"
            )
        user_cat = np.array(
            [
                meta.user_cat[c].lookup(np.array([request.user_features.get(c)], dtype=object))[0]
                if request.user_features.get(c) is not None
                else 0
                for c in meta.user_cat
            ],
            dtype=np.int64,
        )
        user_num = np.array(
            [
                standardise(np.array([_number(request.user_features.get(c), f"user_features.{c}")]), meta.user_num[c])[
                    0
                ]
                for c in meta.user_num
            ],
            dtype=np.float32,
        )
        history = np.zeros(meta.max_history, dtype=np.int64)
        known = [i for i in (self.item_index(h) for h in request.history) if i > 0][-meta.max_history :]
        if known and meta.max_history:
            history[meta.max_history - len(known) :] = known

        items = np.zeros(len(request.candidates), dtype=np.int64)
        texts: list[str] = []
        cold_ids: list[Any] = []
        inter_num = np.zeros((len(request.candidates), len(meta.inter_num)), dtype=np.float32)
        columns = list(meta.inter_num)
        for n, c in enumerate(request.candidates):
            index = self.item_index(c.item_id)
            if index == 0:
                if self.reads_text and not c.text:
                    raise RequestError(
                        f"candidates[{n}]: item {c.item_id!r} is not in the catalog; give its text to serve it cold"
                    )
                texts.append(c.text or "")
                cold_ids.append(_as_id(c.item_id, self._int_ids))
                index = -len(texts)
            items[n] = index
            if c.features:
                bad = sorted(set(c.features) - set(columns))
                if bad:
                    raise RequestError(
                        f"candidates[{n}].features: unknown feature(s) {bad}; this model reads {columns or 'none'}"
                    )
                raw = np.array([_number(c.features.get(k), f"candidates[{n}].features.{k}") for k in columns])
                inter_num[n] = [standardise(raw[j : j + 1], meta.inter_num[k])[0] for j, k in enumerate(columns)]
        if not self.reads_text:
            texts = []  # an ID-only model reads no text: cold items are their id bucket alone
        cold_id_rows = meta.items.lookup(np.array(cold_ids, dtype=object)) if cold_ids else np.zeros(0, np.int64)

        context = 0
        if request.context is not None and self.reads_text and meta.contexts:
            text = request.context.strip()  # training trims contexts the same way
            context = self._context_index.get(text, -1)
            if context == -1:
                texts.append(request.context)
        return IndexedRequest(user, user_cat, user_num, history, items, cold_id_rows, context, inter_num, texts)


class Scorer:
    """A bundle's model behind raw requests: ``score(request, embed) -> {task: (N,) float}``.

    Takes over ``bundle.model`` (a finetune-mode model is switched to the bundle's stored text
    vectors and loses its encoder: the :class:`Embedder`-side language model encodes new texts).
    """

    def __init__(self, bundle: Bundle) -> None:
        self.catalog = Catalog(bundle.cfg, bundle.meta, bundle.fusion_scales)
        self.tasks = self.catalog.tasks
        self._model: MultiTaskModel = serving_model(bundle)
        self._num_items = bundle.meta.num_items
        self._num_contexts = len(bundle.meta.contexts)
        self._device = next(self._model.parameters()).device

    @torch.no_grad()
    def predict(self, jobs: Sequence[tuple[IndexedRequest, np.ndarray | None]]) -> list[dict[str, np.ndarray]]:
        """Indexed requests and the vectors ``(len(p.texts), D)`` of their texts -> per request
        ``{task: (N,) float32}``, all in one forward."""
        preds = self._model(*self.inputs(jobs))
        out, start = [], 0
        for p, _ in jobs:
            end = start + len(p.items)
            out.append({t: preds[t][start:end].float().cpu().numpy() for t in self.tasks})
            start = end
        return out

    def inputs(
        self, jobs: Sequence[tuple[IndexedRequest, np.ndarray | None]]
    ) -> tuple[dict[str, Tensor], ExtraItems | None, Tensor | None]:
        """The model's arguments for :meth:`predict`: the batch (one row per candidate, requests one
        after the other, in the layout of :func:`mtrec.features.collate`), the cold items and the
        unseen contexts."""
        user, user_cat, user_num, history, items, inter_num, context = [], [], [], [], [], [], []
        cold_rows, cold_text, context_text = [], [], []
        for p, vectors in jobs:
            n, cold = len(p.items), len(p.cold_id_rows)
            if len(p.texts) and (vectors is None or len(vectors) != len(p.texts)):
                raise ValueError(f"{len(p.texts)} texts need vectors; got {None if vectors is None else len(vectors)}")
            user.append(np.full(n, p.user))
            user_cat.append(np.tile(p.user_cat, (n, 1)))
            user_num.append(np.tile(p.user_num, (n, 1)))
            history.append(np.tile(p.history, (n, 1)))
            offset = self._num_items + 1 + sum(len(r) for r in cold_rows)
            items.append(np.where(p.items > 0, p.items, offset - 1 - p.items))
            inter_num.append(p.inter_num)
            cold_rows.append(p.cold_id_rows)
            if p.texts:
                cold_text.append(vectors[:cold])
            if p.context == -1:
                context_text.append(vectors[cold:])
                p_context = self._num_contexts + len(context_text)
            else:
                p_context = p.context
            context.append(np.full(n, p_context))
        cat = lambda xs, dtype: torch.from_numpy(np.concatenate(xs).astype(dtype)).to(self._device)  # noqa: E731
        batch = {
            "user": cat(user, np.int64),
            "item": cat(items, np.int64),
            "history": cat(history, np.int64),
            "context": cat(context, np.int64),
            "user_cat": cat(user_cat, np.int64),
            "user_num": cat(user_num, np.float32),
            "inter_num": cat(inter_num, np.float32),
        }
        extra = None
        if sum(len(r) for r in cold_rows):
            tower = self._model.item_tower
            e = sum(len(r) for r in cold_rows)
            extra = ExtraItems(
                id_rows=cat(cold_rows, np.int64),
                cat=tower.cat.new_zeros((e, tower.cat.shape[1])),
                num=tower.num.new_zeros((e, tower.num.shape[1])),
                text=cat(cold_text, np.float32) if cold_text else None,
            )
        return batch, extra, cat(context_text, np.float32) if context_text else None

    def score(
        self, request: ScoreRequest, embed: Callable[[list[str]], np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """One request: ``{task: (N,) float32}``. ``embed`` texts -> (N, D) vectors, for cold items."""
        p = self.catalog.prepare(request)
        if p.texts and embed is None:
            raise RequestError("this request has texts to encode (cold items or a new context) but no embedder")
        return self.predict([(p, embed(p.texts) if p.texts else None)])[0]


def serving_model(bundle: Bundle) -> MultiTaskModel:
    """The bundle's model for serving, in eval mode. Finetune mode: item (and context) text vectors come
    from the bundle's stored tables, computed by the trained encoder, instead of running it per
    request; the encoder is dropped from the model (the standardisation statistics are kept)."""
    model = bundle.model.eval()
    if bundle.cfg.encoder.mode == "finetune":
        if bundle.item_vectors is None:
            raise BundleError(f"{bundle.path}: a finetune-mode bundle without its item-vector table")
        model.item_tower.text = _frozen(model.item_tower.text, bundle.item_vectors)
        if model.context_text is not None:
            if bundle.context_vectors is None:
                raise BundleError(f"{bundle.path}: the model reads contexts but the bundle has no context vectors")
            model.context_text = _frozen(model.context_text, bundle.context_vectors)
        model.encoder = None
    return model


def _frozen(text: TextVectors, table: Tensor) -> TextVectors:
    view = TextVectors(vectors=table.to(text.mean.device))
    view.mean.copy_(text.mean)
    view.std.copy_(text.std)
    return view


def _as_id(raw: Any, integer: bool) -> Any:
    """A request's id in the catalog's type: ``"12"`` -> 12 when the ids are integers, 12 -> ``"12"``
    otherwise (JSON clients send either)."""
    if integer and isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        return int(raw)
    if not integer and isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    return raw


def _number(x: Any, where: str) -> float:
    """A feature value as a float (None: missing, NaN, which standardises to the mean)."""
    if x is None:
        return math.nan
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise RequestError(f"{where}: {x!r} is not a finite number")
    return float(x)
