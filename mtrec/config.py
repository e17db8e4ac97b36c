"""Configuration: one small dataclass per concern, YAML presets, and ``key=value`` overrides.

The defaults of every dataclass build a small working setup. A full run is described by
:class:`Config`, whose sections are addressed in overrides as ``section.field=value``
(``model.arch=ple``, ``train.lr=3e-4``). Unknown keys and values of the wrong type fail loudly
and list what is valid. Configs cross into Ray as plain dicts (:func:`dataclasses.asdict`) and
come back through :meth:`Config.from_dict`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mtrec.errors import ConfigError

TaskKind = Literal["binary", "regression"]
TASK_KINDS: tuple[str, ...] = ("binary", "regression")


@dataclass
class TaskSpec:
    """One prediction task.

    ``label`` is the interactions column holding the label (0/1 for binary, float for regression,
    null where unobserved). ``depends_on`` names the task this one is conditioned on, ESMM-style:
    p(task) = p(depends_on) * p(task | depends_on). ``loss_weight`` is the prior weight of the task's
    loss in training; ``fusion_weight`` is the prior weight of its prediction in the serving score.
    """

    name: str
    kind: TaskKind = "binary"
    label: str = ""
    depends_on: str | None = None
    loss_weight: float = 1.0
    fusion_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.label:
            self.label = self.name


@dataclass
class DataConfig:
    """Where the data is and how examples are built from it."""

    path: str = ""
    max_history: int = 20  # most recent items of a user's history fed to the user tower
    negatives_per_positive: int = 0  # extra sampled negatives for datasets with positives only
    valid_fraction: float = 0.1  # time-based split when the data carries no ``split`` column
    test_fraction: float = 0.1


@dataclass
class EncoderConfig:
    """The language model that reads item (and user, context) text."""

    name: str = "minilm"  # a registry name (minilm, smollm2), a Hugging Face name, or a local path
    revision: str = "main"
    mode: Literal["frozen", "finetune", "none"] = "frozen"  # none: ID-only model, no text
    pooling: Literal["mean", "cls", "last"] = "mean"
    # hidden states pooled into the text vector, concatenated: 0 is the embeddings' output, -1 the last
    # layer's. A sentence encoder's last layer keeps the gist and drops lexical detail that lower layers
    # still hold (a star rating among the words): [-1, -2, -3] keeps both, for a 3x wider vector
    layers: list[int] = field(default_factory=lambda: [-1])
    max_length: int = 64
    # finetune mode: the top `finetune_layers` layers train whole (top_layers), or only LoRA adapters
    # on their projections train (lora; Hu et al., ICLR 2022) while the base weights stay frozen
    finetune: Literal["top_layers", "lora"] = "top_layers"
    finetune_layers: int = 2
    lora_rank: int = 8
    lora_alpha: float = 16.0  # adapter output scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    # projections that get adapters; []: the architecture's attention query and value projections
    lora_targets: list[str] = field(default_factory=list)
    bf16: bool = True  # bfloat16 autocast of the language model on a GPU; no effect on the CPU
    batch_size: int = 64
    prompt: str = "{text}"  # template around the item text (decoders: a closing phrase helps)
    cache_dir: str = ""  # frozen-mode vector cache; "" means ~/.cache/mtrec/vectors

    def __post_init__(self) -> None:
        checks = [
            ("max_length", self.max_length >= 2, "at least 2"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("finetune_layers", self.finetune_layers >= 0, "0 or more"),
            ("lora_rank", self.lora_rank >= 1, "at least 1"),
            ("lora_alpha", self.lora_alpha > 0, "positive"),
            ("lora_dropout", 0.0 <= self.lora_dropout < 1.0, "in [0, 1)"),
            ("lora_targets", all(t and "." not in t for t in self.lora_targets), "module names without dots"),
        ]
        if self.mode == "finetune" and self.finetune == "lora":
            checks.append(("finetune_layers", self.finetune_layers >= 1, "at least 1 with encoder.finetune=lora"))
        for key, ok, wanted in checks:
            if not ok:
                raise ConfigError(f"encoder.{key}={getattr(self, key)!r}: must be {wanted}")


@dataclass
class ModelConfig:
    """The multi-task network on top of the item vectors."""

    arch: Literal["shared_bottom", "mmoe", "ple"] = "mmoe"
    id_dim: int = 32  # user and item id embedding size
    id_buckets: int = 10_007  # hashing buckets for ids unseen in training (cold users and items)
    use_item_ids: bool = True
    use_user_ids: bool = True
    history: Literal["din", "transformer", "mean", "none"] = "din"
    proj_dim: int = 64  # text vectors are projected to this size
    expert_dim: int = 64
    num_experts: int = 4  # MMoE experts; PLE shared experts per level
    specific_experts: int = 1  # PLE task-specific experts per task per level
    ple_levels: int = 2
    tower_dim: int = 32
    dropout: float = 0.1
    # training only: each item's and user's id embedding is zeroed with this probability per batch, so
    # the network learns to predict without it, as it must for ids unseen in training (their rows are
    # zero); without it, cold items are over-predicted (DropoutNet, Volkovs et al., NeurIPS 2017)
    id_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.id_dropout < 1.0:
            raise ConfigError(f"model.id_dropout={self.id_dropout!r}: must be in [0, 1)")


@dataclass
class TrainConfig:
    """Optimisation, weighting, checkpoints and resources."""

    epochs: int = 3
    batch_size: int = 256
    lr: float = 2e-3
    encoder_lr: float = 2e-5  # finetune mode: learning rate of the language model's top layers
    weight_decay: float = 1e-5
    weighting: str = "static"
    weighting_params: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    num_workers: int = 1  # Ray Train workers; 0: the same loop in this process (small data, no Ray start)
    use_gpu: bool = False
    bf16: bool = True  # autocast on GPU only
    checkpoint_every_steps: int = 0  # 0: once per epoch
    num_to_keep: int = 2
    max_failures: int = 2
    early_stop_patience: int = 2
    objective: str = "mean_auc"  # metric maximised for early stopping and checkpoint ranking
    log_every_steps: int = 50

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(
                f"train.num_workers={self.num_workers!r}: must be 0 (train in this process, no Ray Train) or more"
            )


@dataclass
class Config:
    """A full run: data, tasks, encoder, model and training."""

    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tasks: list[TaskSpec] = field(default_factory=list)  # empty: read from the data's tasks.yaml

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return _build(cls, d, "")

    def override(self, assignments: list[str]) -> Config:
        """Apply ``section.field=value`` strings; values are parsed as YAML scalars."""
        d = self.to_dict()
        for a in assignments:
            if "=" not in a:
                raise ConfigError(f"override {a!r} is not of the form key=value")
            key, raw = a.split("=", 1)
            _set_path(d, key.strip(), yaml.safe_load(raw) if raw.strip() else "", cls=Config)
        return Config.from_dict(d)


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(_join(where, k) for k in unknown)}; "
            f"valid keys: {', '.join(_join(where, k) for k in fields)}"
        )
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, v: Any, where: str) -> Any:
    """Check ``v`` against the annotation ``tp``; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {v!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if v not in choices:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(repr, choices))}")
        return v
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(v, list):
            raise ConfigError(f"{where}: expected a list, got {v!r}")
        return [_coerce(inner, x, f"{where}[{i}]") for i, x in enumerate(v)]
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: expected a mapping, got {v!r}")
        return {str(k): _coerce(vt, x, f"{where}.{k}") for k, x in v.items()}
    if dataclasses.is_dataclass(tp):
        return v if isinstance(v, tp) else _build(tp, v, where)
    if tp is float:
        if isinstance(v, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {v!r}")
        return float(v)
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where}: expected an integer, got {v!r}")
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: expected true or false, got {v!r}")
        return v
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where}: expected a string, got {v!r}")
        return v
    return v


def _set_path(d: dict[str, Any], key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    node, node_cls = d, cls
    for i, p in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)] if dataclasses.is_dataclass(node_cls) else None
        last = i == len(parts) - 1
        if names is not None and p not in names:
            prefix = ".".join(parts[:i])
            valid = ", ".join(_join(prefix, n) for n in names)
            raise ConfigError(f"unknown key {key!r}; valid keys: {valid}")
        if last:
            node[p] = value
            return
        hint = typing.get_type_hints(node_cls)[p] if names is not None else None
        if names is not None and not dataclasses.is_dataclass(hint) and typing.get_origin(hint) is not dict:
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section; cannot set {key!r}")
        node = node.setdefault(p, {})
        node_cls = hint if dataclasses.is_dataclass(hint) else dict


PRESET_DIR = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> Config:
    """A named preset (``mtrec/presets/NAME.yaml``) or a YAML file path, over the defaults."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset {name_or_path!r}; valid presets: {', '.join(preset_names())}")
    if not path.exists():
        raise ConfigError(f"preset file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return Config.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
