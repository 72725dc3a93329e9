"""Distributed training: ``tf.distribute`` strategies and a custom loop for multi-worker runs.

Conventions:

- ``train --strategy`` picks the strategy: ``default`` (one device), ``mirrored`` (every
  local GPU, else the CPU; `tf.distribute.MirroredStrategy`) or ``multi-worker``
  (`tf.distribute.MultiWorkerMirroredStrategy`, configured through the ``TF_CONFIG``
  environment variable). The CLI creates the strategy before any other TensorFlow op and
  runs the whole command inside ``strategy.scope()``, so pipelines build and compile their
  models under it unchanged.
- ``train.batch_size`` is the global batch size: each batch of the pipeline's dataset is
  split across the replicas, so every replica gets ``batch_size / replicas`` examples.
  The learning rate is therefore left as configured: an update averages the gradients of
  the same number of examples as on one device.
- ``Model.fit`` under MultiWorkerMirroredStrategy fails in Keras 3.15 with TF 2.21
  ("Attempt to convert a value (PerReplica...)"), so `train_custom_loop` replaces it
  there. It reproduces what `shared.training.train_model`'s callbacks do: ``history.csv``,
  ``checkpoints/best.keras``, early stopping with the best weights restored, TensorBoard
  scalars in ``logs/``, NaN termination, and a backup in ``backup/`` from which a killed
  run resumes (all workers must be restarted with the same run directories).
- Gradients are all-reduced first, then clipped as the optimizer's ``global_clipnorm``,
  ``clipnorm`` or ``clipvalue`` asks, so clipping acts on the global gradient as it
  does on one device.
- The chief (task ``chief``, or ``worker`` 0 when the cluster has no chief) writes into
  the run directory. Every other worker writes the same files into
  ``<run_dir>/workers/<type>_<index>/`` so that workers sharing a file system never
  overwrite the chief's files.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.errors import ConfigError

logger = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored", "multi-worker")
TUNING_ROLES = ("standalone", "chief", "worker")
TUNER_ID_ENV = "KERASTUNER_TUNER_ID"
ORACLE_IP_ENV = "KERASTUNER_ORACLE_IP"
ORACLE_PORT_ENV = "KERASTUNER_ORACLE_PORT"
CHIEF_TUNER_ID = "chief"
TF_CONFIG_ENV = "TF_CONFIG"
WORKERS_DIR = "workers"
BACKUP_DIR = "backup"
HISTORY_CSV = "history.csv"
BEST_CHECKPOINT = Path("checkpoints") / "best.keras"


# ---------------------------------------------------------------------------
# TF_CONFIG and the roles of the processes of a cluster.


def read_tf_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read and check ``TF_CONFIG``: a cluster of ``host:port`` lists and this process's task.

    Returns:
        The parsed ``TF_CONFIG``; an empty dict when the variable is unset.

    Raises:
        ConfigError: the variable is not JSON, or its task is missing from its cluster.
    """
    environ = os.environ if environ is None else environ
    text = environ.get(TF_CONFIG_ENV, "").strip()
    if not text:
        return {}
    try:
        tf_config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{TF_CONFIG_ENV} is not valid JSON ({error}): {text!r}. Set it to e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}.'
        ) from error
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ConfigError(
            f"{TF_CONFIG_ENV} needs a 'cluster' mapping and a 'task' mapping, got {text!r}."
        )
    task_type, index = task.get("type"), task.get("index")
    addresses = cluster.get(task_type)
    if (
        not isinstance(addresses, list)
        or not isinstance(index, int)
        or not 0 <= index < len(addresses)
    ):
        raise ConfigError(
            f"{TF_CONFIG_ENV}: task {task!r} is not in the cluster {cluster!r}; the task's "
            "type must be a key of 'cluster' and its index a position in that list."
        )
    return tf_config


def is_chief_task(tf_config: Mapping[str, Any]) -> bool:
    """Return True for the chief: task "chief", or worker 0 of a cluster without a chief.

    A process without ``TF_CONFIG`` (an empty mapping) is its own chief.
    """
    if not tf_config:
        return True
    task = tf_config["task"]
    if task["type"] == "chief":
        return True
    return task["type"] == "worker" and task["index"] == 0 and "chief" not in tf_config["cluster"]


