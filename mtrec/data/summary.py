"""A short human-readable description of a dataset in the contract."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtrec.data.contract import INTERACTIONS, ITEMS, USERS, read_tasks


def _summary_columns(root: Path, tasks: list) -> list[str]:
    """Only the columns the summary reads (ids, split, cold flag, labels), not text or features."""
    present = set(pq.read_schema(root / INTERACTIONS).names)
    wanted = ["user_id", "split", "cold_item", *dict.fromkeys(t.label for t in tasks)]
    return [c for c in wanted if c in present]


def describe(path: str | Path) -> str:
    root = Path(path)
    tasks = read_tasks(root)
    inter = pq.read_table(root / INTERACTIONS, columns=_summary_columns(root, tasks))
    n_items = pq.read_metadata(root / ITEMS).num_rows
    n_users = (
        pq.read_metadata(root / USERS).num_rows if (root / USERS).exists() else len(pc.unique(inter.column("user_id")))
    )
    lines = [f"{root}: {inter.num_rows:,} interactions, {n_users:,} users, {n_items:,} items"]
    if "split" in inter.column_names:
        counts = {d["values"]: d["counts"] for d in pc.value_counts(inter.column("split")).to_pylist()}
        lines.append("  splits: " + ", ".join(f"{k} {counts.get(k, 0):,}" for k in ("train", "valid", "test")))
    if "cold_item" in inter.column_names:
        lines.append(f"  cold-item rows: {pc.sum(inter.column('cold_item')).as_py() or 0:,}")
    for t in tasks:
        col = inter.column(t.label)
        observed = inter.num_rows - col.null_count
        stat = pc.mean(pc.cast(col, "float64")).as_py()
        what = "positive rate" if t.kind == "binary" else "mean"
        dep = f", depends on {t.depends_on}" if t.depends_on else ""
        lines.append(f"  task {t.name} ({t.kind}{dep}): {observed:,} observed, {what} {stat:.4f}")
    return "\n".join(lines)
