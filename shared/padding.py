"""Padding, masking, length-bucketed batching and masked losses.

The contract every pipeline follows:

* Padding is on the right: real steps come first, padding steps after them.
* Token sequences are padded with ``PAD_ID = 0``; id 0 is reserved and never a real token.
* Every sequence has an explicit length, the number of real steps, and no row is all
  padding: an empty sequence is rejected where it is loaded, with its index.
* Numeric sequences are padded with a fill value and carry a boolean mask in which
  ``True`` marks a real step. The mask, not the fill value, decides what is padding.
* Losses and metrics over sequences average over real steps only.

Because padding is on the right and recurrent layers carry their state through masked
steps, a padded sequence gives the same outputs as the same sequence alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from shared.errors import DataError

PAD_ID = 0

# Bucket upper bounds used when a pipeline gives none: few buckets keep tf.data and the
# traced functions small, and doubling widths keeps the padding fraction below one half.
DEFAULT_BUCKET_BOUNDARIES = (8, 16, 32, 64, 128, 256)


def compute_lengths(sequences: Sequence[Sequence]) -> np.ndarray:
    """Return the number of steps in each sequence as an int32 array."""
    return np.asarray([len(s) for s in sequences], dtype=np.int32)


def check_not_empty(sequences: Sequence[Sequence], source: str = "input") -> None:
    """Raise DataError naming the first empty sequence, since a row of only padding is invalid."""
    for index, sequence in enumerate(sequences):
        if len(sequence) == 0:
            raise DataError(
                f"{source}: sequence {index} is empty; every row needs at least one real step. "
                "Remove empty rows or fix the source data."
            )


def pad_token_ids(
    sequences: Sequence[Sequence[int]],
    max_length: int | None = None,
    source: str = "input",
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id sequences with PAD_ID.

    Args:
        sequences: lists of token ids, none of them empty and none containing PAD_ID.
        max_length: padded width; defaults to the longest sequence. Longer sequences
            raise, because silent truncation would change the data.
        source: name of the data, used in error messages.

    Returns:
        ``(token_ids, lengths)``: an int32 array ``(batch_size, max_length)`` and the
        int32 lengths ``(batch_size,)``.

    Raises:
        DataError: an empty sequence, a sequence longer than ``max_length`` or a
            PAD_ID inside a sequence.
    """
    check_not_empty(sequences, source)
    lengths = compute_lengths(sequences)
    width = int(lengths.max()) if max_length is None else max_length
    token_ids = np.full((len(sequences), width), PAD_ID, dtype=np.int32)
    for index, sequence in enumerate(sequences):
        if len(sequence) > width:
            raise DataError(
                f"{source}: sequence {index} has {len(sequence)} steps, more than the maximum "
                f"length {width}. Truncate or filter it before padding, or raise the maximum."
            )
        row = np.asarray(sequence, dtype=np.int32)
        if np.any(row == PAD_ID):
            raise DataError(f"{source}: sequence {index} contains the padding id {PAD_ID} as a real token.")
        token_ids[index, : len(row)] = row
    return token_ids, lengths


