"""``mtrec demo``: the whole system on one machine, end to end, in a few minutes.

1. data     the synthetic ``ecommerce`` scenario (click -> add_to_cart -> purchase, ad_click), whose true
            probabilities are known;
2. train    the ``synthetic-ecommerce`` preset (frozen MiniLM item vectors, MMoE) with 2 Ray Train workers;
3. tune     a short Ray Tune search over the loss weighting and learning rate (at most 4 trials);
4. serve    the better of the two bundles on Ray Serve at http://127.0.0.1:PORT, the controller reading
            a real Prometheus when the binary is installed (else Ray's metrics endpoint directly);
5. traffic  simulated users send requests and feedback drawn from the true probabilities; the
            controller runs the adaptive policy ``mtrec serve`` runs (``calibrated``, with the RayService's
            5 % holdout and click guardrail): it may try candidate weights on a ramp of the traffic and
            promotes one only on always-valid evidence against the holdout;
6. summary  the served model's test AUC per task beside the oracle's (the true probabilities), every
            setting the best trial changed, serving latency, the fusion weights before and after, the
            adaptive traffic against the holdout (north star and guardrail rates with 95 % intervals,
            the controller's lift and verdict, the impressions a 1 % lift takes to show), the exact
            expected north star of the weights before and after on the same requests, and the plots
            (training curves, AUC against the oracle, Pareto front, weights and outcome per round).

The terminal shows stage lines, a progress bar per long stage, a line per epoch, trial and round, and
the summary last, once everything has stopped; Ray's, Tune's and Serve's own output goes to
``OUT/logs/demo.log``. ``OUT`` must be absent, empty or an earlier demo's (``--force`` writes into
another folder, leaving its other files alone). Everything it starts (Ray, Serve, Prometheus) is
stopped at the end or on Ctrl-C; ``--keep-serving`` leaves the service up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mtrec.cli_help import HelpFormatter
from mtrec.config import Config
from mtrec.fusion import ADAPTIVE, HOLDOUT
from mtrec.io import atomic_write_text, claim_output
from mtrec.weighted import weighted_sum
from mtrec_app.console import Console, quiet_terminal
from mtrec_app.summary import ADAPTIVE_TRAFFIC, against_holdout, group_outcome, summarize, summary_lines

FULL = {"users": 2000, "items": 1000, "interactions": 100_000, "epochs": 4, "trials": 4, "requests": 1500}
MAX_TRIALS = 4  # the demo's search stays short; `mtrec tune` runs longer ones
QUICK = {"users": 300, "items": 200, "interactions": 12_000, "epochs": 2, "trials": 2, "requests": 300}
STRATEGIES = ["static", "uncertainty", "dwa"]  # the demo's search space of loss weightings
ROUNDS = 6  # of traffic, a line each
OUTPUTS = ("data", "train", "tune", "controller", "prometheus", "logs", "weights.png", "summary.json")
LOG = Path("logs") / "demo.log"  # under OUT: everything Ray, Tune, Serve and the libraries print
QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}  # read by every Ray process, Tune trials' included
SERVE_LOGGING = {"enable_access_log": False, "log_level": "WARNING"}  # no line per request or handle call
# the adaptive policy's parameters: the RayService's (k8s/base/rayservice.serve.yaml); its values of an
# event are the default (the initial weights rank by value)
POLICY_PARAMS = {"holdout": 0.05, "guardrails": {"click": 0.98}}
LIMITS = {"min_events": 10, "max_step": 0.1, "smoothing": 0.9}  # the demo's traffic is small: act on fewer events


@contextmanager
def keeps_ctrl_c() -> Iterator[None]:
    """Ray Train's and Tune's ``fit()`` install SIGINT handlers of their own and leave them behind; put
    back the one before, so that Ctrl-C in a later stage still stops the demo."""
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def get(url: str, timeout: float = 10.0) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_healthy(url: str, timeout_s: float = 180.0) -> None:
    """Until ``GET /healthz`` answers 200 (replicas load the model first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            get(url + "/healthz", timeout=5)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}/healthz did not answer within {timeout_s:.0f} s") from None
            time.sleep(1)


def main_weights(decision: dict[str, Any]) -> dict[str, float]:
    return decision["weights"][decision.get("main", "main")]


