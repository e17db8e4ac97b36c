"""Fusion-weight policies against the oracle in the feedback simulator (``python -m bench.policy_bench``).

The setting (see :mod:`mtrec.fusion.simulator` for the simulator):

- world: the ``ecommerce`` scenario, 2000 users, 1000 items, 300k impressions per seed; the funnel
  click -> add_to_cart -> purchase. Requests of 50 candidates; the top 5 are shown. The simulated
  model errs with std 0.5 on each conditional logit.
- north star: purchases per impression. Guardrail (bandit): the click rate of an arm that is promoted
  stays at least 95% of the control arm's.
- traffic: 200k requests (1M impressions) per round, 200 rounds; at round 100 the users' behaviour
  shifts (the model does not see it; the oracle weights move). Two shifts, each its own run
  (:data:`SHIFTS`):

  - ``checkout`` (the headline): checkout friction disappears (one-click buying, free shipping):
    the conditional logits of add_to_cart and purchase rise by 3, so almost whoever clicks buys.
    Conversion saturates, clicks decide purchases, and the oracle weights move from purchase-heavy
    (about 0.3 / 0.0 / 0.7) to click-heavy (about 0.8 / 0.05 / 0.15): the prior loses about 5%.
  - ``sale`` (session 1's shift, kept for comparison): shoppers who click add to cart and buy more
    often (conditional logits +0.5 and +1.0) and click a little less (-0.3). The oracle weights move
    (purchase 0.7 -> 0.45) but the value is flat around them: the prior loses about 1%, so this
    shift barely separates the policies.

- policies, all starting from the scenario's prior fusion weights (click 1, add_to_cart 3, purchase 8):
  ``static`` (the prior, fixed), ``proportional`` (weights proportional to the live rates, the naive
  baseline), ``target`` (click rate held at the prior's, purchase rate pushed 5% above the prior's),
  ``bandit`` (Thompson sampling over local weight arms), and the ``oracle`` (the best fixed weights of
  each phase, computed from the true probabilities; it knows when the shift happens).

The bandit's settings (``BANDIT``: max_step 0.15, smoothing 0.9, confidence 0.9) were chosen on
worlds 100-103 under the ``sale`` shift, before the ``checkout`` shift existed, and are evaluated
here on worlds 0-4 under both. The ``checkout`` shift was chosen for the size of the prior's loss
after it (the gap between static and the oracle), not for any policy's result.

Reported: each policy's expected purchases per impression over the phase as a fraction of the
oracle's, before and after the shift (the whole phase, adaptation included), median over seeds,
and the bandit's margin over static and proportional (median over seeds of the per-seed difference).
The values are exact expectations under the true probabilities (no sampling noise). In this world
the tasks of the funnel are strongly correlated, so the value is flat near its best weights: sensible
weights are within a few percent of the oracle, and the policies differ by tenths of a percent to a
few percent.
Saves ``bench/results/policies.json`` (top level: the headline shift; ``other_shifts``: the rest)
and ``bench/results/policy_weights[_SHIFT].png`` (main-arm weights per round of the first seed,
oracle dashed).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, save_results
from mtrec.data.synthetic import load_spec
from mtrec.fusion import Limits, build_policy
from mtrec.fusion.simulator import Shift, SimResult, Simulator, synthetic_pool

SCENARIO = "ecommerce"
TASKS = ["click", "add_to_cart", "purchase"]
NORTH_STAR = {"purchase": 1.0}
GUARDRAILS = {"click": 0.95}
SHIFTS = {
    "checkout": Shift(logit_shift={"add_to_cart": 3.0, "purchase": 3.0}),
    "sale": Shift(logit_shift={"click": -0.3, "add_to_cart": 0.5, "purchase": 1.0}),
}
HEADLINE = "checkout"
NUM_INTERACTIONS = 300_000
CANDIDATES, SHOWN, MODEL_NOISE = 50, 5, 0.5
ROUNDS, REQUESTS_PER_ROUND = 200, 200_000
POLICY_NAMES = ("static", "proportional", "target", "bandit")
BANDIT = {
    "limits": Limits(max_step=0.15, smoothing=0.9, min_events=200),
    "params": {"values": NORTH_STAR, "guardrails": GUARDRAILS, "explore_share": 0.2, "arms": 4, "confidence": 0.9},
}
SERIES = ("value", "main_weights", "oracle_weights")  # per-round lists in a run's summary


def prior_weights() -> dict[str, float]:
    """The scenario's prior fusion weights (``fusion_weight`` in its task list)."""
    spec = {t["name"]: t for t in load_spec(SCENARIO)["tasks"]}
    return {t: float(spec[t].get("fusion_weight", 1.0)) for t in TASKS}


