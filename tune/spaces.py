"""Search spaces over task weighting, and how one sampled point becomes a :class:`~mtrec.config.Config`.

A point of the space (a trial's ``config`` in Ray Tune) is a small dict::

    {"weighting": "gradnorm",                                     # the strategy
     "params": {"gradnorm": {"alpha": 1.3, "lr": 0.02}, ...},     # hyperparameters, per strategy
     "task_weights": {"click": 0.8, "purchase": 0.05},            # static task weights (raw)
     "lr": 0.002, "arch": "mmoe", "seed": 0}                      # train.lr, model.arch, train.seed

Conditional parameters: every strategy's hyperparameters are drawn and :func:`trial_config` applies
only those of the trial's strategy (and the task weights only for strategies that weigh tasks by
their prior, ``static`` and ``pcgrad``); :func:`effective_point` is the conditional view that tables
show. A nested ``choice`` (one dict of domains per strategy) would sample conditionally too, but
Ray Tune's ``points_to_evaluate`` cannot pin a value under a choice (it looks up each pinned key's
domain by path), and the search always pins its equal-weights baseline. Draws are seeded
(``BasicVariantGenerator(random_state=...)``), so a search is reproducible; ``sample_from`` would not be.

Task weights are drawn log-uniformly per task and normalised to sum to T: log-uniform draws reach the
strongly unequal weightings (one task 10-100x another) that Dirichlet(1) draws rarely produce, and
only ratios matter.

Only training and model settings are searched: the examples and frozen item vectors are prepared
once for the whole search, so a point may not change the data or the encoder.
"""

from __future__ import annotations

from typing import Any

import ray.tune

from mtrec.config import Config
from mtrec.errors import ConfigError, check_names
from mtrec.weighting import build_weighting

# strategy -> its searched hyperparameters (the rest keep their defaults)
STRATEGY_SPACES: dict[str, dict[str, Any]] = {
    "static": {},
    "uncertainty": {},
    "dwa": {"temperature": ray.tune.loguniform(0.5, 10.0)},
    "gradnorm": {"alpha": ray.tune.uniform(0.0, 3.0), "lr": ray.tune.loguniform(3e-3, 1e-1)},
    "famo": {"lr": ray.tune.loguniform(3e-3, 1e-1), "gamma": ray.tune.loguniform(1e-4, 1e-1)},
    "rlw": {},
    "pcgrad": {},
}
USES_TASK_WEIGHTS = ("static", "pcgrad")  # strategies that scale task losses by TaskSpec.loss_weight
TASK_WEIGHT_RANGE = (0.01, 1.0)  # log-uniform draw per task, before normalisation
SAMPLE_KEYS = ("weighting", "params", "task_weights", "lr", "arch", "seed")


def search_space(
    tasks: list[str],
    strategies: list[str] | None = None,
    lr: tuple[float, float] | None = (3e-4, 1e-2),
    archs: list[str] | None = None,
) -> dict[str, Any]:
    """The Ray Tune ``param_space``: a choice over ``strategies`` (default: every strategy of
    :data:`STRATEGY_SPACES`) with their hyperparameters, task weights when a strategy uses them, a
    log-uniform learning rate in ``lr`` (None: not searched), a choice over ``archs`` (None: not searched)."""
    strategies = list(strategies or STRATEGY_SPACES)
    unknown = [s for s in strategies if s not in STRATEGY_SPACES]
    if unknown:
        raise ConfigError(f"unknown weighting {unknown[0]!r}; valid weightings: {', '.join(STRATEGY_SPACES)}")
    if not tasks:
        raise ConfigError("search_space: the task list is empty")
    space: dict[str, Any] = {"weighting": ray.tune.choice(strategies)}
    params = {s: dict(STRATEGY_SPACES[s]) for s in strategies if STRATEGY_SPACES[s]}
    if params:
        space["params"] = params
    if any(s in USES_TASK_WEIGHTS for s in strategies) and len(tasks) > 1:
        space["task_weights"] = {t: ray.tune.loguniform(*TASK_WEIGHT_RANGE) for t in tasks}
    if lr is not None:
        space["lr"] = ray.tune.loguniform(*lr)
    if archs:
        space["arch"] = ray.tune.choice(list(archs))
    return space


def effective_point(point: dict[str, Any]) -> dict[str, Any]:
    """The part of a point a trial uses: its own strategy's hyperparameters, task weights only where
    the strategy uses them."""
    name = point.get("weighting")
    out = {k: v for k, v in point.items() if k not in ("params", "task_weights")}
    if point.get("params", {}).get(name):
        out["params"] = {name: point["params"][name]}
    if name in USES_TASK_WEIGHTS and "task_weights" in point:
        out["task_weights"] = point["task_weights"]
    return out


def equal_weights(tasks: list[str]) -> dict[str, Any]:
    """The baseline point: static weighting, every task weighted 1 (the prior of an untuned run)."""
    return {"weighting": "static", "task_weights": {t: 1.0 for t in tasks}}


def normalised_weights(task_weights: dict[str, float], tasks: list[str]) -> dict[str, float]:
    """Task weights scaled to sum to the number of tasks (equal weights are all 1, as an untuned prior)."""
    missing = [t for t in tasks if t not in task_weights]
    unknown = [t for t in task_weights if t not in tasks]
    if missing or unknown:
        raise ConfigError(
            f"task_weights: {'missing ' + ', '.join(missing) if missing else 'unknown ' + ', '.join(unknown)}; "
            f"tasks are {', '.join(tasks)}"
        )
    values = [float(task_weights[t]) for t in tasks]
    if any(not v >= 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"task_weights {dict(zip(tasks, values))}: must be >= 0 with a positive sum")
    total = sum(values)
    return {t: len(tasks) * v / total for t, v in zip(tasks, values)}


def trial_config(base: Config, sample: dict[str, Any]) -> Config:
    """``base`` (with its tasks resolved) with one point of the space applied; ConfigError on an unknown
    key, an unknown strategy or a hyperparameter the strategy does not take."""
    check_names("search point", sample, SAMPLE_KEYS, noun="key")
    if not base.tasks:
        raise ConfigError("trial_config: the base config has no tasks (resolve it against the data first)")
    d = base.to_dict()
    point = effective_point({"weighting": base.train.weighting, **sample})
    if "weighting" in point:
        d["train"]["weighting"] = point["weighting"]
        d["train"]["weighting_params"] = dict(point.get("params", {}).get(point["weighting"], {}))
    if "task_weights" in point:
        scaled = normalised_weights(point["task_weights"], [t["name"] for t in d["tasks"]])
        for t in d["tasks"]:
            t["loss_weight"] = scaled[t["name"]]
    for key, section, field in (("lr", "train", "lr"), ("arch", "model", "arch"), ("seed", "train", "seed")):
        if key in sample:
            d[section][field] = sample[key]
    cfg = Config.from_dict(d)
    build_weighting(cfg.train.weighting, cfg.tasks, **cfg.train.weighting_params)  # fails here, not in a worker
    return cfg
