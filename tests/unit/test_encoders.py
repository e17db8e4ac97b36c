"""Text encoders on tiny random BERT, GPT-2 and Llama models with tokenizers built here (no weights)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
)

from mtrec.config import Config, EncoderConfig
from mtrec.encoders import (
    ENCODERS,
    RecentVectors,
    TextEncoder,
    VectorStore,
    apply_lora,
    clean_text,
    clean_texts,
    encode_cached,
    load_lora_state_dict,
    lora_state_dict,
    pool,
    resolve_model_path,
)
from mtrec.encoders.cache import MAX_SHARDS
from mtrec.errors import BundleError, ConfigError, DataError

WORDS = (
    "a the space ship crew alien planet war robot star galaxy cook book recipe bread soup garden "
    "item summary in one word : . , love story night city old new red blue green fast slow"
).split()
TEXTS = [
    "space ship crew",
    "the alien planet war robot star galaxy",
    "cook book",
    "a red soup recipe in one old city night",
    "robot",
]


def word_tokenizer(decoder: bool, words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """Whitespace WordLevel tokenizer over ``words``; BERT-style [CLS] x [SEP], or a decoder's bare
    tokens with an EOS and no pad token."""
    specials = ["<unk>", "</s>", "<s>"] if decoder else ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0] if decoder else "[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if decoder:
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", bos_token="<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


VOCAB = len(WORDS) + 4


def tiny(arch: str, **over) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    torch.manual_seed(0)
    if arch == "bert":
        cfg = BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **over
        )
        return BertModel(cfg).eval(), word_tokenizer(decoder=False)
    if arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=2, eos_token_id=1, **over
        )
        return GPT2Model(cfg).eval(), word_tokenizer(decoder=True)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **over,
    )
    return LlamaModel(cfg).eval(), word_tokenizer(decoder=True)


def llama_dir(path: Path, texts: list[str], seed: int = 0) -> Path:
    """A tiny random Llama (3 layers) and a word tokenizer over the words of ``texts``, saved as a
    local model folder that ``encoder.name`` can point at."""
    words = sorted({w for t in texts for w in t.split()})
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(words) + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaModel(cfg).save_pretrained(path)
    word_tokenizer(decoder=True, words=words).save_pretrained(path)
    return path


def encoder(arch: str, pooling: str = "mean", **kw) -> TextEncoder:
    model, tok = tiny(arch)
    return TextEncoder(model, tok, pooling=pooling, max_length=kw.pop("max_length", 16), **kw)


# ---------------------------------------------------------------------------------- text cleaning


def test_clean_text_normalises_strips_and_caps():
    assert clean_text("ﬁne  ＡＢＣ\t\n x\x00y\u200b z ") == "fine ABC xy z"
    assert clean_text("word " * 10, max_chars=12) == "word word wo"
    assert clean_text("\x07 \u200b\n") == ""


def test_clean_texts_names_bad_rows():
    with pytest.raises(DataError) as e:
        clean_texts(["ok", " \x00 ", "fine", None])
    msg = str(e.value)
    assert "texts[1] is empty" in msg and "texts[3] is NoneType" in msg and "texts[0]" not in msg


def test_prompt_must_hold_text_once():
    model, tok = tiny("bert")
    for bad in ("no placeholder", "{text} and {text}"):
        with pytest.raises(ConfigError, match="exactly once"):
            TextEncoder(model, tok, prompt=bad)


# ---------------------------------------------------------------------------------- pooling


def test_pool_reads_the_mask_on_either_side():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert pool(h, right, "last").squeeze(1).tolist() == [2.0, 5.0]
    assert pool(h, left, "last").squeeze(1).tolist() == [3.0, 7.0]
    assert pool(h, right, "cls").squeeze(1).tolist() == [0.0, 4.0]
    assert pool(h, left, "cls").squeeze(1).tolist() == [1.0, 6.0]
    assert pool(h, right, "mean").squeeze(1).tolist() == [1.0, 4.5]
    assert pool(h, left, "mean").squeeze(1).tolist() == [2.0, 6.5]


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_encode_shapes_and_order(arch):
    enc = encoder(arch)
    out = enc.encode(TEXTS, batch_size=2)
    assert out.shape == (len(TEXTS), 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    singles = torch.cat([enc.encode([t]) for t in TEXTS])
    torch.testing.assert_close(out, singles, atol=1e-5, rtol=1e-5)
    assert enc.encode([]).shape == (0, 32)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_layers_concatenate_pooled_hidden_states(arch):
    """encoder.layers: each listed hidden state pooled, side by side; [-1] is the plain last layer."""
    last, several = encoder(arch), encoder(arch, layers=[-1, 0, 1])
    several.load_state_dict(last.state_dict())
    out = several.encode(TEXTS)
    assert several.dim == 3 * last.dim == out.shape[1]
    torch.testing.assert_close(out[:, : last.dim], last.encode(TEXTS))
    batch = last.pad(last.token_ids(TEXTS))
    with torch.no_grad():
        hidden = last.model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"]
    torch.testing.assert_close(out[:, last.dim : 2 * last.dim], pool(hidden[0], mask, "mean"))
    torch.testing.assert_close(out[:, 2 * last.dim :], pool(hidden[1], mask, "mean"))
    assert several.fingerprint() != last.fingerprint()  # other vectors: other cache entries


@pytest.mark.parametrize("layers", [[], [3], [-4], [-1, 2]])
def test_layers_outside_the_model_or_repeated_are_named(layers):
    with pytest.raises(ConfigError, match=r"encoder.layers .*this model has 2 layers"):
        encoder("bert", layers=layers)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_decoder_pooling_equals_unpadded_on_either_padding_side(arch, pooling):
    enc = encoder(arch, pooling=pooling)
    assert enc.tokenizer.pad_token == "</s>" and enc.tokenizer.padding_side == "right"
    ids = enc.token_ids(TEXTS)
    with torch.no_grad():
        singles = torch.cat([enc(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in ids])
        width = max(map(len, ids))
        pad_id = enc.tokenizer.pad_token_id
        for side in ("right", "left"):
            rows = [
                r + [pad_id] * (width - len(r)) if side == "right" else [pad_id] * (width - len(r)) + r for r in ids
            ]
            masks = [
                [int(j < len(r)) if side == "right" else int(j >= width - len(r)) for j in range(width)] for r in ids
            ]
            batch = enc(torch.tensor(rows), torch.tensor(masks))
            torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5, msg=side)
    # the last token really differs from the mean and from the first token
    assert not torch.allclose(singles, encoder(arch, pooling="cls").encode(TEXTS), atol=1e-3)


def test_mean_pooling_ignores_padding_and_differs_from_cls():
    enc = encoder("bert", pooling="mean")
    batch = enc.tokenize(TEXTS)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        padded = enc(**batch)
        hidden = enc.model(**batch).last_hidden_state
    torch.testing.assert_close(padded, torch.cat([enc.encode([t]) for t in TEXTS]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(padded, hidden.mean(1), atol=1e-4)  # a plain mean would count the pads
    torch.testing.assert_close(encoder("bert", pooling="cls").encode(TEXTS), hidden[:, 0])


def test_encode_is_deterministic_even_from_train_mode():
    model, tok = tiny("bert", hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    enc = TextEncoder(model, tok).train()
    a, b = enc.encode(TEXTS), enc.encode(TEXTS)
    assert torch.equal(a, b) and enc.training  # eval while encoding, training mode restored after
    assert not a.requires_grad


def test_long_text_keeps_prompt_closing_phrase():
    enc = encoder("llama", pooling="last", prompt="item : {text} . summary in one word :", max_length=12)
    (ids,) = enc.token_ids(["space ship crew " * 20])
    words = enc.tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) == 12 and words[:2] == ["item", ":"] and words[-6:] == [".", "summary", "in", "one", "word", ":"]
    bert = encoder("bert", prompt="item : {text} .", max_length=8)
    (ids,) = bert.token_ids(["space ship crew " * 20])
    assert bert.tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "item", ":", "space", "ship", "crew", ".", "[SEP]"]
    with pytest.raises(ConfigError, match="no room"):
        encoder("bert", prompt="item summary in one word : {text}", max_length=6)


def test_progress_line(capsys):
    encoder("bert").encode(TEXTS, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "encode 5/5 texts" in err and "texts/s" in err and err.endswith("\n")


# ---------------------------------------------------------------------------------- cache


class Counting:
    """Counts the texts a TextEncoder really encodes."""

    def __init__(self, enc: TextEncoder, monkeypatch):
        self.calls: list[list[str]] = []
        real = enc.encode

        def spy(texts, **kw):
            self.calls.append(list(texts))
            return real(texts, **kw)

        monkeypatch.setattr(enc, "encode", spy)


def test_encode_cached_reencodes_only_changed_texts(tmp_path, monkeypatch):
    enc = encoder("bert")
    spy = Counting(enc, monkeypatch)
    first = encode_cached(enc, TEXTS + [TEXTS[0]], tmp_path)
    assert first.dtype == np.float32 and first.shape == (6, 32)
    assert spy.calls == [TEXTS]  # the duplicate is encoded once
    np.testing.assert_array_equal(first[5], first[0])

    again = encode_cached(enc, list(reversed(TEXTS)), tmp_path)
    assert len(spy.calls) == 1  # all hits, nothing encoded
    np.testing.assert_array_equal(again, first[:5][::-1])

    changed = TEXTS[:3] + ["new blue garden", "robot  \u200b"]  # the last one cleans to a cached text
    out = encode_cached(enc, changed, tmp_path)
    assert spy.calls[-1] == ["new blue garden"]
    np.testing.assert_array_equal(out[[0, 1, 2, 4]], first[[0, 1, 2, 4]])

    enc.pooling = "cls"  # other settings, other vectors: nothing is reused
    encode_cached(enc, TEXTS, tmp_path)
    assert spy.calls[-1] == TEXTS and len(spy.calls) == 3
    enc.pooling = "mean"
    np.testing.assert_allclose(first[:5], enc.encode(TEXTS).numpy(), atol=1e-6)


def test_encode_cached_default_dir_is_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    enc = encoder("bert")
    np.testing.assert_array_equal(encode_cached(enc, TEXTS, None), encode_cached(enc, TEXTS, ""))
    (shard_dir,) = (tmp_path / "mtrec" / "vectors").iterdir()
    assert shard_dir.name.startswith("bert_local-") and len(list(shard_dir.glob("shard-*.npz"))) == 1


def test_encode_cached_through_recent_vectors_is_an_lru_over_cleaned_texts(monkeypatch):
    enc = encoder("bert")
    spy = Counting(enc, monkeypatch)
    cache = RecentVectors(capacity=2)
    out = encode_cached(enc, ["robot", "robot \t\u200b", "cook book"], cache)  # the first two clean alike
    assert spy.calls == [["robot", "cook book"]]
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_allclose(out, enc.encode(["robot", "robot", "cook book"]).numpy(), atol=1e-6)
    encode_cached(enc, ["cook book"], cache)  # a hit: "cook book" becomes the most recent
    encode_cached(enc, ["space ship crew"], cache)  # evicts "robot", the least recent
    assert spy.calls[-1] == ["space ship crew"] and len(cache) == 2
    encode_cached(enc, ["robot", "cook book"], cache)
    assert spy.calls[-1] == ["robot"] and cache.hits == 2 and cache.misses == 4
    with pytest.raises(ValueError, match="capacity -1"):
        RecentVectors(capacity=-1)


def test_encode_cached_misses_after_weights_change(tmp_path, monkeypatch):
    enc = encoder("bert")
    spy = Counting(enc, monkeypatch)
    encode_cached(enc, TEXTS, tmp_path)
    with torch.no_grad():
        enc.model.encoder.layer[1].output.dense.weight.add_(0.1)
    encode_cached(enc, TEXTS, tmp_path)
    assert len(spy.calls) == 2


def test_vector_store_concurrent_writers_and_merge(tmp_path):
    store = VectorStore(tmp_path, dim=4)
    rng = np.random.default_rng(0)
    expected = {i.to_bytes(32, "big"): rng.standard_normal(4).astype(np.float32) for i in range(96)}
    items = list(expected.items())

    def writer(part: int) -> None:
        for j in range(part, len(items), 16):  # 6 writes of one vector each, per thread
            store.put([items[j][0]], items[j][1][None])

    threads = [threading.Thread(target=writer, args=(p,)) for p in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = store.get(set(expected))
    assert len(got) == len(expected)
    assert all(np.array_equal(got[k], v) for k, v in expected.items())
    shards = list(tmp_path.glob("shard-*.npz"))
    assert len(shards) <= MAX_SHARDS + 16 and not list(tmp_path.glob(".*.tmp-*"))  # merged as they piled up
    (tmp_path / "shard-broken.npz").write_bytes(b"not a zip")
    assert len(store.get(set(expected))) == len(expected)


# ---------------------------------------------------------------------------------- fine-tuning


def trainable(enc: TextEncoder) -> set[str]:
    return {n for n, p in enc.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("arch", "top", "final_norm"),
    [("bert", "encoder.layer.1.", None), ("gpt2", "h.1.", "ln_f."), ("llama", "layers.1.", "norm.")],
)
def test_set_trainable_top_layers(arch, top, final_norm):
    enc = encoder(arch)
    enc.set_trainable_top_layers(0)
    assert trainable(enc) == set()
    enc.set_trainable_top_layers(1)
    names = trainable(enc)
    expected = {
        n for n, _ in enc.model.named_parameters() if n.startswith(top) or (final_norm and n.startswith(final_norm))
    }
    assert names == expected and any(n.startswith(top) for n in names)
    enc.set_trainable_top_layers(2)
    assert not any("emb" in n or "wte" in n or "wpe" in n for n in trainable(enc))
    assert len(trainable(enc)) > len(names)
    with pytest.raises(ConfigError, match="between 0 and 2"):
        enc.set_trainable_top_layers(3)


def test_lora_trains_only_adapters_and_round_trips(tmp_path):
    enc = apply_lora(encoder("llama", pooling="last"), r=2, alpha=4, top_layers=1)
    names = trainable(enc)
    assert names and all("lora_" in n for n in names)
    assert all(n.startswith("layers.1.self_attn.") and (".q_proj." in n or ".v_proj." in n) for n in names)
    before = {n: p.detach().clone() for n, p in enc.model.named_parameters()}
    opt = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=0.5)
    enc.train()
    loss = enc(**enc.tokenize(TEXTS)).pow(2).sum()
    loss.backward()
    opt.step()
    changed = {n for n, p in enc.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names and any("lora_B" in n for n in changed)

    save_file(lora_state_dict(enc), tmp_path / "lora.safetensors")
    fresh = apply_lora(encoder("llama", pooling="last"), **{k: v for k, v in enc.lora.items() if k != "target"})
    assert not torch.allclose(fresh.encode(TEXTS), enc.encode(TEXTS))
    load_lora_state_dict(fresh, load_file(tmp_path / "lora.safetensors"))
    torch.testing.assert_close(fresh.encode(TEXTS), enc.encode(TEXTS))

    with pytest.raises(BundleError, match="do not match"):
        load_lora_state_dict(apply_lora(encoder("llama"), r=2, top_layers=2), lora_state_dict(enc))
    with pytest.raises(ConfigError, match="no such module"):
        apply_lora(encoder("bert"), target=("q_proj",), top_layers=1)


# ---------------------------------------------------------------------------------- loading


def test_from_config_loads_a_local_path(tmp_path):
    model, tok = tiny("gpt2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = EncoderConfig(name=str(tmp_path / "m"), pooling="last", max_length=16, mode="frozen")
    enc = TextEncoder.from_config(cfg)
    assert enc.dim == 32 and enc.model_id == f"{tmp_path / 'm'}@main" and trainable(enc) == set()
    torch.testing.assert_close(enc.encode(TEXTS), TextEncoder(model, tok, "last", 16).encode(TEXTS))
    tuned = TextEncoder.from_config(EncoderConfig(name=str(tmp_path / "m"), mode="finetune", finetune_layers=1))
    assert trainable(tuned) and all(n.startswith(("h.1.", "ln_f.")) for n in trainable(tuned))
    with pytest.raises(ConfigError, match="ID-only"):
        TextEncoder.from_config(EncoderConfig(name=str(tmp_path / "m"), mode="none"))


def test_unknown_names_fail_fast_and_list_the_registry(tmp_path):
    assert set(ENCODERS) >= {"minilm", "smollm2"}
    with pytest.raises(ConfigError, match="minilm, smollm2"):
        resolve_model_path(str(tmp_path / "missing"))


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_an_uncached_hub_name_offline_is_a_clean_error_without_network(monkeypatch, variable):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(ConfigError) as e:
        TextEncoder.from_config(EncoderConfig(name="nobody-here/no-such-model-xyz"))
    assert str(e.value) == (
        "encoder.name 'nobody-here/no-such-model-xyz' (revision 'main'): not in the local Hugging Face cache, "
        "and HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) forbids downloading it; run once without it to fetch "
        "the model, or pass a local path"
    )


def test_the_packaged_model_and_local_paths_never_reach_the_hub(monkeypatch, tmp_path):
    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_hub)
    assert Path(resolve_model_path("minilm"), "config.json").exists()
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


# ---------------------------------------------------------------------------------- fine-tuning from the config


def lora_config(**kw) -> EncoderConfig:
    return EncoderConfig(**{"mode": "finetune", "finetune": "lora", "finetune_layers": 1, "lora_rank": 2, **kw})


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"lora_rank": 0}, "encoder.lora_rank=0: must be at least 1"),
        ({"lora_alpha": 0.0}, "encoder.lora_alpha=0.0: must be positive"),
        ({"lora_dropout": 1.0}, r"encoder.lora_dropout=1.0: must be in \[0, 1\)"),
        ({"lora_targets": ["self_attn.q_proj"]}, "module names without dots"),
        ({"finetune_layers": 0}, "at least 1 with encoder.finetune=lora"),
        ({"max_length": 1}, "encoder.max_length=1"),
    ],
)
def test_encoder_config_rejects_bad_lora_settings(kw, message):
    with pytest.raises(ConfigError, match=message):
        lora_config(**kw)
    with pytest.raises(ConfigError, match=message):  # the same through overrides
        Config().override(
            ["encoder.mode=finetune", "encoder.finetune=lora", "encoder.finetune_layers=1"]
            + [f"encoder.{k}={v}" for k, v in kw.items()]
        )
    assert lora_config(finetune_layers=0, mode="frozen").finetune_layers == 0  # only finetune mode needs layers


@pytest.mark.parametrize(
    ("arch", "stack", "targets"),
    [
        ("bert", "encoder.layer.", ("query", "value")),
        ("gpt2", "h.", ("c_attn",)),
        ("llama", "layers.", ("q_proj", "v_proj")),
    ],
)
def test_prepare_finetuning_puts_default_adapters_on_the_top_layers(arch, stack, targets):
    enc = encoder(arch)
    enc.prepare_finetuning(lora_config())
    names = trainable(enc)
    assert names and all("lora_" in n and n.startswith(f"{stack}1.") for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == set(targets)
    assert enc.lora["target"] == list(targets)
    enc.prepare_finetuning(lora_config())  # the same config again: nothing changes
    assert trainable(enc) == names
    with pytest.raises(ConfigError, match="carries LoRA adapters"):
        enc.prepare_finetuning(lora_config(lora_rank=4))
    with pytest.raises(ConfigError, match="does not train them"):
        enc.prepare_finetuning(EncoderConfig(mode="finetune", finetune="top_layers"))
    with pytest.raises(ConfigError, match="between 1 and 2"):
        encoder(arch).prepare_finetuning(lora_config(finetune_layers=3))
    with pytest.raises(ConfigError, match="no such module"):
        encoder(arch).prepare_finetuning(lora_config(lora_targets=["nothing_here"]))


def test_prepare_finetuning_top_layers_and_frozen():
    enc = encoder("llama")
    enc.prepare_finetuning(EncoderConfig(mode="finetune", finetune="top_layers", finetune_layers=1))
    assert trainable(enc) and all(n.startswith(("layers.1.", "norm.")) for n in trainable(enc))
    enc.prepare_finetuning(EncoderConfig(mode="frozen"))
    assert trainable(enc) == set()


def test_base_digest_ignores_adapters_and_sees_base_weights():
    enc = encoder("llama")
    before = enc.base_digest()
    enc.prepare_finetuning(lora_config())
    with torch.no_grad():
        for n, p in enc.model.named_parameters():
            if "lora_" in n:
                p.add_(1.0)
    assert enc.base_digest() == before  # adapters added and trained: the same base
    with torch.no_grad():
        enc.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-6
    assert enc.base_digest() != before


def test_bf16_setting_is_a_no_op_on_the_cpu():
    model, tok = tiny("llama")
    plain = TextEncoder(model, tok, pooling="last", max_length=16)
    asked = TextEncoder(model, tok, pooling="last", max_length=16, bf16=True)
    assert torch.equal(plain.encode(TEXTS), asked.encode(TEXTS)) and asked.encode(TEXTS).dtype == torch.float32
    assert plain.fingerprint() == asked.fingerprint()  # the same numbers share cache entries


def test_from_config_applies_lora_and_keeps_the_base(tmp_path):
    path = llama_dir(tmp_path / "m", TEXTS)
    frozen = TextEncoder.from_config(EncoderConfig(name=str(path), pooling="last", max_length=16))
    tuned = TextEncoder.from_config(lora_config(name=str(path), pooling="last", max_length=16, finetune_layers=2))
    assert tuned.lora["top_layers"] == 2 and all("lora_" in n for n in trainable(tuned))
    assert tuned.base_digest() == frozen.base_digest()
    # LoRA's B starts at zero: the adapted model encodes exactly as the base does
    torch.testing.assert_close(tuned.encode(TEXTS), frozen.encode(TEXTS), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_last_token_pooling_is_the_same_for_either_tokenizer_padding_side(tmp_path, padding_side):
    """A tokenizer that pads on the left (as many decoder tokenizers ship) gives the same vectors:
    the encoder pads on the right itself, and its forward also reads left-padded batches right."""
    model, tok = tiny("llama")
    tok.padding_side = padding_side
    enc = TextEncoder(model, tok, pooling="last", max_length=16)
    singles = torch.cat([enc.encode([t]) for t in TEXTS])
    torch.testing.assert_close(enc.encode(TEXTS, batch_size=5), singles, atol=1e-5, rtol=1e-5)
    left = enc.tokenizer.pad(
        {"input_ids": enc.token_ids(TEXTS)}, padding=True, padding_side="left", return_tensors="pt"
    )
    assert (left["attention_mask"][:, 0] == 0).any()
    with torch.no_grad():
        torch.testing.assert_close(enc(left["input_ids"], left["attention_mask"]), singles, atol=1e-5, rtol=1e-5)


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank in this process (DDP's reducer and comm hooks run as
    with more ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_lora_step_under_ddp_reduces_and_changes_only_adapters_and_heads(tmp_path, one_rank_group):
    from test_models import tiny_batch, tiny_config, tiny_meta

    from mtrec.config import TaskSpec
    from mtrec.engine import make_optimizer, train_step
    from mtrec.models import build_model
    from mtrec.weighting import StepContext, build_weighting

    tasks = [TaskSpec("click"), TaskSpec("buy", depends_on="click")]
    meta = tiny_meta(tasks)
    cfg = tiny_config("mmoe", mode="finetune")
    cfg.encoder = lora_config(name=str(llama_dir(tmp_path / "m", meta.item_texts + meta.contexts)), pooling="last")
    model = build_model(cfg, meta, None, TextEncoder.from_config(cfg.encoder))
    ddp = DistributedDataParallel(model)
    reduced: list[int] = []

    def count(state, bucket):  # the elements DDP all-reduces, then the plain all-reduce
        reduced.append(bucket.buffer().numel())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, count)
    weighting = build_weighting("static", tasks)
    optimizer = make_optimizer(ddp, weighting, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(ddp, weighting, optimizer, tiny_batch(meta), StepContext())

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    adapters = {n for n in before if "lora_" in n}
    base = {n for n in before if n.startswith("encoder.") and n not in adapters}
    assert any(".lora_B." in n for n in changed & adapters)
    assert not changed & base  # the language model's own weights never move
    heads = changed - adapters
    assert heads and not any(n.startswith("encoder.") for n in heads)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for n, p in model.named_parameters() if n in base)
    assert sum(reduced) == trainable and frozen > 0  # frozen base weights are in no gradient bucket
