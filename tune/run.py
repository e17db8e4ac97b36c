"""``mtrec tune`` and ``python -m mtrec_tune.run``: search task weighting with Ray Tune over Ray Train.

Checks the data, the config and the objective first, then starts (or joins) Ray and runs
:func:`mtrec_tune.search.run_search`, whose docstring describes the search and what ``OUT`` holds.
Running the same command again on an interrupted search resumes it.

As a Ray job::

    ray job submit --working-dir . -- python -m mtrec_tune.run --data DIR --out OUT --trials 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from mtrec.cli_help import HelpFormatter
from mtrec.config import Config, load_preset, preset_names
from mtrec.errors import ConfigError
from mtrec.preflight import check_training
from mtrec_cluster.ray_env import local_ray


def _read_points(path: str) -> list[dict[str, Any]]:
    points = yaml.safe_load(Path(path).read_text())
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError(f"{path}: expected a YAML list of points (mappings), got {type(points).__name__}")
    return points


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mtrec tune", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="dataset directory (the data contract)")
    p.add_argument("--out", required=True, help="search directory (resumed when it holds an unfinished search)")
    p.add_argument("--trials", type=int, default=8, help="trials in all, the equal-weights baseline included")
    p.add_argument("--objective", default="mean_auc", help="e.g. 'purchase.auc; click.auc>=0.7' (tune/objective.py)")
    p.add_argument("--preset", default=None, help=f"a preset name ({', '.join(preset_names())}) or a YAML path")
    p.add_argument("--strategies", default="", help="weighting strategies searched (comma-separated; default: all)")
    p.add_argument("--archs", default="", help="architectures searched (comma-separated; empty: not searched)")
    p.add_argument("--no-lr", action="store_true", help="keep train.lr instead of searching it")
    p.add_argument("--points", default=None, help="YAML file: a list of points tried first (tune/spaces.py)")
    p.add_argument("--concurrency", type=int, default=None, help="trials at once (default: as many as fit)")
    p.add_argument("--grace-epochs", type=int, default=1, help="epochs before ASHA may stop a trial")
    p.add_argument("--seed", type=int, default=0, help="seed of the random search")
    p.add_argument("--address", default=None, help="Ray address to join (default: an embedded local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray")
    p.add_argument("overrides", nargs="*", help="section.field=value applied to every trial")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = (load_preset(args.preset) if args.preset else Config()).override(args.overrides)
    tasks = check_training(base, args.data)  # a bad name or dataset fails here, before Ray starts
    from mtrec_tune.objective import Objective  # imports torch: after the checks that need nothing

    objective = Objective.parse(args.objective)
    objective.check(tasks)
    points = _read_points(args.points) if args.points else None
    with local_ray(args.address, num_cpus=args.num_cpus):
        from mtrec_tune.search import SearchInterrupted, run_search

        try:
            summary = run_search(
                base,
                args.data,
                args.out,
                args.trials,
                objective,
                strategies=[s for s in args.strategies.split(",") if s] or None,
                archs=[a for a in args.archs.split(",") if a] or None,
                lr_range=None if args.no_lr else (3e-4, 1e-2),
                points=points,
                seed=args.seed,
                concurrency=args.concurrency,
                grace_epochs=args.grace_epochs,
            )
        except SearchInterrupted as e:
            print(f"[tune] {e}", file=sys.stderr)
            return 130
    print(json.dumps(summary, indent=2, default=float))
    print(f"[tune] best preset: {Path(args.out) / 'result' / 'best.yaml'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