def resolve_worker_run_dir(run_dir: Path, tf_config: Mapping[str, Any]) -> Path:
    """Return where this process writes: ``run_dir`` on the chief, else a folder of its own."""
    if is_chief_task(tf_config):
        return Path(run_dir)
    task = tf_config["task"]
    return Path(run_dir) / WORKERS_DIR / f"{task['type']}_{task['index']}"


def build_strategy(name: str):
    """Create the `tf.distribute.Strategy` that ``--strategy`` names.

    Create it before any other TensorFlow op: MultiWorkerMirroredStrategy configures the
    collective ops of the process and fails once TensorFlow has started.

    Raises:
        ConfigError: an unknown name, or a ``TF_CONFIG`` that `read_tf_config` rejects.
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        # Every GPU; without one, every logical CPU device (one, unless the process split it).
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    elif name == "multi-worker":
        tf_config = read_tf_config()
        if not tf_config:
            logger.warning(
                "--strategy multi-worker without %s: training runs as a cluster of one worker. "
                "Set %s on every machine to train on several.",
                TF_CONFIG_ENV,
                TF_CONFIG_ENV,
            )
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        raise ConfigError(
            f"--strategy {name!r}: unknown strategy; expected one of {list(STRATEGIES)}."
        )
    logger.info("Strategy %s with %d replicas in sync", name, strategy.num_replicas_in_sync)
    return strategy


def needs_custom_loop(strategy) -> bool:
    """Return True for strategies under which ``Model.fit`` fails in Keras 3 (multi-worker)."""
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


# ---------------------------------------------------------------------------
# Distributed tuning: KerasTuner's chief and workers, set up through its variables.


def pick_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` now (another process may take it later)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def parse_oracle_address(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 hosts in brackets) into host and port.

    Raises:
        ConfigError: no port, or a port outside 1..65535.
    """
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(
            f"--oracle {text!r}: expected HOST:PORT with a port in 1..65535, e.g. 10.0.0.5:8000."
        )
    return host, int(port_text)


def configure_tuning_role(
    role: str | None,
    oracle: str | None,
    worker_id: str | None,
    environ: dict[str, str] | None = None,
) -> tuple[str, str | None]:
    """Set KerasTuner's variables for ``--role``; return the role and the worker's tuner ID.

    KerasTuner reads ``KERASTUNER_TUNER_ID``, ``KERASTUNER_ORACLE_IP`` and
    ``KERASTUNER_ORACLE_PORT`` when a tuner is created. The chief (tuner ID "chief")
    serves the oracle on HOST:PORT (HOST 0.0.0.0 listens on every interface); each worker
    connects to it. Without ``--role``, variables already set select the role, so runs
    started the KerasTuner way keep working; else the search is standalone.

    Raises:
        ConfigError: a chief or worker without ``--oracle``, a worker without an ID, or a
            worker ID that names the chief.
    """
    environ = os.environ if environ is None else environ
    if role is None:
        if ORACLE_IP_ENV not in environ:
            return "standalone", None
        tuner_id = environ.get(TUNER_ID_ENV, "")
        role = "chief" if CHIEF_TUNER_ID in tuner_id else "worker"
        worker_id = worker_id or tuner_id or None
        oracle = oracle or f"{environ[ORACLE_IP_ENV]}:{environ.get(ORACLE_PORT_ENV, '')}"
    if role == "standalone":
        for name in (TUNER_ID_ENV, ORACLE_IP_ENV, ORACLE_PORT_ENV):
            environ.pop(name, None)
        return role, None
    if not oracle:
        raise ConfigError(
            f"--role {role} needs --oracle HOST:PORT, the address the chief serves on."
        )
    host, port = parse_oracle_address(oracle)
    if role == "worker":
        worker_id = worker_id or environ.get(TUNER_ID_ENV)
        if not worker_id or CHIEF_TUNER_ID in worker_id:
            raise ConfigError(
                f"--role worker needs --worker-id NAME, unique per worker and without 'chief' "
                f"(got {worker_id!r}), e.g. tuner0; a restarted worker reusing its name resumes "
                "its unfinished trial."
            )
    tuner_id = CHIEF_TUNER_ID if role == "chief" else worker_id
    environ.update({TUNER_ID_ENV: tuner_id, ORACLE_IP_ENV: host, ORACLE_PORT_ENV: str(port)})
    logger.info("Distributed search: %s (tuner ID %s), oracle at %s:%d", role, tuner_id, host, port)
    return role, (worker_id if role == "worker" else None)


