"""Serving graphs and export: raw-string and token-id SavedModels, and fixed-length TFLite models.

Three graphs share the trained weights:

* ``text`` (SavedModel ``text_savedmodel``): a batch of raw UTF-8 strings in, probabilities
  and label names out. Cleaning, SentencePiece tokenization (``tensorflow_text``) and the
  configured truncation run inside the graph, so loading it needs ``import tensorflow_text``.
* ``token_ids`` (SavedModel ``token_ids_savedmodel``, signature ``classify``): token ids
  ``(batch_size, timesteps)`` padded with ``PAD_ID = 0``, any batch size and length.
* ``classify_fixed`` (same SavedModel): token ids ``(1, export.max_length)`` (default
  ``data.max_length``; longer texts are truncated to it), with the
  recurrent layers unrolled into a static loop of cell calls. This is the graph converted
  to TFLite. A Keras 3 LSTM in loop form crashes the TF 2.21 converter during full-int8
  quantization, while single cell steps quantize, so every TFLite variant is converted
  from this unrolled graph. Padding steps carry the state unchanged
  (``where(mask, new_state, old_state)``), which is what the Keras layers do with a mask.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipelines.sentiment.config import DataConfig, SentimentConfig
from pipelines.sentiment.data import (
    HTML_BREAK_PATTERN,
    LabeledTexts,
    compute_head_length,
    encode_texts,
    pad_batch,
)
from pipelines.sentiment.model import compute_probabilities, list_members
from shared.errors import ExportError
from shared.export import export_saved_model, export_tflite_variants, load_export_report, write_export_report
from shared.padding import PAD_ID
from shared.text import SentencePieceTokenizer

logger = logging.getLogger(__name__)

FIXED_SIGNATURE = "classify_fixed"
# Margin, in score units, between the lowest real attention score and a padding score in the
# TFLite graph: exp(-24) is about 4e-11.
MASK_MARGIN = 24.0
TOKEN_IDS_SIGNATURE = "classify"
TEXT_SIGNATURE = "classify_text"
# Max abs difference in any class probability between a quantized TFLite model and Keras,
# checked on the parity examples. int8 quantizes every activation, and near the decision
# boundary one review moved by 0.28 (IMDB model, 1000 test reviews) while accuracy fell by
# 0.2 points. So the int8 bound only catches broken models, and the accuracy check below is
# the real limit.
QUANTIZED_TOLERANCES = {"dynamic_range": 0.05, "float16": 0.01, "int8": 0.5}
# Largest accepted drop in accuracy (in points) of the int8 model against Keras. Below
# MIN_EXAMPLES_FOR_ACCURACY_CHECK parity examples one flipped prediction is worth more than
# 0.2 points, so a larger drop is only logged as a warning.
MAX_INT8_ACCURACY_DROP_POINTS = 1.0
MIN_EXAMPLES_FOR_ACCURACY_CHECK = 500
# NOTE: the SentencePiece build inside tensorflow-text 2.21.1 segments some runs of a repeated
# character ("!!!!!!!!", "nooooo") differently from the sentencepiece Python package. That hit
# 4 of 1000 IMDB test reviews (same decoded text) and moved probabilities by up to 2.5e-4.
# So the raw-string model passes when at least TEXT_PARITY_SHARE of the texts are within
# TEXT_PARITY_TOLERANCE of Keras and none is further than TEXT_PARITY_MAX_DIFF.
TEXT_PARITY_TOLERANCE = 1e-4
TEXT_PARITY_SHARE = 0.99
TEXT_PARITY_MAX_DIFF = 1e-2


# ---------------------------------------------------------------------------
# The unrolled fixed-length graph.


def run_cell_steps(cell: keras.layers.Layer, steps: Sequence, step_mask: Sequence, reverse: bool):
    """Run ``cell`` over the steps, keeping the state on padding steps.

    Args:
        cell: a trained ``LSTMCell``, ``GRUCell`` or ``SimpleRNNCell``.
        steps: one ``(batch_size, features)`` tensor per time step.
        step_mask: one boolean ``(batch_size, 1)`` tensor per step, True on real steps.
        reverse: run from the last step to the first (the backward direction).

    Returns:
        ``(outputs, last_output)``: the output at each step in time order (on a padding
        step, the previous output) and the output after the final real step.
    """
    batch_size = tf.shape(steps[0])[0]
    states = [tf.zeros((batch_size, size), steps[0].dtype) for size in tf.nest.flatten(cell.state_size)]
    output = states[0]
    outputs = [None] * len(steps)
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    for t in order:
        new_output, new_states = cell(steps[t], states, training=False)
        new_states = tf.nest.flatten(new_states)
        states = [tf.where(step_mask[t], new, old) for new, old in zip(new_states, states)]
        output = tf.where(step_mask[t], new_output, output)
        outputs[t] = output
    return outputs, output


def run_recurrent_layer_unrolled(layer: keras.layers.Layer, steps: Sequence, step_mask: Sequence):
    """Run one trained recurrent layer (optionally Bidirectional) with its cells; see `run_cell_steps`."""
    if isinstance(layer, keras.layers.Bidirectional):
        forward, forward_last = run_cell_steps(layer.forward_layer.cell, steps, step_mask, reverse=False)
        backward, backward_last = run_cell_steps(layer.backward_layer.cell, steps, step_mask, reverse=True)
        outputs = [tf.concat([f, b], axis=-1) for f, b in zip(forward, backward)]
        return outputs, tf.concat([forward_last, backward_last], axis=-1)
    return run_cell_steps(layer.cell, steps, step_mask, reverse=getattr(layer, "go_backwards", False))


def compute_unrolled_probabilities(model: keras.Model, token_ids: tf.Tensor) -> tf.Tensor:
    """Return the model's probabilities for fixed-length ``token_ids`` without recurrent loops.

    For an ensemble, the mean of its members' probabilities, as its ``Average`` layer computes.
    """
    members = list_members(model)
    outputs = [compute_classifier_unrolled(member, token_ids) for member in members]
    return outputs[0] if len(outputs) == 1 else tf.add_n(outputs) / float(len(outputs))


def compute_classifier_unrolled(model: keras.Model, token_ids: tf.Tensor) -> tf.Tensor:
    """Return one classifier's probabilities for fixed-length ``token_ids`` without recurrent loops."""
    timesteps = token_ids.shape[1]
    padding_mask = tf.not_equal(token_ids, PAD_ID)
    embedded = model.get_layer("embedding")(token_ids)
    steps = [embedded[:, t, :] for t in range(timesteps)]
    step_mask = [padding_mask[:, t : t + 1] for t in range(timesteps)]
    layer_names = sorted((layer.name for layer in model.layers if layer.name.startswith("recurrent_")),
                         key=lambda name: int(name.rsplit("_", 1)[1]))
    last = None
    for name in layer_names:
        steps, last = run_recurrent_layer_unrolled(model.get_layer(name), steps, step_mask)
    names = {layer.name for layer in model.layers}
    if "attention_pooling" in names:
        pooled = pool_attention_bounded(model.get_layer("attention_pooling"), tf.stack(steps, axis=1), padding_mask)
    elif "max_pooling" in names:
        pooled = model.get_layer("max_pooling")(tf.stack(steps, axis=1), padding_mask)
    else:
        pooled = last
    return model.get_layer("probabilities")(pooled)


