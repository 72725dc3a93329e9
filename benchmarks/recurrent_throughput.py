"""Measure the CPU ceiling, recurrent training throughput and one-step TFLite latency in one run.

Prints a Markdown table. Run from the repository root:

    python benchmarks/recurrent_throughput.py [--train-steps 20] [--matmul-size 2048]

What it measures, all in one process so the numbers compare:

* float32 matmul GFLOP/s: the ceiling for dense recurrent math on this machine.
* Training throughput of the shared recurrent block (`shared.recurrent`) for SimpleRNN,
  LSTM and GRU: batch 128, 100 time steps, 64 features, 256 units, one layer, a mean
  squared error on the last output. GFLOP/s counts only the recurrent matmuls: per step
  and example a cell with ``g`` gate blocks does ``2 * g * units * (features + units)``
  FLOPs forward, and training counts three times that (forward, and the two backward
  matmuls). The share of the ceiling is GFLOP/s divided by the matmul rate. Both rates
  are the best of several timed runs, because on a shared machine other processes only
  slow a run down.
* Per-call latency of a one-step LSTM (64 features, 256 units) exported to TFLite with
  built-in ops only and run with ai-edge-litert.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.config import ExportConfig, RecurrentConfig  # noqa: E402
from shared.recurrent import apply_recurrent_stack, build_recurrent_stack  # noqa: E402

BATCH_SIZE = 128
TIMESTEPS = 100
FEATURES = 64
UNITS = 256
GATE_BLOCKS = {"simple_rnn": 1, "lstm": 4, "gru": 3}


def measure_matmul_gflops(size: int, repeats: int, trials: int = 5) -> float:
    """Return the best float32 matmul rate in GFLOP/s over ``trials`` timed runs.

    The best run, not the mean, is the ceiling: on a shared machine other processes only
    ever slow a run down.
    """
    a = tf.random.normal((size, size))
    b = tf.random.normal((size, size))

    @tf.function
    def multiply(x, y):
        return tf.matmul(x, y)

    multiply(a, b).numpy()  # Trace and warm up.
    best_seconds = float("inf")
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            result = multiply(a, b)
        result.numpy()
        best_seconds = min(best_seconds, time.perf_counter() - started)
    return 2 * size**3 * repeats / best_seconds / 1e9


def compute_training_flops(cell: str) -> float:
    """Return the recurrent matmul FLOPs of one training step (forward and backward)."""
    forward_per_step = 2 * GATE_BLOCKS[cell] * UNITS * (FEATURES + UNITS)
    return 3 * forward_per_step * TIMESTEPS * BATCH_SIZE


def measure_training(cell: str, train_steps: int) -> dict[str, float]:
    """Train the shared recurrent block for ``train_steps`` batches and time it."""
    keras.backend.clear_session()
    inputs = keras.Input((TIMESTEPS, FEATURES))
    layers = build_recurrent_stack(RecurrentConfig(cell=cell, units=UNITS))
    outputs = keras.layers.Dense(1)(apply_recurrent_stack(layers, inputs))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    rng = np.random.default_rng(0)
    values = rng.normal(size=(BATCH_SIZE, TIMESTEPS, FEATURES)).astype(np.float32)
    targets = rng.normal(size=(BATCH_SIZE, 1)).astype(np.float32)
    model.train_on_batch(values, targets)  # Trace and warm up.
    model.train_on_batch(values, targets)
    step_seconds = []
    for _ in range(train_steps):
        started = time.perf_counter()
        model.train_on_batch(values, targets)
        step_seconds.append(time.perf_counter() - started)
    seconds = min(step_seconds)  # Best step, measured the same way as the matmul ceiling.
    return {"seconds_per_step": seconds, "gflops": compute_training_flops(cell) / seconds / 1e9}


def measure_step_latency(runs: int) -> dict[str, float]:
    """Export a one-step LSTM to TFLite and return its per-call latency, size and parity."""
    from shared.export import export_tflite_variants
    from shared.streaming import build_step_model, export_step_model, make_initial_state

    keras.backend.clear_session()
    layers = build_recurrent_stack(RecurrentConfig(cell="lstm", units=UNITS))
    keras.Sequential([keras.Input((None, FEATURES)), *layers])  # Builds the layers' weights.
    step_model = build_step_model(layers, input_features=FEATURES)
    rng = np.random.default_rng(0)
    examples = 8
    inputs = {"inputs": rng.normal(size=(examples, FEATURES)).astype(np.float32)}
    for name, value in make_initial_state(step_model).items():
        inputs[name] = rng.normal(size=(examples, *value.shape[1:])).astype(np.float32)
    keras_outputs = {name: np.asarray(value) for name, value in step_model(inputs).items()}
    with tempfile.TemporaryDirectory() as work_dir:
        saved_model_dir = export_step_model(step_model, Path(work_dir) / "saved_model")
        entry = export_tflite_variants(
            saved_model_dir, "step", Path(work_dir) / "tflite", "lstm_step",
            parity_inputs=inputs, keras_outputs=keras_outputs,
            export_config=ExportConfig(latency_runs=runs, parity_samples=examples), variants=("float32",),
        )
    variant = entry["variants"]["float32"]
    return {
        "latency_ms": variant["latency_ms"],
        "size_kb": variant["size_bytes"] / 1024,
        "max_abs_diff": max(variant["max_abs_diff"].values()),
    }


def describe_cpu() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=20, help="timed training batches per cell")
    parser.add_argument("--matmul-size", type=int, default=2048, help="square matrix size for the ceiling")
    parser.add_argument("--matmul-repeats", type=int, default=5, help="matmuls per timed run")
    parser.add_argument("--latency-runs", type=int, default=200, help="timed TFLite calls")
    args = parser.parse_args()

    print(f"Load average at start: {os.getloadavg()[0]:.1f}")
    print(f"Machine: {describe_cpu()}, {os.cpu_count()} logical CPUs, "
          f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {time.strftime('%Y-%m-%d')}")
    ceiling = measure_matmul_gflops(args.matmul_size, args.matmul_repeats)
    print(f"\n| measurement | value |\n|---|---|\n| float32 matmul {args.matmul_size}^3 | {ceiling:.1f} GFLOP/s |")
    print("\n| cell | ms per training step | GFLOP/s | share of matmul ceiling |\n|---|---|---|---|")
    for cell in ("simple_rnn", "lstm", "gru"):
        result = measure_training(cell, args.train_steps)
        print(f"| {cell} | {result['seconds_per_step'] * 1000:.1f} | {result['gflops']:.1f} | "
              f"{result['gflops'] / ceiling:.0%} |")
    step = measure_step_latency(args.latency_runs)
    print("\n| one-step LSTM TFLite (float32, 64 features, 256 units) | value |\n|---|---|")
    print(f"| latency per call | {step['latency_ms']:.3f} ms |")
    print(f"| file size | {step['size_kb']:.0f} KB |")
    print(f"| max abs difference from Keras | {step['max_abs_diff']:.2e} |")
    print(f"\nLoad average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