def run_seed(
    seed: int, shift: str = HEADLINE, policies: tuple[str, ...] = POLICY_NAMES, rounds: int = ROUNDS
) -> dict[str, Any]:
    """Every policy on the world of ``seed`` under ``shift``: fractions of the oracle and the main weights per round."""
    start = time.time()
    pool = synthetic_pool(
        SCENARIO, TASKS, num_interactions=NUM_INTERACTIONS, candidates=CANDIDATES, model_noise=MODEL_NOISE, seed=seed
    )
    sim = Simulator(pool, NORTH_STAR, k=SHOWN, requests_per_round=REQUESTS_PER_ROUND, shift=SHIFTS[shift], seed=seed)
    prior = prior_weights()
    prior_w = np.array([prior[t] for t in TASKS]) / sum(prior.values())
    prior_rates = dict(zip(TASKS, sim.rates(prior_w, 0)))
    out: dict[str, Any] = {"seed": seed, "shift": shift, "oracle": {}, "policies": {}}
    for phase in range(sim.phases):
        w, v = sim.oracle(phase)
        out["oracle"][f"phase{phase}"] = {"weights": dict(zip(TASKS, w.round(4).tolist())), "value": v}
    for name in policies:
        policy = build_policy(name, prior, seed=seed, **_config(name, prior_rates))
        result = sim.run(policy, rounds)
        out["policies"][name] = _summary(result)
    out["seconds"] = round(time.time() - start, 1)
    return out


def _config(name: str, prior_rates: dict[str, float]) -> dict[str, Any]:
    if name == "bandit":
        return {"limits": BANDIT["limits"], **BANDIT["params"]}
    if name == "target":
        return {"targets": {"click": prior_rates["click"], "purchase": 1.05 * prior_rates["purchase"]}}
    return {}


def _summary(result: SimResult) -> dict[str, Any]:
    return {
        "before": result.fraction(0),
        "after": result.fraction(1),
        "after_second_half": result.fraction(1, skip=0.5),
        "value": result.value.round(6).tolist(),
        "main_weights": result.main_weights.round(4).tolist(),
        "oracle_weights": result.oracle_weights.round(4).tolist(),
        "shift_round": result.shift_round,
        "actions": {a: result.actions.count(a) for a in sorted(set(result.actions))},
    }


def report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over seeds of each policy's fractions of the oracle, and whether the bandit meets the bar."""
    names = list(runs[0]["policies"])
    table = {}
    for name in names:
        per_seed = {k: [r["policies"][name][k] for r in runs] for k in ("before", "after", "after_second_half")}
        table[name] = {f"{k}_median": float(np.median(v)) for k, v in per_seed.items()} | {"per_seed": per_seed}
    table["oracle"] = {"before_median": 1.0, "after_median": 1.0, "after_second_half_median": 1.0}
    bar = {}
    if {"bandit", "static", "proportional"} <= set(names):
        after = {n: table[n]["after_median"] for n in ("bandit", "static", "proportional")}
        bar = {
            "bandit_after_at_least_0.9": after["bandit"] >= 0.9,
            "bandit_beats_static_after": after["bandit"] > after["static"],
            "bandit_beats_proportional_after": after["bandit"] > after["proportional"],
        }
        for other in ("static", "proportional"):
            pairs = list(zip(table["bandit"]["per_seed"]["after"], table[other]["per_seed"]["after"]))
            bar[f"seeds_where_bandit_beats_{other}_after"] = f"{sum(b > o for b, o in pairs)} of {len(runs)}"
            bar[f"bandit_minus_{other}_after_median"] = float(np.median([b - o for b, o in pairs]))
    return {"table": table, "bar": bar}


