"""Caches of text vectors, so a text is encoded once: :func:`encode_cached` looks each text up by the
sha256 of its cleaned form and encodes only the missing ones, through one of two stores:

- :class:`VectorStore`, on disk (training's frozen item vectors: a changed catalogue re-encodes only
  what changed). Layout: ``cache_dir/<model>-<fingerprint>/shard-*.npz``, one directory per encoder
  fingerprint (model id, text settings, weights; see :meth:`TextEncoder.fingerprint`), one shard per
  write holding ``keys (M, 32) uint8`` and ``vectors (M, D) float32``. The directory listing is the
  index. Shards are written to a temporary file and renamed, and never change after, so any number of
  processes may read and write at once; when shards pile up, a writer merges them.
- :class:`RecentVectors`, in memory (serving's Embedder: cold items and new contexts): an LRU of
  bounded size, so texts differing only in whitespace or control characters share an entry.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from mtrec.encoders.encoder import TextEncoder
from mtrec.encoders.registry import cache_root
from mtrec.encoders.text import clean_texts
from mtrec.io import atomic_write_bytes

log = logging.getLogger(__name__)

MAX_SHARDS = 32  # a write that leaves more shards than this merges them into one


def encode_cached(
    encoder: TextEncoder,
    texts: list[str],
    cache: str | Path | RecentVectors | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Texts -> (N, D) float32, encoding only texts whose vectors are not cached yet.

    ``cache``: a :class:`RecentVectors` held by the caller, or the directory of the on-disk store
    (None or ``""`` means ``~/.cache/mtrec/vectors``). Duplicate texts encode once. DataError naming
    the index of a text that is empty after cleaning.
    """
    cleaned = clean_texts(texts, encoder.max_chars)
    keys = [hashlib.sha256(c.encode()).digest() for c in cleaned]
    if isinstance(cache, RecentVectors):
        store: VectorStore | RecentVectors = cache
    else:
        root = Path(cache) if cache else cache_root() / "vectors"
        safe_id = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder.model_id)[:80]
        store = VectorStore(root / f"{safe_id}-{encoder.fingerprint()[:20]}", encoder.dim)
    found = store.get(set(keys))
    todo = {k: c for k, c in zip(keys, cleaned) if k not in found}
    log.log(
        logging.DEBUG if store is cache else logging.INFO,  # serving looks up every request's texts
        "encode_cached %s: %d texts, %d cached, %d to encode",
        encoder.model_id,
        len(keys),
        len(keys) - len(todo),
        len(todo),
    )
    if todo:
        vectors = encoder.encode(list(todo.values()), batch_size=batch_size, progress=progress).numpy()
        store.put(list(todo), vectors)
        found.update(zip(todo, vectors))
    out = np.empty((len(keys), encoder.dim), dtype=np.float32)
    for i, k in enumerate(keys):
        out[i] = found[k]
    return out


class RecentVectors:
    """The ``capacity`` most recently used text vectors, in memory. ``hits``: distinct texts found per
    lookup, summed; ``misses``: texts stored after encoding (each one language-model encode)."""

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 0:
            raise ValueError(f"RecentVectors capacity {capacity} must be >= 0")
        self._capacity = capacity
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, wanted: set[bytes]) -> dict[bytes, np.ndarray]:
        """The vectors (D,) of the keys in ``wanted`` held now; each becomes the most recent."""
        found = {k: self._entries[k] for k in wanted if k in self._entries}
        for k in found:
            self._entries.move_to_end(k)
        self.hits += len(found)
        return found

    def put(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """Hold ``vectors`` (M, D) under ``keys`` (M,), dropping the least recently used beyond capacity."""
        self.misses += len(keys)
        self._entries.update(zip(keys, vectors))
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)


class VectorStore:
    """Vectors by 32-byte key in immutable ``.npz`` shards under one directory."""

    def __init__(self, root: Path, dim: int):
        self._root = root
        self._dim = dim

    def get(self, wanted: set[bytes]) -> dict[bytes, np.ndarray]:
        """The cached vectors (D,) float32 of the keys in ``wanted`` that any shard holds."""
        found: dict[bytes, np.ndarray] = {}
        for shard in self._shards():
            if len(found) == len(wanted):
                break
            loaded = self._load(shard)
            if loaded is None:
                continue
            keys, vectors = loaded
            for row, k in enumerate(keys):
                if k in wanted and k not in found:
                    found[k] = vectors[row]
        return found

    def put(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """Write one new shard: keys (M,) of 32 bytes, vectors (M, D) float32."""
        self._write(keys, vectors)
        shards = self._shards()
        if len(shards) > MAX_SHARDS:
            self._merge(shards)

    def _shards(self) -> list[Path]:
        return sorted(self._root.glob("shard-*.npz")) if self._root.is_dir() else []

    def _load(self, shard: Path) -> tuple[list[bytes], np.ndarray] | None:
        """(keys, vectors (M, D)); None for a shard gone (merged away meanwhile) or unreadable."""
        try:
            with np.load(shard) as z:
                raw, vectors = z["keys"], z["vectors"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            log.warning("vector cache: skipping unreadable shard %s (%s)", shard, e)
            return None
        if raw.ndim != 2 or raw.shape[1] != 32 or vectors.shape != (len(raw), self._dim):
            log.warning("vector cache: skipping shard %s with keys %s, vectors %s", shard, raw.shape, vectors.shape)
            return None
        return [r.tobytes() for r in raw], vectors.astype(np.float32, copy=False)

    def _write(self, keys: list[bytes], vectors: np.ndarray) -> None:
        raw = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        shard = io.BytesIO()
        np.savez(shard, keys=raw, vectors=np.ascontiguousarray(vectors, dtype=np.float32))
        atomic_write_bytes(self._root / f"shard-{uuid.uuid4().hex}.npz", shard.getvalue())

    def _merge(self, shards: list[Path]) -> None:
        """Rewrite ``shards`` as one. The merged shard is published before the old ones go, so a
        reader at worst misses some vectors for a moment and encodes them again."""
        merged: dict[bytes, np.ndarray] = {}
        for shard in shards:
            loaded = self._load(shard)
            if loaded is not None:
                merged.update(zip(*loaded))
        if merged:
            self._write(list(merged), np.stack(list(merged.values())))
        for shard in shards:
            shard.unlink(missing_ok=True)
