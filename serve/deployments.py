"""The model-side deployments: ``Embedder`` (texts -> vectors) and ``TaskHeads`` (requests -> predictions).

Both batch with ``@ray.serve.batch``: concurrent requests of the Ingress are answered by one
forward each. Catalog items never reach the Embedder: their text vectors are the bundle's table,
inside the TaskHeads' model (:class:`mtrec.inference.Scorer`); the Embedder runs the language model
only for texts the bundle does not hold (cold items, new contexts), behind an LRU cache
(:class:`mtrec.encoders.RecentVectors`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.serve

from mtrec.bundle import load_bundle
from mtrec.encoders import RecentVectors, TextEncoder, encode_cached
from mtrec.inference import Catalog, IndexedRequest, Scorer


@ray.serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class Embedder:
    """Texts -> raw text vectors ``(N, D) float32`` through the bundle's language model.

    Frozen mode: the encoder the bundle's config names (loaded offline); finetune mode: the bundle's
    fine-tuned encoder weights; an ID-only bundle has none and is never called.
    """

    def __init__(self, bundle: str, cache_size: int = 10_000) -> None:
        catalog = Catalog.load(bundle)
        mode = catalog.cfg.encoder.mode
        self._encoder = None
        if mode == "finetune":
            self._encoder = load_bundle(bundle).model.encoder.eval()
        elif mode == "frozen":
            self._encoder = TextEncoder.from_config(catalog.cfg.encoder)
        self._batch_size = catalog.cfg.encoder.batch_size
        self._cache = RecentVectors(cache_size)
        self._calls = 0
        self._texts = 0

    @ray.serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed(self, requests: list[list[str]]) -> list[np.ndarray]:
        """One call per request (its texts); the batch's texts are encoded together."""
        if self._encoder is None:
            raise RuntimeError("this bundle has no language model (encoder.mode=none): nothing to embed")
        self._calls += len(requests)
        flat = [t for texts in requests for t in texts]
        self._texts += len(flat)
        vectors = encode_cached(self._encoder, flat, self._cache, self._batch_size)
        out, start = [], 0
        for texts in requests:
            out.append(vectors[start : start + len(texts)])
            start += len(texts)
        return out

    def stats(self) -> dict[str, Any]:
        """Calls and texts seen, and the cache's hits and misses (misses are language-model encodes)."""
        return {
            "calls": self._calls,
            "texts": self._texts,
            "cache_hits": self._cache.hits,
            "cache_misses": self._cache.misses,
            "cached": len(self._cache),
        }


@ray.serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class TaskHeads:
    """Indexed requests -> ``{task: (N,) float32}``: the multi-task network, one forward per batch."""

    def __init__(self, bundle: str) -> None:
        self._scorer = Scorer(load_bundle(bundle))

    # no wait for a batch to fill: requests that queue while a forward runs form the next batch, and a
    # lone request does not pay a timeout
    @ray.serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def predict(self, jobs: list[tuple[IndexedRequest, np.ndarray | None]]) -> list[dict[str, np.ndarray]]:
        """One call per request: its indexed inputs and the vectors of its texts."""
        return self._scorer.predict(jobs)
