"""Run every benchmark, or a named subset, then regenerate BENCHMARKS.md.

    python -m bench                  # all of them (long: tens of minutes on 2 cores)
    python -m bench data control     # a subset
    python -m bench --list
    python -m bench --report-only    # only regenerate BENCHMARKS.md from bench/results/

Each benchmark runs in its own process (a fresh Ray, no memory carried over), reports medians (over
repeated timings, or over a training run's steady-state epochs), and writes
``bench/results/<name>.json`` plus its plots. Extra arguments after ``--`` go to every selected benchmark.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time

from bench import report

# name -> (module, arguments, what it measures); the order is the order they run in
BENCHMARKS: dict[str, tuple[str, list[str], str]] = {
    "data": ("bench.data_bench", [], "synthetic generator rows/s and peak memory at 1M and 10M rows"),
    "model": ("bench.model_bench", [], "forward+backward samples/s per architecture and encoder mode"),
    "control": ("bench.control_bench", [], "fusion-weight control: gap closed, safety and honesty in hard worlds"),
    "quality": ("bench.quality_bench", [], "single-process test AUC against the synthetic oracle as the data grows"),
    "training": ("bench.train_bench", ["throughput"], "Ray Train samples/s, 1 vs 2 workers, frozen vs finetune"),
    "movielens": ("bench.train_bench", ["movielens"], "MovieLens-100K AUC: LLM text vs ID-only"),
    "llm": ("bench.llm_bench", [], "ID only / MiniLM / SmolLM2 frozen and fine-tuned on MovieLens-100K"),
    "serving": ("bench.serve_bench", [], "HTTP latency and throughput against an echo floor and in-process"),
    "reliability": ("bench.reliability_bench", [], "faults, fuzzing and a soak under load"),
    "autoscale": ("bench.autoscale_bench", [], "a load step: replicas of Embedder and TaskHeads up and back down"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--report-only", action="store_true", help="only regenerate BENCHMARKS.md")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; valid: {', '.join(BENCHMARKS)}")
    if args.list:
        for name, (module, _, what) in BENCHMARKS.items():
            present = "" if importlib.util.find_spec(module) else "  (not built yet)"
            print(f"{name:12s} {what}{present}")
        return 0
    failed = []
    for name in [] if args.report_only else args.names or list(BENCHMARKS):
        module, bench_args, _ = BENCHMARKS[name]
        if importlib.util.find_spec(module) is None:
            print(f"== {name}: skipped ({module} does not exist yet)", flush=True)
            continue
        print(f"== {name}: python -m {module} {' '.join(bench_args + extra)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", module, *bench_args, *extra])
        print(f"== {name}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(name)
    print(f"wrote {report.write()}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
