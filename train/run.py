"""``mtrec train`` and ``python -m mtrec_train.run``: train a multi-task model on Ray Train.

Without ``--address`` (and without ``RAY_ADDRESS``, which a Ray job sets) it starts an embedded
local Ray on 127.0.0.1 and stops it at the end; with ``train.num_workers=0`` it starts no Ray and
trains in this process (the same loop, for data small enough that starting Ray Train is the larger
cost). As a Ray job:

    ray job submit --working-dir . -- python -m mtrec_train.run --data DIR --out RUN [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext

from mtrec.cli_help import HelpFormatter
from mtrec.config import Config, load_preset, preset_names
from mtrec.io import claim_output
from mtrec.preflight import check_training
from mtrec_cluster.ray_env import local_ray


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mtrec train", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="dataset directory (the data contract)")
    p.add_argument("--out", required=True, help="run directory: bundle/, metrics.json, curves.png")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into --out even if it holds files mtrec did not write (files of the same names are replaced)",
    )
    p.add_argument("--preset", default=None, help=f"a preset name ({', '.join(preset_names())}) or a YAML path")
    p.add_argument("--address", default=None, help="Ray address to join (default: an embedded local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. model.arch=ple train.lr=1e-3")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    cfg = load_preset(args.preset) if args.preset else Config()
    return cfg.override(args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = build_config(args)
    check_training(cfg, args.data)  # a bad name or dataset fails here, before Ray starts
    claim_output(args.out, args.force)
    in_process = cfg.train.num_workers == 0 and not args.address
    with nullcontext() if in_process else local_ray(args.address, num_cpus=args.num_cpus):
        from mtrec_train.trainer import run_training

        metrics = run_training(cfg, args.data, args.out)
    summary = {split: metrics[split] for split in ("valid", "test")}
    print(json.dumps(summary, indent=2))
    print(f"[train] {metrics['train']['samples_per_s']:,.0f} samples/s; bundle in {args.out}/bundle", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