def plot(run: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(run["policies"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names):
        p = run["policies"][name]
        main, oracle = np.array(p["main_weights"]), np.array(p["oracle_weights"])
        for i, task in enumerate(TASKS):
            (line,) = ax.plot(main[:, i], label=task)
            ax.plot(oracle[:, i], "--", color=line.get_color(), alpha=0.6)
        ax.axvline(p["shift_round"], color="grey", lw=0.8)
        ax.set_title(f"{name}: {p['before']:.3f} / {p['after']:.3f} of oracle", fontsize=9)
        ax.set_xlabel("round")
    np.atleast_1d(axes)[0].set_ylabel("main-arm weight (oracle dashed)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_shift(shift: str, seeds: list[int], policies: tuple[str, ...], rounds: int, workers: int) -> dict[str, Any]:
    """Every seed under ``shift``: the summary (table, bar), the setting and the runs; plots the first seed."""
    jobs = [(seed, shift, policies, rounds) for seed in seeds]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            runs = list(pool.map(run_seed, *zip(*jobs)))
    else:
        runs = [run_seed(*job) for job in jobs]
    summary = report(runs)
    print(f"shift {shift!r}")
    print(f"{'policy':14s} {'before':>8s} {'after':>8s} {'after, 2nd half':>16s}   (fraction of the oracle, median)")
    for name, row in summary["table"].items():
        print(
            f"{name:14s} {row['before_median']:8.4f} {row['after_median']:8.4f} {row['after_second_half_median']:16.4f}"
        )
    for key, ok in summary["bar"].items():
        print(f"  {key}: {ok}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(runs[0], RESULTS / ("policy_weights.png" if shift == HEADLINE else f"policy_weights_{shift}.png"))
    for run in runs[1:]:  # per-round series of the plotted seed only, to keep the file small
        for p in run["policies"].values():
            for key in SERIES:
                del p[key]
    s = SHIFTS[shift]
    setting = {"shift_name": shift, "shift": {"logit_shift": dict(s.logit_shift), "logit_drift": dict(s.logit_drift)}}
    return {"setting": setting, **summary, "runs": runs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--policies", nargs="+", default=list(POLICY_NAMES), choices=POLICY_NAMES)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--workers", type=int, default=1, help="seeds run in parallel processes")
    args = parser.parse_args(argv)
    results = {
        name: run_shift(name, args.seeds, tuple(args.policies), args.rounds, args.workers) for name in args.shifts
    }
    headline = HEADLINE if HEADLINE in results else args.shifts[0]
    setting = {
        "scenario": SCENARIO,
        "tasks": TASKS,
        "north_star": NORTH_STAR,
        "guardrails": GUARDRAILS,
        "num_interactions": NUM_INTERACTIONS,
        "candidates": CANDIDATES,
        "shown": SHOWN,
        "model_noise": MODEL_NOISE,
        "rounds": args.rounds,
        "requests_per_round": REQUESTS_PER_ROUND,
        "prior_weights": prior_weights(),
        "bandit": {"limits": asdict(BANDIT["limits"]), "params": BANDIT["params"]},
    }
    main_result = results.pop(headline)
    setting |= main_result.pop("setting")
    doc = {"setting": setting, "seeds": args.seeds, **main_result, "other_shifts": results}
    save_results("policies", doc)
    return doc


if __name__ == "__main__":
    main()
