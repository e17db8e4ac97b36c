"""A real small weighting search on Ray Tune over Ray Train, on data where the weighting matters.

The data: the synthetic e-commerce world's ``click`` (the main task) plus ``aux``, a coin flipped
once per item: labels that say nothing about an item's content, which a shared bottom can fit only
by memorising items. Through a narrow shared bottom (16 units) the aux task crowds the click signal
out unless it is down-weighted. Seen in plain torch (:func:`mtrec.engine.fit`, 3 epochs, seeds 0-2), test
click AUC with equal weights / with aux at 1/10 of click: 0.618 +- 0.011 / 0.709 +- 0.008 on 30k rows
(this test's size), 0.730 +- 0.005 / 0.758 +- 0.001 on 60k rows: the fewer the rows, the more the aux
task crowds out.

The search: 4 trials, 3 at a time (each trains in its trial's process, ``train.num_workers=0``: 1 CPU
each; Tune over Ray Train workers is the demo's; 3 at a time so that the interrupt after two finished
lands while the fourth, started when the first finished, still runs: 4 at a time finish together,
before the Ctrl-C takes effect):
the equal-weights baseline, aux down-weighted to 1/10 of click, and the baseline again with seeds 1
and 2 (the seed noise the best trial must beat). It is interrupted by SIGINT after 2 trials finished
(Ctrl-C to a separate driver process), then resumed in this one. Every comparison is on the test split
(the search chose by the valid split).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mtrec.config import Config, TaskSpec
from mtrec.data.contract import load_table, write_dataset
from mtrec.data.synthetic import generate

EPOCHS = 3
OVERRIDES = [
    "model.arch=shared_bottom",
    "model.expert_dim=16",  # narrow: the tasks compete for the shared bottom
    "model.dropout=0.0",
    "model.history=mean",
    "model.use_item_ids=false",
    "model.use_user_ids=false",
    f"train.epochs={EPOCHS}",
    "train.batch_size=256",
    "train.lr=0.003",
    "train.num_workers=0",  # each trial trains in its own process: Tune's part is what is tested here
    "train.early_stop_patience=0",
    "train.log_every_steps=1000",
]
DOWN = {"weighting": "static", "task_weights": {"click": 1.0, "aux": 0.1}}
EQUAL = {"weighting": "static", "task_weights": {"click": 1.0, "aux": 1.0}}
POINTS = [DOWN, {**EQUAL, "seed": 1}, {**EQUAL, "seed": 2}]  # after the baseline (equal weights, seed 0)


def noisy_aux_dataset(out: Path) -> Path:
    """``click`` of the e-commerce scenario plus ``aux``: one fixed random bit per item."""
    src = generate(
        "ecommerce", out.parent / "ecommerce", num_users=2000, num_items=300, num_interactions=30_000, seed=3
    )
    inter = load_table(src / "interactions.parquet")
    items = inter.column("item_id").to_numpy()
    coin = np.random.default_rng(0).random(int(items.max()) + 1) < 0.5
    keep = [c for c in inter.column_names if c not in ("add_to_cart", "purchase", "ad_click")]
    inter = inter.select(keep).append_column("aux", pa.array(coin[items].astype(np.int8)))
    tasks = [TaskSpec("click"), TaskSpec("aux")]
    return write_dataset(out, inter, load_table(src / "items.parquet"), tasks, users=load_table(src / "users.parquet"))


def _results_on_disk(out: Path) -> dict[str, list[dict]]:
    """Trial id -> the result rows Tune logged for it (``result.json``, one JSON line per report)."""
    rows = {}
    for f in (out / "ray" / "search").glob("*/result.json"):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if lines:
            rows[lines[0]["trial_id"]] = lines
    return rows


def _terminated(out: Path) -> list[str]:
    """Trials Tune's last saved experiment state records as TERMINATED (what a restore will not rerun)."""
    states = sorted((out / "ray" / "search").glob("experiment_state-*.json"))
    if not states:
        return []
    try:
        trials = [json.loads(t[0]) for t in json.loads(states[-1].read_text())["trial_data"]]
    except (ValueError, KeyError):  # caught mid-write
        return []
    return [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]


