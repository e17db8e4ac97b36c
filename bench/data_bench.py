"""Synthetic-data generator throughput and peak memory (``python -m bench.data_bench``).

Each run generates one scenario (default ``ecommerce``, 100k users, 20k items) in a fresh Python
process, so its peak resident memory (``ru_maxrss``) is its own: the whole dataset is written to a
temporary folder and removed afterwards. Reported per size, over ``--repeats`` runs: median wall time
and rows per second (the generator end to end: world, texts, simulation, per-chunk contract checks,
Parquet writing), the process's peak RSS, the part of it above the RSS after imports (what the
generator itself needs), and the peak of Arrow's memory pool. Streaming means the last three do not
grow with the number of rows. Saves ``bench/results/data.json`` and ``bench/results/data.png``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, save_results

SIZES = (1_000_000, 10_000_000)


def _worker(scenario: str, rows: int, users: int, items: int, out: Path) -> dict[str, Any]:
    """One generation in this process; the peak RSS figures are this process's own."""
    import pyarrow as pa

    from mtrec.data.synthetic import generate

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    generate(scenario, out, num_users=users, num_items=items, num_interactions=rows, seed=0)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "seconds": seconds,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "arrow_pool_peak_mb": pa.default_memory_pool().max_memory() / 2**20,
        "files_mb": sum(f.stat().st_size for f in out.iterdir()) / 2**20,
    }


def _run(scenario: str, rows: int, users: int, items: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mtrec-data-bench-") as tmp:
        cmd = [sys.executable, "-m", "bench.data_bench", "--worker", "--scenario", scenario, "--rows", str(rows),
               "--users", str(users), "--items", str(items), "--out", str(Path(tmp) / "ds")]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(rows: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = statistics.median(r["seconds"] for r in runs)
    return {
        "rows": rows,
        "runs": len(runs),
        "seconds_median": seconds,
        "seconds": [r["seconds"] for r in runs],
        "rows_per_s": rows / seconds,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "peak_over_baseline_mb": max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in runs),
        "arrow_pool_peak_mb": max(r["arrow_pool_peak_mb"] for r in runs),
        "files_mb": runs[0]["files_mb"],
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'rows':>12} {'runs':>4} {'median s':>9} {'rows/s':>10} {'peak RSS MB':>11} {'over import MB':>14} {'arrow MB':>9} {'files MB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['rows']:>12,} {r['runs']:>4} {r['seconds_median']:>9.1f} {r['rows_per_s']:>10,.0f} "
            f"{r['peak_rss_mb']:>11.0f} {r['peak_over_baseline_mb']:>14.0f} {r['arrow_pool_peak_mb']:>9.0f} {r['files_mb']:>9.0f}"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], scenario: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["rows"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(sizes, [r["rows_per_s"] for r in rows], "o-")
    left.set(xscale="log", xlabel="interactions", ylabel="rows / s", title=f"{scenario}: throughput")
    for key, label in (
        ("peak_rss_mb", "peak RSS"),
        ("peak_over_baseline_mb", "above imports"),
        ("arrow_pool_peak_mb", "Arrow pool"),
    ):
        right.plot(sizes, [r[key] for r in rows], "o-", label=label)
    right.set(xscale="log", xlabel="interactions", ylabel="MB", title="peak memory", ylim=(0, None))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="ecommerce")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.scenario, args.rows, args.users, args.items, args.out)))
        return None
    rows = []
    for size in args.sizes:
        runs = [_run(args.scenario, size, args.users, args.items) for _ in range(args.repeats)]
        rows.append(_summary(size, runs))
        times = ", ".join(f"{r['seconds']:.1f}s" for r in runs)
        print(f"{size:,} rows: {times}", flush=True)
    print(_table(rows))
    setup = {"scenario": args.scenario, "users": args.users, "items": args.items, "repeats": args.repeats}
    path = save_results("data", {"setup": setup, "results": rows})
    _plot(rows, args.scenario, RESULTS / "data.png")
    print(f"saved {path} and {RESULTS / 'data.png'}")
    return {"setup": setup, "results": rows}


if __name__ == "__main__":
    main()
