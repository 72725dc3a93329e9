"""Tests for shared.distributed: TF_CONFIG roles, the custom loop and two loopback workers."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from shared.cli import resolve_strategy_run_dir
from shared.config import TrainConfig
from shared.distributed import (
    build_strategy,
    clip_gradients,
    is_chief_task,
    is_improvement,
    read_tf_config,
    resolve_worker_run_dir,
    train_custom_loop,
)
from shared.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
TOY_PIPELINE = Path(__file__).with_name("toy_pipeline.py")
TIMEOUT_S = 300


def tf_config(task_type: str, index: int, cluster: dict | None = None) -> dict:
    cluster = cluster or {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    return {"cluster": cluster, "task": {"type": task_type, "index": index}}


# ---------------------------------------------------------------------------
# TF_CONFIG and roles.


def test_tf_config_unset_is_empty():
    assert read_tf_config({}) == {}


def test_tf_config_invalid_json():
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_tf_config({"TF_CONFIG": "{cluster"})


def test_tf_config_task_outside_cluster():
    with pytest.raises(ConfigError, match="not in the cluster"):
        read_tf_config({"TF_CONFIG": json.dumps(tf_config("worker", 2))})


def test_chief_is_worker_zero_without_chief():
    assert is_chief_task(tf_config("worker", 0))
    assert not is_chief_task(tf_config("worker", 1))


def test_chief_task_type_wins():
    cluster = {"chief": ["h:1"], "worker": ["h:2"]}
    assert is_chief_task(tf_config("chief", 0, cluster))
    assert not is_chief_task(tf_config("worker", 0, cluster))


def test_worker_run_dir(tmp_path):
    assert resolve_worker_run_dir(tmp_path, tf_config("worker", 0)) == tmp_path
    assert (
        resolve_worker_run_dir(tmp_path, tf_config("worker", 1))
        == tmp_path / "workers" / "worker_1"
    )


def test_cli_run_dir_for_default_strategy(tmp_path):
    class Args:
        strategy = "default"

    assert resolve_strategy_run_dir(Args(), tmp_path) == tmp_path


def test_unknown_strategy_rejected():
    with pytest.raises(ConfigError, match="unknown strategy"):
        build_strategy("parameter-server")


def test_improvement_cases():
    assert is_improvement(1.0, float("nan"), "min")
    assert is_improvement(1.0, 2.0, "min")
    assert not is_improvement(2.0, 1.0, "min")
    assert is_improvement(2.0, 1.0, "max")
    assert not is_improvement(float("nan"), 1.0, "min")


def test_clip_global_norm():
    optimizer = keras.optimizers.Adam(global_clipnorm=1.0)
    clipped = clip_gradients(optimizer, [tf.constant([3.0, 0.0]), tf.constant([4.0])])
    # Global norm 5 -> scaled by 1/5.
    np.testing.assert_allclose(clipped[0].numpy(), [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped[1].numpy(), [0.8], rtol=1e-6)


def test_clip_value():
    optimizer = keras.optimizers.SGD(clipvalue=0.5)
    clipped = clip_gradients(optimizer, [tf.constant([3.0, -0.2, -4.0])])
    np.testing.assert_allclose(clipped[0].numpy(), [0.5, -0.2, -0.5])


# ---------------------------------------------------------------------------
# The custom loop on one device (the default strategy).


def build_regressor() -> keras.Model:
    inputs = keras.Input((4, 2))
    hidden = keras.layers.GRU(3)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.compile(
        optimizer=keras.optimizers.Adam(0.05, global_clipnorm=1.0), loss="mse", metrics=["mae"]
    )
    return model


def make_data(examples: int = 32) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(examples, 4, 2)).astype(np.float32)
    targets = values.sum(axis=(1, 2))[:, None]
    return tf.data.Dataset.from_tensor_slices((values, targets)).batch(8)


def read_history(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_custom_loop_writes_run_files(tmp_path):
    model = build_regressor()
    config = TrainConfig(epochs=3, batch_size=8, early_stopping_patience=5)
    history = train_custom_loop(
        model, make_data(), make_data(16), config, tmp_path, strategy=tf.distribute.get_strategy()
    )
    assert sorted(history) == ["loss", "mae", "val_loss", "val_mae"]
    assert len(history["loss"]) == 3
    rows = read_history(tmp_path / "history.csv")
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    assert (tmp_path / "checkpoints" / "best.keras").is_file()
    assert not (tmp_path / "backup").exists()  # Deleted once training finished.
    assert list((tmp_path / "logs" / "validation").glob("events.out.tfevents.*"))


def test_custom_loop_loss_matches_evaluate(tmp_path):
    model = build_regressor()
    config = TrainConfig(epochs=1, batch_size=8)
    history = train_custom_loop(
        model, make_data(), make_data(16), config, tmp_path, strategy=tf.distribute.get_strategy()
    )
    # One epoch: the best weights are the final ones, so evaluate runs the same model.
    loss, mae = model.evaluate(make_data(16), verbose=0)
    assert history["val_loss"][0] == pytest.approx(loss, rel=1e-5)
    assert history["val_mae"][0] == pytest.approx(mae, rel=1e-5)


def test_custom_loop_early_stops_and_restores(tmp_path):
    model = build_regressor()
    model.optimizer.learning_rate.assign(0.0)  # Nothing changes: no epoch after the first improves.
    config = TrainConfig(epochs=10, batch_size=8, early_stopping_patience=2)
    history = train_custom_loop(
        model, make_data(), make_data(16), config, tmp_path, strategy=tf.distribute.get_strategy()
    )
    assert len(history["loss"]) == 3  # The first epoch, then two without improvement.


def test_custom_loop_resumes_from_backup(tmp_path):
    config = TrainConfig(epochs=2, batch_size=8)
    strategy = tf.distribute.get_strategy()
    first = build_regressor()
    train_custom_loop(first, make_data(), None, config, tmp_path, strategy=strategy, monitor="loss")
    # As if a 3-epoch run had been killed after its second epoch: a backup of two epochs.
    config_three = TrainConfig(epochs=3, batch_size=8)
    from shared.distributed import TrainingBackup

    backup = TrainingBackup(first, tmp_path)
    backup.save(2, float("nan"), 0)
    resumed = build_regressor()
    history = train_custom_loop(
        resumed, make_data(), None, config_three, tmp_path, strategy=strategy, monitor="loss"
    )
    assert len(history["loss"]) == 1  # Only epoch 3 ran.
    assert [row["epoch"] for row in read_history(tmp_path / "history.csv")] == ["0", "1", "2"]


# ---------------------------------------------------------------------------
# Two workers on 127.0.0.1.


def pick_free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


@pytest.mark.slow
def test_two_workers_equal_weights(tmp_path):
    run_dir = tmp_path / "run"
    addresses = [f"127.0.0.1:{port}" for port in pick_free_ports(2)]
    processes = []
    try:
        for index in range(2):
            environment = {
                **os.environ,
                "PYTHONPATH": str(REPO_ROOT),
                "TF_CPP_MIN_LOG_LEVEL": "2",
                "TF_CONFIG": json.dumps(
                    {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
                ),
            }
            argv = [
                sys.executable,
                str(TOY_PIPELINE),
                "train",
                "--strategy",
                "multi-worker",
                "--run-dir",
                str(run_dir),
                "--data-dir",
                str(tmp_path),
                "--log-level",
                "INFO",
            ]
            log = open(tmp_path / f"worker{index}.log", "w", encoding="utf-8")  # noqa: SIM115
            processes.append(
                subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=log, env=environment, text=True
                )
            )
        deadline = time.monotonic() + TIMEOUT_S
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        results = [json.loads(process.stdout.read()) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert [process.returncode for process in processes] == [0, 0]
    chief_weights = np.load(run_dir / "weights.npy")
    worker_weights = np.load(run_dir / "workers" / "worker_1" / "weights.npy")
    np.testing.assert_array_equal(chief_weights, worker_weights)
    assert results[0]["epochs_run"] == 2
    assert results[0]["final"]["loss"] == pytest.approx(results[1]["final"]["loss"])
    assert (run_dir / "model.keras").is_file()
    assert (run_dir / "checkpoints" / "best.keras").is_file()
    assert len(read_history(run_dir / "history.csv")) == 2
    assert not (run_dir / "backup").exists()


@pytest.mark.slow
def test_mirrored_two_replicas(tmp_path):
    run_dir = tmp_path / "run"
    argv = [
        sys.executable,
        str(TOY_PIPELINE),
        "--logical-cpus",
        "2",
        "train",
        "--strategy",
        "mirrored",
        "--run-dir",
        str(run_dir),
        "--data-dir",
        str(tmp_path),
        "--log-level",
        "INFO",
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    finished = subprocess.run(
        argv, capture_output=True, env=environment, text=True, timeout=TIMEOUT_S, check=False
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "Strategy mirrored with 2 replicas in sync" in finished.stderr
    assert json.loads(finished.stdout)["epochs_run"] == 2
    assert np.isfinite(np.load(run_dir / "weights.npy")).all()
    assert (run_dir / "model.keras").is_file()


def test_custom_loop_trains_embedding(tmp_path):
    token_ids = keras.Input((5,), dtype="int32")
    embedded = keras.layers.Embedding(20, 4, mask_zero=True)(token_ids)
    model = keras.Model(token_ids, keras.layers.Dense(1)(keras.layers.LSTM(3)(embedded)))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    rng = np.random.default_rng(1)
    values = rng.integers(1, 20, size=(16, 5)).astype(np.int32)
    data = tf.data.Dataset.from_tensor_slices((values, values.sum(axis=1, keepdims=True) / 50.0)).batch(8)
    before = np.array(model.layers[1].get_weights()[0])
    config = TrainConfig(epochs=1, batch_size=8)
    train_custom_loop(model, data, None, config, tmp_path, strategy=tf.distribute.get_strategy(), monitor="loss")
    assert not np.allclose(model.layers[1].get_weights()[0], before)
