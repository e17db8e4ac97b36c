"""app/demo.py and its console, progress and summary: the pieces of `mtrec demo` that need no Ray cluster."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from mtrec.config import load_preset
from mtrec.fusion import HOLDOUT
from mtrec.fusion.stats import Evidence, value_variance
from mtrec.io import OUTPUT_MARKER
from mtrec_app import demo
from mtrec_app.console import Console
from mtrec_app.summary import (
    ADAPTIVE_TRAFFIC,
    RULE,
    VERDICTS,
    against_holdout,
    changed_settings,
    group_outcome,
    impressions_to_detect,
    summary_lines,
)

VALUES = {"click": 1.0, "add_to_cart": 4.0, "purchase": 40.0}
PARAMS = {"holdout": 0.05, "guardrails": {"click": 0.98}, "effect": 0.02}
GROUPS = {  # a quick demo's counts: the holdout's users few
    ADAPTIVE_TRAFFIC: {"impressions": 1420, "events": {"click": 300, "add_to_cart": 40, "purchase": 6}},
    HOLDOUT: {"impressions": 80, "events": {"click": 15, "add_to_cart": 2, "purchase": 0}},
}


def controller_report(low: float | None, high: float | None) -> dict:
    """A calibrated policy's report with the main arm's lift interval ``[low, high]``."""
    estimate = None if low is None else (low + high) / 2
    return {
        "lift_vs_holdout": {"arm": "a0", "estimate": estimate, "low": low, "high": high, "windows": 9},
        "guardrails": {"click": {"least": 0.98, "ratio": 1.01, "low": 0.7, "state": "uncertain"}},
    }


def serving_outcome(tmp_path) -> dict:
    """The serving part of a summary, measured against the holdout as the demo does."""
    return {
        "serving": {"requests": 300, "failed": 0, "p50_ms": 40.0, "p99_ms": 120.0},
        "main_arm": "a0",
        "weights_before": {"click": 0.5, "purchase": 0.5},
        "weights_after": {"click": 0.4, "purchase": 0.6},
        "controller_reason": "keep: nothing to change",
        "holdout": against_holdout(GROUPS, VALUES, controller_report(-0.35, 0.41), PARAMS),
        "expected": {"requests": 300, "before": 0.5012, "after": 0.5034},
        "plots": [str(tmp_path / "weights.png")],
        "log": str(tmp_path / "logs" / "demo.log"),
    }


def terminal_view(raw: str) -> list[str]:
    """What a terminal shows of ``raw``: each line as its last ``\\r`` redraw left it (erased lines gone)."""
    shown = [line.split("\r")[-1].replace("\033[K", "") for line in raw.split("\n")]
    return [line for line in shown if line]


@pytest.mark.parametrize("trials", ["0", "5"])
def test_the_demo_search_stays_short(trials, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--trials", trials])
    assert f"--trials: {trials}: the demo's search runs 1 to {demo.MAX_TRIALS} trials" in capsys.readouterr().err


def test_the_demo_refuses_a_folder_it_did_not_write(tmp_path):
    """`mtrec demo --out DIR` on the user's own folder: exit 2, one line naming it, before Ray starts
    (well within 5 s), and every file left as it was."""
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "plan.txt").write_text("keep me")
    (mine / "train").mkdir()  # a name the demo writes, still the user's here
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "mtrec_app.cli", "demo", "--quick", "--out", str(mine)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - start < 5
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert str(mine) in done.stderr and "--force" in done.stderr
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["notes", "notes/plan.txt", "train"]
    assert (mine / "notes" / "plan.txt").read_text() == "keep me"


def test_an_earlier_demo_is_replaced_and_forced_writes_keep_other_files(tmp_path):
    earlier = tmp_path / "earlier"
    (earlier / "tune" / "ray").mkdir(parents=True)
    (earlier / OUTPUT_MARKER).touch()
    (earlier / "summary.json").write_text("{}")
    assert demo.claim(earlier, force=False) == earlier.resolve()
    assert sorted(p.name for p in earlier.iterdir()) == [OUTPUT_MARKER]  # a fresh start: no search to resume

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "plan.txt").write_text("keep me")
    demo.claim(theirs, force=True)
    assert (theirs / "plan.txt").read_text() == "keep me" and (theirs / OUTPUT_MARKER).exists()


def test_a_bar_on_a_terminal_redraws_in_place_and_leaves_only_the_lines():
    out = io.StringIO()
    console = Console(out, tty=True, name="demo")
    with console.bar("training", 2, "epochs") as bar:
        bar.set(1)
        console.line("   epoch 1/2")
        bar.set(2)
        console.line("   epoch 2/2")
    console.line("after")
    assert "\r" in out.getvalue() and "[############............] 1/2 epochs" in out.getvalue()
    assert terminal_view(out.getvalue()) == ["   epoch 1/2", "   epoch 2/2", "after"]


def test_without_a_terminal_there_is_no_bar_only_lines():
    out = io.StringIO()
    console = Console(out, tty=False, name="demo")
    with console.bar("training", 2, "epochs") as bar:
        bar.set(1)
        console.line("   epoch 1/2")
    console.say("4/6 serve")
    assert "\r" not in out.getvalue() and "\033" not in out.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[0] == "   epoch 1/2" and re.fullmatch(r"\[demo \d\d:\d\d:\d\d\] 4/6 serve", lines[1])


def test_changed_settings_lists_every_setting_the_best_trial_changed():
    base = load_preset("synthetic-ecommerce")
    base.tasks = []
    best = load_preset("synthetic-ecommerce").override(["train.lr=0.004", "train.weighting=dwa"])
    best.train.weighting_params = {"temperature": 2.5}
    assert changed_settings(base, best) == {
        "train.lr": [base.train.lr, 0.004],
        "train.weighting": ["static", "dwa"],
        "train.weighting_params.temperature": [None, 2.5],
    }


def test_the_summary_block_puts_the_served_auc_beside_the_oracle(tmp_path):
    s = {
        "seconds": 200.0,
        "served_run": str(tmp_path / "tune" / "result" / "best"),
        "served_from": "tune",
        "test_auc": {"click": 0.712, "purchase": 0.731},
        "oracle_auc": {"click": 0.745, "purchase": 0.780},
        "tune": {
            "trials": 2,
            "best": "ab12c_00001",
            "best_score": 0.7213,
            "baseline": "ab12c_00000",
            "baseline_score": 0.719,
            "changed": {"train.lr": [0.002, 0.0043], "train.weighting": ["static", "dwa"]},
        },
        **serving_outcome(tmp_path),
    }
    lines = summary_lines(s, tmp_path)
    assert lines[0] == lines[-1] == RULE
    assert "served model: tune's best trial #2 (tune/result/best)" in lines
    assert "  test AUC, served (oracle): click 0.712 (0.745), purchase 0.731 (0.780)" in lines
    assert "tuning: 2 trials; best #2, mean valid AUC 0.7213; equal weights #1: 0.7190" in lines
    assert "  #2 changed: train.lr 0.002 -> 0.0043, train.weighting static -> dwa" in lines
    assert (
        "fusion weights of the main arm (a0), before -> after traffic: click 0.500 -> 0.400, purchase 0.500 -> 0.600"
        in lines
    )
    holdout = next(line for line in lines if line.startswith("north star per impression"))
    assert "adaptive 0.4930 [" in holdout and "on 1,420 impressions" in holdout and "5% holdout" in holdout
    assert any(
        line.startswith("guardrail click rate: adaptive 0.2113 [") and line.endswith(": uncertain") for line in lines
    )
    verdict = "verdict: no detectable difference (controller: lift of a0 over the holdout +3.0% [-35.0%, +41.0%]"
    assert f"{verdict}, always valid, 95 %, 9 windows)" in lines
    assert any(line.startswith("a 1% lift takes about ") and line.endswith("this run served 1,500") for line in lines)
    assert lines[-3].endswith("before 0.5012, after 0.5034 (+0.44%)"), lines[-3]


def test_the_full_demo_fits_in_40_terminal_lines(tmp_path):
    """The integration test counts the quick demo's lines; the full one adds epochs and trials. Its
    widest summary: a static best trial that changed every task's weight and the learning rate."""
    tasks = ["click", "add_to_cart", "purchase", "ad_click"]
    changed = {f"tasks.{t}.loss_weight": [1.0, 0.123456] for t in tasks} | {"train.lr": [0.002, 0.00431234]}
    s = {
        "seconds": 600.0,
        "served_run": str(tmp_path / "train"),
        "served_from": "train",
        "test_auc": dict.fromkeys(tasks, 0.7),
        "oracle_auc": dict.fromkeys(tasks, 0.8),
        "tune": {"trials": 4, "best": "ab12c_00003", "best_score": 0.7, "baseline": None, "changed": changed},
        **serving_outcome(tmp_path),
    }
    # the output-folder line, a line per stage (0-5), the encoding line, --keep-serving's line
    stages = 1 + 6 + 1 + demo.FULL["epochs"] + demo.FULL["trials"] + demo.ROUNDS + 1
    assert stages + len(summary_lines(s, tmp_path)) <= 40


