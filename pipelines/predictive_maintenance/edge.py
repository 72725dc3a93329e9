"""Edge models: the batch-1 window model and the one-step streaming RUL model, their TFLite export and checks.

The streaming model takes one preprocessed reading ``reading`` ``(1, features)`` and the
recurrent state (``state_{i}_h`` per layer, plus ``state_{i}_c`` for LSTM, each
``(1, units)``) and returns ``rul`` ``(1, 1)`` and the new state under the same names.
The streaming model starts from zero state at a window's first reading and takes the
window's readings one at a time. Its ``rul`` after reading ``k`` equals the window
model's output on the first ``k + 1`` readings, right-padded and masked, because the
masked recurrent layers carry their state unchanged through padding.

Export writes, under the run's ``export/`` folder, a SavedModel and one ``.tflite`` file
per variant for each model (``window_float32.tflite``, ``streaming_int8.tflite``, ...),
with built-in ops only, and ``export_report.json``: per model and variant the parity
against Keras, size, latency, and RMSE and NASA score on the whole test set. The float32
streaming model is also checked against the float32 window model reading by reading.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipelines.predictive_maintenance.config import ModelConfig
from pipelines.predictive_maintenance.model import (
    MEAN_FRACTION,
    RUL_OUTPUT,
    build_rul_model,
    list_member_prefixes,
)
from pipelines.predictive_maintenance.scoring import compute_nasa_score, compute_rmse
from pipelines.predictive_maintenance.windows import PADDING_MASK, READINGS, EngineWindows
from shared.config import ExportConfig
from shared.errors import ConfigError, ExportError
from shared.export import (
    export_saved_model,
    export_tflite_variants,
    load_export_report,
    make_model_endpoint,
    run_tflite,
    write_export_report,
)
from shared.streaming import STEP_INPUT_NAME, STEP_OUTPUT_NAME, apply_stack_unrolled, build_step_model

logger = logging.getLogger(__name__)

READING = "reading"
WINDOW = "window"
STREAMING = "streaming"
STEP_SIGNATURE = "step"
HEAD_LAYER_TYPES = (keras.layers.Dense, keras.layers.Rescaling)

StepFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def list_recurrent_layers(model: keras.Model, prefix: str = "") -> list[keras.layers.Layer]:
    """Return one member's recurrent layers in order: ``{prefix}recurrent_0``, ``_1``, ..."""
    layers = [layer for layer in model.layers if layer.name.startswith(f"{prefix}recurrent_")]
    return sorted(layers, key=lambda layer: int(layer.name.rsplit("_", 1)[1]))


def count_members(model: keras.Model) -> int:
    """Return how many ensemble members the window model averages (1 for a single model)."""
    return sum(1 for layer in model.layers if layer.name.endswith("rul_fraction"))


def build_window_export_model(
    model: keras.Model, config: ModelConfig, window_length: int, rul_cap: float
) -> keras.Model:
    """Return a copy of the window model with batch size 1 and the trained weights.

    Raises:
        ConfigError: the model is bidirectional (its streaming twin cannot exist) or its
            inputs do not match ``window_length``.
    """
    if config.bidirectional:
        raise ConfigError(
            "model.bidirectional is true, and a bidirectional model cannot stream one reading "
            "at a time; retrain with model.bidirectional=false to export it."
        )
    num_features = model.input[READINGS].shape[-1]
    exported = build_rul_model(config, num_features, window_length, rul_cap, batch_size=1)
    exported.set_weights(model.get_weights())
    return exported


