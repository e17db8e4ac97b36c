"""Feedback that cannot poison the weight controller: events checked against the bundle's tasks and the
range each regression task's labels had in training (which training stores in the bundle's meta)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_features import prepare

from mtrec.config import TaskSpec
from mtrec.features import FeatureMeta
from mtrec_serve.schemas import RecommendResponse, check_events

TASKS = {"click": TaskSpec("click"), "dwell": TaskSpec("dwell", "regression")}
RANGE = {"dwell": (0.0, 95.5)}


def test_training_stores_each_regression_tasks_label_range(tmp_path):
    meta = prepare(tmp_path).meta
    assert meta.label_range == {"stars": (2.0, 4.0)}  # the train split's ratings; the test row's 5.0 is not in it
    assert FeatureMeta.from_json(json.loads(json.dumps(meta.to_json()))).label_range == meta.label_range
    older = meta.to_json()
    del older["label_range"]  # a meta written before ranges were stored still loads...
    assert FeatureMeta.from_json(older).label_range == {}  # ...and its regression feedback is refused (below)


@pytest.mark.parametrize("events", [{"click": 1, "dwell": 12.5}, {"click": 0}, {"dwell": 0.0}, {"dwell": 95.5}])
def test_events_within_the_tasks_and_ranges_pass(events):
    assert check_events(events, TASKS, RANGE) is None


@pytest.mark.parametrize(
    "events, message",
    [
        (
            {"dwell": 1e308},
            "events.dwell: 1e+308 is outside [0, 95.5], the range of the labels of regression task 'dwell' in training",
        ),
        ({"dwell": 95.6}, "events.dwell: 95.6 is outside [0, 95.5]"),
        ({"dwell": -1.0}, "events.dwell: -1.0 is outside [0, 95.5]"),
        ({"click": 2}, "events.click: 2; a binary task's event is 0 or 1"),
        ({"click": 1e308}, "events.click: 1e+308; a binary task's event is 0 or 1"),
        ({"clicks": 1}, "events: unknown task(s) ['clicks']; tasks: ['click', 'dwell']"),
    ],
)
def test_events_beyond_the_tasks_or_ranges_are_refused_with_a_message(events, message):
    assert message in check_events(events, TASKS, RANGE)


def test_a_bundle_without_label_ranges_refuses_regression_feedback_only():
    assert check_events({"click": 1}, TASKS, {}) is None
    problem = check_events({"dwell": 3.0}, TASKS, {})
    assert "no label range for regression task 'dwell'" in problem and "train it again" in problem


def test_responses_name_no_arm_and_no_weights_version():
    """The arm is recorded server-side: a client that saw it could send feedback only for the arm it likes."""
    assert set(RecommendResponse.model_fields) == {"request_id", "items"}


def test_a_score_that_is_not_finite_is_a_503_never_a_null_in_a_200():
    from fastapi import HTTPException

    from mtrec_serve.ingress import _finite

    scores = np.array([1.5, 0.2])
    assert _finite(scores, "main") is scores
    for bad in (np.nan, np.inf):
        with pytest.raises(HTTPException) as e:
            _finite(np.array([1.5, bad]), "main")
        assert e.value.status_code == 503 and "not a finite number" in e.value.detail
