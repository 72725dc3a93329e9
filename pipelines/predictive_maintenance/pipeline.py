"""Commands of the predictive-maintenance pipeline: train, evaluate, predict, tune and export.

Every command reads the run directory written by ``train``: ``model.keras``,
``preprocessing.json`` (kept sensors, operating conditions, scaling, all fitted on the
training engines) and ``splits.json`` (which training engines were held out). The test
protocol is the standard one for C-MAPSS: one prediction per test engine, from the window
that ends at its last reading, scored against the true RUL file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipelines.predictive_maintenance.config import SUBSETS, PredictiveMaintenanceConfig
from pipelines.predictive_maintenance.data import (
    EngineTable,
    compute_rul_targets,
    load_engine_table,
    load_test_set,
    load_train_table,
)
from pipelines.predictive_maintenance.edge import (
    STEP_SIGNATURE,
    STREAMING,
    WINDOW,
    build_streaming_model,
    build_unrolled_window_model,
    build_window_export_model,
    check_streaming_matches_window,
    collect_step_examples,
    export_model_variants,
    load_tflite_step_fn,
    make_zero_state,
    score_variants,
    stream_windows,
)
from pipelines.predictive_maintenance.model import (
    RUL_OUTPUT,
    build_rul_model,
    compile_rul_model,
    list_member_prefixes,
)
from pipelines.predictive_maintenance.plots import plot_predicted_vs_true, plot_trajectories
from pipelines.predictive_maintenance.preprocessing import (
    PREPROCESSING_FILE,
    SensorPreprocessor,
    fit_preprocessor,
    load_preprocessor,
)
from pipelines.predictive_maintenance.scoring import compute_rmse, compute_rul_metrics
from pipelines.predictive_maintenance.windows import (
    EngineWindows,
    make_dataset,
    make_last_engine_windows,
    make_windows_per_row,
)
from shared.cli import CommandContext
from shared.config import TFLITE_VARIANTS, check_choice
from shared.errors import ConfigError, DataError, ExportError
from shared.export import load_export_report, run_tflite, write_export_report
from shared.padding import padding_fraction
from shared.reports import format_metrics_table, write_report
from shared.runs import read_json, write_json, write_text_atomic
from shared.timeseries import TRAIN, VALIDATION, split_entities
from shared.training import set_seeds, train_model
from shared.tuning import run_tuning

logger = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"
EXPORT_DIR = "export"
TRAJECTORY_ENGINES = 4
PREDICT_BATCH_SIZE = 1024


# ---------------------------------------------------------------------------
# Data preparation


def split_engines(
    table: EngineTable, validation_fraction: float, seed: int
) -> dict[str, EngineTable]:
    """Hold out a share of engines (never single rows) for validation."""
    splits = split_entities(table.unit_ids, validation_fraction=validation_fraction, seed=seed)
    return {name: table.select_rows(np.isin(table.unit_ids, ids)) for name, ids in splits.items()}


def make_table_windows(
    table: EngineTable,
    preprocessor: SensorPreprocessor,
    config: PredictiveMaintenanceConfig,
    final_rul: np.ndarray | None = None,
    min_length: int | None = None,
) -> EngineWindows:
    """Transform a table and cut a window ending at each row, with the capped RUL target."""
    data = config.data
    features = preprocessor.transform(table)
    targets = compute_rul_targets(table.unit_ids, table.cycles, data.rul_cap, final_rul)
    length = data.min_window_length if min_length is None else min_length
    return make_windows_per_row(features, table.unit_ids, data.window_length, length, targets)


def log_windows(name: str, windows: EngineWindows, rul_cap: float) -> None:
    """Log window count, engines, real-reading percentiles, padding and target balance."""
    lengths = windows.lengths
    p5, p50, p95 = np.percentile(lengths, [5, 50, 95])
    capped = float(np.mean(windows.targets >= rul_cap))
    logger.info(
        "%s: %d windows from %d engines; real readings per window p5/p50/p95 %.0f/%.0f/%.0f; "
        "padding %.1f%%; target mean %.1f, share at the cap %.1f%%",
        name, len(windows), len(np.unique(windows.unit_ids)), p5, p50, p95,
        100 * padding_fraction(lengths, windows.padding_mask.shape[1]),
        float(np.mean(windows.targets)), 100 * capped,
    )  # fmt: skip


def prepare_training_data(
    config: PredictiveMaintenanceConfig, data_dir: Path, run_dir: Path | None
):
    """Load the training table, split engines, fit and save the preprocessing, and make windows.

    Returns:
        ``(preprocessor, {"train": windows, "validation": windows}, engine ids per split)``.
    """
    table = load_train_table(config.data, data_dir)
    tables = split_engines(table, config.data.validation_fraction, config.train.seed)
    preprocessor = fit_preprocessor(tables[TRAIN], config.data, config.train.seed)
    windows = {
        name: make_table_windows(split, preprocessor, config) for name, split in tables.items()
    }
    for name, split_windows in windows.items():
        log_windows(name, split_windows, config.data.rul_cap)
    engine_ids = {name: np.unique(split.unit_ids).tolist() for name, split in tables.items()}
    if run_dir is not None:
        logger.info("Wrote %s", preprocessor.save(run_dir / PREPROCESSING_FILE))
        logger.info(
            "Wrote %s", write_json(run_dir / SPLITS_FILE, {"source": table.source, **engine_ids})
        )
    return preprocessor, windows, engine_ids


def make_datasets(config: PredictiveMaintenanceConfig, windows: dict[str, EngineWindows]):
    """Return ``(train_dataset, validation_dataset)`` batched with ``train.batch_size``.

    Only the training windows are shuffled, and only after the engine split.
    """
    batch_size = config.train.batch_size
    train = make_dataset(
        windows[TRAIN],
        batch_size,
        shuffle=True,
        seed=config.train.seed,
        repeat=config.train.steps_per_epoch is not None,
    )
    validation = make_dataset(
        windows[VALIDATION], batch_size, repeat=config.train.validation_steps is not None
    )
    return train, validation


def build_compiled_model(
    config: PredictiveMaintenanceConfig, num_features: int, steps_per_epoch: int
) -> keras.Model:
    """Build and compile the window model for training."""
    model = build_rul_model(
        config.model, num_features, config.data.window_length, config.data.rul_cap
    )
    compile_rul_model(
        model, config.train, config.data.rul_cap, steps_per_epoch * config.train.epochs
    )
    return model


# ---------------------------------------------------------------------------
# train


def train(config: PredictiveMaintenanceConfig, context: CommandContext) -> dict[str, Any]:
    """Train the RUL model on the training engines, early-stopping on held-out engines.

    With ``model.members`` above 1, each member trains on its own (seed ``train.seed + k``,
    same engine split) under ``members/member{k}/``, and the members are then joined into
    one averaging model saved as ``model.keras``.
    """
    run_dir = context.run_dir
    preprocessor, windows, _ = prepare_training_data(config, context.data_dir, run_dir)
    num_features = len(preprocessor.feature_names)
    logger.info("Inputs: %s", preprocessor.feature_names)
    if config.model.members == 1:
        model, metrics = train_single_model(config, windows, num_features, run_dir)
    else:
        model, metrics = train_ensemble(config, windows, num_features, run_dir)
    validation = predict_windows(model, windows[VALIDATION])
    metrics["validation_rmse_all_windows"] = compute_rmse(validation, windows[VALIDATION].targets)
    write_json(run_dir / "metrics.json", metrics)
    write_report(
        run_dir,
        "Predictive maintenance: training",
        metrics,
        config,
        artifacts=[
            "model.keras",
            PREPROCESSING_FILE,
            SPLITS_FILE,
            *(
                ["learning_curves.png", "history.csv"]
                if config.model.members == 1
                else ["members/"]
            ),
        ],
    )
    return metrics


def train_single_model(
    config: PredictiveMaintenanceConfig,
    windows: dict[str, EngineWindows],
    num_features: int,
    run_dir: Path,
) -> tuple[keras.Model, dict[str, Any]]:
    """Train one single (``members=1``) model into ``run_dir``; return it with its metrics."""
    steps_per_epoch = config.train.steps_per_epoch or math.ceil(
        len(windows[TRAIN]) / config.train.batch_size
    )
    model = build_compiled_model(config, num_features, steps_per_epoch)
    logger.info("Model: %d parameters", model.count_params())
    train_ds, validation_ds = make_datasets(config, windows)
    metrics = train_model(
        model,
        train_ds,
        validation_ds,
        config.train,
        run_dir,
        monitor="val_loss",
        mode="min",
        num_train_samples=len(windows[TRAIN]),
        verbose=2,
    )
    return model, metrics


def train_ensemble(
    config: PredictiveMaintenanceConfig,
    windows: dict[str, EngineWindows],
    num_features: int,
    run_dir: Path,
) -> tuple[keras.Model, dict[str, Any]]:
    """Train ``model.members`` single models one after another and join them into one model."""
    single = dataclasses.replace(config.model, members=1)
    # NOTE: after a kill, train_model resumes the member in progress from its backup, but
    # members that had finished train again from scratch.
    members, member_metrics = [], []
    for index in range(config.model.members):
        seed = config.train.seed + index
        set_seeds(seed)
        member_config = dataclasses.replace(
            config, model=single, train=dataclasses.replace(config.train, seed=seed)
        )
        member_dir = run_dir / "members" / f"member{index}"
        member_dir.mkdir(parents=True, exist_ok=True)
        logger.info(
            "Training ensemble member %d of %d in %s", index + 1, config.model.members, member_dir
        )
        model, metrics = train_single_model(member_config, windows, num_features, member_dir)
        members.append(model)
        member_metrics.append(metrics)
    ensemble = join_members(config, members, num_features)
    ensemble.save(run_dir / "model.keras")
    logger.info("Wrote %s", run_dir / "model.keras")
    metrics = {
        "members": member_metrics,
        "train_seconds": round(sum(m["train_seconds"] for m in member_metrics), 2),
        "parameters": int(ensemble.count_params()),
    }
    return ensemble, metrics


def join_members(
    config: PredictiveMaintenanceConfig, members: list[keras.Model], num_features: int
) -> keras.Model:
    """Build the averaging model and copy each trained member's weights into it."""
    ensemble = build_rul_model(
        config.model, num_features, config.data.window_length, config.data.rul_cap
    )
    for prefix, member in zip(list_member_prefixes(len(members)), members, strict=True):
        for layer in member.layers:
            if layer.weights:
                ensemble.get_layer(f"{prefix}{layer.name}").set_weights(layer.get_weights())
    # Compiled only so that model.keras keeps the loss; the ensemble itself is never fitted.
    compile_rul_model(ensemble, config.train, config.data.rul_cap, total_steps=1)
    return ensemble


