"""Tests for tuning outputs: edge objective, kept checkpoints, plots, HParams and options."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import sys
from pathlib import Path

import keras_tuner
import pytest
import tensorflow as tf

from shared.cli import CommandContext
from shared.errors import ConfigError
from shared.tuning import (
    ConfigHyperModel,
    EdgeLimits,
    SearchOptions,
    best_record,
    check_search_setup,
    compute_penalized_value,
    resolve_search_options,
    run_tuning,
    select_best_epoch,
)

TOY_PATH = Path(__file__).with_name("toy_pipeline.py")
_spec = importlib.util.spec_from_file_location("toy_pipeline", TOY_PATH)
toy = importlib.util.module_from_spec(_spec)
sys.modules["toy_pipeline"] = toy  # Dataclasses look their module up while being created.
_spec.loader.exec_module(toy)


def make_args(**flags) -> argparse.Namespace:
    args = argparse.Namespace(
        tuner=None,
        max_trials=None,
        executions_per_trial=None,
        time_budget=None,
        stage="all",
        max_size_kb=None,
        max_latency_ms=None,
        keep_checkpoints=None,
        role=None,
        oracle=None,
        worker_id=None,
    )
    for name, value in flags.items():
        setattr(args, name, value)
    return args


def tune_toy(run_dir: Path, build_export_model=None, **flags) -> dict:
    context = CommandContext(
        "toy", "tune", run_dir, run_dir, "default", make_args(**flags), io.StringIO()
    )
    config = toy.ToyConfig()
    return run_tuning(
        config, context, toy.build_model, toy.make_datasets, build_export_model=build_export_model
    )


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "trials.csv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------
# Pure functions.


def test_penalty_for_min_objective():
    # 25% over the limit: 2.0 + (2.0 + 1) * 1.25 = 5.75.
    assert compute_penalized_value(2.0, 0.25, "min") == pytest.approx(5.75)


def test_penalty_for_max_objective():
    # 0.8 - (0.8 + 1) * 1.5 = -1.9.
    assert compute_penalized_value(0.8, 0.5, "max") == pytest.approx(-1.9)


def test_no_penalty_within_limits():
    assert compute_penalized_value(2.0, -0.1, "min") == 2.0
    assert compute_penalized_value(2.0, 0.0, "min") == 2.0


def test_excess_is_largest_overrun():
    limits = EdgeLimits(max_size_kb=100.0, max_latency_ms=2.0)
    assert limits.compute_excess(150.0, 1.0) == pytest.approx(0.5)
    assert limits.compute_excess(50.0, 3.0) == pytest.approx(0.5)
    assert limits.compute_excess(50.0, 1.0) == pytest.approx(-0.5)


def test_best_epoch_metrics():
    history = {"val_loss": [3.0, 1.0, 2.0], "loss": [5.0, 4.0, 3.0]}
    assert select_best_epoch(history, "val_loss", "min") == {"val_loss": 1.0, "loss": 4.0}
    assert select_best_epoch(history, "val_loss", "max") == {"val_loss": 3.0, "loss": 5.0}


def test_best_epoch_skips_nan():
    history = {"val_loss": [float("nan"), 2.0]}
    assert select_best_epoch(history, "val_loss", "min") == {"val_loss": 2.0}


def test_best_record_skips_infeasible():
    records = [
        {"trial_id": "0", "status": "COMPLETED", "value": 1.0, "feasible": False},
        {"trial_id": "1", "status": "COMPLETED", "value": 2.0, "feasible": True},
        {"trial_id": "2", "status": "FAILED", "value": None},
    ]
    assert best_record(records, "min")["trial_id"] == "1"
    assert best_record(records[:1], "min") is None


def test_edge_objective_needs_export_hook():
    options = SearchOptions(edge_limits=EdgeLimits(max_size_kb=10.0))
    with pytest.raises(ConfigError, match="build_export_model"):
        check_search_setup(options, ("size",), None)


def test_distributed_needs_one_stage():
    with pytest.raises(ConfigError, match="--stage"):
        check_search_setup(SearchOptions(role="chief"), ("learning_rate", "size"), None)


def test_options_from_flags():
    options = resolve_search_options(
        toy.ToyConfig().tune, make_args(max_size_kb=64.0, max_latency_ms=1.5, keep_checkpoints=1)
    )
    assert options.edge_limits == EdgeLimits(64.0, 1.5)
    assert options.keep_checkpoints == 1
    assert options.role == "standalone"


def test_options_default_checkpoints():
    assert resolve_search_options(toy.ToyConfig().tune, make_args()).keep_checkpoints == 3


def test_options_negative_limit_rejected():
    with pytest.raises(ConfigError, match="--max-size-kb"):
        resolve_search_options(toy.ToyConfig().tune, make_args(max_size_kb=-1.0))


def make_hypermodel(fixed=None) -> ConfigHyperModel:
    config = toy.ToyConfig()
    fields = {"learning_rate": "train.learning_rate", "units": "model.units"}
    space = {"units": toy.SEARCH_SPACE["units"]}
    return ConfigHyperModel(config, space, fields, toy.build_model, toy.make_datasets, fixed=fixed)


def test_chief_declares_fixed_values():
    hp = keras_tuner.HyperParameters()
    config = make_hypermodel(fixed={"learning_rate": 0.05}).trial_config(hp)
    assert config.train.learning_rate == 0.05
    assert hp.values["learning_rate"] == 0.05  # Sent to workers with each trial.


def test_worker_applies_chief_values():
    hp = keras_tuner.HyperParameters()
    hp.Fixed("learning_rate", 0.07)  # As received from the chief.
    config = make_hypermodel().trial_config(hp)
    assert config.train.learning_rate == 0.07
    assert config.model.units == 2  # The stage's own entry, at its default (the minimum).


# ---------------------------------------------------------------------------
# One search: checkpoints kept, plots, HParams logs.


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("search")
    result = tune_toy(run_dir, keep_checkpoints=1)
    return run_dir, result


def test_only_best_checkpoint_kept(search_run):
    run_dir, result = search_run
    checkpoints = sorted(run_dir.glob("tuning/*/trial_*/checkpoint.weights.h5"))
    assert result["trials"] == 3
    assert [path.parent.name for path in checkpoints] == [f"trial_{result['best_trial_id']}"]


def test_search_plots_written(search_run):
    run_dir, result = search_run
    for name in ("objective_per_trial.png", "objective_per_hyperparameter.png"):
        assert (run_dir / name).read_bytes().startswith(b"\x89PNG")
    assert len(result["plots"]) == 2


def test_hparams_logged_per_trial(search_run):
    run_dir, _ = search_run
    trial_logs = sorted((run_dir / "logs" / "tuning" / "learning_rate").iterdir())
    assert [path.name for path in trial_logs] == ["0", "1", "2"]
    plugins = set()
    for event_file in (trial_logs[0] / "execution0").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            plugins.update(value.metadata.plugin_data.plugin_name for value in event.summary.value)
    assert "hparams" in plugins


def test_trials_csv_without_edge_columns(search_run):
    run_dir, _ = search_run
    assert "size_kb" not in read_rows(run_dir)[0]


# ---------------------------------------------------------------------------
# Edge-aware objective: each trial is exported to TFLite and checked against the limits.


@pytest.mark.slow
def test_edge_limit_penalizes_every_trial(tmp_path):
    result = tune_toy(tmp_path, toy.build_export_model, max_size_kb=1.0, max_trials=2)
    rows = read_rows(tmp_path)
    assert len(rows) == 2
    for row in rows:
        size_kb, value, score = float(row["size_kb"]), float(row["val_loss"]), float(row["score"])
        assert size_kb > 1.0
        assert row["feasible"] == "False"
        assert score == pytest.approx(
            compute_penalized_value(value, size_kb / 1.0 - 1.0, "min"), rel=1e-3
        )
        assert float(row["latency_ms"]) > 0
    assert result["best_config"] is None  # No trial met the limit.
    assert list(tmp_path.glob("tuning/*/trial_*/edge/model_float32.tflite"))


@pytest.mark.slow
def test_edge_limit_met(tmp_path):
    result = tune_toy(tmp_path, toy.build_export_model, max_size_kb=1000.0, max_trials=1)
    rows = read_rows(tmp_path)
    assert rows[0]["feasible"] == "True"
    assert float(rows[0]["score"]) == pytest.approx(float(rows[0]["val_loss"]))
    assert result["best_config"] is not None