def build_unrolled_window_model(model: keras.Model, window_length: int) -> keras.Model:
    """Return the batch-1 window model with each recurrent layer unrolled into cell steps.

    It computes what ``model`` computes with the same trained layers: every member, its
    head, the mean and the rescaling to cycles. It has no ``While`` op, so full-int8
    conversion works, and the TFLite window files are converted from it.
    """
    num_features = model.input[READINGS].shape[-1]
    readings = keras.Input((window_length, num_features), batch_size=1, name=READINGS)
    padding_mask = keras.Input((window_length,), batch_size=1, dtype="bool", name=PADDING_MASK)
    members = count_members(model)
    fractions = []
    for prefix in list_member_prefixes(members):
        hidden = apply_stack_unrolled(list_recurrent_layers(model, prefix), readings, padding_mask)
        for name in ("head_hidden", "rul_fraction"):  # Dropout is the identity at inference.
            if any(layer.name == f"{prefix}{name}" for layer in model.layers):
                hidden = model.get_layer(f"{prefix}{name}")(hidden)
        fractions.append(hidden)
    fraction = fractions[0] if members == 1 else model.get_layer(MEAN_FRACTION)(fractions)
    rul = model.get_layer(RUL_OUTPUT)(fraction)
    return keras.Model({READINGS: readings, PADDING_MASK: padding_mask}, rul, name="rul_window_unrolled")


def build_streaming_model(model: keras.Model) -> keras.Model:
    """Build the one-step model ``{reading, state_*} -> {rul, state_*}`` from the trained window model.

    Raises:
        ConfigError: a recurrent layer is bidirectional or otherwise cannot stream.
    """
    if count_members(model) > 1:
        return build_ensemble_streaming_model(model)
    head = [layer for layer in model.layers if isinstance(layer, HEAD_LAYER_TYPES)]
    step = build_step_model(
        list_recurrent_layers(model), input_features=model.input[READINGS].shape[-1], head=head
    )
    inputs = {
        READING if name == STEP_INPUT_NAME else name: tensor for name, tensor in step.input.items()
    }
    outputs = {
        RUL_OUTPUT if name == STEP_OUTPUT_NAME else name: tensor
        for name, tensor in step.output.items()
    }
    with warnings.catch_warnings():
        # Keras warns that the key "reading" differs from the input tensor's name "inputs".
        # The dict keys are the names that callers, the SavedModel and the TFLite signature use.
        warnings.filterwarnings("ignore", message="When providing `inputs` as a dict")
        return keras.Model(inputs, outputs, name="rul_streaming_model")


def rename_member_state(name: str, member: int, layers: int) -> str:
    """Return a member's state name in the ensemble: ``state_{member * layers + i}_{h or c}``."""
    _, layer_index, suffix = name.split("_")
    return f"state_{member * layers + int(layer_index)}_{suffix}"


def list_member_head(model: keras.Model, prefix: str) -> list[keras.layers.Layer]:
    """Return one member's dense head layers in order; dropout is left out (inference only)."""
    names = {layer.name for layer in model.layers}
    return [
        model.get_layer(f"{prefix}{name}")
        for name in ("head_hidden", "rul_fraction")
        if f"{prefix}{name}" in names
    ]


def build_ensemble_streaming_model(model: keras.Model) -> keras.Model:
    """Build the one-step model of an ensemble: members step on their own states, then average.

    Member ``k``'s layer ``i`` owns the state ``state_{k * layers + i}_*``, so the state
    names keep the single model's pattern.
    """
    features = model.input[READINGS].shape[-1]
    reading = keras.Input((features,), batch_size=1, name=READING)
    inputs, outputs, fractions = {READING: reading}, {}, []
    for member, prefix in enumerate(list_member_prefixes(count_members(model))):
        recurrent = list_recurrent_layers(model, prefix)
        step = build_step_model(
            recurrent,
            input_features=features,
            head=list_member_head(model, prefix),
            name=f"{prefix}step_model",
        )
        feed = {STEP_INPUT_NAME: reading}
        for name in [name for name in step.input if name != STEP_INPUT_NAME]:
            renamed = rename_member_state(name, member, len(recurrent))
            inputs[renamed] = keras.Input(step.input[name].shape[1:], batch_size=1, name=renamed)
            feed[name] = inputs[renamed]
        result = step(feed)
        fractions.append(result.pop(STEP_OUTPUT_NAME))
        outputs.update(
            {
                rename_member_state(name, member, len(recurrent)): value
                for name, value in result.items()
            }
        )
    outputs[RUL_OUTPUT] = model.get_layer(RUL_OUTPUT)(model.get_layer(MEAN_FRACTION)(fractions))
    return keras.Model(inputs, outputs, name="rul_streaming_model")


