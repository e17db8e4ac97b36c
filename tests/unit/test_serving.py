"""The serving path: raw requests map to exactly the model inputs training used; cold items and users
are served through their text and hashed id buckets; the text-vector cache; arm choice."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from mtrec.bundle import load_bundle, save_bundle
from mtrec.config import Config
from mtrec.data.synthetic import generate
from mtrec.engine import fit
from mtrec.features import ExampleSet, collate
from mtrec.serving import (
    Candidate,
    Catalog,
    RequestError,
    Scorer,
    ScoreRequest,
    TextVectorCache,
    choose_arm,
)

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
    path = save_bundle(tmp_path / "b", cfg, examples.meta, result.model, None, examples.meta.item_ids)
    skeleton = word_encoder(examples.meta.item_texts)
    bundle = load_bundle(path, encoder=skeleton)
    batch = collate({k: v[:64] for k, v in examples.arrays("test").items()})
    with torch.no_grad():
        own = bundle.model(batch)
    scorer = Scorer(bundle)
    assert bundle.model.encoder is None  # the language model is off the scoring path
    skeleton.forward = lambda *a: pytest.fail("the encoder ran for a catalog item")
    with torch.no_grad():
        served = bundle.model(batch)
    for task in own:
        torch.testing.assert_close(served[task], own[task], rtol=1e-4, atol=1e-5)
    assert scorer.reference_scales().keys() == set(scorer.tasks)


def test_text_vector_cache_is_an_lru_over_cleaned_texts():
    calls: list[list[str]] = []

    def encode(texts):
        calls.append(texts)
        return np.array([[len(t), 1.0] for t in texts], np.float32)

    cache = TextVectorCache(capacity=2)
    out = cache.get_or_encode(["a b", "a  b\t", "ccc"], encode)  # the first two clean to the same text
    assert calls == [["a b", "ccc"]] and out[:, 0].tolist() == [3, 3, 3]
    cache.get_or_encode(["ccc"], encode)  # hit: "ccc" becomes the most recent
    cache.get_or_encode(["dd"], encode)  # evicts "a b", the least recent
    assert calls[-1] == ["dd"] and len(cache) == 2
    cache.get_or_encode(["a b", "ccc"], encode)
    assert calls[-1] == ["a b"] and cache.hits == 2 and cache.misses == 4


def test_arm_choice_is_deterministic_and_follows_the_shares():
    traffic = {"main": 0.8, "explore-1": 0.15, "explore-2": 0.05}
    ids = [f"req-{i}" for i in range(20_000)]
    arms = [choose_arm(i, traffic) for i in ids]
    assert arms == [choose_arm(i, dict(reversed(traffic.items()))) for i in ids]  # order of the dict is irrelevant
    counts = Counter(arms)
    for arm, share in traffic.items():
        assert abs(counts[arm] / len(ids) - share) < 0.01, (arm, counts)
    assert {choose_arm(i, {"main": 1.0, "off": 0.0}) for i in ids[:500]} == {"main"}
    with pytest.raises(ValueError, match="shares must be finite"):
        choose_arm("x", {"main": float("nan")})
    with pytest.raises(ValueError):
        choose_arm("x", {})


def _or_none(x) -> float | None:
    """A raw feature value as a request sends it: null when missing."""
    return None if x is None or np.isnan(x) else float(x)


def test_feedback_ledger_counts_once_forgets_old_requests_and_names_what_is_wrong():
    from mtrec.serving import FeedbackLedger

    now = [0.0]
    ledger = FeedbackLedger(ttl_s=10, max_requests=2, clock=lambda: now[0])
    ledger.remember("r1", "main", [1, "b"])
    assert ledger.record("r1", "1", ["click"]) == ("main", ["click"], [])  # ids compare as strings
    assert ledger.record("r1", 1, ["click", "buy"]) == ("main", ["buy"], ["click"])
    with pytest.raises(LookupError, match="item_id 'zz' was not served in request 'r1'"):
        ledger.record("r1", "zz", ["click"])
    ledger.remember("r2", "explore", ["x"])
    ledger.remember("r3", "main", ["y"])  # over max_requests: r1, the oldest, goes
    with pytest.raises(LookupError, match="request_id 'r1'"):
        ledger.record("r1", 1, ["click"])
    now[0] = 11.0  # past the TTL
    with pytest.raises(LookupError, match="request_id 'r2'"):
        ledger.record("r2", "x", ["click"])
    assert len(ledger) == 2
