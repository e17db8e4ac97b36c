"""Language-model text encoders: any Hugging Face model (encoder or decoder-only), local or from the hub,
pooled to one vector per text, with vector caches (on disk, in memory) and LoRA adapters for fine-tuning."""

from mtrec.encoders.cache import RecentVectors, VectorStore, encode_cached
from mtrec.encoders.encoder import POOLINGS, TextEncoder, find_layer_stack, pool
from mtrec.encoders.lora import apply_lora, default_lora_targets, load_lora_state_dict, lora_state_dict
from mtrec.encoders.registry import ENCODERS, cache_root, resolve_model_path
from mtrec.encoders.text import clean_text, clean_texts

__all__ = [
    "ENCODERS",
    "POOLINGS",
    "RecentVectors",
    "TextEncoder",
    "VectorStore",
    "apply_lora",
    "cache_root",
    "clean_text",
    "clean_texts",
    "default_lora_targets",
    "encode_cached",
    "find_layer_stack",
    "load_lora_state_dict",
    "lora_state_dict",
    "pool",
    "resolve_model_path",
]
