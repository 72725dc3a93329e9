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
- Outputs in the run directory: ``trials.csv`` (one row per trial of every stage),
  ``best.yaml`` (the full config with the incumbent's values, usable with
  ``train --config best.yaml``) and the returned summary.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import sys
import time
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import keras_tuner

from shared.config import TuneConfig, closest_name, coerce_value, save_config
from shared.errors import ConfigError
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

BuildModelFn = Callable[[Any], keras.Model]
MakeDatasetsFn = Callable[[Any], tuple[Any, Any]]


class TrialConfigError(ConfigError, keras_tuner.errors.FatalError):
    """A sampled value made an invalid config; KerasTuner stops the search instead of retrying."""


class TimeBudgetReached(Exception):  # noqa: N818 - a stop signal that never reaches the user.
    """Raised before a new trial is created once the time budget is spent; ends the search."""


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


class ConfigHyperModel(keras_tuner.HyperModel):
    """Builds and fits the pipeline's model from a config with one stage's sampled values."""

    def __init__(
        self,
        base_config: Any,
        search_space: Mapping[str, Mapping[str, Any]],
        fields: Mapping[str, str],
        build_model: BuildModelFn,
        make_datasets: MakeDatasetsFn,
    ) -> None:
        super().__init__(name="config_hypermodel")
        self.base_config = base_config
        self.search_space = dict(search_space)
        self.fields = dict(fields)
        self.build_model = build_model
        self.make_datasets = make_datasets
        self.parameter_count: int | None = None

    def trial_config(self, hp: keras_tuner.HyperParameters) -> Any:
        """Return the base config with this trial's values; an invalid one stops the search."""
        values = {
            name: declare_hyperparameter(hp, name, spec) for name, spec in self.search_space.items()
        }
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
        history = model.fit(
            train_data,
            *args,
            validation_data=validation_data,
            steps_per_epoch=config.train.steps_per_epoch,
            validation_steps=config.train.validation_steps,
            shuffle=False,  # tf.data pipelines shuffle themselves.
            **kwargs,
        )
        self.parameter_count = int(model.count_params())
        return history


