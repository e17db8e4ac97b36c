"""Single-process quality against the synthetic oracle as the data grows (``python -m bench.quality_bench``).

On the ``ecommerce`` scenario the best achievable test AUC of each task is known: the AUC of the true
probabilities against the drawn labels (:func:`mtrec.data.synthetic.oracle_metrics`). This trains the
quality test's model (frozen MiniLM vectors from its last three layers, MMoE with 128-wide experts, DIN
history, no ids) single-process with :func:`mtrec.engine.fit` at several dataset sizes and reports each
task's gap to the oracle; the bar is a gap of at most 0.02
on every task. Results: ``bench/results/quality.json`` and ``quality.png``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, save_results

MARGIN = 0.02
OVERRIDES = [  # the quality test's model (tests/unit/test_engine.py)
    "model.arch=mmoe",
    "model.history=din",
    "model.use_user_ids=false",
    "model.use_item_ids=false",
    "model.expert_dim=128",
    "encoder.layers=[-1,-2,-3]",
    "train.batch_size=512",
    "train.epochs=8",
    "train.early_stop_patience=0",
]


def run(size: int, work: Path, seed: int, epochs: int, extra: list[str]) -> dict[str, Any]:
    from mtrec.config import Config
    from mtrec.data.synthetic import generate, oracle_metrics
    from mtrec.engine import fit

    data = generate(
        "ecommerce", work / f"data-{size}", num_users=2000, num_items=1000, num_interactions=size, seed=seed
    )
    cfg = Config().override([*OVERRIDES, f"train.epochs={epochs}", *extra])
    start = time.perf_counter()
    result = fit(cfg, data, work / f"run-{size}")
    seconds = time.perf_counter() - start
    oracle = oracle_metrics(data, "test")
    tasks = {
        t: {
            "auc": result.metrics["test"][t]["auc"],
            "oracle_auc": o["auc"],
            "gap": o["auc"] - result.metrics["test"][t]["auc"],
        }
        for t, o in oracle.items()
    }
    return {"interactions": size, "seconds": seconds, "tasks": tasks, "max_gap": max(v["gap"] for v in tasks.values())}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["interactions"] for r in rows]
    for task in rows[0]["tasks"]:
        ax.plot(sizes, [r["tasks"][task]["gap"] for r in rows], marker="o", label=task)
    ax.axhline(MARGIN, color="grey", ls="--", label=f"bar ({MARGIN})")
    ax.set(xscale="log", xlabel="interactions", ylabel="oracle AUC - test AUC", title="gap to the oracle")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.quality_bench", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 500_000, 1_000_000])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="config overrides on top of the defaults (KEY=VALUE)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mtrec-quality-") as tmp:
        for size in args.sizes:
            row = run(size, Path(tmp), args.seed, args.epochs, args.overrides)
            rows.append(row)
            gaps = ", ".join(f"{t} {v['auc']:.4f}/{v['oracle_auc']:.4f}" for t, v in row["tasks"].items())
            print(f"{size:,} interactions ({row['seconds']:.0f} s): {gaps}; max gap {row['max_gap']:.4f}", flush=True)
    largest = rows[-1]
    headline = {f"{t} gap at {largest['interactions']:,}": v["gap"] for t, v in largest["tasks"].items()}
    headline[f"every task within {MARGIN} at {largest['interactions']:,}"] = largest["max_gap"] <= MARGIN
    overrides = [*OVERRIDES, *args.overrides]
    doc = {"setting": {"scenario": "ecommerce", "overrides": overrides, "epochs": args.epochs, "seed": args.seed}}
    doc |= {"runs": rows, "headline": headline}
    save_results("quality", doc)
    plot(rows, RESULTS / "quality.png")
    return doc


if __name__ == "__main__":
    main()