def plot_weights(trajectory: list[dict[str, Any]], values: dict[str, float], guarded: list[str], path: Path) -> None:
    """The main arm's weights after each round (0: before traffic), and each round's north star per
    impression and guarded rates of the adaptive traffic and of the holdout, with 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1 + 1 + len(guarded), 1, figsize=(6, 2.4 * (2 + len(guarded))), sharex=True)
    rounds = range(len(trajectory))
    for task in trajectory[0]["weights"]:
        axes[0].plot(rounds, [p["weights"][task] for p in trajectory], marker=".", label=task)
    axes[0].set(ylabel="fusion weight\n(main arm)", title="controller weights and outcome per round", ylim=(0, 1))
    axes[0].legend(fontsize="small", ncol=2)
    for ax, what in zip(axes[1:], ["value", *guarded]):
        for offset, group in ((-0.08, ADAPTIVE_TRAFFIC), (0.08, HOLDOUT)):
            points = [(r, _outcome(p["groups"].get(group), values, guarded, what)) for r, p in enumerate(trajectory)]
            points = [(r + offset, x) for r, x in points if x is not None]
            if points:
                xs, ys = [r for r, _ in points], [x for _, x in points]
                err = [[y[0] - y[1] for y in ys], [y[2] - y[0] for y in ys]]
                ax.errorbar(xs, [y[0] for y in ys], yerr=err, fmt="o", capsize=3, label=group)
        ax.set(ylabel="north star per\nimpression" if what == "value" else f"{what} rate")
        ax.legend(fontsize="small")
    axes[-1].set(xlabel="round of traffic (0: before)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _outcome(counts: dict[str, Any] | None, values: dict[str, float], guarded: list[str], what: str) -> Any:
    """``[estimate, low, high]`` of the north star (``what`` "value") or a guarded rate of one round's group."""
    outcome = group_outcome(counts, values, guarded)
    return outcome["value"] if what == "value" else outcome["rates"][what]


def claim(out: str | Path, force: bool) -> Path:
    """The demo's output folder (:func:`mtrec.io.claim_output`: refused when it holds files the tool did
    not write, unless ``force``), with what an earlier demo left there removed: a demo starts afresh
    (Tune would resume an earlier search). Only the demo's own :data:`OUTPUTS` are removed."""
    out = claim_output(Path(out).resolve(), force)
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return out


def demo_config(size: dict[str, int], *overrides: str) -> Config:
    from mtrec.config import load_preset

    return load_preset("synthetic-ecommerce").override([f"train.epochs={size['epochs']}", *overrides])


def stage_data(out: Path, size: dict[str, int], seed: int, console: Console) -> Path:
    from mtrec.data.synthetic import generate

    console.say(f"1/6 data: synthetic ecommerce, {size['interactions']:,} interactions -> {out / 'data'}")
    return generate("ecommerce", out / "data", size["users"], size["items"], size["interactions"], seed)


