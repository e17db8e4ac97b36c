"""``mtrec``: the command-line front door. Each subcommand is thin and calls into the packages.

Subcommands that need Ray (train, tune, serve, cluster, submit, demo) import their package lazily,
so ``mtrec data ...`` works without starting or even importing Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from mtrec.errors import MtrecError

# subcommand -> "module:function" taking the remaining argv (each owns its own argparse)
PASSTHROUGH = {
    "train": ("mtrec_train.run:main", "train a multi-task model on Ray Train"),
    "tune": ("mtrec_tune.run:main", "search task weighting with Ray Tune"),
    "serve": ("mtrec_serve.run:main", "serve a bundle with Ray Serve (or write its Serve config)"),
    "cluster": ("mtrec_cluster.local:main", "local Ray cluster up/down/status"),
    "submit": ("mtrec_cluster.submit:main", "submit train/tune as a Ray job"),
    "demo": ("mtrec_app.demo:main", "the one-command end-to-end demo"),
}

SCENARIOS = ("ecommerce", "social", "search")


def _data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build, convert and validate datasets").add_subparsers(
        dest="data_cmd", required=True
    )
    s = data.add_parser("synth", help="a synthetic scenario with known ground truth")
    s.add_argument("--scenario", choices=SCENARIOS, default="ecommerce")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--users", type=int, default=2000)
    s.add_argument("--items", type=int, default=1000)
    s.add_argument("--interactions", type=int, default=100_000)
    for name, help_ in (
        ("movielens", "MovieLens ml-100k or ml-1m folder"),
        ("ali-ccp", "Ali-CCP CSVs (torch-rechub layout)"),
        ("aliexpress", "AliExpress CSVs (Tianchi layout)"),
        ("census", "UCI Census-Income (KDD) raw data file folder"),
        ("kuairand", "KuaiRand log_standard_*.csv folder"),
    ):
        p = data.add_parser(name, help=help_)
        p.add_argument("--src", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--seed", type=int, default=0)
    v = data.add_parser("validate", help="check a dataset against the data contract")
    v.add_argument("path")


def _run_data(args: argparse.Namespace) -> int:
    if args.data_cmd == "validate":
        from mtrec.data.contract import validate

        problems = validate(args.path)
        if problems:
            print(f"{args.path}: {len(problems)} problem(s)", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            return 1
        from mtrec.data.summary import describe

        print(describe(args.path))
        return 0
    if args.data_cmd == "synth":
        from mtrec.data.synthetic import generate

        out = generate(
            args.scenario,
            args.out,
            num_users=args.users,
            num_items=args.items,
            num_interactions=args.interactions,
            seed=args.seed,
        )
    else:
        module, fn = {
            "movielens": ("mtrec.data.movielens", "convert"),
            "ali-ccp": ("mtrec.data.alibaba", "convert_ali_ccp"),
            "aliexpress": ("mtrec.data.alibaba", "convert_aliexpress"),
            "census": ("mtrec.data.census", "convert"),
            "kuairand": ("mtrec.data.kuairand", "convert"),
        }[args.data_cmd]
        out = getattr(importlib.import_module(module), fn)(Path(args.src), Path(args.out), seed=args.seed)
    from mtrec.data.summary import describe

    print(describe(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        target, _ = PASSTHROUGH[argv[0]]
        module, fn = target.split(":")
        try:
            return int(getattr(importlib.import_module(module), fn)(argv[1:]) or 0)
        except MtrecError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="mtrec", description="LLM-driven multi-task recommendation on Ray")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _data_parser(sub)
    for name, (_, help_) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_, add_help=False)
    args = parser.parse_args(argv)
    try:
        return _run_data(args)
    except MtrecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