# ---------------------------------------------------------------------------
# evaluate


def load_trained(run_dir: Path) -> tuple[keras.Model, SensorPreprocessor]:
    """Load the trained model and its preprocessing from a run directory.

    Raises:
        DataError: the run directory contains no trained model.
    """
    model_path = run_dir / "model.keras"
    if not model_path.is_file():
        raise DataError(
            f"{model_path} not found; run `python -m pipelines.predictive_maintenance train "
            f"--run-dir {run_dir}` first."
        )
    # Uncompiled: evaluate, predict and export only run the model forward.
    model = keras.models.load_model(model_path, compile=False)
    return model, load_preprocessor(run_dir / PREPROCESSING_FILE)


def predict_windows(model: keras.Model, windows: EngineWindows) -> np.ndarray:
    """Return the model's RUL for each window, in cycles, shape ``(windows,)``."""
    outputs = model.predict(windows.inputs(), batch_size=PREDICT_BATCH_SIZE, verbose=0)
    return np.asarray(outputs, dtype=np.float64).reshape(-1)


def resolve_eval_sets(config: PredictiveMaintenanceConfig, split: str | None) -> list[str]:
    """Return the sets to evaluate: "test", "validation", or C-MAPSS subsets from a comma list.

    Raises:
        ConfigError: an unknown name.
    """
    if not split or split == "test":
        return ["test"]
    if split == VALIDATION:
        return [VALIDATION]
    names = [name.strip().upper() for name in split.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUBSETS]
    if unknown or not names:
        raise ConfigError(
            f"--split {split!r}: expected 'test', 'validation' or a comma list of subsets from "
            f"{list(SUBSETS)}, e.g. FD001,FD003."
        )
    return names