def pad_numeric(
    sequences: Sequence[np.ndarray],
    max_length: int | None = None,
    fill_value: float = 0.0,
    source: str = "input",
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad numeric sequences of shape ``(steps, features)`` and build their mask.

    Returns:
        ``(values, mask)``: float32 ``(batch_size, max_length, features)`` and a bool
        mask ``(batch_size, max_length)`` with True on real steps.

    Raises:
        DataError: an empty sequence, a sequence longer than ``max_length``, feature
            counts that differ between sequences, or a NaN or infinite value.
    """
    check_not_empty(sequences, source)
    arrays = [np.asarray(s, dtype=np.float32) for s in sequences]
    features = arrays[0].shape[-1]
    width = max(a.shape[0] for a in arrays) if max_length is None else max_length
    values = np.full((len(arrays), width, features), fill_value, dtype=np.float32)
    mask = np.zeros((len(arrays), width), dtype=bool)
    for index, array in enumerate(arrays):
        if array.ndim != 2 or array.shape[1] != features:
            raise DataError(f"{source}: sequence {index} has shape {array.shape}; expected (steps, {features}).")
        if array.shape[0] > width:
            raise DataError(
                f"{source}: sequence {index} has {array.shape[0]} steps, more than the maximum length {width}."
            )
        if not np.all(np.isfinite(array)):
            raise DataError(f"{source}: sequence {index} contains NaN or infinite values.")
        values[index, : array.shape[0]] = array
        mask[index, : array.shape[0]] = True
    return values, mask


def mask_from_lengths(lengths: np.ndarray | tf.Tensor, max_length: int) -> tf.Tensor:
    """Return a bool mask ``(batch_size, max_length)``: True for steps below each length."""
    return tf.sequence_mask(lengths, maxlen=max_length)


def padding_fraction(lengths: np.ndarray, width: int | None = None) -> float:
    """Return the share of padded steps when ``lengths`` are padded to ``width`` (default: max)."""
    lengths = np.asarray(lengths)
    width = int(lengths.max()) if width is None else width
    return float(1.0 - lengths.sum() / (len(lengths) * width))


def make_bucketed_dataset(
    dataset: tf.data.Dataset,
    length_fn,
    batch_size: int,
    boundaries: Sequence[int] = DEFAULT_BUCKET_BOUNDARIES,
    padding_values=None,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Batch a dataset of unpadded examples by length bucket, padding each batch on the right.

    Args:
        dataset: examples with variable-length tensors (a tensor, tuple or dict).
        length_fn: maps an example to its int32 length, used to pick the bucket.
        batch_size: examples per batch in every bucket.
        boundaries: increasing bucket upper bounds; longer examples go to the last bucket.
        padding_values: structure of pad values matching the example; PAD_ID by default.
        drop_remainder: drop each bucket's final partial batch.

    Returns:
        A dataset of padded batches whose width is the longest example in that batch.
    """
    boundaries = list(boundaries)
    if boundaries != sorted(set(boundaries)) or not boundaries or boundaries[0] < 1:
        raise ValueError(f"boundaries must be increasing positive integers, got {boundaries}.")
    return dataset.bucket_by_sequence_length(
        element_length_func=length_fn,
        bucket_boundaries=boundaries,
        bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
        padding_values=padding_values,
        pad_to_bucket_boundary=False,
        drop_remainder=drop_remainder,
    )


# ---------------------------------------------------------------------------
# Masked losses and metrics. Labels equal to PAD_ID mark padding.


@keras.saving.register_keras_serializable(package="rnn_pipelines")
class MaskedSparseCategoricalCrossentropy(keras.losses.Loss):
    """Token cross-entropy averaged over real target tokens (labels != PAD_ID) of the batch.

    Supports label smoothing on sparse labels, which Keras' own sparse loss does not.
    """

    def __init__(self, from_logits: bool = True, label_smoothing: float = 0.0, name: str = "masked_sparse_ce",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.from_logits = from_logits
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        y_true = keras.ops.cast(y_true, "int32")
        mask = keras.ops.cast(keras.ops.not_equal(y_true, PAD_ID), y_pred.dtype)
        num_classes = keras.ops.shape(y_pred)[-1]
        one_hot = keras.ops.one_hot(y_true, num_classes, dtype=y_pred.dtype)
        per_token = keras.losses.categorical_crossentropy(
            one_hot, y_pred, from_logits=self.from_logits, label_smoothing=self.label_smoothing
        )
        return keras.ops.sum(per_token * mask) / keras.ops.maximum(keras.ops.sum(mask), 1.0)

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits, "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="rnn_pipelines")
class MaskedTokenAccuracy(keras.metrics.Mean):
    """Share of real target tokens (labels != PAD_ID) whose arg-max prediction is right."""

    def __init__(self, name: str = "token_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = keras.ops.cast(y_true, "int32")
        mask = keras.ops.not_equal(y_true, PAD_ID)
        predicted = keras.ops.cast(keras.ops.argmax(y_pred, axis=-1), "int32")
        correct = keras.ops.cast(keras.ops.equal(predicted, y_true), "float32")
        return super().update_state(correct, sample_weight=keras.ops.cast(mask, "float32"))


def compute_masked_mean(values, mask):
    """Return the mean of ``values`` over positions where ``mask`` is True (0 when none are)."""
    mask = keras.ops.cast(mask, values.dtype)
    return keras.ops.sum(values * mask) / keras.ops.maximum(keras.ops.sum(mask), 1.0)
