"""LoRA adapters on the top layers of a text encoder (Hu et al., "LoRA: Low-Rank Adaptation of
Large Language Models", ICLR 2022), through ``peft``.

Only the adapter matrices train; the base weights, embeddings and lower layers stay frozen. The
adapters save as a flat dict of CPU tensors (safetensors-ready) and load back into an encoder to
which :func:`apply_lora` was applied with the same settings (kept in ``encoder.lora``). The default
targets are the attention query and value projections, as in the paper.
"""

from __future__ import annotations

import torch

from mtrec.encoders.encoder import TextEncoder, find_layer_stack
from mtrec.errors import BundleError, ConfigError

# query and value projection names, per architecture family, tried in this order
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),  # Llama, SmolLM2, Mistral, Qwen
    ("query", "value"),  # BERT, MiniLM
    ("c_attn",),  # GPT-2 (query, key and value in one projection)
    ("q_lin", "v_lin"),  # DistilBERT
)


def default_lora_targets(encoder: TextEncoder) -> tuple[str, ...]:
    """The query and value projection names of ``encoder``'s layers (see :data:`DEFAULT_TARGETS`)."""
    _, layers = find_layer_stack(encoder.model)
    leaves = {sub.rsplit(".", 1)[-1] for sub, _ in layers[-1].named_modules() if sub}
    for names in DEFAULT_TARGETS:
        if set(names) <= leaves:
            return names
    raise ConfigError(
        f"encoder.lora_targets: no default for a {type(layers[-1]).__name__} (modules: {', '.join(sorted(leaves))}); "
        "name the projections to adapt"
    )


def apply_lora(
    encoder: TextEncoder,
    r: int = 8,
    alpha: float = 16.0,
    target: tuple[str, ...] | None = None,
    top_layers: int = 2,
    dropout: float = 0.0,
) -> TextEncoder:
    """Add rank-``r`` adapters to the ``target`` projections (default: :func:`default_lora_targets`)
    of the top ``top_layers`` layers, in place.

    Afterwards exactly the adapter parameters require gradients. Returns ``encoder``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if encoder.lora is not None:
        raise ConfigError(f"{encoder.model_id} already has LoRA adapters {encoder.lora}")
    target = target or default_lora_targets(encoder)
    stack, layers = find_layer_stack(encoder.model)
    if not 1 <= top_layers <= len(layers):
        raise ConfigError(
            f"encoder.finetune_layers={top_layers} (LoRA): must be between 1 and {len(layers)}, "
            f"the number of layers of {encoder.model_id}"
        )
    modules = [
        f"{stack}.{i}.{sub}"
        for i in range(len(layers) - top_layers, len(layers))
        for sub, _ in layers[i].named_modules()
        if sub and sub.rsplit(".", 1)[-1] in target
    ]
    if not modules:
        leaves = sorted(
            {sub.rsplit(".", 1)[-1] for sub, m in layers[-1].named_modules() if sub and not list(m.children())}
        )
        raise ConfigError(
            f"encoder.lora_targets {list(target)}: no such module in a {type(layers[-1]).__name__}; it has {', '.join(leaves)}"
        )
    # GPT-2 style Conv1D projections store their weight transposed
    conv1d = any(type(encoder.model.get_submodule(m)).__name__ == "Conv1D" for m in modules)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, bias="none", fan_in_fan_out=conv1d
    )
    inject_adapter_in_model(config, encoder.model)
    for name, p in encoder.model.named_parameters():
        p.requires_grad_("lora_" in name)
    encoder.lora = {"r": r, "alpha": alpha, "target": list(target), "top_layers": top_layers, "dropout": dropout}
    return encoder


def lora_state_dict(encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """The adapter weights by parameter name, as contiguous CPU tensors sharing no storage."""
    state = {n: p.detach().cpu().contiguous().clone() for n, p in encoder.model.named_parameters() if "lora_" in n}
    if not state:
        raise ConfigError(f"{encoder.model_id} has no LoRA adapters; call apply_lora first")
    return state


def load_lora_state_dict(encoder: TextEncoder, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter weights into an encoder carrying the same adapters."""
    params = {n: p for n, p in encoder.model.named_parameters() if "lora_" in n}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise BundleError(
            f"LoRA adapters do not match {encoder.model_id} (settings {encoder.lora}): "
            f"missing {missing[:5]} ({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise BundleError(
                    f"LoRA adapter {name}: saved shape {tuple(state[name].shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(state[name])