def pool_attention_bounded(layer: keras.layers.Layer, sequences: tf.Tensor, padding_mask: tf.Tensor) -> tf.Tensor:
    """Compute `MaskedAttentionPooling` with padding scores kept in the range of the real scores.

    The Keras layer gives padding steps a score of -1e9. Full-int8 quantization gives the
    score tensor one scale for its whole range, so -1e9 would round every real score to the
    same value. Here padding steps get ``min(scores) - MASK_MARGIN`` or less, so each has a
    softmax weight below ``exp(-MASK_MARGIN)`` relative to any real step, and the weights
    are then multiplied by the mask.
    """
    scores = tf.squeeze(layer.score(layer.hidden(sequences)), axis=-1)
    mask = tf.cast(padding_mask, scores.dtype)
    span = tf.reduce_max(scores, axis=-1, keepdims=True) - tf.reduce_min(scores, axis=-1, keepdims=True)
    weights = tf.nn.softmax(scores - (1.0 - mask) * (span + MASK_MARGIN), axis=-1) * mask
    return tf.einsum("bt,btf->bf", weights, sequences)


def make_fixed_endpoint(model: keras.Model, max_length: int):
    """Return the ``(function, signature)`` of the batch-1, fixed-length unrolled graph."""

    def classify_fixed(token_ids):
        return {"probabilities": compute_unrolled_probabilities(model, token_ids)}

    return classify_fixed, [tf.TensorSpec((1, max_length), tf.int32, name="token_ids")]


