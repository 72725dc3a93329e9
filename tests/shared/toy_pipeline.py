"""A tiny pipeline on random sequences, run as a subprocess by the tuning and distribution tests.

Usage: ``python tests/shared/toy_pipeline.py [--logical-cpus N] <train|tune> [flags]`` with
the repository root on ``PYTHONPATH``; ``--logical-cpus`` splits the CPU into N devices. ``train`` writes ``weights.npy`` (all weights, flattened) into
its run directory so that tests can compare the workers of a multi-worker run.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from shared.cli import run_cli
from shared.config import ExportConfig, RecurrentConfig, TrainConfig, TuneConfig, check_range
from shared.training import build_optimizer, train_model
from shared.tuning import run_tuning

TIMESTEPS, FEATURES = 5, 3

SEARCH_SPACE = {
    "learning_rate": {
        "type": "float",
        "min": 1e-3,
        "max": 1e-1,
        "sampling": "log",
        "stage": "learning_rate",
    },
    "units": {"type": "int", "min": 2, "max": 8, "step": 2, "stage": "size"},
}


@dataclasses.dataclass(frozen=True)
class ToyDataConfig:
    """Random regression sequences: the target is the sum of the inputs."""

    examples: int = 64

    def __post_init__(self) -> None:
        check_range("data.examples", self.examples, 8)


@dataclasses.dataclass(frozen=True)
class ToyModelConfig(RecurrentConfig):
    """A tiny LSTM with a dense output."""

    units: int = 4


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """The five standard sections."""

    data: ToyDataConfig = ToyDataConfig()
    model: ToyModelConfig = ToyModelConfig()
    train: TrainConfig = TrainConfig(epochs=2, batch_size=8, steps_per_epoch=3, validation_steps=2)
    tune: TuneConfig = TuneConfig(
        max_trials=3, epochs_per_trial=1, stages=("learning_rate",), search_space=SEARCH_SPACE
    )
    export: ExportConfig = ExportConfig()


def make_arrays(examples: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(examples, TIMESTEPS, FEATURES)).astype("float32")
    return inputs, inputs.sum(axis=(1, 2))[:, None].astype("float32")


def build_model(config: ToyConfig, batch_size: int | None = None) -> keras.Model:
    inputs = keras.Input((TIMESTEPS, FEATURES), batch_size=batch_size, name="readings")
    hidden = keras.layers.LSTM(config.model.units, dropout=config.model.dropout)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.compile(optimizer=build_optimizer(config.train), loss="mse", metrics=["mae"])
    return model


def build_export_model(config: ToyConfig, model: keras.Model) -> keras.Model:
    exported = build_model(config, batch_size=1)
    exported.set_weights(model.get_weights())
    return exported


def make_datasets(config: ToyConfig) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    inputs, targets = make_arrays(config.data.examples)
    batch_size = config.train.batch_size
    train = tf.data.Dataset.from_tensor_slices((inputs, targets)).batch(batch_size).repeat()
    validation = tf.data.Dataset.from_tensor_slices((inputs[:16], targets[:16])).batch(batch_size)
    return train, validation


def train(config: ToyConfig, context: Any) -> dict[str, Any]:
    model = build_model(config)
    train_data, validation_data = make_datasets(config)
    metrics = train_model(
        model, train_data, validation_data, config.train, context.run_dir, verbose=0
    )
    weights = np.concatenate([w.ravel() for w in model.get_weights()])
    np.save(context.run_dir / "weights.npy", weights)
    return metrics


def tune(config: ToyConfig, context: Any) -> dict[str, Any]:
    return run_tuning(
        config, context, build_model, make_datasets, build_export_model=build_export_model
    )


PRESETS = {"default": ToyConfig()}
COMMANDS = {"train": train, "tune": tune}

if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--logical-cpus":
        # Split the CPU into replicas for MirroredStrategy, before TensorFlow starts.
        count = int(sys.argv.pop(2))
        sys.argv.pop(1)
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    sys.exit(run_cli("toy", PRESETS, COMMANDS, description="Toy pipeline for tests."))
