"""Fusion-weight control in semi-synthetic worlds: does a policy earn its keep, and can it be trusted?

    python -m bench control -- [--seeds 1,2,...] [--worlds step,null] [--traffic 10000,100000]
                               [--policies calibrated] [--windows 336] [--workers 2] [--json PATH]

Every world of :mod:`mtrec.fusion.worlds` x traffic level (impressions per window) x policy runs for
``--windows`` windows (two weeks of hourly windows by default) with the world's shift half way, on
each seed. Values are exact expected values (:mod:`mtrec.fusion.simulator`); the static weights
are the yardstick and are not run. Per cell, over seeds:

- ``gap_closed``: ``G = (V - V_static) / (V_oracle - V_static)`` over the second half after the
  shift (median, and the distribution-free 95 % interval of the median from order statistics);
  undefined in a null world, where no weight changes the value;
- ``regret``: ``sum (V_oracle - V) / sum V_static`` over the run;
- ``loss_vs_static``: ``(sum V_static - sum V) / sum V_static`` over the run (negative: a gain);
- ``promotions`` and ``false_promotions`` (the promoted weights' true value is not above the
  weights they replaced), ``rollbacks``;
- ``guardrail_violations``: windows in which the main arm's true guarded rate is below the guardrail
  (``rho`` times the static weights'); ``experiment_violations``: the same for all the traffic outside
  the holdout (the main arm and a candidate together);
- ``recover_windows``: windows after the shift until the value first reaches 0.99 of the oracle's;
- ``steady_l1``: mean L1 movement of the main weights per window over the second half after the shift.

``summary`` holds the figures of the policy ``mtrec serve`` uses for adaptive control
(:data:`mtrec.fusion.ADAPTIVE`) against their targets: ``gap_closed_1m`` and ``gap_closed_100k``, the
lowest median G over the worlds where weights matter; ``worst_loss_vs_static``, the largest loss of
any run; ``false_promotion_share`` over all promotions; ``guardrail_violations``, all windows;
``null_lift_claim_share``, the largest share of seeds that promoted, over the null world's traffic
levels; ``steady_l1``, the largest median over cells. Saves ``bench/results/control.json`` (and
``--json PATH``), ``control.png`` (G per world and traffic level) and ``control_runs.png`` (one seed's
value and weights, window by window).
"""

from __future__ import annotations

import argparse
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, save_results
from mtrec.fusion import ADAPTIVE, Limits, build_policy
from mtrec.fusion.simulator import Run, Simulator, World
from mtrec.fusion.worlds import MOVIELENS_100K, NULL_WORLDS, WORLDS, build_world
from mtrec.io import atomic_write_text

SEEDS = tuple(range(1, 11))
TRAFFIC = (10_000, 100_000, 1_000_000)
POLICIES = ("proportional", "target", ADAPTIVE)
WINDOWS, SHIFT_AT = 336, 0.5
QUOTA = 1.05  # the target policy's quota: purchases at 1.05 x the static weights' rate before the shift
TARGETS = {  # summary figure -> (bound, "min" or "max")
    "gap_closed_1m": (0.6, "min"),
    "gap_closed_100k": (0.3, "min"),
    "worst_loss_vs_static": (0.002, "max"),
    "false_promotion_share": (0.10, "max"),
    "guardrail_violations": (0, "max"),
    "null_lift_claim_share": (0.05, "max"),
    "steady_l1": (0.01, "max"),
}


def policy_params(name: str, world: World, sim: Simulator) -> dict[str, Any]:
    """What each policy is told about the world: what ``mtrec serve`` would be configured with."""
    if name == ADAPTIVE:
        return {"values": world.values, "scales": world.phases[0].scales, "guardrails": world.guardrails}
    if name == "target":
        quota = world.tasks[-1] if "purchase" not in world.tasks else "purchase"
        rate = sim.rates(sim.static_weights, 0)[world.tasks.index(quota)]
        return {"targets": {quota: QUOTA * rate}}
    return {}


