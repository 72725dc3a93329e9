"""Typed, frozen pipeline configs and their resolution from presets, YAML files and overrides.

A pipeline config is a frozen dataclass whose fields are sections (frozen dataclasses
themselves), for example ``config.model.units``. Each section validates its values in
``__post_init__`` and raises `ConfigError` naming ``section.field``, the value received
and the allowed range.

Resolution order, later wins: the named preset, then each ``--config`` YAML file in the
order given, then each ``--set section.field=value`` override. Unknown sections or fields
are errors that list the closest valid name. The resolved config is written to the run
directory as ``config.yaml`` so that a run can be reproduced and reloaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from shared.errors import ConfigError

logger = logging.getLogger(__name__)

ConfigT = TypeVar("ConfigT")

RECURRENT_CELLS = ("simple_rnn", "lstm", "gru")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
LR_SCHEDULES = ("constant", "cosine", "exponential")
CLIPPING = ("global_norm", "norm", "value", "none")
TUNERS = ("random", "bayesian", "hyperband")
TFLITE_VARIANTS = ("float32", "dynamic_range", "float16", "int8")


# ---------------------------------------------------------------------------
# Validation helpers used by every section's __post_init__.


def closest_name(name: str, candidates: Iterable[str]) -> str | None:
    """Return the candidate most similar to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def check_choice(where: str, value: Any, choices: Iterable[str]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value in choices:
        return
    hint = closest_name(str(value), choices)
    suggestion = f" Did you mean {hint!r}?" if hint else ""
    raise ConfigError(f"{where}: invalid value {value!r}; expected one of {list(choices)}.{suggestion}")


def check_range(
    where: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise ConfigError unless ``low <= value <= high`` (bounds optional, strictness per side)."""
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if not (too_low or too_high):
        return
    left = "[" if low_inclusive else "("
    right = "]" if high_inclusive else ")"
    low_text = "-inf" if low is None else repr(low)
    high_text = "inf" if high is None else repr(high)
    raise ConfigError(
        f"{where}: value {value!r} is out of range; expected a value in {left}{low_text}, {high_text}{right}."
    )


# ---------------------------------------------------------------------------
# Sections shared by several pipelines.


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
    """Recurrent stack: cell type, size, depth, direction, dropout and initializers."""

    cell: str = "lstm"
    units: int = 128
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    recurrent_dropout: float = 0.0
    kernel_initializer: str = "glorot_uniform"
    recurrent_initializer: str = "orthogonal"

    def __post_init__(self) -> None:
        check_choice("model.cell", self.cell, RECURRENT_CELLS)
        check_range("model.units", self.units, 1, 8192)
        check_range("model.layers", self.layers, 1, 16)
        check_range("model.dropout", self.dropout, 0.0, 1.0, high_inclusive=False)
        check_range("model.recurrent_dropout", self.recurrent_dropout, 0.0, 1.0, high_inclusive=False)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization: epochs, batches, optimizer, clipping, schedule, early stopping, seed."""

    epochs: int = 20
    batch_size: int = 64
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    clipping: str = "global_norm"
    clip_value: float = 1.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    early_stopping_patience: int = 5
    backup_every_steps: int | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        check_range("train.epochs", self.epochs, 1)
        check_range("train.batch_size", self.batch_size, 1, 65536)
        if self.steps_per_epoch is not None:
            check_range("train.steps_per_epoch", self.steps_per_epoch, 1)
        if self.validation_steps is not None:
            check_range("train.validation_steps", self.validation_steps, 1)
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        check_range("train.learning_rate", self.learning_rate, 0.0, 10.0, low_inclusive=False)
        check_range("train.weight_decay", self.weight_decay, 0.0, 1.0)
        check_choice("train.clipping", self.clipping, CLIPPING)
        check_range("train.clip_value", self.clip_value, 0.0, low_inclusive=False)
        check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_range("train.warmup_steps", self.warmup_steps, 0)
        check_range("train.early_stopping_patience", self.early_stopping_patience, 0)
        if self.backup_every_steps is not None:
            check_range("train.backup_every_steps", self.backup_every_steps, 1)
        check_range("train.seed", self.seed, 0, 2**31 - 1)


def default_search_space() -> dict[str, dict[str, Any]]:
    """Return the search space every pipeline starts from, keyed by hyperparameter name."""
    return {
        "learning_rate": {"type": "float", "min": 1e-3, "max": 1e-2, "sampling": "log", "stage": "learning_rate"},
        "units": {"type": "int", "min": 64, "max": 512, "step": 64, "stage": "size"},
        "batch_size": {"type": "choice", "values": [16, 32, 64, 128], "stage": "learning_rate"},
        "layers": {"type": "int", "min": 1, "max": 3, "stage": "size"},
        "dropout": {"type": "float", "min": 0.2, "max": 0.5, "stage": "regularization"},
        "recurrent_dropout": {"type": "float", "min": 0.0, "max": 0.3, "stage": "regularization"},
        "weight_decay": {"type": "float", "min": 1e-5, "max": 1e-2, "sampling": "log", "stage": "regularization"},
    }


SEARCH_SPACE_TYPES = ("float", "int", "choice", "boolean")
SEARCH_STAGES = ("learning_rate", "size", "regularization")


def validate_search_space(space: Mapping[str, Any]) -> None:
    """Raise ConfigError unless every entry of ``space`` is a well-formed hyperparameter spec."""
    for name, spec in space.items():
        where = f"tune.search_space.{name}"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'type', got {spec!r}.")
        check_choice(f"{where}.type", spec.get("type"), SEARCH_SPACE_TYPES)
        check_choice(f"{where}.stage", spec.get("stage", "size"), SEARCH_STAGES)
        if spec["type"] in ("float", "int"):
            for key in ("min", "max"):
                if not isinstance(spec.get(key), (int, float)) or isinstance(spec.get(key), bool):
                    raise ConfigError(f"{where}.{key}: expected a number, got {spec.get(key)!r}.")
            if spec["min"] >= spec["max"]:
                raise ConfigError(f"{where}: min {spec['min']!r} must be below max {spec['max']!r}.")
            check_choice(f"{where}.sampling", spec.get("sampling", "linear"), ("linear", "log"))
            if spec.get("sampling") == "log" and spec["min"] <= 0:
                raise ConfigError(f"{where}: log sampling needs min > 0, got {spec['min']!r}.")
        if spec["type"] == "choice" and not spec.get("values"):
            raise ConfigError(f"{where}.values: expected a non-empty list, got {spec.get('values')!r}.")


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """KerasTuner search: tuner, budget, objective and search space."""

    tuner: str = "random"
    max_trials: int = 10
    executions_per_trial: int = 1
    epochs_per_trial: int = 5
    objective: str = "val_loss"
    direction: str = "min"
    stages: tuple[str, ...] = SEARCH_STAGES
    time_budget_minutes: float | None = None
    max_size_kb: float | None = None
    max_latency_ms: float | None = None
    keep_checkpoints: int = 3
    search_space: dict[str, Any] = dataclasses.field(default_factory=default_search_space)

    def __post_init__(self) -> None:
        check_choice("tune.tuner", self.tuner, TUNERS)
        check_range("tune.max_trials", self.max_trials, 1)
        check_range("tune.executions_per_trial", self.executions_per_trial, 1)
        check_range("tune.epochs_per_trial", self.epochs_per_trial, 1)
        check_choice("tune.direction", self.direction, ("min", "max"))
        for stage in self.stages:
            check_choice("tune.stages", stage, SEARCH_STAGES)
        if self.time_budget_minutes is not None:
            check_range("tune.time_budget_minutes", self.time_budget_minutes, 0.0, low_inclusive=False)
        if self.max_size_kb is not None:
            check_range("tune.max_size_kb", self.max_size_kb, 0.0, low_inclusive=False)
        if self.max_latency_ms is not None:
            check_range("tune.max_latency_ms", self.max_latency_ms, 0.0, low_inclusive=False)
        check_range("tune.keep_checkpoints", self.keep_checkpoints, 0)
        validate_search_space(self.search_space)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Export: TFLite variants, parity tolerance and the number of held-out parity inputs."""

    tflite_variants: tuple[str, ...] = TFLITE_VARIANTS
    parity_samples: int = 32
    float32_tolerance: float = 1e-4
    representative_samples: int = 100
    latency_runs: int = 50

    def __post_init__(self) -> None:
        for variant in self.tflite_variants:
            check_choice("export.tflite_variants", variant, TFLITE_VARIANTS)
        check_range("export.parity_samples", self.parity_samples, 1)
        check_range("export.float32_tolerance", self.float32_tolerance, 0.0, low_inclusive=False)
        check_range("export.representative_samples", self.representative_samples, 1)
        check_range("export.latency_runs", self.latency_runs, 1)


# ---------------------------------------------------------------------------
# Conversion between dataclasses, dictionaries and YAML.


def config_to_dict(config: Any) -> dict[str, Any]:
    """Convert a config dataclass to plain dicts, lists and scalars (YAML-safe)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return plain(config)


def _unwrap_optional(field_type: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(field_type)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(field_type) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return field_type, False


def coerce_value(where: str, value: Any, field_type: Any) -> Any:
    """Convert ``value`` (from YAML or an override) to ``field_type`` or raise ConfigError."""
    field_type, optional = _unwrap_optional(field_type)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed; expected {getattr(field_type, '__name__', field_type)}.")
    origin = typing.get_origin(field_type)
    if field_type is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: invalid value {value!r}; expected true or false.")
    if field_type is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: invalid value {value!r}; expected an integer.")
        return int(value)
    if field_type is float:
        return _coerce_float(where, value)
    if field_type is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: invalid value {value!r}; expected a string.")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: invalid value {value!r}; expected a list.")
        item_type = typing.get_args(field_type)[0]
        return tuple(coerce_value(f"{where}[{i}]", v, item_type) for i, v in enumerate(value))
    if origin is dict or field_type is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: invalid value {value!r}; expected a mapping.")
        return dict(value)
    raise ConfigError(f"{where}: unsupported field type {field_type!r}.")  # A bug in a config class.


def _coerce_float(where: str, value: Any) -> float:
    # YAML 1.1 reads "5e-4" (no dot) as a string, so numeric strings are accepted here.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: invalid value {value!r}; expected a finite number.")
    return float(value)


def config_from_dict(config_cls: type[ConfigT], data: Mapping[str, Any], where: str = "") -> ConfigT:
    """Build ``config_cls`` from a nested mapping, rejecting unknown keys with the closest name."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for key in data:
        if key not in fields:
            hint = closest_name(str(key), fields)
            suggestion = f" Did you mean {hint!r}?" if hint else ""
            raise ConfigError(
                f"{where}{key}: unknown config key; valid keys are {sorted(fields)}.{suggestion}"
            )
    kwargs = {}
    for name, value in data.items():
        field_type = hints[name]
        if dataclasses.is_dataclass(field_type):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}{name}: expected a mapping of fields, got {value!r}.")
            kwargs[name] = config_from_dict(field_type, value, f"{where}{name}.")
        else:
            kwargs[name] = coerce_value(f"{where}{name}", value, field_type)
    return config_cls(**kwargs)


def merge_dicts(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``base``; nested mappings merge, everything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) and key != "search_space":
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. Check the path given to --config.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}.")
    return dict(data)


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``section.field=value`` into a nested mapping; the value is parsed as YAML."""
    key, sep, raw_value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"invalid override {text!r}; expected section.field=value, e.g. train.epochs=5.")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid value in override {text!r}: {error}") from error
    parts = [p for p in key.strip().split(".")]
    if any(not p for p in parts):
        raise ConfigError(f"invalid override key {key!r}; expected section.field.")
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def resolve_config(
    preset: ConfigT,
    config_files: Iterable[str | Path] = (),
    overrides: Iterable[str] = (),
) -> ConfigT:
    """Apply YAML files, then overrides, on top of a preset, and validate the result."""
    data = config_to_dict(preset)
    for path in config_files:
        data = merge_dicts(data, load_yaml_file(path))
    for text in overrides:
        data = merge_dicts(data, parse_override(text))
    return config_from_dict(type(preset), data)


def select_preset(presets: Mapping[str, ConfigT], name: str) -> ConfigT:
    """Return the preset called ``name``, or raise ConfigError listing the presets."""
    if name in presets:
        return presets[name]
    hint = closest_name(name, presets)
    suggestion = f" Did you mean {hint!r}?" if hint else ""
    raise ConfigError(f"unknown preset {name!r}; available presets: {sorted(presets)}.{suggestion}")


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def load_config(config_cls: type[ConfigT], path: str | Path) -> ConfigT:
    """Read a config saved by `save_config`."""
    return config_from_dict(config_cls, load_yaml_file(path))


def replace_field(config: ConfigT, dotted: str, value: Any) -> ConfigT:
    """Return a copy of ``config`` with ``section.field`` set to ``value`` (validated)."""
    section_name, _, field_name = dotted.partition(".")
    section = getattr(config, section_name)
    return dataclasses.replace(config, **{section_name: dataclasses.replace(section, **{field_name: value})})
