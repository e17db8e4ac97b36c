"""The request-to-model path: raw requests map to exactly the model inputs training used; cold items and
users are served through their text and hashed id buckets; the bundle's fusion scales come from training."""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from mtrec.bundle import load_bundle
from mtrec.config import Config
from mtrec.data.synthetic import generate
from mtrec.engine import fit
from mtrec.features import ExampleSet, collate
from mtrec.inference import Candidate, Catalog, RequestError, Scorer, ScoreRequest

MODEL_KEYS = ("user", "item", "history", "context", "user_cat", "user_num", "inter_num")


def word_encoder(texts: list[str]):
    """A tiny random BERT whose vocabulary holds every word of ``texts``, so texts differ in vectors."""
    from mtrec.encoders import TextEncoder

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])})
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=4 + len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
        )
    )
    return TextEncoder(bert, tokenizer, max_length=32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small ecommerce dataset, a frozen-text model trained on it for one epoch, and its bundle."""
    root = tmp_path_factory.mktemp("serving")
    data = generate("ecommerce", root / "data", num_users=60, num_items=50, num_interactions=3000, seed=3)
    cfg = Config().override(
        [
            "model.id_buckets=7",
            "data.max_history=5",
            "train.epochs=1",
            "train.batch_size=128",
            "model.id_dim=8",
            "model.proj_dim=16",
            "model.expert_dim=16",
            "model.tower_dim=8",
            "model.arch=ple",
            f"encoder.cache_dir={root / 'cache'}",
        ]
    )
    texts = pq.read_table(data / "items.parquet").column("text").to_pylist()
    encoder = word_encoder(texts)
    result = fit(cfg, data, work_dir=root / "work", encoder=encoder)
    path = result.save_bundle(root / "bundle", cfg)
    return {"data": data, "examples": ExampleSet.load(root / "work" / "examples"), "bundle": path, "encoder": encoder}


def test_catalog_requests_map_to_the_training_inputs_and_predict_bit_identically(world):
    """Each test interaction, sent as a raw request (raw ids, raw features), becomes exactly the
    row training built for it, and the serving predictions equal the model's own bit for bit."""
    bundle = load_bundle(world["bundle"])
    meta, examples = bundle.meta, world["examples"]
    raw = pq.read_table(world["data"] / "interactions.parquet").to_pandas()
    raw = raw[raw["split"] == "test"].reset_index(drop=True)
    users = pq.read_table(world["data"] / "users.parquet").to_pandas().set_index("user_id")
    arrays = examples.arrays("test")
    rows = np.arange(0, len(raw), max(1, len(raw) // 40))[:40]
    expected_batch = collate({k: v[rows] for k, v in arrays.items()})
    with torch.no_grad():
        expected = bundle.model(expected_batch)

    scorer = Scorer(bundle)
    jobs = []
    for r in rows:
        row = raw.iloc[r]
        request = ScoreRequest(
            user_id=int(row.user_id),
            candidates=[Candidate(int(row.item_id), features={c: _or_none(row[c]) for c in meta.inter_num})],
            history=[meta.item_ids[h - 1] for h in arrays["history"][r] if h > 0],
            user_features={c: users.loc[row.user_id, c] for c in meta.user_cat},
        )
        jobs.append((scorer.catalog.prepare(request), None))
    batch, extra, contexts = scorer.inputs(jobs)
    assert extra is None and contexts is None
    for key in MODEL_KEYS:
        assert torch.equal(batch[key], expected_batch[key]), key
    got = scorer.predict(jobs)
    for task in scorer.tasks:
        served = np.concatenate([g[task] for g in got])
        assert np.array_equal(served, expected[task].numpy()), task


def test_a_cold_item_given_by_text_scores_like_the_same_item_in_the_catalog(world):
    """Items of the catalog never seen in training have an untrained (zero) id bucket, like any new id:
    the same text under a new id must score the same, up to the float noise of encoding it alone."""
    scorer = Scorer(load_bundle(world["bundle"]))
    meta = scorer.catalog.meta
    texts = dict(zip(meta.item_ids, pq.read_table(world["data"] / "items.parquet").column("text").to_pylist()))
    unseen = [i for i in meta.item_ids if i not in set(meta.items.values)]
    assert unseen, "the dataset should hold catalog items unseen in training"
    seen = [i for i in meta.item_ids if i in set(meta.items.values)][:5]
    history = seen[:3]
    catalog = ScoreRequest("u-new", [Candidate(i) for i in unseen[:4] + seen], history=history)
    cold = ScoreRequest(
        "u-new",
        [Candidate(f"new-{i}", text=texts[i]) for i in unseen[:4]] + [Candidate(i) for i in seen],
        history=history,
    )
    encoded: list[str] = []
    embed = lambda t: encoded.extend(t) or world["encoder"].encode(t).numpy()  # noqa: E731
    a, b = scorer.score(catalog), scorer.score(cold, embed)
    assert encoded == [texts[i] for i in unseen[:4]]  # catalog items never reach the encoder
    for task in scorer.tasks:
        np.testing.assert_allclose(a[task], b[task], rtol=1e-4, atol=1e-6)
    # a different text is a different item
    other = ScoreRequest("u-new", [Candidate("new-x", text=texts[seen[0]])], history=history)
    assert not np.allclose(scorer.score(other, embed)["click"], a["click"][:1])


def test_unknown_users_and_history_ids_are_served(world):
    scorer = Scorer(load_bundle(world["bundle"]))
    items = scorer.catalog.meta.item_ids[:10]
    out = scorer.score(ScoreRequest("never-seen", [Candidate(i) for i in items], history=["nope", items[0]]))
    assert set(out) == set(scorer.tasks)
    for task, p in out.items():
        assert p.shape == (10,) and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all(), task
    # ids arrive from JSON as strings or numbers: both find the catalog item
    assert scorer.catalog.item_index(str(items[3])) == scorer.catalog.item_index(items[3]) == 4
    prepared = scorer.catalog.prepare(ScoreRequest(1, [Candidate(items[0])], history=["nope", items[0]]))
    assert prepared.history.tolist() == [0, 0, 0, 0, 1]  # the unknown id dropped, left-padded


def test_bad_requests_name_the_field(world):
    catalog = Catalog.load(world["bundle"])
    with pytest.raises(RequestError, match=r"candidates\[1\]: item 'zzz' is not in the catalog"):
        catalog.prepare(ScoreRequest(1, [Candidate(1), Candidate("zzz")]))
    with pytest.raises(RequestError, match=r"candidates\[0\].features: unknown feature\(s\) \['colour'\]"):
        catalog.prepare(ScoreRequest(1, [Candidate(1, features={"colour": 1.0})]))
    with pytest.raises(RequestError, match="user_features: unknown"):
        catalog.prepare(ScoreRequest(1, [Candidate(1)], user_features={"shoe_size": 3}))
    with pytest.raises(RequestError, match="not a finite number"):
        catalog.prepare(ScoreRequest(1, [Candidate(1, features={"discount": float("nan")})]))


def test_a_finetune_bundle_serves_from_its_stored_vectors_without_the_encoder(world, tmp_path):
    examples = world["examples"]
    cfg = Config().override(
        ["encoder.mode=finetune", "encoder.finetune_layers=1", "model.id_buckets=7", "data.max_history=5"]
    )
    cfg.train.epochs = 1
    result = fit(cfg, examples, encoder=word_encoder(examples.meta.item_texts))
    path = result.save_bundle(tmp_path / "b", cfg)
    skeleton = word_encoder(examples.meta.item_texts)
    bundle = load_bundle(path, encoder=skeleton)
    batch = collate({k: v[:64] for k, v in examples.arrays("test").items()})
    with torch.no_grad():
        own = bundle.model(batch)
    Scorer(bundle)  # takes the model over for serving
    assert bundle.model.encoder is None  # the language model is off the scoring path
    skeleton.forward = lambda *a: pytest.fail("the encoder ran for a catalog item")
    with torch.no_grad():
        served = bundle.model(batch)
    for task in own:
        torch.testing.assert_close(served[task], own[task], rtol=1e-4, atol=1e-5)


def test_the_bundle_carries_the_fusion_scales_training_measured_on_the_validation_examples(world):
    """Serving divides each task by its mean prediction over the validation examples, measured once at
    the end of training and stored in the bundle, not re-estimated by each replica."""
    bundle = load_bundle(world["bundle"])
    with torch.no_grad():
        preds = bundle.model(collate(world["examples"].arrays("valid")))
    expected = {t: float(preds[t].double().mean()) for t in preds}
    assert bundle.fusion_scales == pytest.approx(expected, rel=1e-5)
    assert Catalog.load(world["bundle"]).fusion_scales == Scorer(bundle).catalog.fusion_scales == bundle.fusion_scales


def _or_none(x) -> float | None:
    """A raw feature value as a request sends it: null when missing."""
    return None if x is None or np.isnan(x) else float(x)
