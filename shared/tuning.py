"""Staged KerasTuner search over a pipeline's config: the ``tune`` command of every pipeline.

Conventions:

- Every ``tune.search_space`` entry is one hyperparameter that sets one config field: the
  entry's ``field`` ("section.field") when given, else the field of the same name in the
  ``model``, ``train`` or ``data`` section, searched in that order. A trial's config is
  built with ``dataclasses.replace``, so each section's ``__post_init__`` validates it.
- Stages run in the order of ``tune.stages``. A stage searches only its own entries. The
  entries of earlier stages are fixed at the incumbent: the values of the best completed
  trial of the earlier stages (when a stage finds nothing better, the incumbent stays the
  earlier trial). Entries of later stages keep the config's values.
- Each stage is a KerasTuner project in ``<run_dir>/tuning/<stage>/`` opened with
  ``overwrite=False``: rerunning the same command resumes it, and trials already run are
  not repeated. ``stage.json`` there stores the stage's settings and one record per trial.
- Trials train for ``tune.epochs_per_trial`` epochs (the Hyperband maximum) with the
  config's ``train.steps_per_epoch`` and ``train.validation_steps``, and their config has
  ``train.epochs`` set to ``tune.epochs_per_trial`` so that learning-rate schedules fit
  the trial's length.
- The time budget (``--time-budget`` or ``tune.time_budget_minutes``) counts from the start
  of the command. Once it is spent no new trial starts; the running trial finishes.
- ``make_datasets(config)`` is called for every trial execution because the batch size may
  be a hyperparameter. Pipelines read and preprocess their data once, in the closure they
  pass, and only batch it in ``make_datasets``.
- A trial's result is the epoch with the best objective value: its metrics, the
  model's parameter count and the training seconds are reported to the oracle, so a
  chief records them for trials that its workers ran.
- Edge-aware objective (``--max-size-kb``, ``--max-latency-ms``): after training, the
  pipeline's ``build_export_model(config, model)`` returns a fixed-shape copy (batch 1)
  that is exported to a float32 TFLite model in the trial's folder and timed with the
  stock runtime. A trial over a limit is infeasible: the oracle receives the penalized value
  ``value + (|value| + 1) * (1 + excess)`` (minus for "max" objectives), where
  ``excess = max(measured / limit - 1)`` over the limits exceeded, and ``best.yaml``
  and the incumbent come from feasible trials only.
- Checkpoints: each trial's ``checkpoint.weights.h5`` is kept only for the best
  ``--keep-checkpoints`` trials of the run (default 3). Hyperband continues training
  from earlier trials' checkpoints, so its stages are pruned when they end.
- Distributed search (``--role chief|worker --oracle HOST:PORT``) runs one stage per
  command: the chief serves the stage's oracle and declares the values fixed by earlier
  stages as ``hp.Fixed``, so workers need no copy of the chief's run directory. Workers
  write into ``<run_dir>/workers/<worker id>/``; the chief writes the run's outputs.
- Trial processes (``--trials-per-process N``): TensorFlow keeps about 10 MiB per trained
  model after ``clear_session``, so a long search can run its trials in child processes
  of N trials each. The command then serves each stage's oracle on 127.0.0.1 as a chief,
  and the children are the same command run as workers.
- Outputs in the run directory: ``trials.csv`` (one row per trial of every stage),
  ``best.yaml`` (the full config with the incumbent's values, usable with
  ``train --config best.yaml``), ``objective_per_trial.png``,
  ``objective_per_hyperparameter.png``, TensorBoard logs with the HParams dashboard in
  ``logs/tuning/<stage>/`` and the returned summary.
"""

from __future__ import annotations

import _thread
import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import keras_tuner
import numpy as np

from shared.config import TuneConfig, check_range, closest_name, coerce_value, save_config
from shared.distributed import (
    ORACLE_IP_ENV,
    ORACLE_PORT_ENV,
    configure_tuning_role,
    pick_free_port,
)
from shared.errors import ConfigError, ExportError
from shared.runs import read_json, write_json, write_text_atomic

if TYPE_CHECKING:
    from shared.cli import CommandContext

logger = logging.getLogger(__name__)

# Sections searched, in this order, for a field named like a search-space entry.
FIELD_SECTIONS = ("model", "train", "data")
TUNING_DIR = "tuning"
STAGE_FILE = "stage.json"
TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best.yaml"
COMPLETED = keras_tuner.engine.trial.TrialStatus.COMPLETED

WORKERS_DIR = "workers"
TENSORBOARD_DIR = Path("logs") / "tuning"
CHECKPOINT_FILE = "checkpoint.weights.h5"
EDGE_DIR = "edge"
DEFAULT_KEEP_CHECKPOINTS = 3
# Extra values each trial reports to the oracle next to its metrics.
PARAMETERS_METRIC = "parameters"
SECONDS_METRIC = "fit_seconds"
SIZE_METRIC = "size_kb"
LATENCY_METRIC = "latency_ms"
UNPENALIZED_METRIC = "unpenalized_objective"
# Test-only fault injection: with this variable set to N, the process SIGKILLs itself
# during the first batch of the N-th trial it runs, so tests can resume a killed search.
KILL_AT_TRIAL_ENV = "PIPELINES_TUNING_KILL_AT_TRIAL"
TRIAL_PROCESS_ID = "trial-process"
TRIAL_PROCESS_FAILURES = 3  # Consecutive failed trial processes that end the search.
EDGE_LATENCY_RUNS = 20
EDGE_CONVERTER_TIMEOUT_S = 300.0

BuildModelFn = Callable[[Any], keras.Model]
MakeDatasetsFn = Callable[[Any], tuple[Any, Any]]
BuildExportModelFn = Callable[[Any, keras.Model], keras.Model]


class TrialConfigError(ConfigError, keras_tuner.errors.FatalError):
    """A sampled value made an invalid config; KerasTuner stops the search instead of retrying."""


class TimeBudgetReached(Exception):  # noqa: N818 - a stop signal that never reaches the user.
    """Raised before a new trial is created once the time budget is spent; ends the search."""


class TrialQuotaReached(Exception):  # noqa: N818 - a stop signal that never reaches the user.
    """Raised by a trial process before its next trial once it has run its quota of trials."""


@dataclasses.dataclass
class TimeBudget:
    """Wall-clock budget of one tune command, in minutes (None: unlimited)."""

    minutes: float | None
    clock: Callable[[], float] = time.monotonic
    started: float | None = None

    def __post_init__(self) -> None:
        if self.started is None:
            self.started = self.clock()

    def expired(self) -> bool:
        """Return True once ``minutes`` have passed since the budget started."""
        return self.minutes is not None and self.clock() - self.started >= self.minutes * 60


# ---------------------------------------------------------------------------
# Search space: entry names to config fields, and configs with sampled values.


def _section_fields(config: Any) -> dict[str, list[str]]:
    """Return the field names of each dataclass section of ``config``."""
    sections = {}
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if dataclasses.is_dataclass(value):
            sections[section.name] = [f.name for f in dataclasses.fields(value)]
    return sections


