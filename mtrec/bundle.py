"""The trained-model bundle that serving loads: safetensors for tensors, JSON for everything else.

``bundle.json``          format, version, the run's config, ``fusion_scales`` (task -> the mean
                         prediction over the validation examples, :func:`mtrec.engine.fusion_scales`:
                         serving divides each task's predictions by it before fusion), and the sha256
                         of every other file; with LoRA adapters also ``encoder_base``: the base
                         model's name, revision and weights digest
                         (:meth:`~mtrec.encoders.TextEncoder.base_digest`)
``meta.json``            :class:`~mtrec.features.FeatureMeta`: tasks, vocabularies, feature statistics,
                         the catalog (``item_ids``: the raw id of item index i + 1 is ``item_ids[i]``)
``model.safetensors``    the model's state dict; with ``encoder.finetune=top_layers`` it holds the whole
                         language model, with ``encoder.finetune=lora`` only its adapters: the base is
                         loaded by name again and must have the recorded digest
``vectors.safetensors``  ``item_vectors`` (num_items + 1, D), ``context_vectors`` (num_contexts + 1, D)
                         when the data has contexts; absent for an ID-only model

Nothing is ever unpickled. A missing, corrupt (checksum) or incompatible (version, shapes) file is a
:class:`~mtrec.errors.BundleError` naming the file. Loading rebuilds the model from the config and
meta and loads the weights, so predictions match the saved model's bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mtrec.config import Config
from mtrec.engine import text_inputs
from mtrec.errors import BundleError, MtrecError
from mtrec.features import FeatureMeta
from mtrec.io import atomic_dir
from mtrec.models import MultiTaskModel, build_model

if TYPE_CHECKING:
    from mtrec.encoders import TextEncoder

BUNDLE_FORMAT = "mtrec-bundle"
BUNDLE_VERSION = 2  # 2: fusion scales in the manifest; the catalog only in meta.json (1 had items.json)
MANIFEST = "bundle.json"
META = "meta.json"
WEIGHTS = "model.safetensors"
VECTORS = "vectors.safetensors"


@dataclass
class Bundle:
    """A loaded bundle: the model in eval mode and what serving needs around it."""

    path: Path
    cfg: Config
    meta: FeatureMeta
    model: MultiTaskModel
    item_vectors: Tensor | None  # (num_items + 1, D), row 0 zeros
    context_vectors: Tensor | None
    fusion_scales: dict[str, float]  # task -> its mean prediction over the validation examples


def save_bundle(
    path: str | Path,
    cfg: Config,
    meta: FeatureMeta,
    model: nn.Module,
    fusion_scales: Mapping[str, float],
    item_vectors: Tensor | None = None,
    context_vectors: Tensor | None = None,
) -> Path:
    """Write a bundle directory atomically.

    ``model`` may be DDP-wrapped. ``fusion_scales``: task -> a positive reference scale for every task
    of ``meta`` (:func:`mtrec.engine.fusion_scales`). ``item_vectors`` (num_items + 1, D): the text
    vector of each item (None: taken from the model, which in finetune mode encodes every item with
    its trained layers).
    """
    scales = _check_scales(fusion_scales, meta, "fusion_scales")
    m: MultiTaskModel = getattr(model, "module", model)
    state = persisted_state(m, cfg)
    base: dict[str, Any] | None = None
    if _lora(cfg):
        base = {"name": cfg.encoder.name, "revision": cfg.encoder.revision, "sha256": m.encoder.base_digest()}
    if cfg.encoder.mode != "none":
        text = m.item_tower.text
        item_vectors = item_vectors if item_vectors is not None else text.table(m.encoder)
        if context_vectors is None and m.context_text is not None:
            context_vectors = m.context_text.table(m.encoder)
        if item_vectors.shape[0] != meta.num_items + 1:
            raise BundleError(
                f"item_vectors has {item_vectors.shape[0]} rows; expected {meta.num_items + 1} (the catalog + row 0)"
            )
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, tmp / WEIGHTS)
        if item_vectors is not None:
            vectors = {"item_vectors": item_vectors}
            if context_vectors is not None:
                vectors["context_vectors"] = context_vectors
            save_file({k: v.detach().float().cpu().contiguous() for k, v in vectors.items()}, tmp / VECTORS)
        (tmp / META).write_text(json.dumps(meta.to_json()))
        files = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
        manifest = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "config": cfg.to_dict(),
            "fusion_scales": scales,
            "files": files,
        }
        if base is not None:
            manifest["encoder_base"] = base
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Path(path)


def load_bundle(path: str | Path, encoder: TextEncoder | None = None, device: str | torch.device = "cpu") -> Bundle:
    """Load and check a bundle. ``encoder``: the language model of a finetune-mode bundle (default:
    built from the bundle's config). With ``top_layers`` its weights come from the bundle; with
    ``lora`` its base weights must be the ones the adapters were trained on, else a BundleError."""
    root = Path(path)
    manifest = _manifest(root)
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files or META not in files:
        raise BundleError(f"{root / MANIFEST}: 'files' must list {WEIGHTS} and {META}")
    for name, digest in files.items():
        f = root / name
        if not f.is_file():
            raise BundleError(f"{f}: file is missing")
        if _sha256(f) != digest:
            raise BundleError(f"{f}: checksum mismatch (the file is corrupt or was changed after saving)")
    cfg, meta, scales = _describe(root, manifest)
    vectors = _tensors(root / VECTORS) if VECTORS in files else {}
    stored = vectors.get("item_vectors"), vectors.get("context_vectors")
    item_vectors, context_vectors, encoder = text_inputs(cfg, meta, encoder, stored)
    try:
        model = build_model(cfg, meta, item_vectors, encoder, context_vectors)
        if _lora(cfg):
            _check_base(root / MANIFEST, manifest.get("encoder_base"), model.encoder)
        load_persisted_state(model, _tensors(root / WEIGHTS), cfg)
    except BundleError:
        raise
    except (MtrecError, RuntimeError, ValueError) as e:
        raise BundleError(f"{root / WEIGHTS}: does not fit the model the bundle's config describes: {e}") from e
    model.to(device).eval()
    return Bundle(root, cfg, meta, model, *stored, scales)


def read_description(path: Path) -> tuple[Config, FeatureMeta, dict[str, float]]:
    """A bundle's config, feature meta and fusion scales, from its manifest and meta alone (no weights,
    no checksums: :func:`load_bundle` checks those). BundleError naming the file otherwise."""
    return _describe(path, _manifest(path))


def persisted_state(model: nn.Module, cfg: Config) -> dict[str, Tensor]:
    """The state dict bundles and training checkpoints store: all of it, except the language model's
    base weights when it trains through LoRA adapters (they are frozen and loaded by name again)."""
    state = getattr(model, "module", model).state_dict()
    return {k: v for k, v in state.items() if not _is_base(k)} if _lora(cfg) else state


def load_persisted_state(model: nn.Module, state: dict[str, Tensor], cfg: Config) -> None:
    """Load what :func:`persisted_state` stored: strictly, or (LoRA) everything but the base weights,
    which must be all that is left out. ValueError / RuntimeError on a state that does not fit."""
    if _lora(cfg):
        _load_adapters_and_heads(getattr(model, "module", model), state)
    else:
        getattr(model, "module", model).load_state_dict(state, strict=True)


def _lora(cfg: Config) -> bool:
    return cfg.encoder.mode == "finetune" and cfg.encoder.finetune == "lora"


def _is_base(key: str) -> bool:
    """A state-dict key of the language model's own (frozen) weights, not of a LoRA adapter."""
    return key.startswith("encoder.") and "lora_" not in key