@pytest.mark.parametrize(
    ("low", "high", "verdict"),
    [
        (0.01, 0.2, "helped"),
        (-0.3, 0.4, "no detectable difference"),
        (-0.2, -0.01, "hurt"),
        (None, None, "no detectable difference"),
    ],
)
def test_the_verdict_is_the_controllers_interval(low, high, verdict):
    h = against_holdout(GROUPS, VALUES, controller_report(low, high), PARAMS)
    assert h["verdict"] == verdict and verdict in VERDICTS
    assert h["lift"]["low"] == low and h["guardrails"]["click"]["state"] == "uncertain"
    assert h["impressions"] == 1500 and h[HOLDOUT]["impressions"] == 80


def test_each_side_has_its_value_and_guarded_rates_with_intervals():
    side = group_outcome(GROUPS[ADAPTIVE_TRAFFIC], VALUES, ["click"])
    value, low, high = side["value"]
    assert value == pytest.approx((300 * 1 + 40 * 4 + 6 * 40) / 1420) and low < value < high
    rates = np.array([300, 40, 6]) / 1420
    half = 1.959964 * (value_variance(np.array(list(VALUES.values())), rates) / 1420) ** 0.5
    assert (high - low) / 2 == pytest.approx(half, rel=1e-5)
    click, c_low, c_high = side["rates"]["click"]
    assert click == pytest.approx(300 / 1420) and c_low < click < c_high
    assert group_outcome(None, VALUES, ["click"]) == {"impressions": 0, "value": None, "rates": {"click": None}}


