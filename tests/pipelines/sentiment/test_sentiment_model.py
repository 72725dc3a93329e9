"""Tests of the sentiment classifier: padding invariance, attention pooling and the unrolled graph."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipelines.sentiment.config import ModelConfig
from pipelines.sentiment.model import (
    MaskedAttentionPooling,
    MaskedMaxPooling,
    build_classifier,
    build_ensemble,
    compute_probabilities,
    copy_matching_weights,
)
from pipelines.sentiment.serving import compute_unrolled_probabilities
from shared.errors import ConfigError

TINY_MODEL = ModelConfig(units=4, embedding_dim=6, attention_units=3, embedding_dropout=0.0, head_dropout=0.0)


def build_tiny(**changes) -> keras.Model:
    return build_classifier(dataclasses.replace(TINY_MODEL, **changes), vocab_size=30, num_classes=3)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"pooling": "last_state"},
        {"pooling": "max"},
        {"cell": "gru", "layers": 2},
        {"bidirectional": False, "cell": "simple_rnn"},
    ],
)
def test_alone_equals_padded_batch(changes):
    model = build_tiny(**changes)
    review = [5, 9, 2, 17]
    alone = np.asarray(model(np.array([review], dtype=np.int32)))
    batch = np.array([review + [0] * 6, [3] * 10, [7, 8] + [0] * 8], dtype=np.int32)
    in_batch = np.asarray(model(batch))
    np.testing.assert_allclose(in_batch[0], alone[0], atol=1e-6)


def test_probabilities_sum_to_one():
    model = build_tiny()
    probabilities = np.asarray(model(np.array([[4, 5, 0, 0]], dtype=np.int32)))
    assert probabilities.shape == (1, 3)
    np.testing.assert_allclose(probabilities.sum(), 1.0, atol=1e-6)


def test_compute_probabilities_keeps_order():
    model = build_tiny()
    texts = [[1, 2, 3, 4, 5, 6], [7], [8, 9]]
    batched = compute_probabilities(model, texts, batch_size=2)
    for index, token_ids in enumerate(texts):
        alone = np.asarray(model(np.array([token_ids], dtype=np.int32)))[0]
        np.testing.assert_allclose(batched[index], alone, atol=1e-6)


def test_attention_pooling_by_hand():
    layer = MaskedAttentionPooling(units=1)
    sequences = np.array([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]], dtype=np.float32)
    mask = np.array([[True, True, False]])
    layer.build(sequences.shape)
    # Hidden = tanh(x0) and score = hidden, so the scores are tanh(1) and tanh(0).
    layer.hidden.set_weights([np.array([[1.0], [0.0]], np.float32), np.zeros(1, np.float32)])
    layer.score.set_weights([np.array([[1.0]], np.float32)])
    pooled = np.asarray(layer(sequences, mask))
    weight = np.exp(np.tanh(1.0)) / (np.exp(np.tanh(1.0)) + 1.0)
    np.testing.assert_allclose(pooled[0], [weight, 1.0 - weight], atol=1e-6)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"pooling": "last_state"},
        {"pooling": "max"},
        {"cell": "gru", "layers": 2},
        {"bidirectional": False},
    ],
)
def test_unrolled_matches_keras(changes):
    model = build_tiny(**changes)
    token_ids = np.array([[4, 8, 15, 16, 23, 0, 0, 0]], dtype=np.int32)
    expected = np.asarray(model(token_ids))
    unrolled = np.asarray(compute_unrolled_probabilities(model, tf.constant(token_ids)))
    np.testing.assert_allclose(unrolled, expected, atol=1e-6)


def test_max_pooling_ignores_padding():
    sequences = np.array([[[1.0, -2.0], [3.0, -1.0], [9.0, 9.0]]], dtype=np.float32)
    mask = np.array([[True, True, False]])
    pooled = np.asarray(MaskedMaxPooling()(sequences, mask))
    np.testing.assert_array_equal(pooled[0], [3.0, -1.0])


def test_copy_weights_skips_mismatch():
    source = build_tiny()
    target = build_classifier(dataclasses.replace(TINY_MODEL), vocab_size=30, num_classes=5)
    skipped = copy_matching_weights(source, target)
    assert skipped == ["probabilities"]
    np.testing.assert_array_equal(target.get_layer("embedding").get_weights()[0],
                                  source.get_layer("embedding").get_weights()[0])


def test_member_poolings_cycle():
    config = dataclasses.replace(TINY_MODEL, members=3, member_poolings=("attention", "max"))
    assert [config.member(k).pooling for k in range(3)] == ["attention", "max", "attention"]
    assert config.member(1).members == 1


def test_member_pooling_unknown_rejected():
    with pytest.raises(ConfigError, match="model.member_poolings"):
        ModelConfig(member_poolings=("mean",))


def test_unrolled_ensemble_matches_keras():
    configs = [dataclasses.replace(TINY_MODEL, pooling=p) for p in ("attention", "max")]
    members = [build_classifier(c, vocab_size=30, num_classes=3) for c in configs]
    ensemble = build_ensemble(configs, members, vocab_size=30, num_classes=3)
    token_ids = np.array([[4, 8, 15, 16, 23, 0, 0, 0]], dtype=np.int32)
    unrolled = np.asarray(compute_unrolled_probabilities(ensemble, tf.constant(token_ids)))
    np.testing.assert_allclose(unrolled, np.asarray(ensemble(token_ids)), atol=1e-6)



def test_fill_every_step_rows():
    from pipelines.sentiment.serving import fill_every_step

    rows = fill_every_step([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], 4)
    assert rows == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_fill_every_step_short_texts():
    from pipelines.sentiment.serving import fill_every_step

    assert fill_every_step([[1, 2], [3]], 4) == []