def _check_base(manifest: Path, recorded: Any, encoder: TextEncoder) -> None:
    """The encoder's base weights must be those the bundle's adapters were trained on."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        raise BundleError(f"{manifest}: a LoRA bundle needs 'encoder_base' with the base model's sha256")
    found = encoder.base_digest()
    if found != recorded["sha256"]:
        raise BundleError(
            f"{manifest}: the LoRA adapters were trained on base model {recorded.get('name')!r} "
            f"(revision {recorded.get('revision')!r}) with weights sha256 {recorded['sha256'][:16]}..., but the "
            f"encoder loaded now ({encoder.model_id}) has weights sha256 {found[:16]}...; load the same base model"
        )


def _load_adapters_and_heads(model: MultiTaskModel, state: dict[str, Tensor]) -> None:
    """Everything but the language model's base weights, which must be all that is left out."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    not_base = [k for k in missing if not _is_base(k)]
    stray_base = [k for k in state if _is_base(k)]
    if not_base or unexpected or stray_base:
        raise ValueError(
            f"missing {not_base[:5]} ({len(not_base)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all), "
            f"base weights that a LoRA bundle must not hold {stray_base[:5]} ({len(stray_base)} in all)"
        )


def _manifest(root: Path) -> dict[str, Any]:
    """The manifest, of this code's format and version (an older bundle is refused: retrain to serve it)."""
    manifest = _json(root / MANIFEST)
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") != BUNDLE_VERSION:
        raise BundleError(
            f"{root / MANIFEST}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this code reads {BUNDLE_FORMAT!r} version {BUNDLE_VERSION} (train again to write one)"
        )
    return manifest


def _describe(root: Path, manifest: dict[str, Any]) -> tuple[Config, FeatureMeta, dict[str, float]]:
    try:
        cfg = Config.from_dict(manifest["config"])
        meta = FeatureMeta.from_json(_json(root / META), str(root / META))
    except (MtrecError, KeyError, TypeError) as e:
        raise BundleError(f"{root / MANIFEST} / {root / META}: incompatible contents: {e}") from e
    return cfg, meta, _check_scales(manifest.get("fusion_scales"), meta, f"{root / MANIFEST}: fusion_scales")


def _check_scales(scales: Any, meta: FeatureMeta, where: str) -> dict[str, float]:
    """``scales`` as task -> float; BundleError naming a task whose scale is missing or not a positive number."""
    if not isinstance(scales, Mapping):
        raise BundleError(f"{where}: expected task -> scale, found {type(scales).__name__}")
    out = {}
    for task in (t.name for t in meta.tasks):
        value = scales.get(task)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise BundleError(f"{where}: task {task!r} has scale {value!r}; every task needs a positive number")
        out[task] = float(value)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BundleError(f"{path}: file is missing")
    try:
        out = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(out, dict):
        raise BundleError(f"{path}: expected a JSON object, found {type(out).__name__}")
    return out


def _tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{path}: not a readable safetensors file: {e}") from e
