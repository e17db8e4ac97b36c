"""Multi-task models on a tiny config: every architecture over random task mixes (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertConfig, BertModel, BertTokenizerFast

from mtrec.config import Config, TaskSpec
from mtrec.errors import ConfigError
from mtrec.features import FeatureMeta, Vocab
from mtrec.models import ARCHITECTURES, build_model, task_losses
from mtrec.models.losses import full_space_labels

NUM_ITEMS, NUM_USERS, HISTORY, TEXT_DIM = 30, 20, 6, 24


def tiny_config(arch: str = "mmoe", history: str = "din", mode: str = "frozen") -> Config:
    cfg = Config()
    cfg.encoder.mode = mode
    cfg.encoder.max_length = 12
    m = cfg.model
    m.arch, m.history = arch, history
    m.id_dim, m.id_buckets, m.proj_dim, m.expert_dim, m.tower_dim = 8, 7, 16, 16, 8
    m.num_experts, m.specific_experts, m.ple_levels, m.dropout = 3, 2, 2, 0.0
    cfg.data.max_history = HISTORY
    return cfg


def tiny_meta(tasks: list[TaskSpec], contexts: int = 4) -> FeatureMeta:
    """A meta like prepare_examples writes, for 30 items (two side columns) and 20 users."""
    rng = np.random.default_rng(0)
    return FeatureMeta(
        tasks=tasks,
        users=Vocab(list(range(NUM_USERS)), buckets=7),
        items=Vocab(list(range(NUM_ITEMS - 5)), buckets=7),  # the last 5 items are cold
        item_ids=list(range(NUM_ITEMS)),
        contexts=[f"query {i}" for i in range(contexts)],
        user_cat={"age": Vocab(["young", "old"])},
        user_num={"spend": (0.0, 1.0)},
        inter_num={"position": (0.0, 1.0), "sponsored": (0.0, 1.0)},
        item_cat={"category": Vocab(["a", "b", "c"])},
        item_num={"price": (0.0, 1.0)},
        label_stats={t.name: (3.0, 2.0) for t in tasks if t.kind == "regression"},
        max_history=HISTORY,
        history_task=next((t.name for t in tasks if t.kind == "binary"), None),
        counts={"train": 1, "valid": 1, "test": 1},
        item_texts=[f"item number {i}" for i in range(NUM_ITEMS)],
        item_cat_values=np.concatenate([[[0]], rng.integers(1, 4, (NUM_ITEMS, 1))]),
        item_num_values=np.concatenate([[[0.0]], rng.normal(size=(NUM_ITEMS, 1))]).astype(np.float32),
    )


def tiny_batch(meta: FeatureMeta, b: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, NUM_ITEMS + 1, (b, HISTORY), generator=g)
    lengths = torch.randint(0, HISTORY + 1, (b, 1), generator=g)
    history[torch.arange(HISTORY) < HISTORY - lengths] = 0  # left padding, some rows empty
    labels = torch.empty(b, len(meta.tasks))
    for j, t in enumerate(meta.tasks):
        labels[:, j] = (
            (torch.rand(b, generator=g) < 0.4).float() if t.kind == "binary" else torch.randn(b, generator=g) * 2 + 3
        )
    labels[torch.rand(b, len(meta.tasks), generator=g) < 0.3] = float("nan")
    return {
        "user": torch.randint(1, meta.users.num_rows, (b,), generator=g),
        "item": torch.randint(1, NUM_ITEMS + 1, (b,), generator=g),
        "history": history,
        "context": torch.randint(0, len(meta.contexts) + 1, (b,), generator=g),
        "user_cat": torch.randint(0, 3, (b, 1), generator=g),
        "user_num": torch.randn(b, 1, generator=g),
        "inter_num": torch.randn(b, 2, generator=g),
        "labels": labels,
        "cold": torch.rand(b, generator=g) < 0.2,
    }


def vectors(rows: int, seed: int = 0) -> torch.Tensor:
    v = torch.randn(rows, TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    v[0] = 0
    return v


def frozen_model(cfg: Config, meta: FeatureMeta):
    return build_model(cfg, meta, vectors(NUM_ITEMS + 1), None, vectors(len(meta.contexts) + 1, seed=1))


@st.composite
def task_mixes(draw) -> list[TaskSpec]:
    """1-5 tasks, binary or regression; binary tasks may depend on an earlier binary task (chains)."""
    n = draw(st.integers(1, 5))
    tasks: list[TaskSpec] = []
    for i in range(n):
        kind = draw(st.sampled_from(["binary", "regression"]))
        parents = [t.name for t in tasks if t.kind == "binary"]
        dep = draw(st.sampled_from([None, *parents])) if kind == "binary" and parents else None
        tasks.append(TaskSpec(f"t{i}", kind, depends_on=dep))
    return tasks


@settings(max_examples=30, deadline=None)
@given(
    tasks=task_mixes(),
    arch=st.sampled_from(sorted(ARCHITECTURES)),
    history=st.sampled_from(["din", "transformer", "mean", "none"]),
    mode=st.sampled_from(["frozen", "none"]),
)
def test_shapes_finite_losses_esmm_and_gates(tasks, arch, history, mode):
    torch.manual_seed(0)
    cfg, meta = tiny_config(arch, history, mode), tiny_meta(tasks)
    model = frozen_model(cfg, meta)
    batch = tiny_batch(meta)
    preds = model(batch)
    assert list(preds) == [t.name for t in tasks]
    for t in tasks:
        p = preds[t.name]
        assert p.shape == (16,) and torch.isfinite(p).all()
        if t.kind == "binary":
            assert ((p >= 0) & (p <= 1)).all()
        if t.depends_on is not None:  # ESMM: p(child) = p(parent) * p(child | parent) <= p(parent)
            assert (p <= preds[t.depends_on]).all()
    losses, observed = task_losses(preds, batch["labels"], tasks, model.loss_scales)
    assert losses.shape == (len(tasks),) and torch.isfinite(losses).all()
    assert observed.tolist() == (~torch.isnan(full_space_labels(batch["labels"], tasks))).any(0).tolist()
    losses.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    expected_width = {"shared_bottom": None, "mmoe": 3, "ple": 2 + 3}[arch]
    if expected_width is None:
        assert model.gates == {}
    else:
        assert set(model.gates) == {t.name for t in tasks}
        for g in model.gates.values():
            assert g.shape == (16, expected_width)
            torch.testing.assert_close(g.sum(-1), torch.ones(16))


def test_esmm_chain_is_the_product_of_conditionals():
    tasks = [TaskSpec("click"), TaskSpec("cart", depends_on="click"), TaskSpec("buy", depends_on="cart")]
    meta = tiny_meta(tasks)
    model = frozen_model(tiny_config("ple"), meta).eval()
    batch = tiny_batch(meta)
    preds = model(batch)
    reps = model.arch(model_features(model, batch))
    conditional = {t: torch.sigmoid(model.heads[t](reps[t]).squeeze(-1)) for t in ("click", "cart", "buy")}
    torch.testing.assert_close(preds["buy"], conditional["click"] * conditional["cart"] * conditional["buy"])
    torch.testing.assert_close(preds["cart"], conditional["click"] * conditional["cart"])


def model_features(model, batch):
    """The features the architecture reads, recomputed outside forward (same code path)."""
    item = torch.cat([batch["item"].unsqueeze(1), batch["history"]], 1)
    vec = model.item_tower(item)
    user = model.user_tower(
        batch["user"], batch["user_cat"], batch["user_num"], vec[:, 1:], batch["history"] > 0, vec[:, 0]
    )
    ctx = model.context_proj(model.context_text(batch["context"]))
    return torch.cat([user, vec[:, 0], user * vec[:, 0], ctx, batch["inter_num"]], -1)


def test_task_losses_mask_unobserved_labels_and_fill_the_full_space():
    tasks = [TaskSpec("click"), TaskSpec("buy", depends_on="click"), TaskSpec("rating", "regression")]
    nan = float("nan")
    labels = torch.tensor([[1.0, 1.0, 4.0], [0.0, nan, nan], [1.0, nan, 2.0], [nan, nan, nan]])
    preds = {
        "click": torch.tensor([0.9, 0.2, 0.6, 0.5]),
        "buy": torch.tensor([0.5, 0.1, 0.3, 0.2]),
        "rating": torch.tensor([3.0, 9.0, 3.0, 9.0]),
    }
    losses, observed = task_losses(preds, labels, tasks, torch.tensor([1.0, 1.0, 2.0]))
    click = -(np.log(0.9) + np.log(0.8) + np.log(0.6)) / 3
    buy = -(np.log(0.5) + np.log(0.9)) / 2  # row 1: click = 0 makes buy = 0; rows 2, 3 stay unobserved
    rating = ((3 - 4) ** 2 + (3 - 2) ** 2) / 2 / 2**2
    torch.testing.assert_close(losses, torch.tensor([click, buy, rating], dtype=torch.float32))
    assert observed.tolist() == [True, True, True]
    losses, observed = task_losses(preds, torch.full((4, 3), nan), tasks)
    assert observed.tolist() == [False] * 3 and losses.tolist() == [0.0] * 3


def test_id_only_model_has_no_text_and_shared_parameters_exclude_heads_and_gates():
    tasks = [TaskSpec("click"), TaskSpec("like")]
    meta = tiny_meta(tasks)
    model = build_model(tiny_config("mmoe", mode="none"), meta)
    assert model.item_tower.text is None and model.context_text is None
    assert model(tiny_batch(meta))["click"].shape == (16,)
    shared = {id(p) for p in model.shared_parameters()}
    assert shared and not shared & {id(p) for p in model.heads.parameters()}
    assert not shared & {id(p) for p in model.arch.gate.parameters()}
    assert {id(p) for p in model.arch.experts.parameters()} <= shared


def test_frozen_mode_needs_vector_tables_of_the_catalog_size():
    cfg, meta = tiny_config(), tiny_meta([TaskSpec("click")])
    with pytest.raises(ConfigError, match="item_vectors"):
        build_model(cfg, meta, None)
    with pytest.raises(ConfigError, match=r"\(31, D\)"):
        build_model(cfg, meta, vectors(10), None, vectors(5))


def test_cold_and_unseen_ids_get_hashed_rows_inside_the_table():
    meta = tiny_meta([TaskSpec("click")])
    rows = meta.item_id_rows()
    assert rows[0] == 0 and (rows[1:26] == np.arange(1, 26)).all()
    assert ((rows[26:] > 25) & (rows[26:] < meta.items.num_rows)).all()
    model = frozen_model(tiny_config(), meta)
    assert model.item_tower.id_emb.num_embeddings == meta.items.num_rows


def tiny_encoder(tmp_path):
    from mtrec.encoders import TextEncoder

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "item", "number", "query", *map(str, range(40))]
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=len(words),
            hidden_size=TEXT_DIM,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    return TextEncoder(bert, tokenizer, max_length=12)


def test_finetune_mode_trains_the_top_layers_on_unique_items(tmp_path, monkeypatch):
    tasks = [TaskSpec("click"), TaskSpec("buy", depends_on="click")]
    cfg, meta = tiny_config("ple", mode="finetune"), tiny_meta(tasks)
    cfg.encoder.finetune_layers = 1
    encoder = tiny_encoder(tmp_path)
    model = build_model(cfg, meta, None, encoder)
    batch = tiny_batch(meta)
    seen: list[int] = []
    forward = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda ids, mask: seen.append(len(ids)) or forward(ids, mask))
    preds = model(batch)
    items = torch.cat([batch["item"], batch["history"].flatten()])
    assert seen == [len(torch.unique(items[items > 0])), len(torch.unique(batch["context"][batch["context"] > 0]))]
    losses, _ = task_losses(preds, batch["labels"], tasks)
    losses.sum().backward()
    trained = {n for n, p in encoder.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("layer.1." in n for n in trained)
    assert {id(p) for p in model.encoder_parameters()} == {id(p) for p in encoder.parameters() if p.requires_grad}


def test_optimizer_gives_the_encoder_its_own_learning_rate(tmp_path):
    from mtrec.engine import make_optimizer
    from mtrec.weighting import build_weighting

    tasks = [TaskSpec("click")]
    cfg = tiny_config(mode="finetune")
    cfg.train.lr, cfg.train.encoder_lr = 1e-3, 1e-5
    model = build_model(cfg, tiny_meta(tasks), None, tiny_encoder(tmp_path))
    weighting = build_weighting("uncertainty", tasks)
    groups = make_optimizer(model, weighting, cfg).param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-5, 1e-3]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.encoder_parameters()}
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in weighting.parameters()}
    in_groups = sum(len(g["params"]) for g in groups[:2])
    assert in_groups == sum(1 for p in model.parameters() if p.requires_grad)


def test_id_dropout_zeroes_a_share_of_id_rows_in_training_only():
    from mtrec.models.towers import drop_ids

    torch.manual_seed(0)
    vectors = torch.randn(4000, 8) + 5.0  # no row is zero by chance
    dropped = drop_ids(vectors, 0.25, training=True)
    zero = (dropped == 0).all(dim=1)
    assert abs(zero.float().mean().item() - 0.25) < 0.03
    assert torch.equal(dropped[~zero], vectors[~zero])  # the kept rows are untouched
    assert torch.equal(drop_ids(vectors, 0.25, training=False), vectors)
    assert torch.equal(drop_ids(vectors, 0.0, training=True), vectors)
