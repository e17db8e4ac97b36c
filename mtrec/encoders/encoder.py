"""A Hugging Face language model as a text encoder: tokenise, run, pool to one vector per text.

Encoders (BERT, MiniLM) and decoder-only models (GPT-2, Llama, SmolLM2) work alike. Decoders have
no pad token, so EOS pads; padding goes on the right, where a causal model's real tokens never see it.
Pooling reads the attention mask, so it is right for either padding side. Last-token pooling of a
decoder, with a closing phrase in the prompt that asks for a summary, follows HLLM (Chen et al.,
"HLLM: Enhancing Sequential Recommendations via Hierarchical Large Language Models", 2024).

Fine-tuning (:meth:`TextEncoder.prepare_finetuning`) trains either the top layers whole or LoRA
adapters on their projections (:mod:`mtrec.encoders.lora`); everything else has ``requires_grad``
False, so DistributedDataParallel leaves it out of the gradient all-reduce. On a GPU the model can
run under bfloat16 autocast; on the CPU that setting changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from typing import Any, Literal

import torch
from torch import nn

from mtrec.config import EncoderConfig
from mtrec.encoders.registry import resolve_model_path
from mtrec.encoders.text import clean_texts, split_prompt
from mtrec.errors import ConfigError

Pooling = Literal["mean", "cls", "last"]
POOLINGS: tuple[str, ...] = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """hidden (B, S, D), mask (B, S) 0/1 -> (B, D) float32.

    ``mean`` averages the real tokens; ``cls`` takes the first real token, ``last`` the last one,
    wherever the padding is (left or right).
    """
    m = mask.bool()
    if how == "mean":
        w = m.unsqueeze(-1).to(torch.float32)
        return (hidden.float() * w).sum(1) / w.sum(1).clamp(min=1.0)
    pos = torch.arange(m.shape[1], device=m.device).expand_as(m)
    if how == "cls":
        idx = torch.where(m, pos, m.shape[1]).min(1).values
    elif how == "last":
        idx = torch.where(m, pos, -1).max(1).values
    else:
        raise ConfigError(f"encoder.pooling {how!r} is not one of {', '.join(POOLINGS)}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx].float()


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's transformer blocks: the ``nn.ModuleList`` of same-type modules holding the most
    parameters (``encoder.layer`` in BERT, ``h`` in GPT-2, ``layers`` in Llama). Returns (name, list)."""
    best: tuple[str, nn.ModuleList] | None = None
    best_size = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1:
            size = sum(p.numel() for p in m.parameters())
            if size > best_size:
                best, best_size = (name, m), size
    if best is None:
        raise ConfigError(f"{type(model).__name__}: found no list of transformer layers to fine-tune")
    return best


def _final_norms(model: nn.Module, stack: str) -> list[nn.Module]:
    """Norm modules registered after the layer stack (Llama ``norm``, GPT-2 ``ln_f``): they read the
    top layer's output, so they train with it."""
    out, after = [], False
    for name, m in model.named_modules():
        if name == stack:
            after = True
        elif after and not name.startswith(stack + ".") and "norm" in type(m).__name__.lower():
            out.append(m)
    return out


def _is_causal(model: nn.Module) -> bool:
    """A decoder-only model: it has a causal-LM head class in transformers and no masked-LM one."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(getattr(model, "config", None), "model_type", "")
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _check_layers(layers: tuple[int, ...] | list[int], num_layers: int) -> tuple[int, ...]:
    """``encoder.layers``: distinct hidden-state indexes, 0 the embeddings' output .. ``num_layers`` the
    last layer's (negative: from the end, -1 the last)."""
    out = tuple(int(k) for k in layers)
    bad = [k for k in out if not -(num_layers + 1) <= k <= num_layers]
    if not out or bad or len({k % (num_layers + 1) for k in out}) != len(out):
        raise ConfigError(
            f"encoder.layers {list(layers)}: give one or more distinct hidden-state indexes in "
            f"[{-(num_layers + 1)}, {num_layers}] (this model has {num_layers} layers; -1 is the last)"
        )
    return out