def evaluate_test_set(
    model, preprocessor, config, data_dir: Path, name: str, limit: int | None, plots_dir: Path
):
    """Score the last window of each test engine and plot the predictions.

    Returns:
        ``(label, metrics)``: the set's name in reports (the subset) and its metrics.
    """
    table, final_rul = load_test_set(config.data, data_dir, None if name == "test" else name)
    if limit is not None:
        final_rul = final_rul[:limit]
        table = table.select_rows(np.isin(table.unit_ids, np.unique(table.unit_ids)[:limit]))
    last = make_last_engine_windows(
        preprocessor.transform(table), table.unit_ids, config.data.window_length
    )
    predicted = predict_windows(model, last)
    metrics = compute_rul_metrics(predicted, final_rul, config.data.rul_cap)
    metrics["short_engines_padded"] = int(np.sum(last.lengths < config.data.window_length))
    label = config.data.subset if name == "test" and not config.data.test_file else name
    plot_predicted_vs_true(
        predicted, final_rul, last.unit_ids, plots_dir / f"{label}_predicted_vs_true.png", label
    )
    plot_test_trajectories(
        model,
        preprocessor,
        config,
        table,
        final_rul,
        plots_dir / f"{label}_trajectories.png",
        label,
    )
    return label, metrics


def plot_test_trajectories(
    model, preprocessor, config, table: EngineTable, final_rul: np.ndarray, path: Path, label: str
) -> None:
    """Plot predicted, capped and true RUL at every cycle of a few test engines."""
    windows = make_table_windows(table, preprocessor, config, final_rul, min_length=1)
    units = pick_trajectory_units(np.unique(table.unit_ids), final_rul)
    keep = np.isin(windows.unit_ids, units)
    windows = subset_windows(windows, keep)
    true_rul = compute_rul_targets(table.unit_ids, table.cycles, None, final_rul)[windows.end_rows]
    plot_trajectories(
        windows.unit_ids,
        table.cycles[windows.end_rows],
        windows.targets,
        predict_windows(model, windows),
        true_rul,
        path,
        label,
    )


