"""Tests for shared.tuning: search space, objective check, staged search, resume and outputs."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import shutil
from pathlib import Path

import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf

from shared.cli import CommandContext, run_cli
from shared.config import (
    ExportConfig,
    RecurrentConfig,
    TrainConfig,
    TuneConfig,
    check_range,
    load_config,
)
from shared.errors import ConfigError
from shared.training import build_optimizer
from shared.tuning import (
    ConfigHyperModel,
    TimeBudget,
    apply_hyperparameters,
    build_tuner,
    check_search_space,
    resolve_search_fields,
    resolve_tune_config,
    run_tuning,
    select_stages,
)

TIMESTEPS, FEATURES, EXAMPLES = 5, 3, 32


@dataclasses.dataclass(frozen=True)
class ToyDataConfig:
    """Random regression sequences."""

    examples: int = EXAMPLES
    noise: float = 0.1

    def __post_init__(self) -> None:
        check_range("data.examples", self.examples, 8)


@dataclasses.dataclass(frozen=True)
class ToyModelConfig(RecurrentConfig):
    """A tiny LSTM with a dense head."""

    units: int = 4
    head_units: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("model.head_units", self.head_units, 1, 64)


TOY_SPACE = {
    "learning_rate": {
        "type": "float",
        "min": 1e-3,
        "max": 1e-1,
        "sampling": "log",
        "stage": "learning_rate",
    },
    "units": {"type": "int", "min": 4, "max": 8, "step": 4, "stage": "size"},
}


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """A pipeline config with the five standard sections."""

    data: ToyDataConfig = ToyDataConfig()
    model: ToyModelConfig = ToyModelConfig()
    train: TrainConfig = TrainConfig(epochs=3, batch_size=8, steps_per_epoch=2)
    tune: TuneConfig = TuneConfig(
        max_trials=2, epochs_per_trial=1, stages=("learning_rate", "size"), search_space=TOY_SPACE
    )
    export: ExportConfig = ExportConfig()


def toy_config(**tune_changes) -> ToyConfig:
    config = ToyConfig()
    return dataclasses.replace(config, tune=dataclasses.replace(config.tune, **tune_changes))


def make_arrays(examples: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(examples, TIMESTEPS, FEATURES)).astype("float32")
    targets = inputs.sum(axis=(1, 2))[:, None].astype("float32")
    return inputs, targets


def build_toy_model(config: ToyConfig) -> keras.Model:
    inputs = keras.Input((TIMESTEPS, FEATURES))
    hidden = keras.layers.LSTM(config.model.units, dropout=config.model.dropout)(inputs)
    hidden = keras.layers.Dense(config.model.head_units, activation="relu")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    # Eager steps: for two steps per trial, tracing a graph would take longer than training.
    model.compile(
        optimizer=build_optimizer(config.train), loss="mse", metrics=["mae"], run_eagerly=True
    )
    return model


def make_toy_datasets(config: ToyConfig) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    inputs, targets = make_arrays(config.data.examples)
    batch_size = config.train.batch_size
    train = tf.data.Dataset.from_tensor_slices((inputs, targets)).batch(batch_size).repeat()
    validation = tf.data.Dataset.from_tensor_slices((inputs[:16], targets[:16])).batch(batch_size)
    return train, validation


def make_context(run_dir: Path, **flags) -> CommandContext:
    args = argparse.Namespace(
        tuner=None, max_trials=None, executions_per_trial=None, time_budget=None, stage="all"
    )
    for name, value in flags.items():
        setattr(args, name, value)
    return CommandContext("toy", "tune", run_dir, run_dir, "default", args, io.StringIO())


def tune_toy(run_dir: Path, config: ToyConfig | None = None, **flags) -> dict:
    return run_tuning(
        config or toy_config(), make_context(run_dir, **flags), build_toy_model, make_toy_datasets
    )


def read_trials_csv(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "trials.csv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------
# Search space to config fields.


def test_fields_by_name_search_order():
    space = {
        "learning_rate": {"type": "float", "min": 0.001, "max": 0.01},
        "batch_size": {"type": "choice", "values": [8, 16]},
        "units": {"type": "int", "min": 4, "max": 8},
        "layers": {"type": "int", "min": 1, "max": 2},
        "dropout": {"type": "float", "min": 0.0, "max": 0.5},
        "recurrent_dropout": {"type": "float", "min": 0.0, "max": 0.5},
        "weight_decay": {"type": "float", "min": 0.0, "max": 0.1},
        "cell": {"type": "choice", "values": ["lstm", "gru"]},
        "examples": {"type": "int", "min": 8, "max": 16},
    }
    fields = resolve_search_fields(ToyConfig(), space)
    assert fields == {
        "learning_rate": "train.learning_rate",
        "batch_size": "train.batch_size",
        "units": "model.units",
        "layers": "model.layers",
        "dropout": "model.dropout",
        "recurrent_dropout": "model.recurrent_dropout",
        "weight_decay": "train.weight_decay",
        "cell": "model.cell",
        "examples": "data.examples",
    }


def test_fields_explicit_field_wins():
    space = {"width": {"type": "int", "min": 1, "max": 4, "field": "model.head_units"}}
    assert resolve_search_fields(ToyConfig(), space) == {"width": "model.head_units"}


def test_fields_unknown_name_names_closest():
    space = {"unit": {"type": "int", "min": 4, "max": 8}}
    with pytest.raises(ConfigError) as error:
        resolve_search_fields(ToyConfig(), space)
    assert "tune.search_space.unit" in str(error.value)
    assert "'model.units'" in str(error.value)


def test_fields_unknown_explicit_field_names_closest():
    space = {"width": {"type": "int", "min": 1, "max": 4, "field": "model.head_unit"}}
    with pytest.raises(ConfigError, match="'model.head_units'"):
        resolve_search_fields(ToyConfig(), space)


def test_apply_converts_and_validates():
    fields = {"learning_rate": "train.learning_rate", "units": "model.units"}
    config = apply_hyperparameters(ToyConfig(), fields, {"learning_rate": 1, "units": 6})
    assert config.train.learning_rate == 1.0
    assert isinstance(config.train.learning_rate, float)
    assert config.model.units == 6
    assert config.train.batch_size == 8  # Untouched fields keep their values.
    with pytest.raises(ConfigError, match="model.units"):
        apply_hyperparameters(ToyConfig(), fields, {"units": 0})


def test_search_space_bound_outside_field_range():
    space = {"dropout": {"type": "float", "min": 0.5, "max": 1.0, "stage": "regularization"}}
    config = ToyConfig()
    with pytest.raises(ConfigError) as error:
        check_search_space(config, space, resolve_search_fields(config, space))
    assert "tune.search_space.dropout" in str(error.value)
    assert "1.0" in str(error.value)


def test_search_space_invalid_choice_value():
    space = {"cell": {"type": "choice", "values": ["lstm", "transformer"]}}
    config = ToyConfig()
    with pytest.raises(ConfigError, match="transformer"):
        check_search_space(config, space, resolve_search_fields(config, space))


def test_invalid_sample_stops_search():
    space = {"units": TOY_SPACE["units"]}
    hypermodel = ConfigHyperModel(
        ToyConfig(), space, {"units": "model.units"}, build_toy_model, make_toy_datasets
    )
    hp = keras_tuner.HyperParameters()
    hp.values["units"] = 0  # As if the oracle had sampled an invalid value.
    with pytest.raises(ConfigError) as error:
        hypermodel.trial_config(hp)
    assert isinstance(error.value, keras_tuner.errors.FatalError)  # KerasTuner re-raises it.
    assert "model.units" in str(error.value)


def test_unknown_name_fails_before_any_trial(tmp_path):
    space = dict(TOY_SPACE, unitz={"type": "int", "min": 4, "max": 8, "stage": "size"})
    with pytest.raises(ConfigError, match="'model.units'"):
        tune_toy(tmp_path, toy_config(search_space=space))
    assert not (tmp_path / "tuning").exists()


def test_flags_override_tune_section():
    args = argparse.Namespace(
        tuner="hyperband", max_trials=7, executions_per_trial=2, time_budget=1.5
    )
    tune = resolve_tune_config(ToyConfig().tune, args)
    assert tune.tuner == "hyperband"
    assert tune.max_trials == 7
    assert tune.executions_per_trial == 2
    assert tune.time_budget_minutes == 1.5
    assert tune.epochs_per_trial == 1  # No flag: the config's value.


def test_flags_invalid_value_rejected():
    args = argparse.Namespace(tuner=None, max_trials=0, executions_per_trial=None, time_budget=None)
    with pytest.raises(ConfigError, match="tune.max_trials"):
        resolve_tune_config(ToyConfig().tune, args)


def test_select_stages_cases():
    tune = ToyConfig().tune
    assert select_stages(tune, "all") == ("learning_rate", "size")
    assert select_stages(tune, "size") == ("size",)
    with pytest.raises(ConfigError, match="regularization"):
        select_stages(tune, "regularization")


# ---------------------------------------------------------------------------
# Objective check.


def test_objective_unknown_lists_keys(tmp_path):
    with pytest.raises(ConfigError) as error:
        tune_toy(tmp_path, toy_config(objective="val_mea"))
    message = str(error.value)
    assert "'val_mae'" in message  # The closest name.
    for key in ("loss", "mae", "val_loss"):
        assert f"'{key}'" in message
    assert not list(tmp_path.glob("tuning/*/trial_*"))


# ---------------------------------------------------------------------------
# Staged search, outputs, resume.


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("staged")
    keras.utils.set_random_seed(1)
    result = tune_toy(run_dir)
    return run_dir, result


def test_staged_result_counts(staged_run):
    _, result = staged_run
    assert list(result["stages"]) == ["learning_rate", "size"]
    assert result["stages"]["learning_rate"]["trials"] == 2
    assert result["stages"]["size"]["trials"] == 2
    assert result["trials"] == 4
    assert result["new_trials"] == 4
    assert result["time_budget_reached"] is False


def test_staged_second_stage_uses_best_rate(staged_run):
    run_dir, result = staged_run
    rows = read_trials_csv(run_dir)
    first = [row for row in rows if row["stage"] == "learning_rate"]
    second = [row for row in rows if row["stage"] == "size"]
    assert len(first) == 2
    assert len(second) == 2
    best_first = min(first, key=lambda row: float(row["val_loss"]))
    for row in second:
        assert float(row["learning_rate"]) == pytest.approx(float(best_first["learning_rate"]))
    assert result["stages"]["size"]["fixed"]["learning_rate"] == pytest.approx(
        float(best_first["learning_rate"])
    )


def test_trials_csv_columns(staged_run):
    run_dir, _ = staged_run
    rows = read_trials_csv(run_dir)
    assert list(rows[0]) == [
        "stage",
        "trial_id",
        "status",
        "learning_rate",
        "units",
        "val_loss",
        "duration_seconds",
        "parameters",
    ]
    for row in rows:
        assert row["status"] == "COMPLETED"
        assert float(row["duration_seconds"]) > 0
    # LSTM(4): 4*4*(3+4+1)=128, Dense(2): 10, Dense(1): 3 -> 141 parameters.
    four_unit_rows = [row for row in rows if row["units"] == "4"]
    assert four_unit_rows
    assert all(row["parameters"] == "141" for row in four_unit_rows)


def test_best_yaml_loads_with_best_values(staged_run):
    run_dir, result = staged_run
    best = load_config(ToyConfig, run_dir / "best.yaml")
    rows = read_trials_csv(run_dir)
    best_row = min(rows, key=lambda row: float(row["val_loss"]))
    assert result["best_value"] == pytest.approx(float(best_row["val_loss"]))
    assert best.train.learning_rate == pytest.approx(float(best_row["learning_rate"]))
    assert best.model.units == int(best_row["units"])
    assert best.train.epochs == 3  # The trial length does not leak into the saved config.


def test_stage_alone_reads_saved_best(staged_run, tmp_path):
    run_dir, result = staged_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    again = tune_toy(copy, stage="size")
    assert again["new_trials"] == 0
    assert list(again["stages"]) == ["learning_rate", "size"]
    assert again["stages"]["size"]["fixed"] == result["stages"]["size"]["fixed"]


def test_stage_alone_without_saved_results_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="shared.tuning"):
        result = tune_toy(tmp_path, toy_config(max_trials=1), stage="size")
    assert result["stages"]["size"]["fixed"] == {}
    assert "keep the config's values" in caplog.text
    rows = read_trials_csv(tmp_path)
    assert [row["stage"] for row in rows] == ["size"]
    assert float(rows[0]["learning_rate"]) == pytest.approx(0.001)


def test_resume_runs_only_new_trials(tmp_path):
    config = toy_config(stages=("learning_rate",))
    first = tune_toy(tmp_path, config, max_trials=2)
    trial_dirs = sorted(p.name for p in (tmp_path / "tuning" / "learning_rate").glob("trial_*"))
    second = tune_toy(tmp_path, config, max_trials=3)
    assert first["new_trials"] == 2
    assert second["new_trials"] == 1
    assert second["trials"] == 3
    rows = read_trials_csv(tmp_path)
    assert len(rows) == 3
    assert len({row["learning_rate"] for row in rows}) == 3  # No trial repeated.
    new_dirs = sorted(p.name for p in (tmp_path / "tuning" / "learning_rate").glob("trial_*"))
    assert set(trial_dirs) < set(new_dirs)
    assert len(new_dirs) == 3


def test_resume_with_other_tuner_rejected(staged_run, tmp_path):
    run_dir, _ = staged_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    with pytest.raises(ConfigError, match="tuner"):
        tune_toy(copy, tuner="bayesian")
    assert len(read_trials_csv(copy)) == 4


# ---------------------------------------------------------------------------
# Tuners and the time budget.


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["bayesian", "hyperband"])
def test_tuner_runs_tiny_search(tmp_path, tuner):
    config = toy_config(stages=("learning_rate",), epochs_per_trial=2, max_trials=2)
    result = tune_toy(tmp_path, config, tuner=tuner)
    assert result["tuner"] == tuner
    assert result["stages"]["learning_rate"]["completed_trials"] >= 1
    assert (tmp_path / "best.yaml").is_file()


class StepClock:
    """A clock that returns the next of the given readings at each call."""

    def __init__(self, readings):
        self.readings = list(readings)

    def __call__(self) -> float:
        return self.readings.pop(0)


def test_budget_stops_new_trials(tmp_path):
    config = toy_config()
    space = {"units": TOY_SPACE["units"]}
    hypermodel = ConfigHyperModel(
        config, space, {"units": "model.units"}, build_toy_model, make_toy_datasets
    )
    # Started at 0; readings before trials 1 and 2: the second comes after one minute.
    budget = TimeBudget(1.0, clock=StepClock([0.0, 10.0, 61.0]))
    tune = dataclasses.replace(config.tune, max_trials=5)
    tuner = build_tuner(tune, hypermodel, tmp_path, "size", seed=1, budget=budget)
    with pytest.raises(Exception) as stop:
        tuner.search(epochs=1, verbose=0)
    assert type(stop.value).__name__ == "TimeBudgetReached"
    assert len(tuner.oracle.trials) == 1


def test_spent_budget_starts_no_trial(tmp_path, caplog):
    config = toy_config(time_budget_minutes=1e-9)
    with caplog.at_level(logging.WARNING, logger="shared.tuning"):
        result = tune_toy(tmp_path, config)
    assert result["time_budget_reached"] is True
    assert result["trials"] == 0
    assert result["best_config"] is None
    assert "time budget" in caplog.text
    assert not (tmp_path / "best.yaml").exists()


# ---------------------------------------------------------------------------
# Command line.


def tune_command(config, context):
    return run_tuning(config, context, build_toy_model, make_toy_datasets)


def test_cli_tune_smoke(tmp_path):
    stdout = io.StringIO()
    argv = [
        "tune",
        "--run-dir",
        str(tmp_path),
        "--data-dir",
        str(tmp_path),
        "--max-trials",
        "1",
        "--stage",
        "learning_rate",
        "--log-level",
        "WARNING",
    ]
    code = run_cli(
        "toy", {"default": ToyConfig()}, {"tune": tune_command}, argv=argv, stdout=stdout
    )
    assert code == 0
    result = json.loads(stdout.getvalue())
    assert result["stages"]["learning_rate"]["trials"] == 1
    assert (tmp_path / "best.yaml").is_file()
    assert len(read_trials_csv(tmp_path)) == 1


def test_cli_tune_bad_objective_exit_code(tmp_path):
    argv = [
        "tune",
        "--run-dir",
        str(tmp_path),
        "--data-dir",
        str(tmp_path),
        "--set",
        "tune.objective=val_acc",
        "--log-level",
        "ERROR",
    ]
    code = run_cli(
        "toy", {"default": ToyConfig()}, {"tune": tune_command}, argv=argv, stdout=io.StringIO()
    )
    assert code == 2