def resolve_search_fields(
    config: Any, search_space: Mapping[str, Mapping[str, Any]]
) -> dict[str, str]:
    """Map each search-space entry to the "section.field" it sets.

    Args:
        config: the resolved pipeline config (a dataclass of sections).
        search_space: ``tune.search_space``, keyed by hyperparameter name.

    Returns:
        ``{name: "section.field"}`` in the order of ``search_space``.

    Raises:
        ConfigError: an explicit ``field`` does not exist, or a name matches no field of
            the ``model``, ``train`` or ``data`` sections. The message names the closest field.
    """
    sections = _section_fields(config)
    dotted_fields = [f"{section}.{name}" for section, names in sections.items() for name in names]
    fields = {}
    for name, spec in search_space.items():
        explicit = spec.get("field")
        if explicit is not None:
            if explicit not in dotted_fields:
                raise ConfigError(
                    f"tune.search_space.{name}.field: unknown config field {explicit!r}; "
                    f"{_closest_field_hint(str(explicit), dotted_fields)}"
                )
            fields[name] = explicit
            continue
        section = next((s for s in FIELD_SECTIONS if name in sections.get(s, ())), None)
        if section is None:
            raise ConfigError(
                f"tune.search_space.{name}: no field named {name!r} in the sections "
                f"{[s for s in FIELD_SECTIONS if s in sections]}; "
                f"{_closest_field_hint(name, dotted_fields)} "
                "Rename the entry or set its 'field' to section.field."
            )
        fields[name] = f"{section}.{name}"
    return fields


def _closest_field_hint(name: str, dotted_fields: list[str]) -> str:
    by_field = {dotted.partition(".")[2]: dotted for dotted in dotted_fields}
    match = closest_name(name, dotted_fields) or by_field.get(closest_name(name, by_field) or "")
    return f"the closest field is {match!r}." if match else f"valid fields: {dotted_fields}."


def read_hyperparameters(config: Any, fields: Mapping[str, str]) -> dict[str, Any]:
    """Return the config's current value of each mapped field, keyed by hyperparameter name."""
    values = {}
    for name, dotted in fields.items():
        section, _, field = dotted.partition(".")
        values[name] = getattr(getattr(config, section), field)
    return values


def apply_hyperparameters(config: Any, fields: Mapping[str, str], values: Mapping[str, Any]) -> Any:
    """Return a copy of ``config`` with each hyperparameter's field set to its value.

    Values are converted to the field's type (an int for a float field becomes a float)
    and each changed section is rebuilt with ``dataclasses.replace``, which validates it.

    Raises:
        ConfigError: a value of the wrong type or outside the field's valid range.
    """
    by_section: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        section, _, field = fields[name].partition(".")
        by_section.setdefault(section, {})[field] = value
    replacements = {}
    for section_name, changes in by_section.items():
        section = getattr(config, section_name)
        hints = typing.get_type_hints(type(section))
        coerced = {
            field: coerce_value(f"{section_name}.{field}", value, hints[field])
            for field, value in changes.items()
        }
        replacements[section_name] = dataclasses.replace(section, **coerced)
    return dataclasses.replace(config, **replacements)


def declare_hyperparameter(
    hp: keras_tuner.HyperParameters, name: str, spec: Mapping[str, Any]
) -> Any:
    """Declare one search-space entry on ``hp`` and return the value for this trial."""
    kind = spec["type"]
    if kind == "float":
        return hp.Float(
            name,
            float(spec["min"]),
            float(spec["max"]),
            step=spec.get("step"),
            sampling=spec.get("sampling", "linear"),
        )
    if kind == "int":
        return hp.Int(
            name,
            int(spec["min"]),
            int(spec["max"]),
            step=spec.get("step"),
            sampling=spec.get("sampling", "linear"),
        )
    if kind == "choice":
        return hp.Choice(name, list(spec["values"]))
    return hp.Boolean(name)


def check_search_space(
    config: Any, search_space: Mapping[str, Mapping[str, Any]], fields: Mapping[str, str]
) -> None:
    """Check, before any trial, that every entry declares and that its bounds make valid configs.

    Each entry's min and max (or each choice, or both booleans) is applied to ``config``
    alone, so a range that reaches outside a field's valid range fails here with the entry
    named, not in the middle of a search.

    Raises:
        ConfigError: an entry KerasTuner rejects, or a bound that makes an invalid config.
    """
    hp = keras_tuner.HyperParameters()
    for name, spec in search_space.items():
        where = f"tune.search_space.{name}"
        if spec["type"] == "int" and not all(float(spec[k]).is_integer() for k in ("min", "max")):
            raise ConfigError(
                f"{where}: int entries need whole-number min and max, "
                f"got {spec['min']!r} and {spec['max']!r}."
            )
        try:
            declare_hyperparameter(hp, name, spec)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}: invalid entry {dict(spec)!r}: {error}") from error
        candidates = {"float": ("min", "max"), "int": ("min", "max")}.get(spec["type"])
        values = [spec[k] for k in candidates] if candidates else spec.get("values", [True, False])
        for value in values:
            try:
                apply_hyperparameters(config, fields, {name: value})
            except ConfigError as error:
                raise ConfigError(
                    f"{where}: the value {value!r} makes an invalid config for {fields[name]} "
                    f"({error}). Narrow the entry's range or values."
                ) from error


# ---------------------------------------------------------------------------
# Objective: checked with a one-step dry run before any trial.


