"""Tests for config resolution: presets, YAML files, overrides, validation and saving."""

import dataclasses

import pytest

from shared.config import (
    ExportConfig,
    RecurrentConfig,
    TrainConfig,
    TuneConfig,
    load_config,
    parse_override,
    resolve_config,
    save_config,
    select_preset,
)
from shared.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    max_length: int = 50
    pair: tuple[str, ...] = ("en", "de")
    limit: int | None = None


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    data: DataConfig = DataConfig()
    model: RecurrentConfig = RecurrentConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    export: ExportConfig = ExportConfig()


def write_yaml(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_preset_unchanged_without_sources():
    assert resolve_config(ToyConfig()) == ToyConfig()


def test_override_coerces_types():
    config = resolve_config(
        ToyConfig(),
        overrides=["train.epochs=3", "train.learning_rate=5e-4", "model.bidirectional=true", "data.limit=7"],
    )
    assert config.train.epochs == 3
    assert config.train.learning_rate == 0.0005
    assert config.model.bidirectional is True
    assert config.data.limit == 7


def test_override_null_for_optional():
    config = resolve_config(ToyConfig(), overrides=["data.limit=5", "data.limit=null"])
    assert config.data.limit is None


def test_override_list_to_tuple():
    config = resolve_config(ToyConfig(), overrides=["data.pair=[de, en]"])
    assert config.data.pair == ("de", "en")


def test_later_yaml_file_wins(tmp_path):
    first = write_yaml(tmp_path / "a.yaml", "train:\n  epochs: 4\n  batch_size: 8\n")
    second = write_yaml(tmp_path / "b.yaml", "train:\n  epochs: 9\n")
    config = resolve_config(ToyConfig(), [first, second])
    assert config.train.epochs == 9
    assert config.train.batch_size == 8


def test_override_beats_yaml(tmp_path):
    path = write_yaml(tmp_path / "a.yaml", "train:\n  epochs: 4\n")
    config = resolve_config(ToyConfig(), [path], ["train.epochs=2"])
    assert config.train.epochs == 2


def test_unknown_field_suggests_closest():
    with pytest.raises(ConfigError, match=r"train\.epocs: unknown config key.*Did you mean 'epochs'"):
        resolve_config(ToyConfig(), overrides=["train.epocs=3"])


def test_unknown_section_suggests_closest(tmp_path):
    path = write_yaml(tmp_path / "a.yaml", "trian:\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=r"trian: unknown config key.*Did you mean 'train'"):
        resolve_config(ToyConfig(), [path])


def test_out_of_range_names_field_and_range():
    with pytest.raises(ConfigError, match=r"model\.dropout: value 1\.5 is out of range; expected a value in \[0\.0, 1\.0\)"):
        resolve_config(ToyConfig(), overrides=["model.dropout=1.5"])


def test_bad_choice_suggests_closest():
    with pytest.raises(ConfigError, match=r"model\.cell: invalid value 'lstn'.*Did you mean 'lstm'"):
        resolve_config(ToyConfig(), overrides=["model.cell=lstn"])


def test_wrong_type_rejected():
    with pytest.raises(ConfigError, match=r"train\.epochs: invalid value 'many'; expected an integer"):
        resolve_config(ToyConfig(), overrides=["train.epochs=many"])


def test_fractional_integer_rejected():
    with pytest.raises(ConfigError, match=r"train\.batch_size: invalid value 2\.5"):
        resolve_config(ToyConfig(), overrides=["train.batch_size=2.5"])


def test_bool_not_accepted_as_integer():
    with pytest.raises(ConfigError, match="expected an integer"):
        resolve_config(ToyConfig(), overrides=["train.epochs=true"])


def test_override_without_equals_rejected():
    with pytest.raises(ConfigError, match="expected section.field=value"):
        parse_override("train.epochs")


def test_missing_config_file_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        resolve_config(ToyConfig(), [tmp_path / "missing.yaml"])


def test_invalid_yaml_names_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", "train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        resolve_config(ToyConfig(), [path])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match=r"unknown preset 'tinny'.*Did you mean 'tiny'"):
        select_preset({"default": ToyConfig(), "tiny": ToyConfig()}, "tinny")


def test_save_and_load_round_trip(tmp_path):
    config = resolve_config(ToyConfig(), overrides=["model.cell=gru", "data.pair=[fr, en]"])
    path = save_config(config, tmp_path / "run" / "config.yaml")
    assert load_config(ToyConfig, path) == config


def test_search_space_replaced_not_merged(tmp_path):
    path = write_yaml(
        tmp_path / "space.yaml",
        "tune:\n  search_space:\n    units: {type: int, min: 8, max: 16, stage: size}\n",
    )
    config = resolve_config(ToyConfig(), [path])
    assert list(config.tune.search_space) == ["units"]


def test_search_space_bad_bounds_rejected():
    with pytest.raises(ConfigError, match=r"tune\.search_space\.units: min 16 must be below max 8"):
        resolve_config(ToyConfig(), overrides=["tune.search_space={units: {type: int, min: 16, max: 8}}"])


def test_search_space_log_needs_positive_min():
    with pytest.raises(ConfigError, match="log sampling needs min > 0"):
        resolve_config(
            ToyConfig(),
            overrides=["tune.search_space={lr: {type: float, min: 0, max: 1, sampling: log}}"],
        )


def test_tflite_variant_checked():
    with pytest.raises(ConfigError, match=r"export\.tflite_variants: invalid value 'int4'"):
        resolve_config(ToyConfig(), overrides=["export.tflite_variants=[float32, int4]"])


def test_nan_rejected_for_float():
    with pytest.raises(ConfigError, match=r"train\.learning_rate: invalid value .*finite number"):
        resolve_config(ToyConfig(), overrides=["train.learning_rate=.nan"])
