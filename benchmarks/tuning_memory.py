"""Resident memory of a tune command across trials: prints RSS after trials 2 and 20.

Runs a 21-trial random search of a small LSTM through ``run_cli`` and
`shared.tuning.run_tuning`, the path of ``python -m pipelines.<name> tune``. Each dataset
request (once for the one-step objective check, then once per trial after the trial's
model is built) appends the process's resident set size (Linux ``/proc/self/statm``) to
``rss.csv`` in the run directory. The reading taken when trial k + 1 starts is the
memory after trial k, once its Keras session was cleared. With ``--trials-per-process N``
the trials run in child processes of N trials each, and the readings come from them.

Usage: ``python benchmarks/tuning_memory.py [--trials-per-process N] [--run-dir DIR]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.cli import CommandContext, run_cli  # noqa: E402
from shared.config import ExportConfig, RecurrentConfig, TrainConfig, TuneConfig  # noqa: E402
from shared.training import build_optimizer  # noqa: E402
from shared.tuning import run_tuning  # noqa: E402

TIMESTEPS, FEATURES, EXAMPLES = 20, 4, 256
TRIALS = 20


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """No data settings: the benchmark makes its own random sequences."""


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """A config with the five standard sections."""

    data: DataConfig = DataConfig()
    model: RecurrentConfig = RecurrentConfig(units=16)
    train: TrainConfig = TrainConfig(batch_size=32, steps_per_epoch=4, validation_steps=2)
    tune: TuneConfig = TuneConfig(
        max_trials=21,
        epochs_per_trial=1,
        stages=("learning_rate",),
        search_space={
            "learning_rate": {
                "type": "float",
                "min": 1e-4,
                "max": 1e-1,
                "sampling": "log",
                "stage": "learning_rate",
            }
        },
    )
    export: ExportConfig = ExportConfig()


def read_rss_mb() -> float:
    """Return the resident set size in MiB (the peak RSS where /proc is missing)."""
    statm = Path("/proc/self/statm")
    if statm.is_file():
        pages = int(statm.read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.


class MemoryProbe:
    """Appends ``pid,request,rss_mb`` to ``rss.csv`` at each dataset request.

    ``request`` counts from 0 in each process; request 0 is the one-step objective check.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "rss.csv"
        self.requests = 0

    def make_datasets(self, config: BenchmarkConfig) -> tuple[tf.data.Dataset, tf.data.Dataset]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()},{self.requests},{read_rss_mb():.1f}\n")
        self.requests += 1
        rng = np.random.default_rng(0)
        inputs = rng.normal(size=(EXAMPLES, TIMESTEPS, FEATURES)).astype("float32")
        targets = inputs.mean(axis=(1, 2))[:, None]
        dataset = tf.data.Dataset.from_tensor_slices((inputs, targets))
        dataset = dataset.batch(config.train.batch_size)
        return dataset.repeat(), dataset


def build_model(config: BenchmarkConfig) -> keras.Model:
    inputs = keras.Input((TIMESTEPS, FEATURES))
    hidden = keras.layers.LSTM(config.model.units)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.compile(optimizer=build_optimizer(config.train), loss="mse")
    return model


def tune(config: BenchmarkConfig, context: CommandContext) -> dict:
    probe = MemoryProbe(context.run_dir)
    return run_tuning(config, context, build_model, probe.make_datasets)


def read_after_trial(rss_csv: Path) -> dict[int, float]:
    """Return the RSS after each trial: the reading before the next trial's build."""
    with open(rss_csv, encoding="utf-8") as handle:
        rows = [line.strip().split(",") for line in handle if line.strip()]
    trial_readings = [float(rss) for _, build, rss in rows if build != "0"]
    # trial_readings[k] was taken before trial k + 1, so it is the memory after trial k.
    return {k: trial_readings[k] for k in range(1, len(trial_readings))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials-per-process", type=int, help="run trials in child processes")
    parser.add_argument("--run-dir", help="run directory (default: a new temporary folder)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="tuning-memory-"))
    command = [
        sys.executable,
        __file__,
        "tune",
        "--run-dir",
        str(run_dir),
        "--data-dir",
        str(run_dir),
        "--max-trials",
        str(TRIALS + 1),
        "--log-level",
        "WARNING",
    ]
    if args.trials_per_process:
        command += ["--trials-per-process", str(args.trials_per_process)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    after_trial = read_after_trial(run_dir / "rss.csv")
    result = {
        "trials_per_process": args.trials_per_process,
        "rss_mb_after_trial_2": after_trial[2],
        f"rss_mb_after_trial_{TRIALS}": after_trial[TRIALS],
        "rss_mb_after_trial": after_trial,
        "run_dir": str(run_dir),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "tune":
        sys.exit(run_cli("tuning_memory", {"default": BenchmarkConfig()}, {"tune": tune}))
    sys.exit(main())
