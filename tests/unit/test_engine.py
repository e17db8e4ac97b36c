"""Training and evaluation: the step, seeded fits, and the quality bar against the synthetic oracle."""

from __future__ import annotations

import math

import pytest
import torch

from bench.quality_bench import OVERRIDES
from mtrec.config import Config
from mtrec.data.synthetic import generate, oracle_metrics
from mtrec.engine import batches, fit, make_optimizer, objective_value, text_inputs, train_step
from mtrec.errors import ConfigError
from mtrec.features import collate, prepare_examples
from mtrec.models import build_model
from mtrec.weighting import StepContext, build_weighting

QUALITY_MARGIN = 0.02  # test AUC of every task within this of the oracle's


@pytest.fixture(scope="session")
def vector_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vectors")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    data = generate("ecommerce", root / "data", num_users=120, num_items=60, num_interactions=6000, seed=2)
    return prepare_examples(data, small_config(), root / "examples")


def small_config(*overrides: str) -> Config:
    return Config().override(
        [
            "encoder.mode=none",
            "model.id_buckets=11",
            "data.max_history=5",
            "train.epochs=2",
            "train.batch_size=128",
            *overrides,
        ]
    )


def test_train_step_lowers_the_loss_and_trains_the_weighting(small):
    cfg = small_config()
    torch.manual_seed(0)
    model = build_model(cfg, small.meta)
    weighting = build_weighting("uncertainty", small.meta.tasks)
    optimizer = make_optimizer(model, weighting, cfg)
    batch = collate(next(batches(small.arrays("train"), 512)))
    before = [p.detach().clone() for p in weighting.parameters()]
    outs = [train_step(model, weighting, optimizer, batch, StepContext()) for _ in range(40)]
    assert len(outs[0]["losses"]) == len(outs[0]["weights"]) == len(small.meta.tasks)
    assert sum(outs[-1]["losses"]) < 0.8 * sum(outs[0]["losses"])
    assert any(not torch.equal(a, b) for a, b in zip(before, weighting.parameters()))


def test_fit_is_seeded_and_reports_every_split(small):
    first, second = fit(small_config(), small), fit(small_config(), small)
    for split, tasks in first.metrics.items():  # equal up to the order of threaded float sums
        for task, m in tasks.items():
            assert second.metrics[split][task] == pytest.approx(m, rel=1e-6, nan_ok=True)
    assert set(first.metrics) == {"valid", "test"}
    for task in small.meta.tasks:
        m = first.metrics["test"][task.name]
        assert 0.5 < m["auc"] <= 1 and m["logloss"] > 0
    assert len(first.history) == 2 and first.samples_per_s > 0
    assert fit(small_config("train.seed=1"), small).metrics != first.metrics


def test_gradient_weighting_and_early_stopping_run_through_fit(small):
    result = fit(small_config("train.weighting=pcgrad", "train.epochs=6", "train.early_stop_patience=1"), small)
    scores = [h["objective"] for h in result.history]
    assert all(math.isfinite(s) for s in scores)
    stopped_early = len(scores) < 6
    assert not stopped_early or scores[-1] <= max(scores[:-1])


def test_text_inputs_follow_the_encoder_mode_and_reuse_encoded_vectors(small):
    """Each mode gets what build_model needs; frozen vectors already encoded (object store, bundle) are
    used as they are, and no language model is loaded for them (the named one does not exist)."""
    meta, encoder = small.meta, object()
    stored = torch.zeros(meta.num_items + 1, 4), None
    frozen = small_config("encoder.mode=frozen", "encoder.name=/nonexistent/model")
    assert text_inputs(frozen, meta, vectors=stored) == (*stored, None)
    assert text_inputs(small_config("encoder.mode=finetune"), meta, encoder, stored) == (None, None, encoder)
    assert text_inputs(small_config(), meta, encoder, stored) == (None, None, None)


def test_objective_values():
    metrics = {"click": {"auc": 0.7, "logloss": 0.4}, "buy": {"auc": 0.9}, "stars": {"rmse": 1.5}}
    assert objective_value(metrics, "mean_auc") == pytest.approx(0.8)
    assert objective_value(metrics, "click.logloss") == -0.4
    assert objective_value({"stars": {"rmse": 1.5}}, "mean_auc") == -1.5
    with pytest.raises(ConfigError, match="click.auc"):
        objective_value(metrics, "nope")


@pytest.fixture(scope="module")
def ecommerce_run(tmp_path_factory, vector_cache):
    """Frozen MiniLM vectors from its last three layers, MMoE with DIN history, no ids, on 500k synthetic
    e-commerce interactions (2 cores: about 2.5 min of training).

    What got it within the bar (``bench/results/quality.json``; gaps click / add_to_cart / purchase /
    ad_click):
    - MiniLM's last layer alone holds the items' star rating poorly: a linear read-out of the quality
      level from it has R^2 0.72, from the layers below 0.97-0.99. So the model under-used quality
      (residual logits +0.37 .. -0.18 from 1 to 5 stars) and cold items, known only by their text,
      lagged. ``encoder.layers=[-1,-2,-3]`` closes both.
    - Ids hurt once the text is read well: the item text says nearly all there is to know about an item
      (the hidden popularity has sd 0.15), and user ids overfit even with 500 rows per user. At 1M with
      ids, id_dropout 0.5 and the three layers: 0.017, 0.017, 0.019, 0.021; without ids: 0.008, 0.009,
      0.009, 0.010. Here, at 500k: 0.011, 0.012, 0.013, 0.010.
    - At 100k interactions the bar is beyond reach (a logistic regression handed the true latent
      attributes has gaps of 0.012 to 0.045); at 300k it is met by 0.001 to 0.005.
    """
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("quality")
    data = generate("ecommerce", root / "data", num_users=2000, num_items=1000, num_interactions=500_000, seed=0)
    cfg = Config().override([*OVERRIDES, f"encoder.cache_dir={vector_cache}"])  # the quality bench's model
    result = fit(cfg, data, root / "run")
    oracle = oracle_metrics(data, "test")
    got = {t: result.metrics["test"][t] for t in oracle}
    report = ", ".join(
        f"{t}: {got[t]['auc']:.4f} vs oracle {oracle[t]['auc']:.4f} (cold items {got[t]['cold_auc']:.4f} vs "
        f"{oracle[t]['cold_auc']:.4f})"
        for t in oracle
    )
    return oracle, got, report


def test_quality_on_ecommerce_is_within_the_margin_of_the_oracle(ecommerce_run):
    """Every task's test AUC is within 0.02 of the best achievable (the true probabilities' AUC)."""
    oracle, got, report = ecommerce_run
    assert all(got[t]["auc"] >= oracle[t]["auc"] - QUALITY_MARGIN for t in oracle), report


def test_cold_items_are_scored_from_their_text_about_as_well(ecommerce_run):
    """Items released after the training window (no training rows; 14% of test rows) trail the oracle
    on those rows by at most 0.03: the text alone carries what the model knows of an item."""
    oracle, got, report = ecommerce_run
    assert all(got[t]["cold_auc"] >= oracle[t]["cold_auc"] - 0.03 for t in oracle), report