def encode_texts(cfg: Config, data: Path, console: Console, chunks: int = 10) -> None:
    """The item texts (and contexts) through the frozen language model, in chunks so that a bar moves,
    into the vector cache (:func:`mtrec.encoders.encode_cached`) where training then finds them."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mtrec.data.contract import INTERACTIONS, ITEMS
    from mtrec.encoders import TextEncoder, encode_cached

    texts = pq.read_table(data / ITEMS, columns=["text"]).column("text").to_pylist()
    if "context" in pq.read_schema(data / INTERACTIONS).names:
        contexts = pc.unique(pq.read_table(data / INTERACTIONS, columns=["context"]).column("context"))
        texts += sorted(set(contexts.drop_null().to_pylist()) - {""})
    start, step = time.perf_counter(), -(-len(texts) // chunks)
    with console.bar("encoding", len(texts), "texts") as bar:
        encoder = TextEncoder.from_config(cfg.encoder)
        for i in range(0, len(texts), step):
            encode_cached(encoder, texts[i : i + step], cfg.encoder.cache_dir or None, cfg.encoder.batch_size)
            bar.set(i + step)
    console.line(f"   {len(texts):,} texts encoded or found in the vector cache in {time.perf_counter() - start:.1f} s")


def stage_train(data: Path, out: Path, size: dict[str, int], console: Console) -> dict[str, Any]:
    from mtrec_app.progress import EpochFeed, EpochLines, feed
    from mtrec_train.trainer import run_training

    cfg = demo_config(size)
    console.say(
        f"2/6 train: {cfg.model.arch} on {cfg.encoder.mode} {cfg.encoder.name} vectors, "
        f"{cfg.train.num_workers} Ray Train workers, {size['epochs']} epochs"
    )
    if cfg.encoder.mode == "frozen":
        encode_texts(cfg, data, console)
    with console.bar("training", size["epochs"], "epochs") as bar, keeps_ctrl_c():
        with feed(EpochLines(console, bar, size["epochs"])) as q:
            return run_training(cfg, data, out / "train", callbacks=[EpochFeed(q)])


def stage_tune(data: Path, out: Path, size: dict[str, int], console: Console) -> tuple[dict[str, Any], Config]:
    """The search's summary (``OUT/tune/result/summary.json``) and the config every trial started from."""
    from mtrec_app.progress import TrialFeed, TrialLines, feed
    from mtrec_tune.search import SearchInterrupted, run_search

    cfg = demo_config(size, "train.num_workers=1")
    trials, epochs = size["trials"], size["epochs"]
    console.say(f"3/6 tune: {trials} trials over the loss weighting and learning rate (equal weights first)")
    try:
        with console.bar("trials", trials * epochs, "epochs of all trials") as bar, keeps_ctrl_c():
            with feed(TrialLines(console, bar, epochs, "mean valid AUC")) as q:
                summary = run_search(cfg, data, out / "tune", trials, "mean_auc", STRATEGIES, callbacks=[TrialFeed(q)])
    except SearchInterrupted as e:
        # Ctrl-C reaches Tune's own handler, which ends the search early; the demo stops as a whole
        # (its next run starts afresh, so there is nothing to resume)
        raise KeyboardInterrupt("tuning interrupted") from e
    return summary, cfg


def controller_params(bundle: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """The adaptive policy's parameters as the weight controller resolves them for ``bundle`` (its value
    of an event of each task, holdout share, guardrails, ...: the policy built here as the controller
    builds it, from the bundle's fusion weights and scales), and those fusion scales."""
    from mtrec.bundle import read_description
    from mtrec.fusion import Limits, build_policy

    _, meta, scales = read_description(bundle)
    weights = {t.name: t.fusion_weight for t in meta.tasks}
    policy = build_policy(ADAPTIVE, weights, Limits(**LIMITS), 0, scales=scales, **POLICY_PARAMS)
    return policy.to_state()["params"], scales


def stage_serve(bundle: Path, out: Path, port: int, prometheus_url: str | None, console: Console) -> str:
    import ray
    import ray.serve

    from mtrec_serve.app import build_app

    free = ray.available_resources().get("CPU", 0.0)
    console.say(f"4/6 serve: {bundle} on http://127.0.0.1:{port} ({free:g} logical CPUs free)")
    ray.serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=SERVE_LOGGING)
    args = {
        "bundle": str(bundle),
        "prometheus_url": prometheus_url,
        "policy": ADAPTIVE,
        "policy_params": POLICY_PARAMS,
        "limits": LIMITS,
        "state_path": str(out / "controller" / "state.json"),
        "period_s": 4.0,
        "window_s": 30.0,
    }
    ray.serve.run(build_app(args), name="mtrec", route_prefix="/", logging_config=SERVE_LOGGING)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return url