# ---------------------------------------------------------------------------
# The custom training loop.


def distribute_dataset(strategy, dataset):
    """Split each global batch of ``dataset`` across the replicas of ``strategy``.

    Every worker reads the whole input pipeline and keeps its share of each batch (DATA
    sharding), because pipelines build their datasets from in-memory arrays, not files.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def densify_gradients(gradients: list, variables: list) -> list:
    """Return dense gradients: embedding rows (``IndexedSlices``) scattered, None as zeros.

    The all-reduce, the clipping and the division by the replica count need dense
    tensors of one shape per variable.

    NOTE: each step then all-reduces the whole embedding matrix, which may dominate the
    step time with a large vocabulary across machines. It has only run on loopback workers.
    """
    import tensorflow as tf

    return [
        tf.zeros_like(variable) if gradient is None else tf.convert_to_tensor(gradient)
        for gradient, variable in zip(gradients, variables, strict=True)
    ]


def clip_gradients(optimizer, gradients: list) -> list:
    """Clip all-reduced gradients as the optimizer's clipping settings ask."""
    import tensorflow as tf

    if optimizer.global_clipnorm:
        gradients, _ = tf.clip_by_global_norm(gradients, optimizer.global_clipnorm)
    elif optimizer.clipnorm:
        gradients = [tf.clip_by_norm(g, optimizer.clipnorm) for g in gradients]
    elif optimizer.clipvalue:
        gradients = [
            tf.clip_by_value(g, -optimizer.clipvalue, optimizer.clipvalue) for g in gradients
        ]
    return gradients


class StepFunctions:
    """Compiled train and validation steps of one model under one strategy."""

    def __init__(self, model, strategy) -> None:
        import tensorflow as tf

        self.model = model
        self.strategy = strategy
        self.train_step = tf.function(self._run_train_step)
        self.validation_step = tf.function(self._run_validation_step)

    def _replica_train_step(self, inputs, targets, sample_weight=None):
        import tensorflow as tf

        model = self.model
        replicas = self.strategy.num_replicas_in_sync
        with tf.GradientTape() as tape:
            predictions = model(inputs, training=True)
            loss = model.compute_loss(
                x=inputs, y=targets, y_pred=predictions, sample_weight=sample_weight, training=True
            )
            # Each replica's share: the optimizer sums the gradients of all replicas.
            scaled_loss = loss / replicas
        variables = model.trainable_variables
        gradients = densify_gradients(tape.gradient(scaled_loss, variables), variables)
        context = tf.distribute.get_replica_context()
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
        clipped = clip_gradients(model.optimizer, summed)
        # The optimizer sums again across replicas, so each passes 1/replicas of the total.
        model.optimizer.apply([g / replicas for g in clipped], variables)
        model.compute_metrics(inputs, targets, predictions, sample_weight)
        return loss

    def _replica_validation_step(self, inputs, targets, sample_weight=None):
        model = self.model
        predictions = model(inputs, training=False)
        loss = model.compute_loss(
            x=inputs, y=targets, y_pred=predictions, sample_weight=sample_weight, training=False
        )
        model.compute_metrics(inputs, targets, predictions, sample_weight)
        return loss

    def _run_train_step(self, batch):
        import tensorflow as tf

        losses = self.strategy.run(self._replica_train_step, args=tuple(batch))
        return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, losses, axis=None)

    def _run_validation_step(self, batch):
        import tensorflow as tf

        losses = self.strategy.run(self._replica_validation_step, args=tuple(batch))
        return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, losses, axis=None)