def list_state_names(streaming_model: keras.Model) -> list[str]:
    """Return the state input names of the streaming model."""
    return [name for name in streaming_model.input if name != READING]


def make_zero_state(streaming_model: keras.Model) -> dict[str, np.ndarray]:
    """Return the zero state a stream starts from, one ``(1, units)`` float32 array per name."""
    return {
        name: np.zeros((1, streaming_model.input[name].shape[-1]), dtype=np.float32)
        for name in list_state_names(streaming_model)
    }


def stream_readings(step_fn: StepFn, initial_state: dict[str, np.ndarray], readings: np.ndarray):
    """Feed ``readings`` ``(steps, features)`` one at a time from ``initial_state``.

    Args:
        step_fn: maps a feed dict to an output dict (Keras model or TFLite runner).
        initial_state: state name to array, normally `make_zero_state`.
        readings: real readings only, in time order.

    Returns:
        ``(feeds, rul)``: the feed of each step and the RUL after each step ``(steps,)``.
    """
    state = dict(initial_state)
    feeds, rul = [], []
    for reading in np.asarray(readings, dtype=np.float32):
        feed = {READING: reading[np.newaxis], **state}
        result = {name: np.asarray(value) for name, value in step_fn(feed).items()}
        feeds.append(feed)
        rul.append(float(result[RUL_OUTPUT].reshape(-1)[0]))
        state = {name: result[name] for name in state}
    return feeds, np.asarray(rul)


def make_prefix_inputs(readings: np.ndarray, window_length: int) -> dict[str, np.ndarray]:
    """Return window-model inputs for every prefix of ``readings``: prefix ``k`` contains ``k + 1`` readings.

    Args:
        readings: ``(steps, features)`` real readings, at most ``window_length`` of them.
        window_length: the window model's length; prefixes are right-padded to it.
    """
    steps = len(readings)
    values = np.zeros((steps, window_length, readings.shape[-1]), dtype=np.float32)
    mask = np.arange(window_length)[None, :] <= np.arange(steps)[:, None]
    for index in range(steps):
        values[index, : index + 1] = readings[: index + 1]
    return {READINGS: values, PADDING_MASK: mask}


# ---------------------------------------------------------------------------
# TFLite export