def _interrupt_after(proc: subprocess.Popen, out: Path, n: int, timeout_s: float = 400) -> list[str]:
    """Ctrl-C the search driver ``proc`` once ``n`` trials have logged their last epoch and its saved
    experiment state records them as finished (the driver saves it every second: TUNE_GLOBAL_CHECKPOINT_S);
    the trials the state records as finished after the driver stopped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        done = {t for t, rows in _results_on_disk(out).items() if rows[-1].get("epoch") == EPOCHS}
        if len(done & set(_terminated(out))) >= n:
            proc.send_signal(signal.SIGINT)  # Tune saves the experiment and stops; the job's actors go with it
            proc.wait(timeout=120)
            return _terminated(out)
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"the search driver did not finish {n} trials in time (exit code {proc.poll()})")


@pytest.fixture(scope="module")
def search(ray_cluster, tmp_path_factory):
    from mtrec_tune.search import run_search

    root = tmp_path_factory.mktemp("tune")
    data = noisy_aux_dataset(root / "noisy-aux")
    base = Config().override(OVERRIDES)
    out = root / "search"
    (root / "points.yaml").write_text(yaml.safe_dump(POINTS))
    # grace 3 = epochs: every trial trains fully, so the baseline is compared at its best, not cut short
    cli = [
        "--trials",
        "4",
        "--objective",
        "click.auc",
        "--strategies",
        "static",
        "--no-lr",
        "--grace-epochs",
        "3",
        "--concurrency",
        "3",
    ]
    start = time.perf_counter()
    # the search as a separate driver (`mtrec tune` on this cluster), interrupted with Ctrl-C...
    cmd = [
        sys.executable,
        "-m",
        "mtrec_tune.run",
        "--data",
        str(data),
        "--out",
        str(out),
        "--points",
        str(root / "points.yaml"),
    ]
    cmd += [*cli, "--address", ray_cluster.get_runtime_context().gcs_address, *OVERRIDES]
    with open(root / "driver.log", "w") as log:
        env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # its state on disk at most a second behind
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2], env=env)
        finished = _interrupt_after(proc, out, 2)
    assert proc.returncode == 130, (root / "driver.log").read_text()[-3000:]
    before = _results_on_disk(out)
    # ...then resumed here, with the same arguments
    kwargs = dict(objective="click.auc", strategies=["static"], lr_range=None, grace_epochs=3, concurrency=3)
    summary = run_search(base, data, out, trials=4, points=POINTS, **kwargs)
    wall = time.perf_counter() - start
    print(f"\n[tune test] search wall time {wall:.0f} s (4 trials, interrupted and resumed)")
    return {
        "data": data,
        "base": base,
        "out": out,
        "summary": summary,
        "before": before,
        "finished_before": finished,
        "root": root,
    }


def _table(out: Path) -> list[dict]:
    return pq.read_table(out / "result" / "trials.parquet").to_pylist()


def _test_auc(search, row: dict) -> float:
    """Test-split click AUC of one trial's best checkpoint (the model does not depend on the weights)."""
    import ray.train

    from mtrec_train.trainer import finalize, prepare

    prepared = search.setdefault("prepared", prepare(search["base"], search["data"], search["root"] / "eval"))
    dest = search["root"] / "eval" / row["trial_id"]
    return finalize(prepared, ray.train.Checkpoint(row["checkpoint_path"]), dest, 0.0)["test"]["click"]["auc"]


