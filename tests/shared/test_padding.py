"""Tests for the padding contract, bucketing and masked losses, and padding-equivalent models."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from shared.config import RecurrentConfig
from shared.errors import DataError
from shared.padding import (
    PAD_ID,
    MaskedSparseCategoricalCrossentropy,
    MaskedTokenAccuracy,
    compute_masked_mean,
    make_bucketed_dataset,
    mask_from_lengths,
    pad_numeric,
    pad_token_ids,
    padding_fraction,
)
from shared.recurrent import apply_recurrent_stack, build_recurrent_stack


def test_pad_token_ids_right_pads():
    token_ids, lengths = pad_token_ids([[5, 6, 7], [8]])
    np.testing.assert_array_equal(token_ids, [[5, 6, 7], [8, PAD_ID, PAD_ID]])
    np.testing.assert_array_equal(lengths, [3, 1])


def test_pad_token_ids_rejects_empty_row():
    with pytest.raises(DataError, match="train.de: sequence 1 is empty"):
        pad_token_ids([[4, 5], []], source="train.de")


def test_pad_token_ids_rejects_too_long():
    with pytest.raises(DataError, match="sequence 0 has 4 steps, more than the maximum length 3"):
        pad_token_ids([[4, 5, 6, 7]], max_length=3)


def test_pad_token_ids_rejects_pad_inside():
    with pytest.raises(DataError, match="contains the padding id 0"):
        pad_token_ids([[4, 0, 6]])


def test_pad_numeric_mask_marks_real_steps():
    values, mask = pad_numeric([np.ones((2, 3)), np.full((4, 3), 2.0)], fill_value=-1.0)
    assert values.shape == (2, 4, 3)
    np.testing.assert_array_equal(mask, [[True, True, False, False], [True, True, True, True]])
    np.testing.assert_array_equal(values[0, 2:], np.full((2, 3), -1.0))


def test_pad_numeric_rejects_empty_row():
    with pytest.raises(DataError, match="engine windows: sequence 0 is empty"):
        pad_numeric([np.zeros((0, 3)), np.ones((2, 3))], source="engine windows")


def test_pad_numeric_rejects_nan():
    readings = np.ones((3, 2))
    readings[1, 0] = np.nan
    with pytest.raises(DataError, match="sequence 0 contains NaN or infinite values"):
        pad_numeric([readings])


def test_pad_numeric_rejects_feature_mismatch():
    with pytest.raises(DataError, match=r"sequence 1 has shape \(2, 4\); expected \(steps, 3\)"):
        pad_numeric([np.ones((2, 3)), np.ones((2, 4))])


def test_mask_from_lengths():
    mask = mask_from_lengths(np.array([1, 3]), 4).numpy()
    np.testing.assert_array_equal(mask, [[True, False, False, False], [True, True, True, False]])


def test_padding_fraction_hand_computed():
    assert padding_fraction(np.array([2, 4])) == pytest.approx(0.25)


def test_bucketed_batches_pad_to_batch_max():
    sequences = [[1] * n for n in (2, 3, 9, 10, 3, 2)]
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(sequences), output_signature=tf.TensorSpec([None], tf.int32)
    )
    batches = list(
        make_bucketed_dataset(dataset, lambda x: tf.shape(x)[0], batch_size=2, boundaries=(4, 8)).as_numpy_iterator()
    )
    widths = sorted(batch.shape[1] for batch in batches)
    assert widths == [3, 3, 10]
    for batch in batches:
        assert np.all(batch[:, 0] == 1)


def test_bucketed_rejects_unsorted_boundaries():
    dataset = tf.data.Dataset.from_tensor_slices([[1]])
    with pytest.raises(ValueError, match="increasing positive integers"):
        make_bucketed_dataset(dataset, lambda x: tf.shape(x)[0], 2, boundaries=(8, 4))


def test_masked_crossentropy_ignores_padding():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]], dtype=np.float32))
    labels = np.array([[1, 2, PAD_ID]])
    loss = MaskedSparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    expected = -(math.log(0.25) + math.log(0.2)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_masked_crossentropy_label_smoothing():
    logits = np.log(np.array([[[0.5, 0.25, 0.25]]], dtype=np.float32))
    labels = np.array([[1]])
    loss = MaskedSparseCategoricalCrossentropy(label_smoothing=0.3)(labels, logits)
    target = np.array([0.1, 0.8, 0.1])
    expected = -float(np.sum(target * np.log([0.5, 0.25, 0.25])))
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_masked_token_accuracy_counts_real_tokens():
    metric = MaskedTokenAccuracy()
    predictions = np.array([[[0, 1, 0], [1, 0, 0], [0, 0, 1]]], dtype=np.float32)
    metric.update_state(np.array([[1, 2, PAD_ID]]), predictions)
    assert float(metric.result()) == pytest.approx(0.5)


def test_compute_masked_mean():
    values = keras.ops.convert_to_tensor([1.0, 2.0, 100.0])
    assert float(compute_masked_mean(values, [True, True, False])) == pytest.approx(1.5)


STACKS = {
    "simple_rnn": RecurrentConfig(cell="simple_rnn", units=5),
    "lstm": RecurrentConfig(cell="lstm", units=5),
    "gru": RecurrentConfig(cell="gru", units=5),
    "bidirectional_lstm": RecurrentConfig(cell="lstm", units=4, bidirectional=True),
    "bidirectional_gru_2_layers": RecurrentConfig(cell="gru", units=4, layers=2, bidirectional=True),
    "lstm_2_layers": RecurrentConfig(cell="lstm", units=4, layers=2),
}


def build_masked_model(config: RecurrentConfig, return_sequences: bool) -> keras.Model:
    values = keras.Input((None, 3), name="values")
    padding_mask = keras.Input((None,), dtype="bool", name="padding_mask")
    layers = build_recurrent_stack(config, return_sequences=return_sequences)
    outputs = apply_recurrent_stack(layers, values, mask=padding_mask)
    return keras.Model([values, padding_mask], outputs)


@pytest.mark.parametrize("name", sorted(STACKS))
def test_padded_sequence_matches_alone(name):
    model = build_masked_model(STACKS[name], return_sequences=False)
    rng = np.random.default_rng(0)
    sequence = rng.normal(size=(5, 3)).astype(np.float32)
    alone = model([sequence[None], np.ones((1, 5), bool)]).numpy()
    # Padding steps filled with large values: only the mask may hide them.
    batch, mask = pad_numeric([sequence, rng.normal(size=(9, 3))], fill_value=7.0)
    padded = model([batch, mask]).numpy()
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-5)


@pytest.mark.parametrize("name", ["lstm", "bidirectional_gru_2_layers"])
def test_padded_sequence_outputs_match_per_step(name):
    model = build_masked_model(STACKS[name], return_sequences=True)
    sequence = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    alone = model([sequence[None], np.ones((1, 4), bool)]).numpy()
    batch, mask = pad_numeric([sequence], max_length=8, fill_value=-3.0)
    padded = model([batch, mask]).numpy()
    np.testing.assert_allclose(padded[0, :4], alone[0], atol=1e-5)


def test_embedding_mask_zero_matches_alone():
    token_input = keras.Input((None,), dtype="int32")
    embedded = keras.layers.Embedding(20, 4, mask_zero=True)(token_input)
    layers = build_recurrent_stack(RecurrentConfig(cell="gru", units=6, bidirectional=True))
    model = keras.Model(token_input, apply_recurrent_stack(layers, embedded))
    token_ids, _ = pad_token_ids([[3, 4, 5], [6, 7, 8, 9, 10, 11]])
    alone = model(np.array([[3, 4, 5]])).numpy()
    padded = model(token_ids).numpy()
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-5)


def test_unmasked_padding_changes_output():
    # Guards the tests above: without the mask the padded output must differ.
    model = build_masked_model(STACKS["lstm"], return_sequences=False)
    sequence = np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32)
    alone = model([sequence[None], np.ones((1, 5), bool)]).numpy()
    batch, _ = pad_numeric([sequence], max_length=9, fill_value=7.0)
    unmasked = model([batch, np.ones((1, 9), bool)]).numpy()
    assert np.max(np.abs(unmasked - alone)) > 1e-3