def pick_trajectory_units(unit_ids: np.ndarray, final_rul: np.ndarray) -> np.ndarray:
    """Pick a few engines spread over the range of true final RUL, for trajectory plots."""
    order = np.argsort(final_rul, kind="stable")
    picks = np.linspace(0, len(order) - 1, min(TRAJECTORY_ENGINES, len(order))).round().astype(int)
    return unit_ids[order[np.unique(picks)]]


def subset_windows(windows: EngineWindows, keep: np.ndarray) -> EngineWindows:
    """Return the windows selected by a boolean mask."""
    return EngineWindows(
        windows.readings[keep],
        windows.padding_mask[keep],
        None if windows.targets is None else windows.targets[keep],
        windows.unit_ids[keep],
        windows.end_rows[keep],
    )


def evaluate_validation(
    model, config: PredictiveMaintenanceConfig, context: CommandContext, preprocessor
):
    """Score every window of the held-out training engines against the capped RUL."""
    splits = read_json(context.run_dir / SPLITS_FILE)
    table = load_train_table(config.data, context.data_dir)
    units = np.asarray(splits[VALIDATION])
    if context.args.limit is not None:
        units = units[: context.args.limit]
    windows = make_table_windows(
        table.select_rows(np.isin(table.unit_ids, units)), preprocessor, config
    )
    predicted = predict_windows(model, windows)
    return {
        "engines": len(units),
        "windows": len(windows),
        "rmse": compute_rmse(predicted, windows.targets),
        "mae": float(np.mean(np.abs(predicted - windows.targets))),
    }