def run_epoch_steps(step, dataset, steps: int | None) -> tuple[float, int]:
    """Run ``step`` over ``steps`` batches (or until the data ends); return mean loss and count.

    The end of the data is detected with ``get_next_as_optional``, which all workers
    agree on, so no worker waits for a batch that another one does not have.
    """
    iterator = iter(dataset)
    total, count = 0.0, 0
    while steps is None or count < steps:
        batch = iterator.get_next_as_optional()
        if not batch.has_value():
            if steps is not None:
                logger.warning(
                    "The data ran out after %d of %d steps; the epoch ends early.", count, steps
                )
            break
        total += float(step(batch.get_value()))
        count += 1
    return (total / count if count else math.nan), count


def collect_metrics(model, loss: float, prefix: str = "") -> dict[str, float]:
    """Return the model's compiled metrics and ``loss`` under ``prefix``, then reset them."""
    results = {
        f"{prefix}{name}": float(value) for name, value in model.get_metrics_result().items()
    }
    results[f"{prefix}loss"] = loss
    model.reset_metrics()
    return results


class TrainingBackup:
    """Model, optimizer and finished-epoch count in ``<run_dir>/backup``, for resuming a kill."""

    def __init__(self, model, run_dir: Path) -> None:
        import tensorflow as tf

        self.directory = Path(run_dir) / BACKUP_DIR
        self.epochs_done = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.best = tf.Variable(math.nan, dtype=tf.float64, trainable=False)
        self.wait = tf.Variable(0, dtype=tf.int64, trainable=False)
        checkpoint = tf.train.Checkpoint(
            model=model,
            optimizer=model.optimizer,
            epochs_done=self.epochs_done,
            best=self.best,
            wait=self.wait,
        )
        self.manager = tf.train.CheckpointManager(checkpoint, str(self.directory), max_to_keep=1)
        # Optimizer variables must exist before a restore can fill them.
        model.optimizer.build(model.trainable_variables)

    def restore(self) -> int:
        """Restore the latest backup, if any; return the number of epochs it had finished."""
        if self.manager.latest_checkpoint:
            self.manager.checkpoint.restore(self.manager.latest_checkpoint)
            logger.info(
                "Resumed from %s after epoch %d",
                self.manager.latest_checkpoint,
                self.epochs_done.numpy(),
            )
        return int(self.epochs_done.numpy())

    def save(self, epochs_done: int, best: float, wait: int) -> None:
        """Write a backup after ``epochs_done`` epochs with the early-stopping state."""
        self.epochs_done.assign(epochs_done)
        self.best.assign(best)
        self.wait.assign(wait)
        self.manager.save()

    def delete(self) -> None:
        """Remove the backup once training has finished."""
        shutil.rmtree(self.directory, ignore_errors=True)