def load_tflite_step_fn(tflite_path: str | Path, signature_key: str) -> StepFn:
    """Return a function that runs one signature call of a `.tflite` file on a feed dict."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(tflite_path), num_threads=1).get_signature_runner(
        signature_key
    )
    return lambda feed: runner(
        **{name: np.asarray(value, dtype=np.float32) for name, value in feed.items()}
    )


def stream_windows(
    step_fn: StepFn, zero_state: dict[str, np.ndarray], windows: EngineWindows
) -> np.ndarray:
    """Return the streamed RUL after the last real reading of each window."""
    finals = []
    for readings, length in zip(windows.readings, windows.lengths, strict=True):
        _, rul = stream_readings(step_fn, zero_state, readings[:length])
        finals.append(rul[-1])
    return np.asarray(finals)


def collect_step_examples(streaming_model: keras.Model, windows: EngineWindows, count: int):
    """Stream windows through Keras and keep about ``count`` step feeds spread over all steps.

    Returns:
        ``(inputs, outputs)``: name to stacked ``(examples, ...)`` arrays, as
        `shared.export.export_tflite_variants` takes them.
    """
    zero_state = make_zero_state(streaming_model)
    feeds = []
    for readings, length in zip(windows.readings, windows.lengths, strict=True):
        window_feeds, _ = stream_readings(
            lambda feed: streaming_model(feed, training=False), zero_state, readings[:length]
        )
        feeds.extend(window_feeds)
    chosen = np.unique(
        np.linspace(0, len(feeds) - 1, num=min(count, len(feeds))).round().astype(int)
    )
    inputs = {name: np.concatenate([feeds[i][name] for i in chosen]) for name in feeds[0]}
    outputs = {
        name: np.asarray(value)
        for name, value in streaming_model.predict(inputs, batch_size=1, verbose=0).items()
    }
    return inputs, outputs


def export_model_variants(
    keras_model: keras.Model,
    name: str,
    signature_key: str,
    export_dir: Path,
    variants: tuple[str, ...],
    export_config: ExportConfig,
    parity,
    representative,
):
    """Write the SavedModel and every TFLite variant of one model; a failed variant is logged, not raised.

    Returns:
        The report entry, with each variant's status.
    """
    if name == WINDOW:
        endpoint = make_model_endpoint(keras_model, [RUL_OUTPUT])
    else:
        endpoint = make_model_endpoint(keras_model)
    saved_model = export_saved_model(
        export_dir / f"{name}_saved_model", {signature_key: endpoint}, [keras_model]
    )
    try:
        return export_tflite_variants(
            saved_model,
            signature_key,
            export_dir,
            name,
            parity_inputs=parity[0],
            keras_outputs=parity[1],
            export_config=export_config,
            variants=variants,
            representative_inputs=representative,
        )
    except ExportError as error:
        logger.warning("Some TFLite variants of the %s model failed: %s", name, error)
        return load_export_report(export_dir)[name]


def score_variants(
    export_dir: Path, name: str, predict_fn: Callable[[Path], np.ndarray], true_rul: np.ndarray
) -> dict[str, Any]:
    """Add test-set RMSE and NASA score to each converted variant's report entry."""
    entry = load_export_report(export_dir)[name]
    for variant, variant_entry in entry["variants"].items():
        if variant_entry.get("file") is None or variant_entry["status"] == "failed":
            continue
        predicted = predict_fn(export_dir / variant_entry["file"])
        variant_entry["test_rmse"] = compute_rmse(predicted, true_rul)
        variant_entry["test_nasa_score"] = compute_nasa_score(predicted, true_rul)
        logger.info(
            "%s %s: test RMSE %.3f, NASA score %.1f",
            name,
            variant,
            variant_entry["test_rmse"],
            variant_entry["test_nasa_score"],
        )
    write_export_report(export_dir, name, entry)
    return entry


def check_streaming_matches_window(
    export_dir: Path,
    window_length: int,
    windows: EngineWindows,
    zero_state: dict[str, np.ndarray],
    tolerance: float,
) -> float:
    """Stream each window through the float32 streaming TFLite model and compare every step with the window model.

    Returns:
        The largest absolute RUL difference over all steps of all windows.

    Raises:
        ExportError: a difference above ``tolerance``.
    """
    step_fn = load_tflite_step_fn(export_dir / f"{STREAMING}_float32.tflite", STEP_SIGNATURE)
    largest = 0.0
    for readings, length in zip(windows.readings, windows.lengths, strict=True):
        _, streamed = stream_readings(step_fn, zero_state, readings[:length])
        prefixes = make_prefix_inputs(readings[:length], window_length)
        windowed = run_tflite(export_dir / f"{WINDOW}_float32.tflite", WINDOW, prefixes)[
            RUL_OUTPUT
        ].reshape(-1)
        largest = max(largest, float(np.max(np.abs(streamed - windowed))))
    if largest > tolerance:
        raise ExportError(
            f"the streaming model differs from the window model by up to {largest:.3g} cycles, "
            f"above the tolerance {tolerance:g}; the exported models disagree, so do not deploy them."
        )
    return largest