class StageTunerMixin:
    """Adds to a KerasTuner tuner: the time budget, and a record of each finished trial."""

    budget: TimeBudget | None = None
    recorder: StageRecorder | None = None

    def pre_create_trial(self) -> None:
        """Stop before the next trial is created once the time budget is spent."""
        if self.budget is not None and self.budget.expired():
            raise TimeBudgetReached()

    def on_trial_begin(self, trial) -> None:
        super().on_trial_begin(trial)
        self._trial_started = time.monotonic()

    def on_trial_end(self, trial) -> None:
        super().on_trial_end(trial)
        if self.recorder is not None:
            duration = time.monotonic() - self._trial_started
            oracle_trial = self.oracle.get_trial(trial.trial_id)
            self.recorder.record(oracle_trial, duration, self.hypermodel.parameter_count)


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
    """Return the completed record with the best finite value, or None."""
    completed = [r for r in records if r["status"] == COMPLETED and _is_finite(r["value"])]
    if not completed:
        return None
    pick = min if direction == "min" else max
    return pick(completed, key=lambda r: r["value"])


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


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
        """Store and log one finished trial (a retried trial replaces its earlier record)."""
        sampled = {
            n: trial.hyperparameters.values[n]
            for n in self.settings["search_space"]
            if n in trial.hyperparameters.values
        }
        value = (
            float(trial.score) if trial.status == COMPLETED and trial.score is not None else None
        )
        record = {
            "trial_id": trial.trial_id,
            "status": trial.status,
            "value": value,
            "hyperparameters": sampled,
            "values": {**self.base_values, **sampled},
            "duration_seconds": None if duration_seconds is None else round(duration_seconds, 2),
            "parameters": parameters,
        }
        self.records[trial.trial_id] = record
        self.save()
        logger.info(
            "Stage %s trial %s: %s -> %s=%s (%s, %s s, %s parameters)",
            self.stage,
            trial.trial_id,
            sampled,
            self.settings["objective"],
            value,
            trial.status,
            record["duration_seconds"],
            parameters,
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
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for stage in stages:
        for record in load_stage_records(tuning_dir / stage):
            row = {"stage": stage, objective: record["value"], **record, **record["values"]}
            writer.writerow(row)
    return write_text_atomic(path, buffer.getvalue())


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
    ) -> None:
        self.config = config
        self.tune = tune
        self.run_dir = Path(run_dir)
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
        """Return the incumbent's values for the entries of the stages before ``stage``."""
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
            base_config, settings["search_space"], self.fields, self.build_model, self.make_datasets
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
        with contextlib.redirect_stdout(sys.stderr):
            tuner = build_tuner(
                self.tune,
                hypermodel,
                self.tuning_dir,
                stage,
                seed=self.config.train.seed,
                budget=self.budget,
                recorder=recorder,
            )
            recorder.save()
            try:
                tuner.search(epochs=self.tune.epochs_per_trial, verbose=0)
            except TimeBudgetReached:
                stopped = True
                logger.warning(
                    "Stage %s: stopped starting trials, the time budget of %s minutes is spent.",
                    stage,
                    self.budget.minutes,
                )
        recorder.sync(tuner.oracle)
        return stopped

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
) -> dict[str, Any]:
    """Run the staged KerasTuner search of a pipeline's ``tune`` command.

    Args:
        config: the resolved pipeline config, with ``data``, ``model``, ``train`` and
            ``tune`` sections.
        context: the `shared.cli.CommandContext`; uses ``run_dir`` and the flags
            ``args.tuner``, ``args.max_trials``, ``args.executions_per_trial``,
            ``args.time_budget`` (minutes) and ``args.stage`` ("all" or one stage).
        build_model: returns a compiled model for a config, e.g. compiled with
            ``shared.training.build_optimizer(config.train)``.
        make_datasets: returns batched ``(train, validation)`` datasets for a config,
            batched with ``config.train.batch_size``; load the data once, outside it.

    Returns:
        ``tuner``, ``objective``, ``direction``, ``stages`` (per stage: best
        hyperparameters and value, fixed values, trial counts), ``best_hyperparameters``
        (the incumbent's value of every entry), ``best_value``, ``best_stage``,
        ``best_trial_id``, ``trials``, ``new_trials``, ``time_budget_reached`` and the
        paths ``trials_csv`` and ``best_config`` (None when no trial completed).

    Raises:
        ConfigError: an invalid flag, search-space entry or sampled config, an objective
            the model does not log, or a saved stage searched with other settings.
    """
    tune = resolve_tune_config(config.tune, context.args)
    config = dataclasses.replace(config, tune=tune)
    stages = select_stages(tune, getattr(context.args, "stage", "all"))
    budget = TimeBudget(tune.time_budget_minutes)
    search = StagedSearch(config, tune, context.run_dir, build_model, make_datasets, budget)
    check_search_space(search.trial_base, tune.search_space, search.fields)
    search.check_saved_settings(stages)
    check_objective(search.trial_base, build_model, make_datasets, tune.objective)
    results = search.run(stages)
    csv_path = search.write_csv()
    logger.info("Wrote %s", csv_path)
    return summarize_search(search, results)


def summarize_search(search: StagedSearch, results: list[StageResult]) -> dict[str, Any]:
    """Write best.yaml from the incumbent and return the run summary."""
    tune = search.tune
    records = [dict(r, stage=result.stage) for result in results for r in result.records]
    incumbent = best_record(records, tune.direction)
    best_path = None
    if incumbent is None:
        logger.warning("No trial completed, so %s was not written.", search.run_dir / BEST_CONFIG)
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
    return {
        "tuner": tune.tuner,
        "objective": tune.objective,
        "direction": tune.direction,
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
    }