def stage_traffic(
    data: Path, url: str, requests: int, values: dict[str, float], scales: dict[str, float], console: Console
) -> tuple[dict[str, Any], list[dict], dict[str, Any]]:
    """Rounds of simulated traffic; returns the traffic's totals (with each group's counts: the holdout's
    users and the adaptive traffic's), the controller's decision after each round (the first: before
    traffic) with the round's group counts, and the exact expected north star of the main arm's weights
    before and after traffic on the requests sent (:meth:`~mtrec_app.traffic.SimulatedUsers.expected_rates`)."""
    from mtrec.arms import choose_arm
    from mtrec_app.traffic import SimulatedUsers, TrafficReport

    trajectory = [{"t": time.time(), **_weights(url), "groups": {}}]
    # the holdout's users: a sticky hash into the traffic shares, the holdout first and its share fixed,
    # so whatever the other arms do (the simulated users can tell; real clients never learn their arm)
    shares = trajectory[0]["traffic"]
    users = SimulatedUsers(
        data,
        url,
        candidates=20,
        k=5,
        group=lambda user: HOLDOUT if choose_arm(str(user), shares) == HOLDOUT else ADAPTIVE_TRAFFIC,
    )
    console.say(f"5/6 traffic: {requests} requests from simulated users ({', '.join(users.tasks)} feedback)")
    per_round = max(1, requests // ROUNDS)
    reports = []
    with console.bar("traffic", ROUNDS, "rounds") as bar:
        for r in range(ROUNDS):
            reports.append(users.run(per_round, concurrency=4, start=r * per_round))
            time.sleep(5)  # a controller period or so: metrics reach it
            trajectory.append({"t": time.time(), **_weights(url), "groups": reports[-1].groups})
            bar.advance()
            console.line(f"   round {r + 1}/{ROUNDS}: {_round_text(reports[-1].summary(), trajectory[-1])}")
    s = TrafficReport.merge(reports).summary()
    total = {k: s[k] for k in ("requests", "failed", "errors", "p50_ms", "p99_ms", "impressions", "groups")}
    total["events"] = {t: s["events"].get(t, 0) for t in users.tasks}
    sent = range(per_round * ROUNDS)
    scored = users.score(sent)
    rates = {
        when: users.expected_rates(scored, trajectory[i]["weights"], scales)
        for when, i in (("before", 0), ("after", -1))
    }
    v = np.array(list(values.values()))
    expected = {when: float(weighted_sum(np.array([r[t] for t in values]), v)) for when, r in rates.items()}
    expected |= {"requests": len(scored), "rates": rates}
    return total, trajectory, expected


def _round_text(s: dict[str, Any], decision: dict[str, Any]) -> str:
    """``p50 41 ms, failed 0; main a0 click 0.07, ...; candidate a1 at 1 %``"""
    w = ", ".join(f"{k} {v:.2f}" for k, v in decision["weights"].items())
    candidate = next((a for a in decision["traffic"] if a not in (HOLDOUT, decision["main"])), None)
    share = f"; candidate {candidate} at {decision['traffic'][candidate]:.0%}" if candidate else ""
    return f"p50 {s['p50_ms']:.0f} ms, failed {s['failed']}; main {decision['main']} {w}{share}"


def _weights(url: str) -> dict[str, Any]:
    d = get(url + "/v1/weights")
    keys = ("main", "traffic", "version", "action", "reason", "report")
    return {"weights": main_weights(d), **{k: d.get(k) for k in keys}}


def run_demo(args: argparse.Namespace, out: Path, console: Console) -> dict[str, Any]:
    """Every stage; returns the summary (also ``OUT/summary.json``), printed once everything has stopped."""
    from mtrec_cluster.prometheus import ray_metrics_targets, start_prometheus, write_prometheus_config
    from mtrec_cluster.ray_env import local_ray

    size = dict(QUICK if args.quick else FULL)
    size.update({k: v for k, v in (("trials", args.trials), ("requests", args.requests)) if v is not None})
    t0 = time.perf_counter()
    with ExitStack() as stack:
        stack.enter_context(local_ray(args.address, num_cpus=args.num_cpus, export_metrics=True))
        prom_url = None
        if shutil.which(os.environ.get("MTREC_PROMETHEUS", "prometheus")) and not args.no_prometheus:
            config = write_prometheus_config(
                out / "prometheus" / "prometheus.yml", targets=ray_metrics_targets(), scrape_interval_s=2
            )
            server = start_prometheus(config, data_dir=out / "prometheus" / "data")
            stack.callback(server.stop)
            prom_url = server.url
            console.say(f"0/6 prometheus: {prom_url} scraping Ray's metrics every 2 s")
        else:
            console.say("0/6 prometheus: not installed; the controller scrapes Ray's metrics endpoint directly")
        stack.callback(_shutdown_serve)  # first of all (the stack unwinds in reverse): its controller reads the rest

        data = stage_data(out, size, args.seed, console)
        trained = stage_train(data, out, size, console)
        tuned, tune_base = stage_tune(data, out, size, console)
        # the better of the two on validation (a search without a best trial raised)
        served_run = out / "tune" / "result" / "best" if tuned["best"]["score"] > _objective(trained) else out / "train"
        params, scales = controller_params(served_run / "bundle")
        url = stage_serve(served_run / "bundle", out, args.port, prom_url, console)
        traffic, trajectory, expected = stage_traffic(data, url, size["requests"], params["values"], scales, console)
        plot_weights(trajectory, params["values"], list(params["guardrails"]), out / "weights.png")
        summary = {
            "seconds": time.perf_counter() - t0,
            **summarize(data, served_run, trained, tuned, tune_base, out),
            "url": url,
            "prometheus": prom_url,
            "serving": traffic,
            "policy": {"name": ADAPTIVE, "params": params, "limits": LIMITS},
            "main_arm": trajectory[-1]["main"],
            "weights_before": trajectory[0]["weights"],
            "weights_after": trajectory[-1]["weights"],
            "controller_reason": f"{trajectory[-1]['action']}: {trajectory[-1]['reason']}",
            "controller_report": trajectory[-1]["report"],
            "holdout": against_holdout(traffic["groups"], params["values"], trajectory[-1]["report"] or {}, params),
            "expected": expected,
            "plots": [
                str(p)
                for p in (
                    served_run / "curves.png",
                    served_run / "oracle.png",
                    out / "tune" / "result" / "pareto.png",
                    out / "weights.png",
                )
            ],
            "log": str(out / LOG),
        }
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=float))
        if args.keep_serving:
            console.say(f"serving on {url} (docs: {url}/docs); Ctrl-C stops it and prints the summary")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
    for line in summary_lines(summary, out):
        console.line(line)
    return summary


