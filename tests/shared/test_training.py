"""Tests for the optimizer, callbacks, train_model outputs and resuming a killed run."""

import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from shared.config import RecurrentConfig, TrainConfig
from shared.recurrent import apply_recurrent_stack, build_recurrent_stack
from shared.training import (
    build_learning_rate,
    build_optimizer,
    resolve_verbosity,
    summarize_history,
    train_model,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def build_regressor(units: int = 4) -> keras.Model:
    inputs = keras.Input((6, 2))
    hidden = apply_recurrent_stack(build_recurrent_stack(RecurrentConfig(cell="gru", units=units)), inputs)
    return keras.Model(inputs, keras.layers.Dense(1)(hidden))


def make_dataset(examples: int = 32, batch_size: int = 8) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(examples, 6, 2)).astype(np.float32)
    targets = values.sum(axis=(1, 2))
    return tf.data.Dataset.from_tensor_slices((values, targets)).batch(batch_size)


def test_optimizer_global_norm_clipping():
    optimizer = build_optimizer(TrainConfig(clipping="global_norm", clip_value=0.5))
    assert optimizer.global_clipnorm == 0.5
    assert optimizer.clipnorm is None


def test_optimizer_value_clipping():
    optimizer = build_optimizer(TrainConfig(optimizer="sgd", clipping="value", clip_value=2.0))
    assert optimizer.clipvalue == 2.0


def test_cosine_schedule_with_warmup():
    schedule = build_learning_rate(TrainConfig(learning_rate=0.01, lr_schedule="cosine", warmup_steps=10), 110)
    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(10)) == pytest.approx(0.01)
    assert float(schedule(60)) == pytest.approx(0.005, rel=1e-3)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-8)


def test_decaying_schedule_needs_total_steps():
    with pytest.raises(ValueError, match="needs total_steps"):
        build_learning_rate(TrainConfig(lr_schedule="cosine"))


def test_summarize_history_best_epoch():
    summary = summarize_history({"loss": [3.0, 2.0, 1.0], "val_loss": [2.5, 1.5, 1.8]}, "val_loss", "min")
    assert summary["best"] == 1.5
    assert summary["best_epoch"] == 2
    assert summary["final"]["loss"] == 1.0
    assert summary["epochs_run"] == 3


def test_train_model_writes_run_files(tmp_path):
    model = build_regressor()
    model.compile(build_optimizer(TrainConfig()), "mse")
    metrics = train_model(model, make_dataset(), make_dataset(), TrainConfig(epochs=2), tmp_path, verbose=0)
    for name in ("model.keras", "metrics.json", "history.csv", "learning_curves.png", "checkpoints/best.keras"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs_run"] == 2
    assert metrics["parameters"] == model.count_params()
    assert not (tmp_path / "backup").exists()  # Deleted once training completes.


def test_train_model_warns_small_dataset(tmp_path, caplog):
    model = build_regressor(units=16)
    model.compile(build_optimizer(TrainConfig()), "mse")
    with caplog.at_level(logging.WARNING, logger="shared.training"):
        train_model(model, make_dataset(), None, TrainConfig(epochs=1), tmp_path, num_train_samples=32, verbose=0)
    assert "training set is small" in caplog.text


def test_train_model_stops_on_nan(tmp_path):
    model = build_regressor()
    model.compile(keras.optimizers.SGD(1e30), "mse")
    metrics = train_model(model, make_dataset(), None, TrainConfig(epochs=5), tmp_path, verbose=0)
    assert metrics["epochs_run"] == 1


RESUMABLE_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import keras, numpy as np, tensorflow as tf
    from shared.config import TrainConfig
    from shared.training import build_optimizer, set_seeds, train_model
    sys.path.insert(0, {tests!r})
    from test_training import build_regressor, make_dataset

    class KillAtEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == int(os.environ.get("KILL_AT_EPOCH", "-1")):
                os.kill(os.getpid(), signal.SIGKILL)

    set_seeds(0)
    model = build_regressor()
    model.compile(build_optimizer(TrainConfig()), "mse")
    config = TrainConfig(epochs=4, early_stopping_patience=10)
    train_model(model, make_dataset(), make_dataset(), config, {run_dir!r},
                extra_callbacks=[KillAtEpoch()], verbose=0)
    """
)


def read_epochs(history_csv: Path) -> list[int]:
    with open(history_csv, newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_killed_run_resumes_from_backup(tmp_path):
    run_dir = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(RESUMABLE_SCRIPT.format(repo=str(REPO_ROOT), tests=str(Path(__file__).parent),
                                              run_dir=str(run_dir)))
    env = {**os.environ, "KILL_AT_EPOCH": "2", "TF_CPP_MIN_LOG_LEVEL": "2"}
    killed = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert read_epochs(run_dir / "history.csv") == [0, 1]
    assert (run_dir / "backup").is_dir()

    env["KILL_AT_EPOCH"] = "-1"
    resumed = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_epochs(run_dir / "history.csv") == [0, 1, 2, 3]
    assert not (run_dir / "backup").exists()


def test_rerun_warns_before_replacing_model(tmp_path, caplog):
    model = build_regressor()
    model.compile(build_optimizer(TrainConfig()), "mse")
    train_model(model, make_dataset(), None, TrainConfig(epochs=1), tmp_path, verbose=0)
    with caplog.at_level(logging.WARNING, logger="shared.training"):
        train_model(model, make_dataset(), None, TrainConfig(epochs=1), tmp_path, verbose=0)
    assert "already contains a trained model.keras" in caplog.text


def test_verbosity_auto_without_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert resolve_verbosity("auto") == 2
    assert resolve_verbosity(1) == 1
