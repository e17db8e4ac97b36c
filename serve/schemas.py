"""Request and response bodies of the HTTP API, with the limits every client input is checked against.

The request a body asks for is the core :class:`mtrec.inference.ScoreRequest`: :meth:`ScoreBody.request`
converts one into the other by field name, so the two never drift apart (a field the core request has
and the body lacks fails every request, and the unit tests). Static limits (an id's length, ``k``,
finite numbers, no unknown fields) live in the models; the limits an operator configures (candidates
per request, characters per text: ``AppArgs``) are checked by :func:`check_limits`, and feedback
events against the bundle's tasks by :func:`check_events`. A violation is a 422 with a message naming
the field; a body over the byte limit is a 413 (see :mod:`mtrec_serve.ingress`).

Responses name no weight arm and no weights version: the arm is chosen and recorded server-side, and
feedback is keyed by the request id, so a client cannot pick which arm its feedback moves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from mtrec.config import TaskSpec
from mtrec.encoders.text import clean_text
from mtrec.inference import Candidate, ScoreRequest

MAX_ID_CHARS = 256
MAX_K = 1000
MAX_HISTORY = 1000  # ids accepted in a history (the model reads the last max_history of them)
MAX_FEATURES = 64  # named numbers per candidate or user
MAX_EVENTS = 32  # events per feedback call

ItemId = int | Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
FeatureName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class _Body(BaseModel):
    """Unknown fields are an error (a typo must not pass silently); NaN and infinities are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CandidateIn(_Body):
    """A candidate: a catalog item id, or an id and its text for an item not in the catalog (cold start).
    ``features``: numbers of this impression the model was trained with (``position``, ``discount``)."""

    item_id: ItemId
    text: str | None = Field(default=None, min_length=1)
    features: dict[FeatureName, float | None] | None = Field(default=None, max_length=MAX_FEATURES)


class ScoreBody(_Body):
    """Candidates to score for one user. A candidate is an item id or a :class:`CandidateIn`."""

    user_id: ItemId
    candidates: list[CandidateIn | ItemId] = Field(min_length=1)
    history: list[ItemId] = Field(default_factory=list, max_length=MAX_HISTORY)
    context: str | None = Field(default=None, min_length=1)
    user_features: dict[FeatureName, str | int | float | None] = Field(default_factory=dict, max_length=MAX_FEATURES)

    def request(self) -> ScoreRequest:
        """The core request: this body's fields of the same names (a bare candidate id is a catalog item)."""
        body = self.model_dump(include={f.name for f in fields(ScoreRequest)})
        body["candidates"] = [Candidate(**c) if isinstance(c, dict) else Candidate(c) for c in body["candidates"]]
        return ScoreRequest(**body)


class RecommendBody(ScoreBody):
    """:class:`ScoreBody` and ``k``, the number of items to return."""

    k: int = Field(default=10, ge=1, le=MAX_K)


class ScoredItem(BaseModel):
    item_id: int | str
    score: float  # the fused score under the arm's weights
    predictions: dict[str, float]  # task -> probability (binary) or value (regression)


class RecommendResponse(BaseModel):
    request_id: str  # quote it in feedback
    items: list[ScoredItem]  # best first


class FeedbackBody(_Body):
    """Events of one served item, e.g. ``{"click": 1, "purchase": 0}``: 0 or 1 for a binary task,
    the value for a regression task (within the range its labels had in training). Each (request,
    item, task) counts once; repeats are ignored."""

    request_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    item_id: ItemId
    events: dict[FeatureName, float] = Field(min_length=1, max_length=MAX_EVENTS)


class FeedbackResponse(BaseModel):
    recorded: list[str]  # tasks counted now
    duplicates: list[str]  # tasks already counted for this request and item (ignored)


def check_limits(request: ScoreRequest, max_candidates: int, max_text_chars: int) -> str | None:
    """The first configured limit ``request`` breaks, as a message naming the field; None when within."""
    if len(request.candidates) > max_candidates:
        return f"candidates: {len(request.candidates)} candidates; at most {max_candidates} per request"
    texts = [("context", request.context)]
    texts += [(f"candidates[{i}].text", c.text) for i, c in enumerate(request.candidates)]
    for where, text in texts:
        if text is not None and len(text) > max_text_chars:
            return f"{where}: {len(text)} characters; at most {max_text_chars}"
        # A text that cleans to nothing would fail in the Embedder, and with it every request batched
        # with this one: refuse it here, as the client's error.
        if text is not None and not clean_text(text, max_text_chars):
            return f"{where}: {text[:40]!r} holds no words (only spaces or control characters)"
    seen: set[str] = set()
    for i, c in enumerate(request.candidates):
        key = str(c.item_id)
        if key in seen:
            return f"candidates[{i}]: item {key!r} appears more than once"
        seen.add(key)
    return None


def check_events(
    events: Mapping[str, float], tasks: Mapping[str, TaskSpec], label_range: Mapping[str, tuple[float, float]]
) -> str | None:
    """The first problem of feedback ``events`` (task -> value), as a message naming the task; None when
    every event is fine. A task must be one of ``tasks``; a binary event is 0 or 1; a regression event
    lies within ``label_range[task]``, the (min, max) of that task's labels in training: the controller
    adds these values up, and one absurd value would outweigh all the honest ones."""
    unknown = sorted(set(events) - set(tasks))
    if unknown:
        return f"events: unknown task(s) {unknown}; tasks: {sorted(tasks)}"
    for task, value in events.items():
        if tasks[task].kind == "binary":
            if value not in (0, 1):
                return f"events.{task}: {value!r}; a binary task's event is 0 or 1"
            continue
        bounds = label_range.get(task)
        if bounds is None:
            return (
                f"events.{task}: the bundle records no label range for regression task {task!r} (it was "
                "trained before ranges were stored); train it again to accept this task's feedback"
            )
        low, high = bounds
        if not low <= value <= high:
            return (
                f"events.{task}: {value!r} is outside [{low:g}, {high:g}], the range of the labels of "
                f"regression task {task!r} in training"
            )
    return None