def make_token_ids_endpoint(model: keras.Model):
    """Return the ``(function, signature)`` of the any-shape token-id graph (Keras layers)."""

    def classify(token_ids):
        return {"probabilities": model(token_ids, training=False)}

    return classify, [tf.TensorSpec((None, None), tf.int32, name="token_ids")]


# ---------------------------------------------------------------------------
# The raw-string graph.


def truncate_ragged(token_ids: tf.RaggedTensor, config: DataConfig) -> tf.RaggedTensor:
    """Apply `pipelines.sentiment.data.truncate_ids` row by row to a ragged batch of ids."""
    lengths = token_ids.row_lengths()
    max_length = tf.constant(config.max_length, lengths.dtype)
    long_rows = lengths > max_length
    # Each row keeps positions [0, head_end) and [tail_start, length).
    if config.truncation == "head":
        head_end, tail_start = tf.minimum(lengths, max_length), lengths
    elif config.truncation == "tail":
        head_end, tail_start = tf.zeros_like(lengths), tf.maximum(lengths - max_length, 0)
    else:
        head = tf.constant(compute_head_length(config.max_length, config.head_fraction), lengths.dtype)
        head_end = tf.where(long_rows, head, lengths)
        tail_start = tf.where(long_rows, lengths - (max_length - head), lengths)
    positions = tf.concat([tf.ragged.range(tf.zeros_like(head_end), head_end), tf.ragged.range(tail_start, lengths)],
                          axis=1)
    flat_positions = positions + tf.expand_dims(token_ids.row_starts(), 1)
    return tf.RaggedTensor.from_row_splits(tf.gather(token_ids.flat_values, flat_positions.flat_values),
                                           flat_positions.row_splits)


def make_text_endpoint(model: keras.Model, tokenizer: SentencePieceTokenizer, config: DataConfig,
                       label_names: Sequence[str]):
    """Return ``(function, signature, sentencepiece_op)`` for the raw-string graph.

    Raises:
        ExportError: ``tensorflow_text`` is not installed.
    """
    try:
        import tensorflow_text
    except ImportError as error:
        raise ExportError("the raw-string SavedModel needs tensorflow-text; install tensorflow-text~=2.21.0 "
                          "or export the token-id SavedModel only with --variants.") from error
    sentencepiece = tensorflow_text.SentencepieceTokenizer(model=tokenizer.path.read_bytes(), out_type=tf.int32)
    names = tf.constant(list(label_names))

    def classify_text(text):
        if config.strip_html:
            text = tf.strings.regex_replace(text, HTML_BREAK_PATTERN, " ")
        if config.lowercase:
            text = tf.strings.lower(text, encoding="utf-8")
        token_ids = truncate_ragged(sentencepiece.tokenize(text), config)
        probabilities = model(token_ids.to_tensor(default_value=PAD_ID), training=False)
        return {"probabilities": probabilities, "label": tf.gather(names, tf.argmax(probabilities, axis=-1))}

    return classify_text, [tf.TensorSpec((None,), tf.string, name="text")], sentencepiece