def _objective(trained: dict[str, Any]) -> float:
    aucs = [m["auc"] for m in trained["valid"].values() if "auc" in m]
    return sum(aucs) / len(aucs) if aucs else float("-inf")


def _shutdown_serve() -> None:
    import ray
    import ray.serve

    if ray.is_initialized():
        ray.serve.shutdown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mtrec demo",
        description="The whole system on one machine, end to end, in a few minutes.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="out/demo", help="output folder: absent, empty or an earlier demo's")
    p.add_argument("--force", action="store_true", help="write into an --out holding other files (they are kept)")
    p.add_argument("--port", type=int, default=8000, help="Serve HTTP port on 127.0.0.1")
    p.add_argument("--quick", action="store_true", help="a small, fast run (the integration test's mode)")
    p.add_argument(
        "--trials", type=_trials, default=None, help=f"tuning trials, 1 to {MAX_TRIALS} (default 4; 2 with --quick)"
    )
    p.add_argument("--requests", type=int, default=None, help="simulated requests")
    p.add_argument("--keep-serving", action="store_true", help="leave the service up at the end until Ctrl-C")
    p.add_argument("--no-prometheus", action="store_true", help="scrape Ray's metrics directly, even if installed")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--address", default=None, help="Ray address to join (default: an embedded local Ray)")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the embedded local Ray")
    return p.parse_args(argv)


def _trials(value: str) -> int:
    n = int(value)
    if not 1 <= n <= MAX_TRIALS:
        raise argparse.ArgumentTypeError(
            f"{n}: the demo's search runs 1 to {MAX_TRIALS} trials (use `mtrec tune` for a longer search)"
        )
    return n


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = claim(args.out, args.force)  # before anything starts: OutputError (exit 2) on someone else's folder
    signal.signal(signal.SIGTERM, _interrupt)  # stop the same clean way as Ctrl-C
    for k, v in {**QUIET_ENV, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)
    with quiet_terminal(out / LOG, "demo") as console:
        console.say(f"output in {out}; Ray's, Tune's and Serve's own output in {out / LOG}")
        try:
            run_demo(args, out, console)
        except KeyboardInterrupt:
            console.say("interrupted: everything the demo started has been stopped")
            return 130
        except Exception:
            console.say(f"failed (the error follows); Ray's, Tune's and Serve's output is in {out / LOG}")
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