def check_objective(
    config: Any, build_model: BuildModelFn, make_datasets: MakeDatasetsFn, objective: str
) -> list[str]:
    """Train one step on one batch and check that ``objective`` is among the logged metrics.

    Args:
        config: the config to build the model and datasets from.
        build_model: the pipeline's model factory (returns a compiled model).
        make_datasets: the pipeline's dataset factory (returns train and validation).
        objective: the metric name to check, e.g. "val_loss".

    Returns:
        The sorted metric names the dry run logged.

    Raises:
        ConfigError: ``objective`` is not logged; the message lists the names and the closest.
    """
    keras.backend.clear_session()
    model = build_model(config)
    train_data, validation_data = make_datasets(config)
    history = model.fit(
        train_data.take(1),
        validation_data=validation_data.take(1),
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    available = sorted(history.history)
    keras.backend.clear_session()
    if objective not in available:
        hint = closest_name(objective, available)
        suggestion = f" Did you mean {hint!r}?" if hint else ""
        raise ConfigError(
            f"tune.objective: the model does not log {objective!r}; a one-step training run logged "
            f"{available}.{suggestion} Set tune.objective to one of these."
        )
    logger.info("Objective %r found among the logged metrics %s", objective, available)
    return available


# ---------------------------------------------------------------------------
# KerasTuner integration: the hypermodel and tuners with a time budget and trial records.


@dataclasses.dataclass(frozen=True)
class EdgeLimits:
    """Limits of the edge-aware objective; None turns a limit off."""

    max_size_kb: float | None = None
    max_latency_ms: float | None = None

    @property
    def active(self) -> bool:
        """True when at least one limit is set."""
        return self.max_size_kb is not None or self.max_latency_ms is not None

    def compute_excess(self, size_kb: float, latency_ms: float) -> float:
        """Return the largest relative overrun ``measured / limit - 1`` (<= 0: within limits)."""
        overruns = []
        if self.max_size_kb is not None:
            overruns.append(size_kb / self.max_size_kb - 1.0)
        if self.max_latency_ms is not None:
            overruns.append(latency_ms / self.max_latency_ms - 1.0)
        return max(overruns, default=-1.0)


def compute_penalized_value(value: float, excess: float, direction: str) -> float:
    """Return ``value`` made worse by ``(|value| + 1) * (1 + excess)`` when ``excess > 0``."""
    if excess <= 0:
        return value
    penalty = (abs(value) + 1.0) * (1.0 + excess)
    return value + penalty if direction == "min" else value - penalty


def measure_edge_model(export_model: keras.Model, work_dir: Path) -> dict[str, float]:
    """Export ``export_model`` to float32 TFLite in ``work_dir``; return its size and latency.

    Raises:
        ExportError: the model does not convert to built-in ops, or the converter failed.
    """
    from shared.export import (  # Imported late: only the edge objective needs the converter.
        convert_saved_model,
        export_saved_model,
        make_model_endpoint,
        measure_latency_ms,
    )

    endpoint = make_model_endpoint(export_model)
    saved_model = export_saved_model(work_dir / "saved_model", {"serve": endpoint}, [export_model])
    tflite_path = convert_saved_model(
        saved_model,
        "serve",
        "float32",
        work_dir / "model_float32.tflite",
        timeout_s=EDGE_CONVERTER_TIMEOUT_S,
    )
    inputs = {
        name: np.zeros(tuple(spec.shape), spec.dtype.as_numpy_dtype)
        for name, spec in endpoint[1].items()
    }
    latency_ms = measure_latency_ms(tflite_path, "serve", inputs, EDGE_LATENCY_RUNS)
    shutil.rmtree(saved_model, ignore_errors=True)  # The .tflite file is what a reader inspects.
    return {SIZE_METRIC: tflite_path.stat().st_size / 1024.0, LATENCY_METRIC: latency_ms}


def select_best_epoch(
    history: Mapping[str, list[float]], objective: str, direction: str
) -> dict[str, float]:
    """Return every metric at the epoch with the best finite ``objective`` value."""
    values = np.asarray(history[objective], dtype=float)
    worst = np.inf if direction == "min" else -np.inf
    scores = np.where(np.isfinite(values), values, worst)
    epoch = int(np.argmin(scores) if direction == "min" else np.argmax(scores))
    return {name: float(series[epoch]) for name, series in history.items() if len(series) > epoch}


class ConfigHyperModel(keras_tuner.HyperModel):
    """Builds and fits the pipeline's model from a config with one stage's sampled values.

    ``fit`` returns the metrics of the best epoch plus the parameter count, the training
    seconds and, with edge limits, the TFLite size and latency. KerasTuner sends them to
    the oracle, so a chief records them for trials that its workers ran.
    """

    def __init__(
        self,
        base_config: Any,
        search_space: Mapping[str, Mapping[str, Any]],
        fields: Mapping[str, str],
        build_model: BuildModelFn,
        make_datasets: MakeDatasetsFn,
        *,
        objective: keras_tuner.Objective | None = None,
        fixed: Mapping[str, Any] | None = None,
        edge_limits: EdgeLimits = EdgeLimits(),
        build_export_model: BuildExportModelFn | None = None,
    ) -> None:
        super().__init__(name="config_hypermodel")
        self.base_config = base_config
        self.search_space = dict(search_space)
        self.fields = dict(fields)
        self.build_model = build_model
        self.make_datasets = make_datasets
        self.objective = objective
        self.fixed = dict(fixed or {})  # Declared as hp.Fixed, for distributed workers.
        self.edge_limits = edge_limits
        self.build_export_model = build_export_model
        self.parameter_count: int | None = None
        self.trial_dir: Path | None = None

    def trial_config(self, hp: keras_tuner.HyperParameters) -> Any:
        """Return the base config with this trial's values; an invalid one stops the search."""
        values = {
            name: declare_hyperparameter(hp, name, spec) for name, spec in self.search_space.items()
        }
        for name, value in self.fixed.items():
            values[name] = hp.Fixed(name, value)
        # A worker's hp carries the chief's fixed values even when its own are unknown.
        values.update({n: v for n, v in hp.values.items() if n in self.fields and n not in values})
        try:
            return apply_hyperparameters(self.base_config, self.fields, values)
        except ConfigError as error:
            raise TrialConfigError(
                f"the sampled values {values} make an invalid config: {error}"
            ) from error

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        """Free the previous trial's graph and build a compiled model for this trial."""
        keras.backend.clear_session()
        self.parameter_count = None
        return self.build_model(self.trial_config(hp))

    def fit(self, hp: keras_tuner.HyperParameters, model: keras.Model, *args, **kwargs):
        """Train on the trial's datasets; KerasTuner passes epochs and callbacks in ``kwargs``."""
        config = self.trial_config(hp)
        train_data, validation_data = self.make_datasets(config)
        started = time.monotonic()
        history = model.fit(
            train_data,
            *args,
            validation_data=validation_data,
            steps_per_epoch=config.train.steps_per_epoch,
            validation_steps=config.train.validation_steps,
            shuffle=False,  # tf.data pipelines shuffle themselves.
            **kwargs,
        )
        seconds = time.monotonic() - started
        self.parameter_count = int(model.count_params())
        if self.objective is None:
            return history
        results = select_best_epoch(history.history, self.objective.name, self.objective.direction)
        results.update({PARAMETERS_METRIC: self.parameter_count, SECONDS_METRIC: seconds})
        if self.edge_limits.active:
            results.update(self.measure_edge(config, model, results[self.objective.name]))
        return results

    def measure_edge(self, config: Any, model: keras.Model, value: float) -> dict[str, float]:
        """Export the trial's model, and return its size, latency and penalized objective.

        Raises:
            keras_tuner.errors.FailedTrialError: the model does not export to TFLite.
        """
        work_dir = Path(self.trial_dir or ".") / EDGE_DIR
        try:
            measured = measure_edge_model(self.build_export_model(config, model), work_dir)
        except ExportError as error:
            raise keras_tuner.errors.FailedTrialError(
                f"the trial's model did not export to TFLite for the edge objective: {error}"
            ) from error
        excess = self.edge_limits.compute_excess(measured[SIZE_METRIC], measured[LATENCY_METRIC])
        logger.info(
            "Edge check: %.1f KB, %.3f ms per call (limits %s KB, %s ms)%s",
            measured[SIZE_METRIC],
            measured[LATENCY_METRIC],
            self.edge_limits.max_size_kb,
            self.edge_limits.max_latency_ms,
            "" if excess <= 0 else f"; over the limit by {excess:.0%}, objective penalized",
        )
        penalized = compute_penalized_value(value, excess, self.objective.direction)
        return {**measured, UNPENALIZED_METRIC: value, self.objective.name: penalized}


class KillAtFirstBatch(keras.callbacks.Callback):
    """Test-only: SIGKILLs the process at the end of the first training batch."""

    def on_train_batch_end(self, batch, logs=None) -> None:
        logger.warning("%s is set: killing this process during a trial.", KILL_AT_TRIAL_ENV)
        os.kill(os.getpid(), signal.SIGKILL)


class StageTunerMixin:
    """Adds to a KerasTuner tuner: the time budget, trial records and the test kill switch."""

    budget: TimeBudget | None = None
    recorder: StageRecorder | None = None
    after_trial: Callable[[], None] | None = None
    trial_quota: int | None = None  # Trials this process may run (trial processes only).
    trials_started = 0  # Trials this process started, for KILL_AT_TRIAL_ENV and the quota.

    def pre_create_trial(self) -> None:
        """Stop before the next trial once the time budget or this process's quota is spent."""
        if self.budget is not None and self.budget.expired():
            raise TimeBudgetReached()
        if self.trial_quota is not None and StageTunerMixin.trials_started >= self.trial_quota:
            raise TrialQuotaReached()

    def on_trial_begin(self, trial) -> None:
        super().on_trial_begin(trial)
        self._trial_started = time.monotonic()

    def run_trial(self, trial, *args, **kwargs):
        """Pass the trial's folder to the hypermodel; add the kill switch for tests."""
        StageTunerMixin.trials_started += 1
        if isinstance(self.hypermodel, ConfigHyperModel):
            self.hypermodel.trial_dir = Path(self.get_trial_dir(trial.trial_id))
        kill_at = os.environ.get(KILL_AT_TRIAL_ENV)
        if kill_at and StageTunerMixin.trials_started == int(kill_at):
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), KillAtFirstBatch()]
        return super().run_trial(trial, *args, **kwargs)

    def on_trial_end(self, trial) -> None:
        super().on_trial_end(trial)
        if self.recorder is not None:
            duration = time.monotonic() - self._trial_started
            oracle_trial = self.oracle.get_trial(trial.trial_id)
            self.recorder.record(oracle_trial, duration, self.hypermodel.parameter_count)
        if self.after_trial is not None:
            self.after_trial()