# ---------------------------------------------------------------------------
# Export.


def compute_accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Return the accuracy of stacked ``probabilities`` outputs against the first labels."""
    probabilities = np.asarray(outputs["probabilities"])
    probabilities = probabilities.reshape(len(probabilities), -1)
    return float(np.mean(np.argmax(probabilities, axis=-1) == labels[: len(probabilities)]))


def sample_split(data: LabeledTexts, count: int, seed: int) -> LabeledTexts:
    """Return ``count`` examples drawn without replacement with ``seed`` (all when fewer)."""
    order = np.random.default_rng(seed).permutation(len(data))[:count]
    return data.subset(order)


def check_text_savedmodel(path: Path, texts: list[str], expected: np.ndarray) -> dict[str, Any]:
    """Reload the raw-string SavedModel, run it on ``texts`` and compare with ``expected``.

    Raises:
        ExportError: a probability differs from Keras by more than ``TEXT_PARITY_TOLERANCE``.
    """
    import tensorflow_text  # noqa: F401  Registers the SentencePiece ops the SavedModel uses.

    loaded = tf.saved_model.load(str(path))
    runner = loaded.signatures[TEXT_SIGNATURE]
    probabilities = np.concatenate(
        [runner(text=tf.constant(texts[i : i + 64]))["probabilities"].numpy() for i in range(0, len(texts), 64)]
    )
    per_text = np.max(np.abs(probabilities - expected), axis=-1)
    share_within = float(np.mean(per_text <= TEXT_PARITY_TOLERANCE))
    passed = share_within >= TEXT_PARITY_SHARE and float(per_text.max()) <= TEXT_PARITY_MAX_DIFF
    entry = {"signature_key": TEXT_SIGNATURE, "parity_examples": len(texts), "max_abs_diff": float(per_text.max()),
             "share_within_tolerance": share_within, "tolerance": TEXT_PARITY_TOLERANCE,
             "status": "passed" if passed else "failed"}
    if not passed:
        raise ExportError(
            f"{path}: raw-string SavedModel differs from Keras by up to {per_text.max():.3g}, and "
            f"{share_within:.1%} of {len(texts)} texts are within {TEXT_PARITY_TOLERANCE:g} (required: "
            f"{TEXT_PARITY_SHARE:.0%}, and none above {TEXT_PARITY_MAX_DIFF:g}). The in-graph text cleaning "
            "or tokenization does not match the Python pipeline."
        )
    return entry


def export_savedmodels(model, tokenizer, label_names, config: SentimentConfig, export_dir: Path, parity: LabeledTexts):
    """Write both SavedModels and check the raw-string one against the Keras pipeline."""
    token_ids_dir = export_saved_model(
        export_dir / "token_ids_savedmodel",
        {TOKEN_IDS_SIGNATURE: make_token_ids_endpoint(model), FIXED_SIGNATURE: make_fixed_endpoint(model, config.fixed_length())},
        [model],
    )
    text_function, text_signature, sentencepiece = make_text_endpoint(model, tokenizer, config.data, label_names)
    text_dir = export_saved_model(export_dir / "text_savedmodel", {TEXT_SIGNATURE: (text_function, text_signature)},
                                  [model, sentencepiece])
    expected = compute_probabilities(model, encode_texts(tokenizer, parity.texts, config.data, parity.origins))
    text_entry = check_text_savedmodel(text_dir, parity.texts, expected)
    text_entry.update({"saved_model": str(text_dir), "label_names": list(label_names)})
    write_export_report(export_dir, "text_savedmodel", text_entry)
    return token_ids_dir, text_entry


def export_all(
    model: keras.Model,
    tokenizer: SentencePieceTokenizer,
    label_names: Sequence[str],
    splits: dict[str, LabeledTexts],
    config: SentimentConfig,
    export_dir: Path,
    variants: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Export SavedModels and TFLite variants; write ``export_report.json`` in ``export_dir``.

    TFLite accuracy is measured on ``export.parity_samples`` test examples drawn with the
    train seed (validation examples when the dataset has no test split), next to the
    Keras model's accuracy on the same examples.

    Raises:
        ExportError: a conversion failed, a parity check failed, or int8 loses more than
            ``MAX_INT8_ACCURACY_DROP_POINTS`` accuracy points.
    """
    started = time.monotonic()
    held_out = splits["test"] if "test" in splits else splits["validation"]
    parity = sample_split(held_out, config.export.parity_samples, config.train.seed)
    token_ids_dir, text_entry = export_savedmodels(model, tokenizer, label_names, config, export_dir, parity)
    max_length = config.fixed_length()
    fixed_data = dataclasses.replace(config.data, max_length=max_length)  # Truncates as the phone model must.
    parity_ids = pad_batch(encode_texts(tokenizer, parity.texts, fixed_data, parity.origins), max_length)
    keras_probabilities = np.asarray(model.predict(parity_ids, batch_size=64, verbose=0))
    calibration = sample_split(splits["train"], config.export.representative_samples, config.train.seed + 1)
    calibration_token_ids = encode_texts(tokenizer, calibration.texts, fixed_data)
    # A quarter of the calibration rows are texts joined to fill every step. The converter
    # uses only the first export.representative_samples rows, so these replace real texts.
    filled = fill_every_step(calibration_token_ids, max_length)[: max(1, len(calibration_token_ids) // 4)]
    calibration_ids = pad_batch(calibration_token_ids[: len(calibration_token_ids) - len(filled)] + filled, max_length)
    tflite_entry = export_tflite_variants(
        token_ids_dir, FIXED_SIGNATURE, export_dir, "classifier",
        parity_inputs={"token_ids": parity_ids}, keras_outputs={"probabilities": keras_probabilities},
        export_config=config.export, variants=variants, representative_inputs={"token_ids": calibration_ids},
        quantized_tolerances=QUANTIZED_TOLERANCES, metric_fn=lambda outputs: compute_accuracy(outputs, parity.labels),
    )  # fmt: skip
    check_int8_accuracy(tflite_entry)
    logger.info("Export finished in %.1f s: %s", time.monotonic() - started, export_dir)
    return {"export_dir": str(export_dir), **load_export_report(export_dir)}


def fill_every_step(token_ids: Sequence[Sequence[int]], max_length: int) -> list[list[int]]:
    """Join texts end to end and cut the result into rows of exactly ``max_length`` ids.

    Full-int8 calibration mixes such rows with the real texts. Without them, when every
    calibration text is shorter than ``max_length``, the backward recurrent direction
    starts from a zero state at the last steps of every calibration row. Those steps then
    get a near-zero range and a scale that XNNPACK rejects, so the model fails to run.
    """
    joined = [token_id for ids in token_ids for token_id in ids]
    return [joined[start : start + max_length] for start in range(0, len(joined) - max_length + 1, max_length)]


def check_int8_accuracy(entry: dict[str, Any]) -> None:
    """Raise ExportError when the int8 model loses more than the allowed accuracy points."""
    int8 = entry["variants"].get("int8")
    if not int8 or int8.get("metric_delta") is None:
        return
    drop_points = -100.0 * int8["metric_delta"]
    if drop_points <= MAX_INT8_ACCURACY_DROP_POINTS:
        return
    if int8["parity_examples"] < MIN_EXAMPLES_FOR_ACCURACY_CHECK:
        logger.warning("The int8 TFLite model is %.2f accuracy points below Keras on only %d examples; "
                       "raise export.parity_samples to %d or more to check it.", drop_points,
                       int8["parity_examples"], MIN_EXAMPLES_FOR_ACCURACY_CHECK)
        return
    raise ExportError(
            f"the int8 TFLite model is {drop_points:.2f} accuracy points below Keras "
            f"(allowed {MAX_INT8_ACCURACY_DROP_POINTS:g}); raise export.representative_samples "
            "for calibration, or ship the dynamic_range or float16 model."
        )