class TextEncoder(nn.Module):
    """Texts -> (N, D) float vectors through a Hugging Face model and a pooling.

    ``model`` is a base model (``AutoModel``, no LM head) whose output has ``last_hidden_state``;
    ``tokenizer`` is its tokenizer, which this encoder owns from now on (it sets padding and pad token).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        pooling: str = "mean",
        max_length: int = 64,
        prompt: str = "{text}",
        model_id: str | None = None,
        max_chars: int = 2000,
        bf16: bool = False,
        layers: tuple[int, ...] | list[int] = (-1,),
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"encoder.pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_chars = max_chars
        self._max_length = max_length
        self._prompt = prompt
        self._bf16 = bf16
        self.lora: dict[str, Any] | None = None  # set by mtrec.encoders.lora.apply_lora
        self.layers = _check_layers(layers, int(model.config.num_hidden_layers))
        self._model_id = model_id or f"{model.config.name_or_path or model.config.model_type}@local"
        self._causal = _is_causal(model)
        self._prompt_parts = split_prompt(prompt)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError(f"{self._model_id}: the tokenizer has neither a pad nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        self._frame_len = len(tokenizer("".join(self._prompt_parts))["input_ids"])
        if self._frame_len >= max_length:
            raise ConfigError(
                f"encoder.prompt {prompt!r} takes {self._frame_len} tokens with special tokens, which leaves "
                f"no room for text within encoder.max_length={max_length}"
            )
        self.eval()

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> TextEncoder:
        """Load ``cfg.name`` (see :func:`resolve_model_path`) and prepare it for ``cfg.mode``
        (:meth:`prepare_finetuning`)."""
        if cfg.mode == "none":
            raise ConfigError("encoder.mode is 'none' (an ID-only model): there is no text encoder to build")
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(cfg.name, cfg.revision)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"encoder.name {cfg.name!r}: cannot load a model and tokenizer from {path}: {e}") from e
        enc = cls(
            model,
            tokenizer,
            cfg.pooling,
            cfg.max_length,
            cfg.prompt,
            model_id=f"{cfg.name}@{cfg.revision}",
            bf16=cfg.bf16,
            layers=cfg.layers,
        )
        enc.prepare_finetuning(cfg)
        return enc

    @property
    def dim(self) -> int:
        """The vector size: the hidden size times the number of pooled layers."""
        return int(self.model.config.hidden_size) * len(self.layers)

    @property
    def max_length(self) -> int:
        """Tokens per text, special tokens and prompt included."""
        return self._max_length

    @property
    def prompt(self) -> str:
        """The template around each text, holding ``{text}`` once."""
        return self._prompt

    @property
    def model_id(self) -> str:
        """``name@revision``: which weights these are, for cache keys and logs."""
        return self._model_id

    def fingerprint(self) -> str:
        """sha256 over the model id, the text settings and a sample of every parameter tensor (its
        first and last 64 values): changes when the weights are fine-tuned or swapped, in milliseconds."""
        settings: list[Any] = [self._model_id, self.pooling, self._max_length, self._prompt, self.max_chars]
        if self.layers != (-1,):
            settings.append(list(self.layers))  # (the last layer alone keeps the keys it always had)
        if self._autocast_on(next(self.model.parameters()).device):
            settings.append("bf16")  # other numbers than float32: other cache entries
        h = hashlib.sha256(json.dumps(settings).encode())
        for name, p in self.model.named_parameters():
            flat = p.detach().reshape(-1)
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(torch.cat([flat[:64], flat[-64:]]).float().cpu().numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------------------ tokenising

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Clean each text, put it in the prompt, tokenise; a text too long loses its own tail, never
        the prompt's closing phrase or the special tokens."""
        before, after = self._prompt_parts
        cleaned = clean_texts(texts, self.max_chars)
        if not cleaned:
            return []
        ids = self.tokenizer([before + c + after for c in cleaned])["input_ids"]
        for i, row in enumerate(ids):
            budget = self._max_length - self._frame_len
            text_ids = None
            while len(row) > self._max_length and budget > 0:
                if text_ids is None:
                    text_ids = self.tokenizer(cleaned[i], add_special_tokens=False)["input_ids"]
                short = self.tokenizer.decode(text_ids[:budget])
                row = self.tokenizer(before + short + after)["input_ids"]
                budget -= max(len(row) - self._max_length, 1)  # re-tokenising can merge differently
            ids[i] = row[: self._max_length]
        return ids

    def pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Token id lists -> input_ids (B, S) long, attention_mask (B, S) long."""
        batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts -> input_ids (B, S) long, attention_mask (B, S) long (cleaned, prompt applied)."""
        return self.pad(self.token_ids(texts))

    # ------------------------------------------------------------------------------ encoding

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids (B, S), attention_mask (B, S) -> (B, D) float32. Left padding works too."""
        extra: dict[str, Any] = {}
        if self._causal:
            extra["use_cache"] = False
            if bool(
                (attention_mask[:, 0] == 0).any()
            ):  # left padding: count positions from each row's first real token
                extra["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        amp = self._autocast_on(input_ids.device)
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            if self.layers == (-1,):
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
                return pool(out.last_hidden_state, attention_mask, self.pooling)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
        return torch.cat([pool(out.hidden_states[k], attention_mask, self.pooling) for k in self.layers], dim=-1)

    def _autocast_on(self, device: torch.device) -> bool:
        """bfloat16 autocast: asked for, and on a GPU (on the CPU the model stays float32)."""
        return self._bf16 and device.type == "cuda"

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Texts -> (N, D) float32 on the CPU, in eval mode without gradients, in the input order.

        Texts are batched longest first so each batch pads little. ``progress`` prints a line with
        the rate and ETA to stderr.
        """
        ids = self.token_ids(texts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = torch.empty(len(ids), self.dim, dtype=torch.float32)
        device = next(self.model.parameters()).device
        meter = _Progress(len(ids)) if progress else None
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = self.pad([ids[i] for i in rows])
                vecs = self(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                out[rows] = vecs.cpu()
                if meter:
                    meter.update(start + len(rows))
        finally:
            self.train(was_training)
        return out

    # ------------------------------------------------------------------------------ fine-tuning

    def prepare_finetuning(self, cfg: EncoderConfig) -> None:
        """Make trainable exactly what ``cfg`` fine-tunes, and freeze the rest.

        ``frozen`` / ``none`` mode: nothing trains. ``finetune`` with ``finetune=top_layers``: the top
        ``cfg.finetune_layers`` layers (:meth:`set_trainable_top_layers`); with ``finetune=lora``:
        rank ``cfg.lora_rank`` adapters on the ``cfg.lora_targets`` projections of those layers
        (default: the attention query and value), and only the adapters. Calling it again with the
        same config changes nothing; a config asking for other adapters than the encoder carries is
        a ConfigError.
        """
        from mtrec.encoders.lora import apply_lora, default_lora_targets

        if cfg.mode != "finetune" or cfg.finetune == "top_layers":
            if self.lora is not None:
                raise ConfigError(
                    f"{self._model_id} carries LoRA adapters {self.lora}, but encoder.mode={cfg.mode!r} "
                    f"encoder.finetune={cfg.finetune!r} does not train them; build a fresh encoder"
                )
            self.set_trainable_top_layers(cfg.finetune_layers if cfg.mode == "finetune" else 0)
            return
        wanted = {
            "r": cfg.lora_rank,
            "alpha": cfg.lora_alpha,
            "target": list(cfg.lora_targets or default_lora_targets(self)),
            "top_layers": cfg.finetune_layers,
            "dropout": cfg.lora_dropout,
        }
        if self.lora is None:
            apply_lora(self, **{**wanted, "target": tuple(wanted["target"])})
        elif self.lora != wanted:
            raise ConfigError(f"{self._model_id} carries LoRA adapters {self.lora}; the config asks for {wanted}")
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name)

    def base_digest(self) -> str:
        """sha256 over every weight of the base model (names, shapes, dtypes and all bytes), LoRA
        adapters left out and named as before they were added: which base a set of adapters needs."""
        h = hashlib.sha256()
        for name, p in self.model.named_parameters():
            if "lora_" in name:
                continue
            t = p.detach().cpu().contiguous()
            h.update(f"{name.replace('.base_layer.', '.')}{tuple(t.shape)}{t.dtype}".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return h.hexdigest()

    def set_trainable_top_layers(self, k: int) -> None:
        """Train the top ``k`` transformer layers (and the norm after them); freeze the rest.

        ``k=0`` freezes the whole model; embeddings and lower layers always stay frozen.
        """
        name, layers = find_layer_stack(self.model)
        if not 0 <= k <= len(layers):
            raise ConfigError(
                f"encoder.finetune_layers={k}: must be between 0 and {len(layers)}, the number of layers of {self._model_id}"
            )
        self.model.requires_grad_(False)
        if k:
            for layer in layers[len(layers) - k :]:
                layer.requires_grad_(True)
            for norm in _final_norms(self.model, name):
                norm.requires_grad_(True)


class _Progress:
    """One self-overwriting stderr line: done/total, texts per second, time left."""

    def __init__(self, total: int, every_s: float = 0.5):
        self._total = total
        self._start = time.perf_counter()
        self._last = 0.0
        self._every_s = every_s

    def update(self, done: int) -> None:
        now = time.perf_counter()
        finished = done >= self._total
        if not finished and now - self._last < self._every_s:
            return
        self._last = now
        elapsed = max(now - self._start, 1e-9)
        rate = done / elapsed
        eta = (self._total - done) / rate if rate else float("inf")
        sys.stderr.write(
            f"\rencode {done}/{self._total} texts | {rate:.1f} texts/s | "
            + (f"took {elapsed:.1f}s\n" if finished else f"ETA {eta:.0f}s ")
        )
        sys.stderr.flush()