def metrics(run: Run, world: World, shift: int) -> dict[str, Any]:
    """One run's figures (see the module docstring)."""
    windows = len(run.value)
    late = slice(shift + (windows - shift) // 2, windows)
    gap = run.oracle[late].sum() - run.static[late].sum()
    gained = run.value[late].sum() - run.static[late].sum()
    rho = np.array(list(world.guardrails.values()))
    recovered = np.flatnonzero(run.value[shift:] >= 0.99 * run.oracle[shift:])
    promotions = [m for m in run.moves if m.action == "promote"]
    steps = np.abs(np.diff(run.main_weights[late], axis=0)).sum(axis=1)
    return {
        "gap_closed": float(gained / gap) if gap > 1e-9 * run.static[late].sum() else math.nan,
        "regret": float((run.oracle - run.value).sum() / run.static.sum()),
        "loss_vs_static": float((run.static - run.value).sum() / run.static.sum()),
        "promotions": len(promotions),
        "false_promotions": int(sum(m.lift <= 0 for m in promotions)),
        "rollbacks": sum(m.action == "rollback" for m in run.moves),
        "guardrail_violations": int((run.main_ratio < rho - 1e-9).any(axis=1).sum()),
        "experiment_violations": int((run.guardrail_ratio < rho - 1e-9).any(axis=1).sum()),
        "recover_windows": int(recovered[0]) if len(recovered) else None,
        "steady_l1": float(steps.mean()) if len(steps) else 0.0,
    }


def run_world(name: str, seed: int, traffic: tuple[int, ...], policies: tuple[str, ...], windows: int) -> dict:
    """Every traffic level and policy on world ``name`` drawn with ``seed``: figures, and traces at the top traffic."""
    start = time.time()
    world = build_world(name, seed)
    sim = Simulator(world, Limits())
    shift = int(SHIFT_AT * windows)
    out: dict[str, Any] = {"world": name, "seed": seed, "cells": {}, "traces": {}}
    for n in traffic:
        for policy_name in policies:
            policy = build_policy(policy_name, world.prior, Limits(), seed, **policy_params(policy_name, world, sim))
            run = sim.run(policy, n, windows, seed=seed * 1000 + n % 997)
            out["cells"][f"{n}/{policy_name}"] = metrics(run, world, shift)
            if n == max(traffic):
                out["traces"][policy_name] = {
                    "value": (run.value / run.oracle).tolist(),
                    "main_weights": run.main_weights.tolist(),
                }
    out["traces"]["static"] = {"value": (run.static / run.oracle).tolist()}
    out["traces"]["oracle_weights"] = [sim.oracle(world.phase_at(w, windows))[0].tolist() for w in range(windows)]
    out["tasks"] = world.tasks
    out["seconds"] = round(time.time() - start, 1)
    return out


def median_interval(x: list[float]) -> tuple[float, float, float]:
    """``(median, low, high)``: the median and its distribution-free 95 % interval, from order statistics
    (the widest ``[x_(j), x_(n+1-j)]`` with ``P(Binomial(n, 1/2) < j) <= 0.025``); NaNs left out."""
    v = np.sort([a for a in x if a is not None and not math.isnan(a)])
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan
    cdf = np.cumsum([math.comb(n, i) for i in range(n + 1)]) / 2**n  # P(Bin <= i)
    j = int(np.searchsorted(cdf, 0.025, side="right"))  # P(Bin < j) = cdf[j - 1] <= 0.025
    low, high = (v[j - 1], v[n - j]) if j >= 1 else (-math.inf, math.inf)
    return float(np.median(v)), float(low), float(high)


def aggregate(runs: list[dict], traffic: tuple[int, ...], policies: tuple[str, ...]) -> dict[str, Any]:
    """Per world, traffic level and policy: the figures over seeds."""
    table: dict[str, Any] = {}
    for world in dict.fromkeys(r["world"] for r in runs):
        for n in traffic:
            for p in policies:
                cells = [r["cells"][f"{n}/{p}"] for r in runs if r["world"] == world]
                g = median_interval([c["gap_closed"] for c in cells])
                recover = [c["recover_windows"] for c in cells]
                table.setdefault(world, {}).setdefault(str(n), {})[p] = {
                    "gap_closed": {"median": g[0], "low": g[1], "high": g[2]},
                    "regret_median": float(np.median([c["regret"] for c in cells])),
                    "loss_vs_static_median": float(np.median([c["loss_vs_static"] for c in cells])),
                    "loss_vs_static_worst": float(max(c["loss_vs_static"] for c in cells)),
                    "promotions": sum(c["promotions"] for c in cells),
                    "false_promotions": sum(c["false_promotions"] for c in cells),
                    "rollbacks": sum(c["rollbacks"] for c in cells),
                    "guardrail_violations": sum(c["guardrail_violations"] for c in cells),
                    "experiment_violations": sum(c["experiment_violations"] for c in cells),
                    "recovered_seeds": sum(r is not None for r in recover),
                    "recover_windows_median": float(np.median([r for r in recover if r is not None]))
                    if any(r is not None for r in recover)
                    else None,
                    "steady_l1_median": float(np.median([c["steady_l1"] for c in cells])),
                    "seeds_claiming_lift": sum(c["promotions"] > 0 for c in cells),
                    "per_seed": cells,
                }
    return table


def summarise(table: dict[str, Any], policy: str) -> dict[str, Any]:
    """The summary figures of ``policy`` (see the module docstring) and whether each meets its target."""
    cells = {(w, n): table[w][n][policy] for w in table for n in table[w]}
    real = [w for w in table if w not in NULL_WORLDS]

    def gap(n: str) -> float | None:
        medians = [table[w][n][policy]["gap_closed"]["median"] for w in real if n in table[w]]
        return min(medians) if medians else None

    promotions = sum(c["promotions"] for c in cells.values())
    null_claims = [c["seeds_claiming_lift"] / len(c["per_seed"]) for (w, _), c in cells.items() if w in NULL_WORLDS]
    summary = {
        "policy": policy,
        "gap_closed_1m": gap("1000000"),
        "gap_closed_100k": gap("100000"),
        "worst_loss_vs_static": max(max(0.0, c["loss_vs_static_worst"]) for c in cells.values()),
        "false_promotion_share": sum(c["false_promotions"] for c in cells.values()) / promotions if promotions else 0.0,
        "promotions": promotions,
        "guardrail_violations": sum(c["guardrail_violations"] for c in cells.values()),
        "null_lift_claim_share": max(null_claims) if null_claims else None,
        "steady_l1": max(c["steady_l1_median"] for c in cells.values()),
    }
    met = {}
    for key, (bound, kind) in TARGETS.items():
        value = summary[key]
        met[key] = None if value is None else bool(value >= bound if kind == "min" else value <= bound)
    return summary | {"targets": {k: {"bound": b, "kind": kind} for k, (b, kind) in TARGETS.items()}, "met": met}


def plot(table: dict[str, Any], traces: dict[str, Any], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [w for w in table if w not in NULL_WORLDS]
    traffic = list(next(iter(table.values())))
    policies = list(table[worlds[0]][traffic[0]])
    fig, axes = plt.subplots(1, len(traffic), figsize=(4.5 * len(traffic), 3.6), sharey=True)
    for ax, n in zip(np.atleast_1d(axes), traffic):
        for k, p in enumerate(policies):
            g = [table[w][n][p]["gap_closed"] for w in worlds]
            x = np.arange(len(worlds)) + (k - (len(policies) - 1) / 2) * 0.22
            med = np.array([c["median"] for c in g])
            err = np.array([[c["median"] - c["low"], c["high"] - c["median"]] for c in g]).T
            ax.errorbar(x, med, yerr=np.clip(err, 0, None), fmt="o", capsize=3, label=p)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(np.arange(len(worlds)), worlds, rotation=30, fontsize=8)
        ax.set_title(f"{int(n):,} impressions per window", fontsize=9)
        ax.set_ylim(-1.5, 1.2)
    np.atleast_1d(axes)[0].set_ylabel("gap closed G, 2nd half after the shift\n(median, 95% interval over seeds)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

    names = list(traces)
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 5.6), sharex=True)
    axes = np.atleast_2d(axes).reshape(2, len(names))
    for j, name in enumerate(names):
        t = traces[name]
        for p, series in t["policies"].items():
            axes[0, j].plot(series["value"], lw=0.9, label=p)
        axes[0, j].plot(t["policies"][next(iter(t["policies"]))]["static"], "k--", lw=0.8, label="static")
        axes[0, j].set_title(f"{name} (seed {t['seed']})", fontsize=9)
        main = np.array(t["policies"][ADAPTIVE]["main_weights"]) if ADAPTIVE in t["policies"] else None
        oracle = np.array(t["oracle_weights"])
        for i, task in enumerate(t["tasks"]):
            (line,) = axes[1, j].plot(main[:, i], lw=0.9, label=task) if main is not None else (None,)
            axes[1, j].plot(oracle[:, i], "--", lw=0.8, color=line.get_color() if line else None)
        axes[1, j].legend(fontsize=7)
        axes[1, j].set_xlabel("window")
    axes[0, 0].set_ylabel("value / oracle")
    axes[1, 0].set_ylabel(f"{ADAPTIVE} main weights\n(oracle dashed)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "_runs.png"), dpi=100)
    plt.close(fig)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=_ints, default=SEEDS, help="comma-separated, e.g. 1,2,3")
    parser.add_argument("--worlds", default=",".join(WORLDS), help=f"comma-separated of {', '.join(WORLDS)}")
    parser.add_argument("--traffic", type=_ints, default=TRAFFIC, help="impressions per window, comma-separated")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policy names")
    parser.add_argument("--windows", type=int, default=WINDOWS)
    parser.add_argument("--workers", type=int, default=2, help="(world, seed) jobs run in parallel processes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    worlds, policies = args.worlds.split(","), tuple(args.policies.split(","))
    start = time.time()
    jobs = [(w, s, args.traffic, policies, args.windows) for w in worlds for s in args.seeds]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            runs = list(pool.map(run_world, *zip(*jobs)))
    else:
        runs = [run_world(*job) for job in jobs]
    table = aggregate(runs, args.traffic, policies)
    summary = summarise(table, ADAPTIVE) if ADAPTIVE in policies else {}
    report(table, summary)
    traces = {}
    for r in runs:
        if r["seed"] == args.seeds[0]:
            static = r["traces"].pop("static")["value"]
            oracle_weights = r["traces"].pop("oracle_weights")
            pol = {p: t | {"static": static} for p, t in r["traces"].items()}
            traces[r["world"]] = {
                "seed": r["seed"],
                "tasks": r["tasks"],
                "policies": pol,
                "oracle_weights": oracle_weights,
            }
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(table, traces, runs[0]["tasks"], RESULTS / "control.png")
    doc = {
        "summary": summary,
        "table": table,
        "seeds": list(args.seeds),
        "setting": {
            "worlds": worlds,
            "traffic": list(args.traffic),
            "policies": list(policies),
            "windows": args.windows,
            "shift_at": SHIFT_AT,
            "limits": asdict(Limits()),
            "log_stats": asdict(MOVIELENS_100K),
            "target_quota": QUOTA,
        },
        "seconds": round(time.time() - start, 1),
        "job_seconds": {f"{r['world']}/{r['seed']}": r["seconds"] for r in runs},
    }
    path = save_results("control", doc)
    if args.json:
        atomic_write_text(args.json, path.read_text())
    return doc


def report(table: dict[str, Any], summary: dict[str, Any]) -> None:
    print(
        f"{'world':9s} {'traffic':>9s} {'policy':13s} {'G median [95%]':>24s} {'loss':>8s} {'promo':>6s} "
        f"{'false':>6s} {'rollb':>6s} {'viol':>5s} {'l1':>7s}"
    )
    for world, by_n in table.items():
        for n, by_p in by_n.items():
            for p, c in by_p.items():
                g = c["gap_closed"]
                print(
                    f"{world:9s} {int(n):9,d} {p:13s} {g['median']:8.3f} [{g['low']:6.2f}, {g['high']:6.2f}] "
                    f"{c['loss_vs_static_worst']:8.4f} {c['promotions']:6d} {c['false_promotions']:6d} "
                    f"{c['rollbacks']:6d} {c['guardrail_violations']:5d} {c['steady_l1_median']:7.4f}"
                )
    if summary:
        print(f"summary ({summary['policy']}):")
        for key in TARGETS:
            print(
                f"  {key:24s} {summary[key]!s:>24s}  target {TARGETS[key][1]} {TARGETS[key][0]}: {summary['met'][key]}"
            )


if __name__ == "__main__":
    main()