class RandomStageTuner(StageTunerMixin, keras_tuner.RandomSearch):
    """Random search with the time budget and trial records."""


class BayesianStageTuner(StageTunerMixin, keras_tuner.BayesianOptimization):
    """Bayesian optimization with the time budget and trial records."""


class HyperbandStageTuner(StageTunerMixin, keras_tuner.Hyperband):
    """Hyperband with the time budget and trial records."""


def build_tuner(
    tune: TuneConfig,
    hypermodel: keras_tuner.HyperModel,
    directory: Path,
    project_name: str,
    *,
    seed: int | None = None,
    budget: TimeBudget | None = None,
    recorder: StageRecorder | None = None,
) -> keras_tuner.Tuner:
    """Build (or reload, when ``directory/project_name`` exists) the tuner ``tune.tuner`` names.

    Hyperband trains each model for at most ``tune.epochs_per_trial`` epochs; its number of
    trials is capped at ``tune.max_trials`` like the other tuners.
    """
    common = {
        "hypermodel": hypermodel,
        "objective": keras_tuner.Objective(tune.objective, direction=tune.direction),
        "seed": seed,
        "directory": str(directory),
        "project_name": project_name,
        "overwrite": False,
        "executions_per_trial": tune.executions_per_trial,
    }
    if tune.tuner == "hyperband":
        tuner = HyperbandStageTuner(max_epochs=tune.epochs_per_trial, **common)
        # Hyperband takes no max_trials argument, but its base Oracle stops at this count.
        tuner.oracle.max_trials = tune.max_trials
    elif tune.tuner == "bayesian":
        tuner = BayesianStageTuner(max_trials=tune.max_trials, **common)
    else:
        tuner = RandomStageTuner(max_trials=tune.max_trials, **common)
    tuner.budget = budget
    tuner.recorder = recorder
    return tuner


# ---------------------------------------------------------------------------
# Trial records: stage.json per stage, trials.csv for the whole run.


def best_record(records: list[dict[str, Any]], direction: str) -> dict[str, Any] | None:
    """Return the feasible completed record with the best finite value, or None.

    A record is infeasible when the edge objective found it over a limit
    (``feasible`` is False); records without an edge check count as feasible.
    """
    completed = [
        r
        for r in records
        if r["status"] == COMPLETED and _is_finite(r["value"]) and r.get("feasible") is not False
    ]
    if not completed:
        return None
    pick = min if direction == "min" else max
    return pick(completed, key=lambda r: r["value"])


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def read_trial_metric(trial, name: str) -> float | None:
    """Return the last value of ``name`` that the trial reported, or None."""
    if trial.metrics.exists(name):
        return float(trial.metrics.get_last_value(name))
    return None


class StageRecorder:
    """Trial records of one stage, kept in ``stage.json``; ``trials.csv`` is rewritten per trial."""

    def __init__(
        self,
        stage: str,
        stage_dir: Path,
        settings: dict[str, Any],
        fixed: dict[str, Any],
        base_values: dict[str, Any],
        write_csv: Callable[[], None],
    ) -> None:
        self.stage = stage
        self.path = stage_dir / STAGE_FILE
        self.settings = settings
        self.fixed = fixed
        self.base_values = base_values  # Every hyperparameter's value outside this stage's search.
        self.write_csv = write_csv
        saved = read_json(self.path) if self.path.is_file() else {}
        self.records = {r["trial_id"]: r for r in saved.get("trials", [])}

    def record(
        self, trial, duration_seconds: float | None, parameters: int | None
    ) -> dict[str, Any]:
        """Store and log one finished trial (a retried trial replaces its earlier record).

        Values the trial reported to the oracle (parameters, training seconds, edge size
        and latency) fill what this process did not measure, as on a chief.
        """
        sampled = {
            n: trial.hyperparameters.values[n]
            for n in self.settings["search_space"]
            if n in trial.hyperparameters.values
        }
        completed = trial.status == COMPLETED and trial.score is not None
        unpenalized = read_trial_metric(trial, UNPENALIZED_METRIC)
        value = None
        if completed:
            value = unpenalized if unpenalized is not None else float(trial.score)
        size_kb = read_trial_metric(trial, SIZE_METRIC)
        latency_ms = read_trial_metric(trial, LATENCY_METRIC)
        if duration_seconds is None:
            duration_seconds = read_trial_metric(trial, SECONDS_METRIC)
        if parameters is None and read_trial_metric(trial, PARAMETERS_METRIC) is not None:
            parameters = int(read_trial_metric(trial, PARAMETERS_METRIC))
        fixed = {
            n: trial.hyperparameters.values[n]
            for n in self.fixed
            if n in trial.hyperparameters.values
        }
        record = {
            "trial_id": trial.trial_id,
            "status": trial.status,
            "value": value,
            "score": float(trial.score) if completed else None,
            "hyperparameters": sampled,
            "values": {**self.base_values, **fixed, **sampled},
            "duration_seconds": None if duration_seconds is None else round(duration_seconds, 2),
            "parameters": parameters,
            "size_kb": None if size_kb is None else round(size_kb, 2),
            "latency_ms": None if latency_ms is None else round(latency_ms, 4),
            "feasible": None if size_kb is None else bool(completed and trial.score == value),
        }
        self.records[trial.trial_id] = record
        self.save()
        logger.info(
            "Stage %s trial %s: %s -> %s=%s (%s, %s s, %s parameters%s)",
            self.stage,
            trial.trial_id,
            sampled,
            self.settings["objective"],
            value,
            trial.status,
            record["duration_seconds"],
            parameters,
            "" if size_kb is None else f", {record['size_kb']} KB, {record['latency_ms']} ms",
        )
        return record

    def sync(self, oracle) -> None:
        """Add trials the oracle finished but this file missed (a kill between the two writes)."""
        missing = [
            t
            for t in oracle.trials.values()
            if t.trial_id not in self.records and t.status not in ("RUNNING", "IDLE")
        ]
        for trial in missing:
            self.record(trial, None, None)
        if not missing:
            self.save()

    def save(self) -> None:
        """Write stage.json atomically, then refresh trials.csv."""
        write_json(
            self.path,
            {
                "stage": self.stage,
                "settings": self.settings,
                "fixed": self.fixed,
                "trials": list(self.records.values()),
            },
        )
        self.write_csv()