def test_best_trial_beats_equal_weights_by_more_than_seed_noise(search):
    rows = _table(search["out"])
    equal_rows = [r for r in rows if r["loss_weight.click"] == r["loss_weight.aux"] == 1.0]
    assert sorted(r["config.seed"] for r in equal_rows) == [0, 1, 2]
    best = search["summary"]["best"]
    best_auc = best["test"]["click"]["auc"]
    equal = [_test_auc(search, r) for r in equal_rows]
    noise = float(np.std(equal, ddof=1))
    print(
        f"[tune test] best {best['trial_id']} test click AUC {best_auc:.4f}; equal weights over seeds 0-2 {equal}, std {noise:.4f}"
    )
    assert best["loss_weight.click"] > best["loss_weight.aux"], "the best trial should down-weight the noisy task"
    # the margin: twice the seed-to-seed standard deviation of equal weights, and above every seed
    assert best_auc - np.mean(equal) > 2 * noise, (best_auc, equal)
    assert best_auc > max(equal), (best_auc, equal)


def test_pareto_file_lists_exactly_the_non_dominated_trials(search):
    rows = _table(search["out"])
    front = json.loads((search["out"] / "result" / "pareto.json").read_text())
    assert front["metrics"] == ["click.auc", "aux.auc"]
    points = {r["trial_id"]: (r["valid.click.auc"], r["valid.aux.auc"]) for r in rows}

    def dominated(p):
        return any(all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p)) for q in points.values())

    expected = {t for t, p in points.items() if not dominated(p)}
    assert {p["trial_id"] for p in front["front"]} == expected
    assert set(front["dominated"]) == set(points) - expected
    for p in front["front"]:
        assert (p["click.auc"], p["aux.auc"]) == points[p["trial_id"]]
    # down-weighting aux trades aux AUC for click AUC: more than one trial is on the front
    assert len(expected) >= 2
    assert (search["out"] / "result" / "pareto.png").stat().st_size > 10_000


def test_interrupted_search_resumes_without_rerunning_finished_trials(search):
    rows = _table(search["out"])
    after = _results_on_disk(search["out"])
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    assert set(after) == {r["trial_id"] for r in rows}, "no trial was added on resume"
    assert all(r["status"] == "TERMINATED" and r["epochs"] == 3 for r in rows)
    finished = search["finished_before"]
    assert len(finished) >= 2
    for trial_id in finished:
        # the same logged reports, byte for byte: a finished trial was not trained again
        assert after[trial_id] == search["before"][trial_id]
        assert len(after[trial_id]) == 3
    assert len(set(after) - set(finished)) == 4 - len(finished)


def test_outputs_a_preset_mtrec_train_accepts_and_the_best_bundle(search):
    from mtrec.bundle import load_bundle
    from mtrec.engine import batches, predict
    from mtrec.features import ExampleSet, collate
    from mtrec.metrics import auc
    from mtrec_train.run import build_config, parse_args

    result = search["out"] / "result"
    best = search["summary"]["best"]
    cfg = build_config(parse_args(["--data", "D", "--out", "O", "--preset", str(result / "best.yaml")]))
    weights = {t.name: t.loss_weight for t in cfg.tasks}
    assert weights == pytest.approx({"click": best["loss_weight.click"], "aux": best["loss_weight.aux"]})
    assert cfg.train.weighting == "static" and cfg.model.expert_dim == 16 and cfg.data.path == ""
    assert json.loads((result / "best" / "metrics.json").read_text())["test"]["click"]["auc"] == pytest.approx(
        best["test"]["click"]["auc"]
    )
    # the best bundle is the best trial's model: its test predictions give the best trial's test AUC
    bundle = load_bundle(result / "best" / "bundle")
    assert {t.name: t.loss_weight for t in bundle.cfg.tasks} == pytest.approx(weights)
    arrays = ExampleSet.load(search["out"] / "examples").arrays("test")
    preds = predict(bundle.model, (collate(b) for b in batches(arrays, 4096)))["preds"]
    clicks = collate(arrays)["labels"].numpy()[:, 0]
    seen = ~np.isnan(clicks)
    assert auc(clicks[seen], preds[seen, 0]) == pytest.approx(best["test"]["click"]["auc"], abs=1e-9)
    csv_header = (result / "trials.csv").read_text().splitlines()[0]
    for column in ("trial_id", "status", "config.weighting", "loss_weight.click", "valid.click.auc", "score"):
        assert f'"{column}"' in csv_header