class EpochLogs:
    """Writer of each epoch's metrics to ``history.csv`` and TensorBoard, as CSVLogger does."""

    def __init__(self, run_dir: Path) -> None:
        import tensorflow as tf

        self.history_path = Path(run_dir) / HISTORY_CSV
        self.writers = {
            "train": tf.summary.create_file_writer(str(Path(run_dir) / "logs" / "train")),
            "validation": tf.summary.create_file_writer(str(Path(run_dir) / "logs" / "validation")),
        }

    def write(self, epoch: int, logs: Mapping[str, float]) -> None:
        """Append one row (``epoch`` counts from 0, as in CSVLogger) and one scalar per metric."""
        import tensorflow as tf

        names = sorted(logs)
        new_file = not self.history_path.is_file()
        with open(self.history_path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new_file:
                writer.writerow(["epoch", *names])
            writer.writerow([epoch, *(logs[name] for name in names)])
        for name, value in logs.items():
            split = "validation" if name.startswith("val_") else "train"
            with self.writers[split].as_default():
                tf.summary.scalar(f"epoch_{name.removeprefix('val_')}", value, step=epoch)
        for writer in self.writers.values():
            writer.flush()


def is_improvement(value: float, best: float, mode: str) -> bool:
    """Return True when ``value`` beats ``best`` (NaN ``best``: nothing seen yet)."""
    if not math.isfinite(value):
        return False
    if math.isnan(best):
        return True
    return value < best if mode == "min" else value > best


def train_custom_loop(
    model,
    train_data,
    validation_data,
    config,
    run_dir: str | Path,
    *,
    strategy,
    monitor: str = "val_loss",
    mode: str = "min",
) -> dict[str, list[float]]:
    """Train a compiled model with ``strategy.run`` steps, doing what `train_model`'s callbacks do.

    Args:
        model: a model built and compiled under ``strategy.scope()``.
        train_data: a dataset of ``(inputs, targets)`` or ``(inputs, targets, weights)``
            global batches.
        validation_data: a dataset like ``train_data``, or None.
        config: the `shared.config.TrainConfig` (epochs, steps, patience).
        run_dir: this worker's run directory (see `resolve_worker_run_dir`).
        strategy: the `tf.distribute.Strategy` the model was built under.
        monitor: metric for checkpointing and early stopping.
        mode: "min" or "max".

    Returns:
        The history: metric name to one value per epoch run in this call (a resumed run
        returns only the epochs after the backup; ``history.csv`` has them all).
    """
    run_dir = Path(run_dir)
    (run_dir / BEST_CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
    steps = StepFunctions(model, strategy)
    train_batches = distribute_dataset(strategy, train_data)
    validation_batches = (
        distribute_dataset(strategy, validation_data) if validation_data is not None else None
    )
    backup = TrainingBackup(model, run_dir)
    first_epoch = backup.restore()
    best, wait = float(backup.best.numpy()), int(backup.wait.numpy())
    best_weights = None
    epoch_logs = EpochLogs(run_dir)
    history: dict[str, list[float]] = {}

    for epoch in range(first_epoch, config.epochs):
        started = time.monotonic()
        logs = train_one_epoch(model, steps, train_batches, validation_batches, config)
        for name, value in logs.items():
            history.setdefault(name, []).append(value)
        epoch_logs.write(epoch, logs)
        logger.info(
            "Epoch %d/%d (%.1f s): %s",
            epoch + 1,
            config.epochs,
            time.monotonic() - started,
            ", ".join(f"{k}={v:.4g}" for k, v in sorted(logs.items())),
        )
        if not math.isfinite(logs["loss"]):
            logger.warning("Epoch %d: loss is %s; training stopped.", epoch + 1, logs["loss"])
            break
        value = logs.get(monitor, math.nan)
        if is_improvement(value, best, mode):
            best, wait, best_weights = value, 0, model.get_weights()
            model.save(run_dir / BEST_CHECKPOINT)
        else:
            wait += 1
        backup.save(epoch + 1, best, wait)
        if wait >= max(config.early_stopping_patience, 1):
            logger.info("Early stopping after epoch %d: %s did not improve.", epoch + 1, monitor)
            break

    restore_best_weights(model, best_weights, run_dir / BEST_CHECKPOINT)
    backup.delete()
    return history


def restore_best_weights(model, best_weights: list | None, best_checkpoint: Path) -> None:
    """Set the best epoch's weights, as EarlyStopping(restore_best_weights=True) does.

    A resumed run whose best epoch came before the kill reads them from ``best_checkpoint``.
    """
    if best_weights is not None:
        model.set_weights(best_weights)
    elif best_checkpoint.is_file():
        model.load_weights(best_checkpoint)


def train_one_epoch(
    model, steps: StepFunctions, train_batches, validation_batches, config
) -> dict[str, float]:
    """Run one epoch of training and validation; return the epoch's metrics."""
    model.reset_metrics()
    train_loss, _ = run_epoch_steps(steps.train_step, train_batches, config.steps_per_epoch)
    logs = collect_metrics(model, train_loss)
    if validation_batches is not None:
        validation_loss, _ = run_epoch_steps(
            steps.validation_step, validation_batches, config.validation_steps
        )
        logs.update(collect_metrics(model, validation_loss, prefix="val_"))
    return logs
