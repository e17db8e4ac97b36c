"""Bundles: a saved and reloaded model predicts bit for bit the same; a damaged bundle names its file."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mtrec.bundle import BUNDLE_VERSION, MANIFEST, META, VECTORS, WEIGHTS, load_bundle, save_bundle
from mtrec.config import Config
from mtrec.data.synthetic import generate
from mtrec.engine import batches, fusion_scales, make_optimizer, train_step
from mtrec.errors import BundleError
from mtrec.features import collate, prepare_examples
from mtrec.inference import Catalog
from mtrec.io import OUTPUT_MARKER
from mtrec.models import build_model
from mtrec.weighting import StepContext, build_weighting


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    data = generate("search", root / "data", num_users=40, num_items=30, num_interactions=1500, seed=1)
    cfg = Config().override(["model.id_buckets=5", "data.max_history=4"])
    return prepare_examples(data, cfg, root / "examples")


def config(mode: str) -> Config:
    return Config().override(
        [f"encoder.mode={mode}", "model.id_buckets=5", "data.max_history=4", "model.arch=ple", "model.dropout=0.2"]
    )


def trained(cfg: Config, examples, item_vectors=None, context_vectors=None, encoder=None):
    """A model a few steps away from its initialisation, so that every weight matters."""
    torch.manual_seed(0)
    model = build_model(cfg, examples.meta, item_vectors, encoder, context_vectors)
    weighting = build_weighting("static", examples.meta.tasks)
    optimizer = make_optimizer(model, weighting, cfg)
    for b in list(batches(examples.arrays("train"), 64, np.random.default_rng(0)))[:5]:
        train_step(model, weighting, optimizer, collate(b), StepContext())
    return model.eval()


def scales(model, examples) -> dict[str, float]:
    return fusion_scales(model, (collate(b) for b in batches(examples.arrays("valid"), 256)))


def predictions(model, examples) -> dict[str, torch.Tensor]:
    batch = collate(examples.arrays("test"))
    with torch.no_grad():
        return model(batch)


def table(rows: int, seed: int) -> torch.Tensor:
    t = torch.randn(rows, 16, generator=torch.Generator().manual_seed(seed))
    t[0] = 0
    return t


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a bundle must never be unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize("mode", ["frozen", "none"])
def test_round_trip_predicts_bit_identically(tmp_path, examples, mode):
    cfg, meta = config(mode), examples.meta
    vectors = (table(meta.num_items + 1, 0), table(len(meta.contexts) + 1, 1)) if mode == "frozen" else (None, None)
    model = trained(cfg, examples, *vectors)
    measured = scales(model, examples)
    path = save_bundle(tmp_path / "b", cfg, meta, model, measured, vectors[0], vectors[1])
    assert (path / VECTORS).exists() == (mode == "frozen")
    bundle = load_bundle(path)
    before, after = predictions(model, examples), predictions(bundle.model, examples)
    for task in before:
        assert torch.equal(before[task], after[task]), task
    assert bundle.meta.item_ids == meta.item_ids and bundle.cfg == cfg
    assert bundle.fusion_scales == measured and set(measured) == {t.name for t in meta.tasks}
    if mode == "frozen":
        assert torch.equal(bundle.item_vectors, vectors[0]) and torch.equal(bundle.context_vectors, vectors[1])
    assert json.loads((path / MANIFEST).read_text())["version"] == BUNDLE_VERSION
    files = [MANIFEST, META, WEIGHTS, OUTPUT_MARKER] + [VECTORS] * (mode == "frozen")
    assert sorted(p.name for p in path.iterdir()) == sorted(files)  # the catalog lives in meta.json alone


def test_finetune_bundle_carries_the_trained_encoder_and_its_item_vectors(tmp_path, examples):
    from test_models import tiny_encoder

    cfg = config("finetune")
    cfg.encoder.finetune_layers = 1
    model = trained(cfg, examples, encoder=tiny_encoder(tmp_path))
    path = save_bundle(tmp_path / "b", cfg, examples.meta, model, scales(model, examples))
    skeleton = tiny_encoder(tmp_path)
    torch.nn.init.normal_(skeleton.model.embeddings.word_embeddings.weight)  # weights must come from the bundle
    bundle = load_bundle(path, encoder=skeleton)
    before, after = predictions(model, examples), predictions(bundle.model, examples)
    assert all(torch.equal(before[t], after[t]) for t in before)
    assert bundle.item_vectors.shape == (examples.meta.num_items + 1, skeleton.dim)
    torch.testing.assert_close(bundle.item_vectors, model.item_tower.text.table(model.encoder))


@pytest.fixture
def saved(tmp_path, examples):
    cfg, meta = config("frozen"), examples.meta
    vectors = table(meta.num_items + 1, 0), table(len(meta.contexts) + 1, 1)
    model = trained(cfg, examples, *vectors)
    return save_bundle(tmp_path / "b", cfg, meta, model, scales(model, examples), *vectors)


@pytest.mark.parametrize("name", [WEIGHTS, VECTORS, META])
def test_a_changed_byte_is_a_bundle_error_naming_the_file(saved, name):
    data = bytearray((saved / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (saved / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name}: checksum mismatch"):
        load_bundle(saved)


@pytest.mark.parametrize("name", [WEIGHTS, META, MANIFEST])
def test_a_missing_file_is_a_bundle_error_naming_it(saved, name):
    (saved / name).unlink()
    with pytest.raises(BundleError, match=f"{name}: file is missing"):
        load_bundle(saved)


def test_other_versions_and_mismatched_weights_are_refused(saved, examples):
    manifest = json.loads((saved / MANIFEST).read_text())
    (saved / MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(BundleError, match="version 99"):
        load_bundle(saved)
    (saved / MANIFEST).write_text(json.dumps({**manifest, "version": 1}))  # items.json, no fusion scales
    with pytest.raises(BundleError, match=f"version 1; this code reads 'mtrec-bundle' version {BUNDLE_VERSION}"):
        Catalog.load(saved)
    (saved / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match=f"{MANIFEST}: not valid JSON"):
        load_bundle(saved)
    manifest["config"]["model"]["expert_dim"] = 8  # weights no longer fit the model the config builds
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"{WEIGHTS}: does not fit"):
        load_bundle(saved)


def test_fusion_scales_must_cover_every_task_with_a_positive_number(saved, examples, tmp_path):
    manifest = json.loads((saved / MANIFEST).read_text())
    task = examples.meta.tasks[-1].name
    (saved / MANIFEST).write_text(json.dumps({**manifest, "fusion_scales": {**manifest["fusion_scales"], task: 0}}))
    with pytest.raises(BundleError, match=f"{MANIFEST}: fusion_scales: task '{task}' has scale 0"):
        load_bundle(saved)
    del manifest["fusion_scales"][task]
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"task '{task}' has scale None"):
        Catalog.load(saved)
    cfg = config("none")
    model = trained(cfg, examples)
    with pytest.raises(BundleError, match=f"fusion_scales: task '{task}' has scale nan"):
        save_bundle(tmp_path / "c", cfg, examples.meta, model, {**scales(model, examples), task: float("nan")})
    assert not (tmp_path / "c").exists()


def lora_config(model_dir) -> Config:
    cfg = config("finetune").override(
        [
            f"encoder.name={model_dir}",
            "encoder.finetune=lora",
            "encoder.finetune_layers=2",
            "encoder.lora_rank=2",
            "encoder.pooling=last",
            "encoder.max_length=24",
            "train.encoder_lr=0.05",  # adapters that really move in five steps
        ]
    )
    return cfg


def test_lora_bundle_holds_only_adapters_and_rebuilds_base_plus_adapters(tmp_path, examples):
    from test_encoders import llama_dir

    from mtrec.encoders import TextEncoder

    texts = examples.meta.item_texts + examples.meta.contexts
    cfg = lora_config(llama_dir(tmp_path / "base", texts))
    model = trained(cfg, examples, encoder=TextEncoder.from_config(cfg.encoder))
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)
    path = save_bundle(tmp_path / "b", cfg, examples.meta, model, scales(model, examples))

    saved = load_file(path / WEIGHTS)
    encoder_keys = {k for k in saved if k.startswith("encoder.")}
    assert encoder_keys and all("lora_" in k for k in encoder_keys)  # adapters, not the base
    assert set(saved) - encoder_keys == {k for k in model.state_dict() if not k.startswith("encoder.")}
    base = json.loads((path / MANIFEST).read_text())["encoder_base"]
    assert base["sha256"] == model.encoder.base_digest() and base["revision"] == "main"

    bundle = load_bundle(path)  # the base loaded by name again, the adapters from the bundle
    before, after = predictions(model, examples), predictions(bundle.model, examples)
    assert all(torch.equal(before[t], after[t]) for t in before)
    assert bundle.model.encoder.lora == model.encoder.lora
    torch.testing.assert_close(bundle.item_vectors, model.item_tower.text.table(model.encoder))

    llama_dir(tmp_path / "base", texts, seed=1)  # another base model under the same name
    with pytest.raises(BundleError, match="adapters were trained on base model"):
        load_bundle(path)


def test_lora_bundle_without_its_base_record_is_refused(tmp_path, examples):
    from test_encoders import llama_dir

    from mtrec.encoders import TextEncoder

    cfg = lora_config(llama_dir(tmp_path / "base", examples.meta.item_texts + examples.meta.contexts))
    model = trained(cfg, examples, encoder=TextEncoder.from_config(cfg.encoder))
    path = save_bundle(tmp_path / "b", cfg, examples.meta, model, scales(model, examples))
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest["encoder_base"]
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="needs 'encoder_base'"):
        load_bundle(path)


def test_lora_training_checkpoints_hold_only_adapters_and_restore_the_model(tmp_path, examples):
    from test_encoders import llama_dir

    from mtrec.encoders import TextEncoder
    from mtrec.models import build_model
    from mtrec.weighting import build_weighting
    from mtrec_train.checkpoint import MODEL, TrainState, load_checkpoint, save_checkpoint

    cfg = lora_config(llama_dir(tmp_path / "base", examples.meta.item_texts + examples.meta.contexts))
    model = trained(cfg, examples, encoder=TextEncoder.from_config(cfg.encoder))
    weighting = build_weighting("static", cfg.tasks or examples.meta.tasks)
    (tmp_path / "ckpt").mkdir()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    save_checkpoint(tmp_path / "ckpt", cfg, model, weighting, optimizer, TrainState(epoch=1))
    saved = load_file(tmp_path / "ckpt" / MODEL)
    assert all("lora_" in k for k in saved if k.startswith("encoder."))  # no frozen base weights

    fresh = build_model(cfg, examples.meta, encoder=TextEncoder.from_config(cfg.encoder))
    state = load_checkpoint(tmp_path / "ckpt", cfg, fresh, weighting, None)
    assert state.epoch == 1
    before, after = predictions(model, examples), predictions(fresh.eval(), examples)
    assert all(torch.equal(before[t], after[t]) for t in before)
