"""The checks an entry point runs before it starts Ray, so that a typo fails in seconds, not in a worker.

Each raises a :class:`~mtrec.errors.ConfigError` whose message is one line naming what was wrong and
what is valid (``mtrec`` prints it and exits 2). The cheap checks come first; the weighting check
imports torch, so it runs only once the data and the objective are known good. The serving side's
counterpart is :func:`mtrec.fusion.check_policy`.
"""

from __future__ import annotations

from pathlib import Path

from mtrec.config import Config, TaskSpec
from mtrec.data.contract import INTERACTIONS, ITEMS, TASKS, read_tasks, validate
from mtrec.errors import ConfigError
from mtrec.metrics import objective_names


def check_dataset(data_dir: str | Path) -> list[TaskSpec]:
    """The tasks of the dataset at ``data_dir``, once it meets the data contract; ConfigError listing
    every problem the validator found, on one line."""
    problems = validate(data_dir)
    if problems:
        raise ConfigError(
            f"--data {data_dir}: {'; '.join(map(str, problems))} (a dataset holds {INTERACTIONS}, {ITEMS} "
            f"and {TASKS}: see mtrec data synth, mtrec data validate)"
        )
    return read_tasks(data_dir)


def check_objective(objective: str, tasks: list[TaskSpec], where: str = "train.objective") -> None:
    """ConfigError unless ``objective`` is a metric that evaluation reports for ``tasks``."""
    valid = objective_names(tasks)
    if objective not in valid:
        raise ConfigError(f"{where} {objective!r} is not one of {', '.join(valid)}")


def check_training(cfg: Config, data_dir: str | Path) -> list[TaskSpec]:
    """What a training run of ``cfg`` on ``data_dir`` would find wrong before its first step: the data,
    ``train.objective``, ``train.weighting`` and ``train.weighting_params``. Returns the tasks trained
    (the config's, else the dataset's)."""
    data_tasks = check_dataset(data_dir)
    tasks = cfg.tasks or data_tasks
    check_objective(cfg.train.objective, tasks)
    from mtrec.weighting import build_weighting  # imports torch (seconds): after the checks that need nothing

    build_weighting(cfg.train.weighting, tasks, **cfg.train.weighting_params)
    return tasks