def evaluate(config: PredictiveMaintenanceConfig, context: CommandContext) -> dict[str, Any]:
    """Report RMSE and NASA score per test set (last window per engine), with plots."""
    model, preprocessor = load_trained(context.run_dir)
    limit = getattr(context.args, "limit", None)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: expected a positive number of engines.")
    results: dict[str, Any] = {}
    plots_dir = context.run_dir / "plots"
    for name in resolve_eval_sets(config, getattr(context.args, "split", None)):
        if name == VALIDATION:
            results[VALIDATION] = evaluate_validation(model, config, context, preprocessor)
            continue
        label, metrics = evaluate_test_set(
            model, preprocessor, config, context.data_dir, name, limit, plots_dir
        )
        results[label] = metrics
        logger.info(
            "%s: RMSE %.2f, NASA score %.1f on %d engines",
            label,
            metrics["rmse"],
            metrics["nasa_score"],
            metrics["engines"],
        )
    write_json(context.run_dir / "evaluation.json", results)
    sections = {"Results per set": format_subset_table(results)}
    if (context.run_dir / "metrics.json").is_file():
        sections["Training"] = format_training_summary(read_json(context.run_dir / "metrics.json"))
    write_report(
        context.run_dir,
        "Predictive maintenance: evaluation",
        {},  # The per-set table below contains every metric of evaluation.json.
        config,
        artifacts=sorted(plots_dir.glob("*.png")) if plots_dir.is_dir() else [],
        sections=sections,
    )
    return results


