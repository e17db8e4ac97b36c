"""Progress of Ray Train and Ray Tune runs, on the demo's console.

Ray Train runs its callbacks in the Train controller actor, and Ray Tune pickles its callbacks into
the experiment it saves: neither can hold the console. So the callbacks here only put small dicts on a
Ray queue, and :func:`feed` hands them, in a thread of the driver, to a function that draws.

- :class:`EpochFeed` (Ray Train): one item per finished epoch, from rank 0's report.
- :class:`TrialFeed` (Ray Tune): one item per trial result (an epoch) and per trial end.
- :class:`EpochLines` / :class:`TrialLines`: what the console shows of them (a bar, a line each).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray.train
import ray.tune
import ray.util.queue

from mtrec_app.console import Bar, Console
from mtrec_tune.pareto import trial_label

Item = dict[str, Any]


class EpochFeed(ray.train.UserCallback):
    """Rank 0's end-of-epoch report (epoch 1-based, validation metrics per task, samples/s) to ``queue``;
    mid-epoch checkpoint reports carry no validation and are left out."""

    def __init__(self, queue: ray.util.queue.Queue) -> None:
        self._queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        row = metrics[0]
        if "valid" in row:
            self._queue.put({"epoch": row["epoch"], "valid": row["valid"], "samples_per_s": row["samples_per_s"]})


class TrialFeed(ray.tune.Callback):
    """Each trial's results (``epoch``, ``score``) and its end (``done``: ``finished`` or ``failed``), with
    its strategy and whether it weighs every task equally (the search's baseline)."""

    def __init__(self, queue: ray.util.queue.Queue) -> None:
        self._queue = queue

    def _put(self, trial: Any, **item: Any) -> None:
        config = trial.config
        equal = config.get("weighting") == "static" and len(set(config.get("task_weights", {}).values())) <= 1
        self._queue.put({"trial_id": trial.trial_id, "weighting": config.get("weighting"), "equal": equal, **item})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        self._put(trial, epoch=int(result.get("epoch", 0)), score=float(result.get("score", math.nan)))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._put(trial, done="finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._put(trial, done="failed")


@contextmanager
def feed(handle: Callable[[Item], None]) -> Iterator[ray.util.queue.Queue]:
    """A Ray queue for the block's callbacks; a driver thread hands each item to ``handle``, and the
    items still queued when the block ends (callbacks put synchronously: none is lost) before it returns."""
    queue = ray.util.queue.Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()

    def drain() -> None:
        while True:
            try:
                item = queue.get(timeout=0.5)
            except ray.util.queue.Empty:
                if stop.is_set():
                    return
                continue
            handle(item)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        stop.set()
        thread.join()
        queue.shutdown()


def _metric_text(metrics: dict[str, dict[str, float]]) -> str:
    """``click 0.712, purchase 0.731`` (AUC; RMSE for a regression task)."""
    return ", ".join(f"{t} {m['auc'] if 'auc' in m else m.get('rmse', math.nan):.3f}" for t, m in metrics.items())


class EpochLines:
    """A training run's items: the bar at the epoch, and ``epoch 1/4: valid AUC click 0.712, ...``."""

    def __init__(self, console: Console, bar: Bar, epochs: int) -> None:
        self._console, self._bar, self._epochs = console, bar, epochs

    def __call__(self, item: Item) -> None:
        self._bar.set(item["epoch"])
        self._console.line(
            f"   epoch {item['epoch']}/{self._epochs}: valid AUC {_metric_text(item['valid'])}"
            f" ({item['samples_per_s']:,.0f} samples/s)"
        )


class TrialLines:
    """A search's items: the bar counts every trial's epochs (a trial that ends early spends the rest of
    its share), and one line per trial when it ends: its best score and how many epochs it ran."""

    def __init__(self, console: Console, bar: Bar, epochs: int, score_name: str) -> None:
        self._console, self._bar, self._epochs, self._score_name = console, bar, epochs, score_name
        self._ran: dict[str, int] = {}  # trial -> epochs reported
        self._best: dict[str, float] = {}  # trial -> best score so far
        self._spent: dict[str, int] = {}  # trial -> its share of the bar

    def __call__(self, item: Item) -> None:
        trial = item["trial_id"]
        if "done" not in item:
            self._ran[trial] = max(self._ran.get(trial, 0), item["epoch"])
            self._spent[trial] = self._ran[trial]
            if not math.isnan(item["score"]):
                self._best[trial] = max(self._best.get(trial, -math.inf), item["score"])
            self._bar.set(sum(self._spent.values()))
            return
        self._spent[trial] = self._epochs
        self._bar.set(sum(self._spent.values()))
        ran = self._ran.get(trial, 0)
        name = trial_label(trial, item["weighting"]) + (" (equal weights)" if item["equal"] else "")
        if item["done"] == "failed":
            status = f"failed after {ran}/{self._epochs} epochs (its error is in the log)"
        else:
            status = f"{ran}/{self._epochs} epochs" + (", stopped early" if ran < self._epochs else "")
        score = self._best.get(trial, math.nan)
        self._console.line(f"   trial {name}: best {self._score_name} {score:.4f}, {status}")
