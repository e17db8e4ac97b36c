"""``mtrec``: the command-line front door. Each subcommand is thin and calls into the packages.

Subcommands that need Ray (train, tune, serve, cluster, submit, demo) import their package lazily,
so ``mtrec data ...`` works without starting or even importing Ray. Every error ray-mtrec raises on
purpose (:class:`~mtrec.errors.MtrecError`) prints as one ``error:`` line and exits 2, as argparse's
usage errors do.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import mtrec
from mtrec.cli_help import HelpFormatter
from mtrec.errors import MtrecError

# subcommand -> ("module:function" taking the remaining argv, each with its own argparse; one-line help)
PASSTHROUGH = {
    "train": ("mtrec_train.run:main", "train a multi-task model on Ray Train"),
    "tune": ("mtrec_tune.run:main", "search task weighting with Ray Tune"),
    "serve": ("mtrec_serve.run:main", "serve a bundle with Ray Serve; `mtrec serve config` writes its Serve config"),
    "cluster": ("mtrec_cluster.local:main", "local Ray cluster up/down/status"),
    "submit": ("mtrec_cluster.submit:main", "submit train/tune as a Ray job"),
    "demo": ("mtrec_app.demo:main", "the one-command end-to-end demo"),
}

# `mtrec data NAME` -> (module, function, what --src holds)
CONVERTERS = {
    "movielens": ("mtrec.data.movielens", "convert", "MovieLens ml-100k or ml-1m folder"),
    "ali-ccp": ("mtrec.data.alibaba", "convert_ali_ccp", "Ali-CCP CSVs (torch-rechub layout)"),
    "aliexpress": ("mtrec.data.alibaba", "convert_aliexpress", "AliExpress CSVs (Tianchi layout)"),
    "census": ("mtrec.data.census", "convert", "UCI Census-Income (KDD) raw data file folder"),
    "kuairand": ("mtrec.data.kuairand", "convert", "KuaiRand log_standard_*.csv folder"),
}


def _out_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="dataset directory to write; refused when it holds files mtrec did not write",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into DIR although it holds files mtrec did not write (they are kept; same names are replaced)",
    )


def _data_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from mtrec.data.synthetic import SCENARIOS  # numpy and pyarrow: not for the Ray commands' start-up

    parser = sub.add_parser(
        "data",
        help="build, convert and validate datasets",
        description="build, convert and validate datasets in the data contract",
        formatter_class=HelpFormatter,
    )
    data = parser.add_subparsers(dest="data_cmd")
    s = data.add_parser(
        "synth",
        help="a synthetic scenario with known ground truth",
        description="write a synthetic scenario with known ground truth (ground_truth.parquet holds the oracle)",
        formatter_class=HelpFormatter,
    )
    s.add_argument("--scenario", choices=SCENARIOS, default="ecommerce", help="the simulated world")
    _out_arguments(s)
    s.add_argument("--seed", type=int, default=0, help="random seed: the same arguments give identical files")
    s.add_argument("--users", type=int, default=2000, help="number of users")
    s.add_argument("--items", type=int, default=1000, help="number of items")
    s.add_argument("--interactions", type=int, default=100_000, help="number of interaction rows")
    for name, (_, _, source) in CONVERTERS.items():
        p = data.add_parser(
            name,
            help=f"convert {source}",
            description=f"convert {source} into the data contract",
            formatter_class=HelpFormatter,
        )
        p.add_argument("--src", required=True, metavar="DIR", help=source)
        _out_arguments(p)
        p.add_argument("--seed", type=int, default=0, help="random seed (negative sampling, split assignment)")
    v = data.add_parser(
        "validate",
        help="check a dataset against the data contract",
        description="check a dataset against the data contract; exit 1 when it breaks a rule (warnings alone exit 0)",
        formatter_class=HelpFormatter,
    )
    v.add_argument("path", help="dataset directory")
    return parser


def _run_data(args: argparse.Namespace) -> int:
    from mtrec.data.summary import describe

    if args.data_cmd == "validate":
        from mtrec.data.contract import review

        found = review(args.path)
        for w in found.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if found.errors:
            print(f"{args.path}: {len(found.errors)} problem(s)", file=sys.stderr)
            for p in found.errors:
                print(f"  {p}", file=sys.stderr)
            return 1
        print(describe(args.path))
        return 0
    from mtrec.io import check_output

    check_output(args.out, args.force)  # before reading the source, which can take minutes
    if args.data_cmd == "synth":
        from mtrec.data.synthetic import generate

        out = generate(
            args.scenario,
            args.out,
            num_users=args.users,
            num_items=args.items,
            num_interactions=args.interactions,
            seed=args.seed,
            force=args.force,
        )
    else:
        module, fn, _ = CONVERTERS[args.data_cmd]
        convert = getattr(importlib.import_module(module), fn)
        out = convert(Path(args.src), Path(args.out), seed=args.seed, force=args.force)
    print(describe(out))
    return 0


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``mtrec`` parser and its ``data`` subparser."""
    parser = argparse.ArgumentParser(
        prog="mtrec",
        description="LLM-driven multi-task recommendation on Ray",
        epilog="`mtrec COMMAND --help` describes a command",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {mtrec.__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    data = _data_parser(sub)
    for name, (_, help_) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_, add_help=False, formatter_class=HelpFormatter)
    return parser, data


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in PASSTHROUGH:
        module, fn = PASSTHROUGH[argv[0]][0].split(":")
        return int(getattr(importlib.import_module(module), fn)(argv[1:]) or 0)
    parser, data = _parsers()
    args = parser.parse_args(argv)
    if args.cmd is None or args.data_cmd is None:  # `mtrec`, `mtrec data`: what there is to do, as a usage error
        (parser if args.cmd is None else data).print_help(sys.stderr)
        return 2
    return _run_data(args)


def main(argv: list[str] | None = None) -> int:
    """The ``mtrec`` console script: 0 on success, 1 when ``data validate`` finds problems, 2 on a usage
    error or any :class:`~mtrec.errors.MtrecError` (printed as one line)."""
    try:
        try:
            return _dispatch(list(sys.argv[1:] if argv is None else argv))
        except MtrecError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            sys.stdout.flush()  # a reader that went away (`mtrec --help | head -1`) fails here, not at exit
    except BrokenPipeError:
        # Python's final flush would fail again and print a traceback: point stdout at /dev/null instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