def test_impressions_to_detect_a_lift_follow_the_controllers_interval():
    value, variance, tau = 0.43, 3.5, 0.02 * 0.43
    n = impressions_to_detect(0.01, value, variance, 0.05, tau)
    per_impression = variance * (1 / 0.05 + 1 / 0.95)

    def radius(impressions):
        low, high = Evidence(tau, info=impressions / per_impression).interval(0.05)
        return (high - low) / 2

    assert radius(n) <= 0.01 * value < radius(n - 2)  # the first count at which the interval is narrow enough
    assert 1.8 < impressions_to_detect(0.01, value, 2 * variance, 0.05, tau) / n < 2.2  # about linear in the variance
    assert impressions_to_detect(0.01, value, variance, 0.5, tau) < n / 4  # a 50 % holdout needs far fewer
    assert impressions_to_detect(0.01, 0.0, variance, 0.05, tau) is None


def test_the_exact_expected_value_ranks_as_serving_does(tmp_path):
    """With the true probabilities as the model's predictions, weights all on purchase show the
    candidates likeliest to be bought: their expected purchase rate is the best of any ranking."""
    from mtrec.data.synthetic import generate
    from mtrec.fusion import rank
    from mtrec_app.traffic import SimulatedUsers

    data = generate("ecommerce", tmp_path / "data", num_users=20, num_items=30, num_interactions=800, seed=3)
    users = SimulatedUsers(data, "http://127.0.0.1:9", candidates=10, k=3)  # never called
    truth, tasks = users._pool.truth, users.tasks
    scored = []
    for q in range(12):
        rows = np.array(list(users.rows(q).values()))
        scored.append((rows, {t: truth[rows, i] for i, t in enumerate(tasks)}))
    scales = dict.fromkeys(tasks, 1.0)
    on_purchase = users.expected_rates(scored, {t: float(t == "purchase") for t in tasks}, scales)
    on_click = users.expected_rates(scored, {t: float(t == "click") for t in tasks}, scales)
    assert set(on_purchase) == set(tasks) and on_purchase["purchase"] > on_click["purchase"] > 0
    assert on_click["click"] > on_purchase["click"]
    top = [rows[rank(preds, {"purchase": 1.0}, 3)[0]] for rows, preds in scored]
    best = np.mean([truth[r, tasks.index("purchase")].mean() for r in top])  # every request shows 3 here
    assert on_purchase["purchase"] == pytest.approx(best)


def test_a_trial_stopped_early_says_so_and_spends_its_share_of_the_bar():
    from mtrec_app.progress import TrialLines

    out = io.StringIO()
    console = Console(out, tty=False, name="demo")
    with console.bar("trials", 4, "epochs of all trials") as bar:
        lines = TrialLines(console, bar, epochs=2, score_name="mean valid AUC")
        base = {"trial_id": "ab12c_00000", "weighting": "static", "equal": True}
        other = {"trial_id": "ab12c_00001", "weighting": "dwa", "equal": False}
        lines({**base, "epoch": 1, "score": 0.70})
        lines({**other, "epoch": 1, "score": 0.60})
        lines({**other, "done": "finished"})
        lines({**base, "epoch": 2, "score": 0.72})
        lines({**base, "done": "finished"})
        assert bar.render().split("]")[1].startswith(" 4/4")
    assert out.getvalue().splitlines() == [
        "   trial #2 dwa: best mean valid AUC 0.6000, 1/2 epochs, stopped early",
        "   trial #1 static (equal weights): best mean valid AUC 0.7200, 2/2 epochs",
    ]


def test_ctrl_c_during_the_demo_search_stops_the_demo(tmp_path, monkeypatch):
    """Tune's own SIGINT handler ends the search early (SearchInterrupted, which `mtrec tune` answers
    with "run again to resume"); the demo, which starts afresh every time, stops as on any Ctrl-C."""
    from mtrec_app import progress
    from mtrec_tune import search

    def interrupted(*args, **kwargs):
        raise search.SearchInterrupted("search stopped with 1 of 2 trials unfinished")

    monkeypatch.setattr(search, "run_search", interrupted)
    monkeypatch.setattr(progress, "feed", lambda handle: contextlib.nullcontext())  # no Ray queue without Ray
    with pytest.raises(KeyboardInterrupt):
        demo.stage_tune(tmp_path, tmp_path, dict(demo.QUICK), Console(io.StringIO(), tty=False, name="demo"))