def format_subset_table(results: dict[str, dict[str, Any]]) -> str:
    """Format one Markdown row per evaluated set with every metric it has ("-" where absent)."""
    columns = [
        ("engines", "engines", "{:d}"),
        ("rmse", "RMSE", "{:.2f}"),
        ("rmse_capped_truth", "RMSE, truth capped", "{:.2f}"),
        ("nasa_score", "NASA score", "{:.1f}"),
        ("mae", "MAE", "{:.2f}"),
        ("mean_error", "mean error", "{:+.2f}"),
        ("short_engines_padded", "short engines padded", "{:d}"),
        ("windows", "windows", "{:d}"),
    ]
    shown = [c for c in columns if any(c[0] in metrics for metrics in results.values())]
    lines = [
        "| set | " + " | ".join(title for _, title, _ in shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    for name, metrics in results.items():
        cells = [fmt.format(metrics[key]) if key in metrics else "-" for key, _, fmt in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_training_summary(training: dict[str, Any]) -> str:
    """Format training metrics, with one row per ensemble member when there are members."""
    scalars = {k: v for k, v in training.items() if k not in ("final", "members")}
    text = format_metrics_table(scalars)
    members = training.get("members")
    if members:
        rows = ["| member | epochs run | best epoch | best validation loss | seconds |", "|---|---:|---:|---:|---:|"]
        for index, member in enumerate(members):
            rows.append(
                f"| {index} | {member.get('epochs_run', '-')} | {member.get('best_epoch', '-')} | "
                f"{member.get('best', float('nan')):.5f} | {member.get('train_seconds', '-')} |"
            )
        text += "\n\n" + "\n".join(rows)
    return text


# ---------------------------------------------------------------------------
# predict


def read_prediction_input(path: str, bad_input: str) -> EngineTable:
    """Read the user's engine histories from a file or, for "-", standard input."""
    if path != "-":
        return load_engine_table(path, bad_input, run_to_failure=False)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as handle:
        handle.write(sys.stdin.read())
    try:
        table = load_engine_table(handle.name, bad_input, run_to_failure=False)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    table.source = "<stdin>"
    return table


def predict(config: PredictiveMaintenanceConfig, context: CommandContext) -> dict[str, Any] | None:
    """Predict the RUL at the last reading of each engine in ``--input`` (same columns as C-MAPSS)."""
    model, preprocessor = load_trained(context.run_dir)
    table = read_prediction_input(context.args.input, config.data.bad_input)
    last = make_last_engine_windows(
        preprocessor.transform(table), table.unit_ids, config.data.window_length
    )
    predicted = predict_windows(model, last)
    rows = [
        {
            "unit": int(unit),
            "readings": int(length),
            "last_cycle": float(table.cycles[end]),
            "rul": round(float(rul), 3),
        }
        for unit, length, end, rul in zip(
            last.unit_ids, table.unit_lengths(), last.end_rows, predicted, strict=True
        )
    ]
    if context.args.output == "-":
        return {"engines": len(rows), "predictions": rows}
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    output = write_text_atomic(context.args.output, text.getvalue())
    logger.info("Wrote %d predictions to %s", len(rows), output)
    return {"engines": len(rows), "output": str(output)}


# ---------------------------------------------------------------------------
# tune


def tune(config: PredictiveMaintenanceConfig, context: CommandContext) -> dict[str, Any]:
    """Run the shared staged KerasTuner search; data is loaded and windowed once for all trials.

    Each trial trains one single model: with ``model.members`` above 1 the search tunes
    one member, and ``train`` with the chosen settings trains the whole ensemble.
    """
    preprocessor, windows, _ = prepare_training_data(config, context.data_dir, None)
    num_features = len(preprocessor.feature_names)
    if config.model.members > 1:
        logger.warning(
            "model.members=%d: each tuning trial trains one member, not the ensemble.",
            config.model.members,
        )

    def build_model(trial_config: PredictiveMaintenanceConfig) -> keras.Model:
        steps = trial_config.train.steps_per_epoch or math.ceil(
            len(windows[TRAIN]) / trial_config.train.batch_size
        )
        single = dataclasses.replace(trial_config.model, members=1)
        return build_compiled_model(
            dataclasses.replace(trial_config, model=single), num_features, steps
        )

    def make_trial_datasets(trial_config: PredictiveMaintenanceConfig):
        return make_datasets(trial_config, windows)

    def build_export_model(trial_config: PredictiveMaintenanceConfig, model: keras.Model) -> keras.Model:
        return build_window_export_model(
            model, trial_config.model, trial_config.data.window_length, trial_config.data.rul_cap
        )

    return run_tuning(
        config,
        context,
        build_model=build_model,
        make_datasets=make_trial_datasets,
        build_export_model=build_export_model,
    )


# ---------------------------------------------------------------------------
# export


def parse_variants(config: PredictiveMaintenanceConfig, text: str | None) -> tuple[str, ...]:
    """Return the TFLite variants from ``--variants`` (comma-separated) or the config.

    Raises:
        ConfigError: an unknown variant name.
    """
    if not text:
        return tuple(config.export.tflite_variants)
    variants = tuple(name.strip() for name in text.split(",") if name.strip())
    for variant in variants:
        check_choice("--variants", variant, TFLITE_VARIANTS)
    return variants


def load_representative_windows(
    config: PredictiveMaintenanceConfig, context: CommandContext, preprocessor, count: int
) -> EngineWindows:
    """Return about ``count`` windows of the training-split engines, spread evenly, for int8 calibration."""
    splits = read_json(context.run_dir / SPLITS_FILE)
    table = load_train_table(config.data, context.data_dir)
    table = table.select_rows(np.isin(table.unit_ids, np.asarray(splits[TRAIN])))
    windows = make_table_windows(table, preprocessor, config)
    chosen = np.unique(
        np.linspace(0, len(windows) - 1, num=min(count, len(windows))).round().astype(int)
    )
    keep = np.zeros(len(windows), dtype=bool)
    keep[chosen] = True
    return subset_windows(windows, keep)


def export(config: PredictiveMaintenanceConfig, context: CommandContext) -> dict[str, Any]:
    """Export the window and streaming models to TFLite, check parity, and score every variant on the test set.

    Raises:
        ExportError: a float32 model fails parity, or streaming and window models disagree.
    """
    model, preprocessor = load_trained(context.run_dir)
    variants = parse_variants(config, getattr(context.args, "variants", None))
    export_dir = context.run_dir / EXPORT_DIR
    window_model = build_window_export_model(
        model, config.model, config.data.window_length, config.data.rul_cap
    )
    streaming_model = build_streaming_model(window_model)
    table, final_rul = load_test_set(config.data, context.data_dir)
    test = make_last_engine_windows(
        preprocessor.transform(table), table.unit_ids, config.data.window_length
    )
    representative = load_representative_windows(
        config, context, preprocessor, config.export.representative_samples
    )

    window_parity = (test.inputs(), {RUL_OUTPUT: predict_windows(window_model, test)[:, None]})
    export_model_variants(
        build_unrolled_window_model(window_model, config.data.window_length),
        WINDOW,
        WINDOW,
        export_dir,
        variants,
        config.export,
        window_parity,
        representative.inputs(),
    )
    window_entry = score_variants(
        export_dir,
        WINDOW,
        lambda path: run_tflite(path, WINDOW, test.inputs())[RUL_OUTPUT].reshape(-1),
        final_rul,
    )

    examples = max(config.export.parity_samples, config.export.representative_samples)
    step_parity = collect_step_examples(streaming_model, test, examples)
    step_representative = collect_step_examples(streaming_model, representative, examples)[0]
    export_model_variants(
        streaming_model,
        STREAMING,
        STEP_SIGNATURE,
        export_dir,
        variants,
        config.export,
        step_parity,
        step_representative,
    )
    zero_state = make_zero_state(streaming_model)
    streaming_entry = score_variants(
        export_dir,
        STREAMING,
        lambda path: stream_windows(load_tflite_step_fn(path, STEP_SIGNATURE), zero_state, test),
        final_rul,
    )
    check_float32_exports(config, export_dir, window_entry, streaming_entry, test, zero_state)
    write_export_report(export_dir, "device_preprocessing", preprocessor.describe_device_steps())
    return {"export_dir": str(export_dir), **load_export_report(export_dir)}


def check_float32_exports(
    config, export_dir: Path, window_entry, streaming_entry, test: EngineWindows, zero_state
) -> None:
    """Check the float32 models and compare streaming with window step by step.

    The largest streaming-to-window difference is added to the streaming entry of
    ``export_report.json``.

    Raises:
        ExportError: a float32 variant failed, or streaming and window outputs differ.
    """
    for name, entry in ((WINDOW, window_entry), (STREAMING, streaming_entry)):
        float32 = entry["variants"].get("float32")
        if float32 is not None and float32["status"] == "failed":
            raise ExportError(f"the float32 {name} model failed: {float32.get('error')}")
    if "float32" in window_entry["variants"] and "float32" in streaming_entry["variants"]:
        largest = check_streaming_matches_window(
            export_dir,
            config.data.window_length,
            select_check_windows(test),
            zero_state,
            config.export.float32_tolerance,
        )
        entry = load_export_report(export_dir)[STREAMING]
        entry["streaming_vs_window_max_abs_diff"] = largest
        write_export_report(export_dir, STREAMING, entry)


def select_check_windows(windows: EngineWindows, count: int = 3) -> EngineWindows:
    """Pick a few windows for the streaming check: the shortest one and the first full ones."""
    keep = np.zeros(len(windows), dtype=bool)
    keep[int(np.argmin(windows.lengths))] = True
    keep[np.flatnonzero(windows.lengths == windows.lengths.max())[: count - 1]] = True
    return subset_windows(windows, keep)


COMMANDS = {
    "train": train,
    "evaluate": evaluate,
    "predict": predict,
    "tune": tune,
    "export": export,
}
