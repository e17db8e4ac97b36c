"""Time-based train/valid/test splits and the cold-item flag."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def split_boundaries(
    timestamps: Sequence[int] | np.ndarray, valid_fraction: float, test_fraction: float, presorted: bool = False
) -> tuple[float, float]:
    """Timestamps at which valid and test begin: the first ``1 - valid - test`` of rows (by time) train.

    A streaming writer that knows its timestamp schedule calls this on that schedule and
    :func:`assign_split` per chunk; :func:`time_split` does both on a whole table. ``presorted``:
    the timestamps are already in order and only ``len`` and two lookups touch them, so a lazy
    sequence (a stream's known schedule) serves without holding every timestamp.
    """
    if not 0 <= valid_fraction < 1 or not 0 <= test_fraction < 1 or valid_fraction + test_fraction >= 1:
        raise ValueError(f"valid_fraction={valid_fraction}, test_fraction={test_fraction}: each in [0, 1), sum < 1")
    ts = timestamps if presorted else np.sort(np.asarray(timestamps))
    n = len(ts)

    def at(frac: float) -> float:
        k = int(round(n * (1 - frac)))
        return float(ts[k]) if frac and k < n else np.inf

    return at(valid_fraction + test_fraction) if valid_fraction else at(test_fraction), at(test_fraction)


def assign_split(timestamps: np.ndarray, t_valid: float, t_test: float) -> np.ndarray:
    """``train``/``valid``/``test`` per row; ties go to the later split so no time leaks backwards."""
    ts = np.asarray(timestamps)
    return np.where(ts >= t_test, "test", np.where(ts >= t_valid, "valid", "train"))


def time_split(interactions: pa.Table, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> pa.Table:
    """Add ``split`` (train/valid/test by time) and ``cold_item`` columns.

    An item is cold when it never appears in the train split: its first interaction is after the
    training period.
    """
    ts = interactions.column("timestamp").to_numpy()
    split = assign_split(ts, *split_boundaries(ts, valid_fraction, test_fraction))
    out = _replace(interactions, "split", pa.array(split, pa.string()))
    return mark_cold_items(out)


def mark_cold_items(interactions: pa.Table) -> pa.Table:
    """Set ``cold_item`` True on rows whose item has no interaction in the train split."""
    is_train = pc.equal(interactions.column("split"), "train")
    train_items = pc.unique(pc.filter(interactions.column("item_id"), is_train))
    cold = pc.invert(pc.is_in(interactions.column("item_id"), value_set=train_items))
    return _replace(interactions, "cold_item", cold)


def _replace(t: pa.Table, name: str, col: pa.Array) -> pa.Table:
    if name in t.column_names:
        return t.set_column(t.column_names.index(name), name, col)
    return t.append_column(name, col)
