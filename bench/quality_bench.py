"""Single-process quality against the synthetic oracle as the data grows, and the quality gate
(``python -m bench quality``).

On the ``ecommerce`` scenario the best achievable test AUC of each task is known: the AUC of the true
probabilities against the drawn labels (:func:`mtrec.data.synthetic.oracle_metrics`). This trains one
model (frozen MiniLM vectors from its last three layers, MMoE with 128-wide experts, DIN history, no
ids) single-process with :func:`mtrec.engine.fit` at several dataset sizes and reports each task's gap
to the oracle, on all test rows and on the cold items' rows (items released after the training window,
known to the model only by their text).

The gate, judged at every size from 500,000 interactions up: every task's test AUC within 0.02 of the
oracle's, and within 0.03 on the cold items' rows. The process exits 1 when a gated size misses a bar.
Results: ``bench/results/quality.json`` and ``quality.png``. (The test suite keeps a 30,000-row check
of the same model: ``tests/unit/test_engine.py``.)

What got the model within the bar (gaps click / add_to_cart / purchase / ad_click):

- MiniLM's last layer alone holds the items' star rating poorly: a linear read-out of the quality
  level from it has R^2 0.72, from the layers below 0.97-0.99 (``tests/unit/test_encoders_real.py``).
  So the model under-used quality (residual logits +0.37 .. -0.18 from 1 to 5 stars) and cold items,
  known only by their text, lagged. ``encoder.layers=[-1,-2,-3]`` closes both.
- Ids hurt once the text is read well: the item text says nearly all there is to know about an item
  (the hidden popularity has sd 0.15), and user ids overfit even with 500 rows per user. At 1M with
  ids, id_dropout 0.5 and the three layers: 0.017, 0.017, 0.019, 0.021; without ids: 0.008, 0.009,
  0.009, 0.010. At 500k: 0.011, 0.012, 0.013, 0.010.
- At 100k interactions the bar is beyond reach (a logistic regression handed the true latent
  attributes has gaps of 0.012 to 0.045); at 300k it is met by 0.001 to 0.005.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, save_results

MARGIN = 0.02  # the gate: every task's test AUC within this of the oracle's...
COLD_MARGIN = 0.03  # ...and within this on the cold items' rows
GATE_SIZE = 500_000  # the gate applies from this many interactions up
OVERRIDES = [  # the model (also the 30k-row check's in tests/unit/test_engine.py)
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
    tasks = {}
    for t, o in oracle.items():
        got = result.metrics["test"][t]
        tasks[t] = {
            "auc": got["auc"],
            "oracle_auc": o["auc"],
            "gap": o["auc"] - got["auc"],
            "cold_auc": got["cold_auc"],
            "oracle_cold_auc": o["cold_auc"],
            "cold_gap": o["cold_auc"] - got["cold_auc"],
        }
    row = {"interactions": size, "seconds": seconds, "tasks": tasks}
    row["max_gap"] = max(v["gap"] for v in tasks.values())
    row["max_cold_gap"] = max(v["cold_gap"] for v in tasks.values())
    if size >= GATE_SIZE:
        row["passed"] = row["max_gap"] <= MARGIN and row["max_cold_gap"] <= COLD_MARGIN
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    sizes = [r["interactions"] for r in rows]
    for ax, key, bar, title in (
        (axes[0], "gap", MARGIN, "all test rows"),
        (axes[1], "cold_gap", COLD_MARGIN, "cold items' rows"),
    ):
        for task in rows[0]["tasks"]:
            ax.plot(sizes, [r["tasks"][task][key] for r in rows], marker="o", label=task)
        ax.axhline(bar, color="grey", ls="--", label=f"bar ({bar})")
        ax.axvline(GATE_SIZE, color="grey", ls=":", label="gate from here")
        ax.set(xscale="log", xlabel="interactions", title=f"gap to the oracle: {title}")
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
        ax.minorticks_off()
        ax.legend()
    axes[0].set_ylabel("oracle AUC - test AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(row: dict[str, Any]) -> str:
    """One line: PASS or FAIL of a gated size, naming every task over a bar."""
    over = [f"{t} {v['gap']:.4f} > {MARGIN}" for t, v in row["tasks"].items() if v["gap"] > MARGIN]
    over += [
        f"{t} cold {v['cold_gap']:.4f} > {COLD_MARGIN}" for t, v in row["tasks"].items() if v["cold_gap"] > COLD_MARGIN
    ]
    head = f"gate at {row['interactions']:,}: "
    if row["passed"]:
        return (
            head + f"PASS (max gap {row['max_gap']:.4f} <= {MARGIN}, cold {row['max_cold_gap']:.4f} <= {COLD_MARGIN})"
        )
    return head + "FAIL (" + "; ".join(over) + ")"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.quality_bench", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, GATE_SIZE, 1_000_000])
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
            print(
                f"{size:,} interactions ({row['seconds']:.0f} s): {gaps}; max gap {row['max_gap']:.4f}, "
                f"cold {row['max_cold_gap']:.4f}",
                flush=True,
            )
    gated = [r for r in rows if "passed" in r]
    for row in gated:
        print(verdict(row), flush=True)
    if not gated:
        print(f"gate not judged: no size of at least {GATE_SIZE:,} interactions", flush=True)
    largest = rows[-1]
    headline = {f"{t} gap at {largest['interactions']:,}": v["gap"] for t, v in largest["tasks"].items()}
    headline |= {
        f"{t} cold-item gap at {largest['interactions']:,}": v["cold_gap"] for t, v in largest["tasks"].items()
    }
    headline |= {f"gate at {r['interactions']:,} passed": r["passed"] for r in gated}
    overrides = [*OVERRIDES, *args.overrides]
    doc = {
        "setting": {"scenario": "ecommerce", "overrides": overrides, "epochs": args.epochs, "seed": args.seed},
        "gate": {"margin": MARGIN, "cold_margin": COLD_MARGIN, "from_interactions": GATE_SIZE},
    }
    doc |= {"runs": rows, "headline": headline}
    save_results("quality", doc)
    plot(rows, RESULTS / "quality.png")
    return doc


if __name__ == "__main__":
    sys.exit(0 if all(r["passed"] for r in main()["runs"] if "passed" in r) else 1)
