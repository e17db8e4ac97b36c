"""Time-based train/valid/test splits and the cold-item flag."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def time_split(interactions: pa.Table, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> pa.Table:
    """Add ``split`` (train/valid/test by timestamp quantile) and ``cold_item`` columns.

    Rows at or after the ``1 - valid - test`` timestamp quantile are valid, those at or after the
    ``1 - test`` quantile are test; ties go to the later split so no time leaks backwards. An item is
    cold when it never appears in the train split: its first interaction is after the training period.
    """
    if not 0 <= valid_fraction < 1 or not 0 <= test_fraction < 1 or valid_fraction + test_fraction >= 1:
        raise ValueError(f"valid_fraction={valid_fraction}, test_fraction={test_fraction}: each in [0, 1), sum < 1")
    ts = interactions.column("timestamp").to_numpy()
    t_valid = np.quantile(ts, 1 - valid_fraction - test_fraction, method="lower") if valid_fraction else np.inf
    t_test = np.quantile(ts, 1 - test_fraction, method="lower") if test_fraction else np.inf
    split = np.where(ts >= t_test, "test", np.where(ts >= t_valid, "valid", "train"))
    if valid_fraction and test_fraction and t_valid == t_test:
        split = np.where(ts >= t_test, "test", "train")
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
