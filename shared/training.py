"""Training: optimizer with clipping and schedule, standard callbacks, `fit`, and metrics.json.

`train_model` runs ``model.fit`` with EarlyStopping, best-model checkpointing,
BackupAndRestore (a killed run resumes from its last backup when the same command is run
again with the same run directory), TensorBoard, CSVLogger and TerminateOnNaN, then
writes ``model.keras`` (best weights), ``metrics.json`` and ``learning_curves.png``.

Under a MultiWorkerMirroredStrategy scope (``train --strategy multi-worker``), where
``Model.fit`` fails in Keras 3, `train_model` runs `shared.distributed.train_custom_loop`
instead, which writes the same files; ``extra_callbacks`` are not run there.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from shared.config import TrainConfig
from shared.distributed import needs_custom_loop, train_custom_loop
from shared.reports import plot_learning_curves
from shared.runs import write_json

logger = logging.getLogger(__name__)

SMALL_DATA_RATIO = 10  # Warn when training samples < parameters / SMALL_DATA_RATIO.


def set_seeds(seed: int) -> None:
    """Seed Python, NumPy and the backend so that runs with one seed repeat."""
    keras.utils.set_random_seed(seed)


def build_learning_rate(config: TrainConfig, total_steps: int | None = None):
    """Return the learning rate or schedule that ``config.lr_schedule`` names.

    Raises:
        ValueError: a decaying schedule without ``total_steps``.
    """
    if config.lr_schedule == "constant" and config.warmup_steps == 0:
        return config.learning_rate
    if total_steps is None:
        raise ValueError(f"lr_schedule {config.lr_schedule!r} needs total_steps; pass the planned step count.")
    decay_steps = max(1, total_steps - config.warmup_steps)
    if config.lr_schedule == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(
            config.learning_rate, decay_steps=decay_steps, decay_rate=0.1
        )
    # "cosine", and "constant" with warm-up (cosine with alpha=1 keeps the peak rate).
    alpha = 1.0 if config.lr_schedule == "constant" else 0.0
    if config.warmup_steps:
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps, alpha=alpha, warmup_target=config.learning_rate, warmup_steps=config.warmup_steps
        )
    return keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps, alpha=alpha)


def build_optimizer(config: TrainConfig, total_steps: int | None = None) -> keras.optimizers.Optimizer:
    """Build the optimizer with gradient clipping (global norm by default) and its schedule."""
    clipping = {
        "global_norm": {"global_clipnorm": config.clip_value},
        "norm": {"clipnorm": config.clip_value},
        "value": {"clipvalue": config.clip_value},
        "none": {},
    }[config.clipping]
    learning_rate = build_learning_rate(config, total_steps)
    # Keras 3 applies decoupled weight decay in every optimizer; None turns it off.
    options = {**clipping, "weight_decay": config.weight_decay or None}
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate, **options)
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=config.weight_decay, **clipping)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, **options)
    return keras.optimizers.RMSprop(learning_rate, **options)


def build_callbacks(
    config: TrainConfig,
    run_dir: Path,
    monitor: str = "val_loss",
    mode: str = "min",
) -> list[keras.callbacks.Callback]:
    """Build the standard callbacks, writing into ``run_dir``."""
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_freq = config.backup_every_steps or "epoch"
    return [
        keras.callbacks.BackupAndRestore(str(run_dir / "backup"), save_freq=save_freq),
        keras.callbacks.ModelCheckpoint(
            str(run_dir / "checkpoints" / "best.keras"), monitor=monitor, mode=mode, save_best_only=True
        ),
        keras.callbacks.EarlyStopping(
            monitor=monitor, mode=mode, patience=config.early_stopping_patience, restore_best_weights=True
        ),
        keras.callbacks.TensorBoard(str(run_dir / "logs"), write_graph=False),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
        keras.callbacks.TerminateOnNaN(),
    ]


def warn_if_small_dataset(model: keras.Model, num_train_samples: int | None) -> None:
    """Log a WARNING when there are fewer training samples than parameters / 10."""
    if num_train_samples is None:
        return
    parameters = model.count_params()
    if num_train_samples * SMALL_DATA_RATIO < parameters:
        logger.warning(
            "The training set is small for this model: %d samples for %d parameters (fewer than "
            "parameters / %d). Expect overfitting; use a smaller model (fewer units or layers), "
            "more dropout, or more data.",
            num_train_samples,
            parameters,
            SMALL_DATA_RATIO,
        )


def train_model(
    model: keras.Model,
    train_data,
    validation_data,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    monitor: str = "val_loss",
    mode: str = "min",
    num_train_samples: int | None = None,
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: str | int = "auto",
) -> dict[str, Any]:
    """Fit a compiled model and write model.keras, metrics.json and learning_curves.png.

    Args:
        model: a compiled Keras model.
        train_data: a ``tf.data.Dataset`` of ``(inputs, targets)`` batches.
        validation_data: a dataset like ``train_data``, or None (then ``monitor`` falls
            back to the training loss).
        config: epochs, steps per epoch, patience and backup frequency.
        run_dir: run directory; rerunning with the same directory resumes from the backup.
        monitor: metric watched by early stopping and checkpointing.
        mode: "min" or "max" for ``monitor``.
        num_train_samples: training examples, for the small-dataset warning.
        extra_callbacks: callbacks run after the standard ones.
        verbose: Keras progress output.

    Returns:
        The metrics written to ``metrics.json``: last-epoch values, the best value of
        ``monitor`` and its epoch, epochs run, training seconds and parameter count.
    """
    run_dir = Path(run_dir)
    if validation_data is None and monitor.startswith("val_"):
        monitor = monitor[len("val_"):]
    warn_if_small_dataset(model, num_train_samples)
    log_run_state(run_dir)
    started = time.monotonic()
    strategy = tf.distribute.get_strategy()
    if needs_custom_loop(strategy):
        if extra_callbacks:
            logger.warning(
                "The multi-worker training loop does not run extra callbacks %s; they are skipped.",
                [type(callback).__name__ for callback in extra_callbacks],
            )
        history = train_custom_loop(
            model, train_data, validation_data, config, run_dir, strategy=strategy, monitor=monitor, mode=mode
        )
    else:
        history = fit_with_callbacks(
            model, train_data, validation_data, config, run_dir, monitor, mode, extra_callbacks, verbose
        )
    seconds = time.monotonic() - started
    model_path = run_dir / "model.keras"
    model.save(model_path)
    logger.info("Saved model to %s", model_path)
    metrics = summarize_history(history, monitor, mode)
    metrics.update({"train_seconds": round(seconds, 2), "parameters": int(model.count_params())})
    write_json(run_dir / "metrics.json", metrics)
    logger.info("Wrote %s", run_dir / "metrics.json")
    if (run_dir / "history.csv").is_file():
        plot_learning_curves(run_dir / "history.csv", run_dir / "learning_curves.png")
    return metrics


def fit_with_callbacks(
    model: keras.Model,
    train_data,
    validation_data,
    config: TrainConfig,
    run_dir: Path,
    monitor: str,
    mode: str,
    extra_callbacks: list[keras.callbacks.Callback] | None,
    verbose: str | int,
) -> dict[str, list[float]]:
    """Run ``model.fit`` with the standard callbacks; return the history dict."""
    callbacks = build_callbacks(config, run_dir, monitor, mode) + list(extra_callbacks or [])
    history = model.fit(
        train_data,
        validation_data=validation_data,
        epochs=config.epochs,
        steps_per_epoch=config.steps_per_epoch,
        validation_steps=config.validation_steps if validation_data is not None else None,
        callbacks=callbacks,
        shuffle=False,  # tf.data pipelines shuffle themselves.
        verbose=resolve_verbosity(verbose),
    )
    return history.history


def resolve_verbosity(verbose: str | int) -> int:
    """Return Keras' verbosity: for "auto", a live progress bar on a terminal, else one line per epoch.

    The CLI sends Keras output to standard error; redirected to a file, a live bar would
    write thousands of carriage-return updates on one line.
    """
    if verbose != "auto":
        return int(verbose)
    return 1 if sys.stderr.isatty() else 2


def log_run_state(run_dir: Path) -> None:
    """Log whether training resumes an interrupted run or replaces a finished one."""
    if (run_dir / "backup").exists():
        logger.info("Resuming the interrupted run in %s from its last backup.", run_dir)
    elif (run_dir / "model.keras").exists():
        logger.warning(
            "%s already contains a trained model.keras; this run trains from scratch and replaces it. "
            "Pass another --run-dir to keep both.",
            run_dir,
        )


def summarize_history(history: dict[str, list[float]], monitor: str, mode: str) -> dict[str, Any]:
    """Return last-epoch metrics and the best ``monitor`` value from a Keras history dict."""
    last = {name: float(values[-1]) for name, values in history.items() if values}
    summary: dict[str, Any] = {"final": last, "epochs_run": len(next(iter(history.values()), []))}
    values = history.get(monitor)
    if values:
        worst = math.inf if mode == "min" else -math.inf
        finite = [value if math.isfinite(value) else worst for value in values]  # NaN never wins.
        best_epoch = int(np.argmin(finite) if mode == "min" else np.argmax(finite))
        summary.update({"monitor": monitor, "best": float(values[best_epoch]), "best_epoch": best_epoch + 1})
    return summary