def load_stage_records(stage_dir: Path) -> list[dict[str, Any]]:
    """Return the trial records saved in ``stage_dir/stage.json`` (empty when absent)."""
    path = stage_dir / STAGE_FILE
    return read_json(path).get("trials", []) if path.is_file() else []


def write_trials_csv(
    path: Path, tuning_dir: Path, stages: tuple[str, ...], names: list[str], objective: str
) -> Path:
    """Write one row per trial of every stage: ids, status, values, objective, seconds, size."""
    columns = ["stage", "trial_id", "status", *names, objective, "duration_seconds", "parameters"]
    records = {stage: load_stage_records(tuning_dir / stage) for stage in stages}
    if any(
        r.get("size_kb") is not None for stage_records in records.values() for r in stage_records
    ):
        columns += ["size_kb", "latency_ms", "feasible", "score"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for stage in stages:
        for record in records[stage]:
            row = {"stage": stage, objective: record["value"], **record, **record["values"]}
            writer.writerow(row)
    return write_text_atomic(path, buffer.getvalue())


# ---------------------------------------------------------------------------
# Trial processes: TensorFlow keeps about 10 MiB per trained model after clear_session
# (TF 2.21, Keras 3.15), so long searches run their trials in child processes.


def _exit_with_parent() -> None:
    """Ask Linux to SIGKILL this child when its parent dies, so no trial process is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1 is PR_SET_PDEATHSIG.
    except (OSError, AttributeError):
        pass  # Not Linux: a killed parent leaves its child to finish or time out.


class TrialProcessLauncher:
    """Runs trial processes one after another until the stage's oracle has no trial left.

    Each process is the tune command as a worker of this process's oracle on 127.0.0.1;
    it runs ``--trials-per-process`` trials and exits, and the next one starts. Child
    logs go to ``log_path``.
    """

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.command = command
        self.log_path = log_path
        self.stopping = threading.Event()
        self.process: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._run, name="trial-processes", daemon=True)

    def start(self) -> None:
        """Start launching trial processes in a background thread."""
        logger.info("Running trials in child processes: %s", " ".join(self.command))
        self.thread.start()

    def stop(self) -> None:
        """Stop launching, and end a process that is still starting up."""
        self.stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            returncode, new_trials = self._run_one()
            if self.stopping.is_set():
                return
            failures = failures + 1 if returncode != 0 else 0
            if failures >= TRIAL_PROCESS_FAILURES:
                logger.error(
                    "%d trial processes in a row failed (last exit code %s); stopping the "
                    "search. See %s.",
                    failures,
                    returncode,
                    self.log_path,
                )
                _thread.interrupt_main()
                return
            if returncode == 0 and new_trials == 0:
                return  # The oracle has no trial left; the search is ending.

    def _run_one(self) -> tuple[int, int | None]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                preexec_fn=_exit_with_parent,  # noqa: PLW1509 - only a prctl call.
            )
            output, _ = self.process.communicate()
        try:
            new_trials = json.loads(output).get("new_trials")
        except (json.JSONDecodeError, AttributeError):
            new_trials = None
        return self.process.returncode, new_trials


# ---------------------------------------------------------------------------
# Plots of the search, from trials.csv.


def load_trial_rows(trials_csv: Path, objective: str) -> list[dict[str, Any]]:
    """Return the completed rows of ``trials.csv`` with a numeric objective, in file order."""
    with open(trials_csv, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    completed = []
    for row in rows:
        try:
            value = float(row[objective])
        except (TypeError, ValueError):
            continue
        if row["status"] == COMPLETED and math.isfinite(value):
            completed.append({**row, objective: value})
    return completed


def plot_search(trials_csv: Path, out_dir: Path, objective: str, names: list[str]) -> list[Path]:
    """Write ``objective_per_trial.png`` and ``objective_per_hyperparameter.png``.

    The first shows the objective of each completed trial in run order, coloured by
    stage. The second has one panel per hyperparameter. Its x-axis is logarithmic for
    positive values that span more than a factor of 20, and choices sit at their label.
    """
    import matplotlib

    matplotlib.use("Agg")  # Headless: searches run on servers and in CI.
    import matplotlib.pyplot as plt

    rows = load_trial_rows(trials_csv, objective)
    if not rows:
        return []
    paths = [out_dir / "objective_per_trial.png", out_dir / "objective_per_hyperparameter.png"]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for stage in dict.fromkeys(row["stage"] for row in rows):
        points = [(i + 1, row[objective]) for i, row in enumerate(rows) if row["stage"] == stage]
        axis.scatter(*zip(*points, strict=True), label=stage)
    axis.set_xlabel("completed trial")
    axis.set_ylabel(objective)
    axis.legend(title="stage")
    _save_figure(figure, paths[0])

    figure, axes = plt.subplots(1, len(names), figsize=(3.5 * len(names), 3.2), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        _plot_hyperparameter(axis, [row[name] for row in rows], [row[objective] for row in rows])
        axis.set_xlabel(name)
        axis.set_ylabel(objective)
    _save_figure(figure, paths[1])
    return paths


def _plot_hyperparameter(axis, raw_values: list[str], objectives: list[float]) -> None:
    try:
        values = [float(v) for v in raw_values]
    except ValueError:
        values = None
    if values is None:  # Categorical: one position per distinct label.
        labels = sorted(set(raw_values))
        axis.scatter([labels.index(v) for v in raw_values], objectives)
        axis.set_xticks(range(len(labels)), labels)
        return
    axis.scatter(values, objectives)
    if min(values) > 0 and max(values) / min(values) > 20:
        axis.set_xscale("log")


def _save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)
    logger.info("Wrote %s", path)


# ---------------------------------------------------------------------------
# The staged search.


def resolve_tune_config(tune: TuneConfig, args: Any) -> TuneConfig:
    """Apply the tune flags (--tuner, --max-trials, ...) over ``tune``, validated as config."""
    flags = {
        "tuner": getattr(args, "tuner", None),
        "max_trials": getattr(args, "max_trials", None),
        "executions_per_trial": getattr(args, "executions_per_trial", None),
        "time_budget_minutes": getattr(args, "time_budget", None),
    }
    return dataclasses.replace(tune, **{k: v for k, v in flags.items() if v is not None})


def select_stages(tune: TuneConfig, requested: str | None) -> tuple[str, ...]:
    """Return the stages to run: all of ``tune.stages`` in order, or the one requested."""
    if requested in (None, "all"):
        return tuple(tune.stages)
    if requested not in tune.stages:
        raise ConfigError(
            f"--stage {requested}: the stage is not in tune.stages {list(tune.stages)}; "
            f"add it to tune.stages or pick one of {['all', *tune.stages]}."
        )
    return (requested,)


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """Settings of one tune command beyond ``tune``: edge limits, checkpoints and role."""

    edge_limits: EdgeLimits = EdgeLimits()
    keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS
    role: str = "standalone"  # "standalone", "chief" or "worker"
    worker_id: str | None = None
    trials_per_process: int | None = None
    # The worker command that runs trials in child processes; None runs them in this one.
    trial_command: list[str] | None = None


def resolve_search_options(tune: TuneConfig, args: Any) -> SearchOptions:
    """Read the edge limits and checkpoint count from the flags (else ``tune``) and the role.

    Raises:
        ConfigError: a limit or count out of range, or an invalid distributed setup.
    """

    def pick(flag: str, field: str) -> Any:
        value = getattr(args, flag, None)
        return value if value is not None else getattr(tune, field, None)

    limits = EdgeLimits(
        pick("max_size_kb", "max_size_kb"), pick("max_latency_ms", "max_latency_ms")
    )
    for name, value in (
        ("max_size_kb", limits.max_size_kb),
        ("max_latency_ms", limits.max_latency_ms),
    ):
        if value is not None:
            check_range(f"--{name.replace('_', '-')}", value, 0.0, low_inclusive=False)
    keep = pick("keep_checkpoints", "keep_checkpoints")
    keep = DEFAULT_KEEP_CHECKPOINTS if keep is None else keep
    check_range("--keep-checkpoints", keep, 0)
    role, worker_id = configure_tuning_role(
        getattr(args, "role", None), getattr(args, "oracle", None), getattr(args, "worker_id", None)
    )
    per_process = getattr(args, "trials_per_process", None)
    if per_process is not None:
        check_range("--trials-per-process", per_process, 1)
    return SearchOptions(limits, int(keep), role, worker_id, per_process)


@dataclasses.dataclass
class StageResult:
    """One stage's trial records, the values it held fixed and its count of new trials."""

    stage: str
    records: list[dict[str, Any]]
    fixed: dict[str, Any]
    new_trials: int = 0
    stopped_by_budget: bool = False

    def summary(self, direction: str) -> dict[str, Any]:
        """Return the stage's part of the run summary."""
        best = best_record(self.records, direction)
        return {
            "best_hyperparameters": best["hyperparameters"] if best else None,
            "best_value": best["value"] if best else None,
            "fixed": self.fixed,
            "trials": len(self.records),
            "completed_trials": sum(r["status"] == COMPLETED for r in self.records),
            "new_trials": self.new_trials,
            "stopped_by_time_budget": self.stopped_by_budget,
        }


class StagedSearch:
    """Runs the stages of one tune command in order, carrying the incumbent from stage to stage."""

    def __init__(
        self,
        config: Any,
        tune: TuneConfig,
        run_dir: Path,
        build_model: BuildModelFn,
        make_datasets: MakeDatasetsFn,
        budget: TimeBudget,
        options: SearchOptions = SearchOptions(),
        build_export_model: BuildExportModelFn | None = None,
    ) -> None:
        self.config = config
        self.tune = tune
        self.options = options
        self.build_export_model = build_export_model
        # Workers keep their trials apart from the chief's, also on a shared file system.
        self.run_dir = (
            Path(run_dir) / WORKERS_DIR / options.worker_id
            if options.role == "worker"
            else Path(run_dir)
        )
        self.tuning_dir = self.run_dir / TUNING_DIR
        self.fields = resolve_search_fields(config, tune.search_space)
        self.build_model = build_model
        self.make_datasets = make_datasets
        self.budget = budget
        self.config_values = read_hyperparameters(config, self.fields)
        self.trial_base = dataclasses.replace(
            config, train=dataclasses.replace(config.train, epochs=tune.epochs_per_trial)
        )

    def stage_names(self, stage: str) -> list[str]:
        """Return the search-space entries of ``stage`` (an entry without a stage is "size")."""
        return [
            n for n, spec in self.tune.search_space.items() if spec.get("stage", "size") == stage
        ]

    def fixed_values(self, stage: str, earlier: list[StageResult]) -> dict[str, Any]:
        """Return the incumbent's values for the entries of the stages before ``stage``.

        A distributed worker returns none: it receives the chief's fixed values with
        each trial.
        """
        if self.options.role == "worker":
            return {}
        earlier_names = [n for result in earlier for n in self.stage_names(result.stage)]
        records = [r for result in earlier for r in result.records]
        incumbent = best_record(records, self.tune.direction)
        if incumbent is None:
            if earlier_names:
                logger.warning(
                    "Stage %s: the earlier stages %s have no completed trial in %s, so %s keep "
                    "the config's values %s. Run those stages first (--stage all) to search them.",
                    stage,
                    [r.stage for r in earlier],
                    self.tuning_dir,
                    earlier_names,
                    {n: self.config_values[n] for n in earlier_names},
                )
            return {}
        return {n: incumbent["values"].get(n, self.config_values[n]) for n in earlier_names}

    def load_earlier(self, stage: str) -> list[StageResult]:
        """Return the saved results of the stages before ``stage`` in ``tune.stages``."""
        earlier = self.tune.stages[: self.tune.stages.index(stage)]
        return [
            StageResult(s, load_stage_records(self.tuning_dir / s), {})
            for s in earlier
            if self.stage_names(s)
        ]

    def run(self, stages: tuple[str, ...]) -> list[StageResult]:
        """Run ``stages`` in order; earlier stages not run now come from their saved results."""
        results = self.load_earlier(stages[0]) if stages else []
        for stage in stages:
            if not self.stage_names(stage):
                logger.info("Stage %s: no tune.search_space entry has this stage; skipped.", stage)
                continue
            results.append(self.run_stage(stage, self.fixed_values(stage, results)))
        return results

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """Return what must not change between the runs of one stage's project, as JSON types."""
        settings = {
            "tuner": self.tune.tuner,
            "objective": self.tune.objective,
            "direction": self.tune.direction,
            "epochs_per_trial": self.tune.epochs_per_trial,
            "search_space": {n: dict(self.tune.search_space[n]) for n in self.stage_names(stage)},
        }
        return json.loads(json.dumps(settings))  # Tuples become lists, as when read back.

    def check_saved_settings(self, stages: tuple[str, ...]) -> None:
        """Reject resuming a stage's saved project with another tuner, objective or search space."""
        for stage in stages:
            path = self.tuning_dir / stage / STAGE_FILE
            if not self.stage_names(stage) or not path.is_file():
                continue
            previous = read_json(path).get("settings", {})
            settings = self.stage_settings(stage)
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            if changed:
                raise ConfigError(
                    f"{path.parent} contains a search run with different {changed}: saved "
                    f"{[previous.get(k) for k in changed]}, "
                    f"requested {[settings[k] for k in changed]}. "
                    "Rerun with the saved settings to resume it, or pass a new --run-dir."
                )

    def warn_if_fixed_changed(self, stage: str, fixed: dict[str, Any]) -> None:
        """Log a WARNING when a resumed stage's earlier trials ran with other fixed values."""
        path = self.tuning_dir / stage / STAGE_FILE
        previous = read_json(path).get("fixed", fixed) if path.is_file() else fixed
        if previous != json.loads(json.dumps(fixed)):
            logger.warning(
                "Stage %s: its earlier trials ran with %s fixed; new trials run with %s, because "
                "an earlier stage found better values. Use a new --run-dir for a clean search.",
                stage,
                previous,
                fixed,
            )

    def run_stage(self, stage: str, fixed: dict[str, Any]) -> StageResult:
        """Search one stage's entries with ``fixed`` applied; resumes the stage's saved project."""
        names = self.stage_names(stage)
        settings = self.stage_settings(stage)
        self.warn_if_fixed_changed(stage, fixed)
        base_config = apply_hyperparameters(self.trial_base, self.fields, fixed)

        if self.budget.expired():
            logger.warning(
                "Stage %s: not started, the time budget of %s minutes is spent.",
                stage,
                self.budget.minutes,
            )
            return StageResult(
                stage, load_stage_records(self.tuning_dir / stage), fixed, stopped_by_budget=True
            )

        logger.info(
            "Stage %s: searching %s with %s fixed, %s tuner, up to %d trials",
            stage,
            names,
            fixed,
            self.tune.tuner,
            self.tune.max_trials,
        )
        recorder = StageRecorder(
            stage,
            self.tuning_dir / stage,
            settings,
            fixed,
            {**self.config_values, **fixed},
            self.write_csv,
        )
        hypermodel = ConfigHyperModel(
            base_config,
            settings["search_space"],
            self.fields,
            self.build_model,
            self.make_datasets,
            objective=keras_tuner.Objective(self.tune.objective, direction=self.tune.direction),
            fixed=fixed if self.options.role == "chief" or self.options.trial_command else None,
            edge_limits=self.options.edge_limits,
            build_export_model=self.build_export_model,
        )

        before = len(recorder.records)
        stopped = self.search_stage(stage, hypermodel, recorder)
        records = list(recorder.records.values())
        return StageResult(
            stage, records, fixed, new_trials=len(records) - before, stopped_by_budget=stopped
        )

    def search_stage(
        self, stage: str, hypermodel: ConfigHyperModel, recorder: StageRecorder
    ) -> bool:
        """Build or reload the stage's tuner and search; return True if the budget stopped it."""
        stopped = False
        # KerasTuner prints progress; stdout carries the command's results only.
        with contextlib.redirect_stdout(sys.stderr), self.serve_trial_processes():
            tuner = build_tuner(
                self.tune,
                hypermodel,
                self.tuning_dir,
                stage,
                seed=self.config.train.seed,
                budget=self.budget,
                recorder=recorder,
            )
            if self.tune.tuner != "hyperband":  # Hyperband resumes from earlier checkpoints.
                tuner.after_trial = lambda: self.prune_checkpoints()
            if self.options.role == "worker":
                tuner.trial_quota = self.options.trials_per_process
            recorder.save()
            if self.options.role == "chief":
                logger.info(
                    "Stage %s: serving the oracle for the workers; waiting until they finish.",
                    stage,
                )
            launcher = self.start_trial_processes(stage)
            try:
                tuner.search(
                    epochs=self.tune.epochs_per_trial,
                    verbose=0,
                    callbacks=[
                        keras.callbacks.TensorBoard(str(self.run_dir / TENSORBOARD_DIR / stage))
                    ],
                )
            except TimeBudgetReached:
                stopped = True
                logger.warning(
                    "Stage %s: stopped starting trials, the time budget of %s minutes is spent.",
                    stage,
                    self.budget.minutes,
                )
            except TrialQuotaReached:
                logger.info(
                    "Stage %s: this process ran its %d trials; the next process goes on.",
                    stage,
                    self.options.trials_per_process,
                )
            finally:
                if launcher is not None:
                    launcher.stop()
        if self.options.role != "worker":  # A worker's oracle is the chief's, over gRPC.
            recorder.sync(tuner.oracle)
        if not (stopped and self.tune.tuner == "hyperband"):
            self.prune_checkpoints()
        return stopped

    @contextlib.contextmanager
    def serve_trial_processes(self):
        """Make this process the chief of an oracle on 127.0.0.1 while its trial processes run.

        Each stage gets a new port: KerasTuner leaves the previous stage's server running.
        """
        if self.options.trial_command is None:
            yield
            return
        configure_tuning_role("chief", f"127.0.0.1:{pick_free_port()}", None)
        try:
            yield
        finally:
            configure_tuning_role("standalone", None, None)

    def start_trial_processes(self, stage: str) -> TrialProcessLauncher | None:
        """Start the child processes that run this stage's trials, when trials are isolated."""
        if self.options.trial_command is None:
            return None
        remaining = None
        if self.budget.minutes is not None:
            remaining = self.budget.minutes - (self.budget.clock() - self.budget.started) / 60
        command = [
            *self.options.trial_command,
            "--stage",
            stage,
            "--oracle",
            f"{os.environ[ORACLE_IP_ENV]}:{os.environ[ORACLE_PORT_ENV]}",
        ]
        if remaining is not None:
            command += ["--time-budget", f"{max(remaining, 1e-6):.6f}"]
        launcher = TrialProcessLauncher(
            command, self.run_dir / TUNING_DIR / stage / "processes.log"
        )
        launcher.start()
        return launcher

    def all_records(self) -> list[dict[str, Any]]:
        """Return the saved records of every stage, each with its stage name."""
        return [
            dict(record, stage=stage)
            for stage in self.tune.stages
            for record in load_stage_records(self.tuning_dir / stage)
        ]

    def prune_checkpoints(self) -> list[Path]:
        """Delete the trial checkpoints of all but the best ``keep_checkpoints`` trials."""
        records = [
            r for r in self.all_records() if r["status"] == COMPLETED and _is_finite(r["value"])
        ]
        feasible_first = sorted(
            records,
            key=lambda r: (
                r.get("feasible") is False,
                r["value"] if self.tune.direction == "min" else -r["value"],
            ),
        )
        keep = {
            (r["stage"], r["trial_id"]) for r in feasible_first[: self.options.keep_checkpoints]
        }
        deleted = []
        for path in self.tuning_dir.glob(f"*/trial_*/{CHECKPOINT_FILE}"):
            stage, trial_id = path.parts[-3], path.parent.name.removeprefix("trial_")
            if (stage, trial_id) not in keep:
                path.unlink(missing_ok=True)
                deleted.append(path)
        if deleted:
            logger.info("Deleted %d trial checkpoints outside the best %d", len(deleted), len(keep))
        return deleted

    def write_csv(self) -> Path:
        """Rewrite trials.csv from every stage's saved records."""
        return write_trials_csv(
            self.run_dir / TRIALS_CSV,
            self.tuning_dir,
            tuple(self.tune.stages),
            list(self.fields),
            self.tune.objective,
        )


def run_tuning(
    config: Any,
    context: CommandContext,
    build_model: BuildModelFn,
    make_datasets: MakeDatasetsFn,
    build_export_model: BuildExportModelFn | None = None,
) -> dict[str, Any]:
    """Run the staged KerasTuner search of a pipeline's ``tune`` command.

    Args:
        config: the resolved pipeline config, with ``data``, ``model``, ``train`` and
            ``tune`` sections.
        context: the `shared.cli.CommandContext`; uses ``run_dir`` and the flags
            ``args.tuner``, ``args.max_trials``, ``args.executions_per_trial``,
            ``args.time_budget`` (minutes), ``args.stage`` ("all" or one stage),
            ``args.max_size_kb``, ``args.max_latency_ms``, ``args.keep_checkpoints``,
            ``args.role``, ``args.oracle`` and ``args.worker_id``.
        build_model: returns a compiled model for a config, e.g. compiled with
            ``shared.training.build_optimizer(config.train)``.
        make_datasets: returns batched ``(train, validation)`` datasets for a config,
            batched with ``config.train.batch_size``; load the data once, outside it.
        build_export_model: ``(config, trained model) -> model``, returning a copy with
            static shapes (batch 1, fixed length) and the trained weights, because only
            that converts to built-in TFLite ops. Needed for the edge-aware objective only.

    Returns:
        ``tuner``, ``objective``, ``direction``, ``role``, ``stages`` (per stage: best
        hyperparameters and value, fixed values, trial counts), ``best_hyperparameters``
        (the incumbent's value of every entry), ``best_value``, ``best_stage``,
        ``best_trial_id``, ``trials``, ``new_trials``, ``time_budget_reached`` and the
        paths ``trials_csv``, ``best_config`` (None when no trial completed) and ``plots``.

    Raises:
        ConfigError: an invalid flag, search-space entry or sampled config, an objective
            the model does not log, a saved stage searched with other settings, the edge
            objective without ``build_export_model``, or a distributed search of
            several stages.
    """
    tune = resolve_tune_config(config.tune, context.args)
    config = dataclasses.replace(config, tune=tune)
    stages = select_stages(tune, getattr(context.args, "stage", "all"))
    options = resolve_search_options(tune, context.args)
    check_search_setup(options, stages, build_export_model)
    if options.role == "standalone" and options.trials_per_process is not None:
        options = dataclasses.replace(options, trial_command=build_trial_command(context))
    budget = TimeBudget(tune.time_budget_minutes)
    search = StagedSearch(
        config,
        tune,
        context.run_dir,
        build_model,
        make_datasets,
        budget,
        options,
        build_export_model,
    )
    check_search_space(search.trial_base, tune.search_space, search.fields)
    search.check_saved_settings(stages)
    check_objective(search.trial_base, build_model, make_datasets, tune.objective)
    results = search.run(stages)
    csv_path = search.write_csv()
    logger.info("Wrote %s", csv_path)
    return summarize_search(search, results)


def build_trial_command(context: CommandContext) -> list[str]:
    """Return the command line of a trial process: this tune command as a worker on loopback.

    Raises:
        ConfigError: this process was not started as a pipeline's command line, so the
            command cannot be rebuilt (e.g. ``run_tuning`` called from a test).
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name.startswith("pipelines."):
        entry = ["-m", spec.name.removesuffix(".__main__")]
    elif (
        spec is None and getattr(main, "__file__", None) and context.pipeline in str(main.__file__)
    ):
        entry = [str(main.__file__)]
    else:
        raise ConfigError(
            "--trials-per-process: trial processes rerun this tune command, so start it as "
            f"'python -m pipelines.{context.pipeline} tune ...'; it is running inside "
            f"{getattr(spec, 'name', None) or getattr(main, '__file__', '?')!r}."
        )
    args = context.args
    command = [sys.executable, *entry, "tune", "--preset", context.preset]
    for path in getattr(args, "config", None) or []:
        command += ["--config", str(path)]
    for override in getattr(args, "overrides", None) or []:
        command += ["--set", override]
    flags = {
        "--data-dir": context.data_dir,
        "--run-dir": context.run_dir,
        "--seed": getattr(args, "seed", None),
        "--log-level": getattr(args, "log_level", None),
        "--tuner": getattr(args, "tuner", None),
        "--max-trials": getattr(args, "max_trials", None),
        "--executions-per-trial": getattr(args, "executions_per_trial", None),
        "--max-size-kb": getattr(args, "max_size_kb", None),
        "--max-latency-ms": getattr(args, "max_latency_ms", None),
        "--keep-checkpoints": getattr(args, "keep_checkpoints", None),
        "--trials-per-process": getattr(args, "trials_per_process", None),
    }
    for flag, value in flags.items():
        if value is not None:
            command += [flag, str(value)]
    return [*command, "--role", "worker", "--worker-id", TRIAL_PROCESS_ID]


def check_search_setup(
    options: SearchOptions, stages: tuple[str, ...], build_export_model: BuildExportModelFn | None
) -> None:
    """Reject the edge objective without an export hook, and distributed runs of several stages.

    Raises:
        ConfigError: naming the missing piece and what to pass instead.
    """
    if options.edge_limits.active and build_export_model is None:
        raise ConfigError(
            "--max-size-kb/--max-latency-ms: the edge-aware objective exports each trial's model, "
            "but this pipeline's tune command passes no build_export_model to run_tuning. Drop "
            "the limits, or add a build_export_model(config, model) that returns a batch-1, "
            "fixed-length copy of the model."
        )
    if options.role != "standalone" and len(stages) != 1:
        raise ConfigError(
            f"--role {options.role}: a distributed search runs one stage per command, got the "
            f"stages {list(stages)}. Pass --stage with one of them on the chief and every worker, "
            "and run the stages in order."
        )


def summarize_search(search: StagedSearch, results: list[StageResult]) -> dict[str, Any]:
    """Write best.yaml from the incumbent and return the run summary."""
    tune = search.tune
    records = [dict(r, stage=result.stage) for result in results for r in result.records]
    incumbent = best_record(records, tune.direction)
    best_path = None
    if incumbent is None:
        over_limits = sum(r["status"] == COMPLETED and r.get("feasible") is False for r in records)
        reason = (
            f"all {over_limits} completed trials exceeded --max-size-kb or --max-latency-ms "
            "(see size_kb and latency_ms in trials.csv). Raise the limits or search smaller models"
            if over_limits
            else "no trial completed"
        )
        logger.warning("%s was not written: %s.", search.run_dir / BEST_CONFIG, reason)
    else:
        best_config = apply_hyperparameters(search.config, search.fields, incumbent["values"])
        best_path = save_config(best_config, search.run_dir / BEST_CONFIG)
        logger.info(
            "Wrote %s (best %s=%s from stage %s trial %s)",
            best_path,
            tune.objective,
            incumbent["value"],
            incumbent["stage"],
            incumbent["trial_id"],
        )
    plots = (
        plot_search(
            search.run_dir / TRIALS_CSV, search.run_dir, tune.objective, list(search.fields)
        )
        if records
        else []
    )
    return {
        "tuner": tune.tuner,
        "objective": tune.objective,
        "direction": tune.direction,
        "role": search.options.role,
        "stages": {result.stage: result.summary(tune.direction) for result in results},
        "best_hyperparameters": incumbent["values"] if incumbent else None,
        "best_value": incumbent["value"] if incumbent else None,
        "best_stage": incumbent["stage"] if incumbent else None,
        "best_trial_id": incumbent["trial_id"] if incumbent else None,
        "trials": len(records),
        "new_trials": sum(result.new_trials for result in results),
        "time_budget_reached": any(result.stopped_by_budget for result in results),
        "trials_csv": str(search.run_dir / TRIALS_CSV),
        "best_config": str(best_path) if best_path else None,
        "plots": [str(path) for path in plots],
    }
