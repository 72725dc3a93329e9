"""Tests of the attention model and decoding: step model, greedy, beam search, batching."""

import dataclasses

import keras
import numpy as np
import pytest

from pipelines.translation.config import TINY
from pipelines.translation.decoding import (
    BeamState,
    DecodingLimits,
    beam_search_decode,
    compute_length_penalty,
    greedy_decode,
    restrict_continuations,
    strip_special,
)
from pipelines.translation.model import build_inference_models, build_training_model
from shared.padding import PAD_ID, pad_token_ids
from shared.text import BOS_ID, EOS_ID

VOCAB = 40
SOURCES = [
    [5, 9, 11, EOS_ID],
    [7, 8, 9, 10, 12, 13, EOS_ID],
    [20, EOS_ID],
    [6, 6, 30, 31, 32, EOS_ID],
]
LIMITS = DecodingLimits(1.5, 4)


def build_models(cell="gru", attention="multiplicative"):
    """Return an untrained tiny model and its inference models (random weights vary the tokens)."""
    config = dataclasses.replace(TINY.model, cell=cell, attention=attention)
    model = build_training_model(config, VOCAB, VOCAB)
    return model, build_inference_models(model, config)


@pytest.fixture(
    params=[("gru", "multiplicative"), ("lstm", "additive")], ids=["gru-luong", "lstm-bahdanau"]
)
def models(request):
    return build_models(*request.param)


def teacher_forced_logits(model, source, target_input):
    return np.asarray(
        model(
            {
                "source_ids": np.array([source], np.int32),
                "target_input_ids": np.array([target_input], np.int32),
            },
            training=False,
        )
    )[0]


def test_step_model_matches_training(models):
    model, inference = models
    source, target_input = SOURCES[1], [BOS_ID, 14, 15, 16]
    expected = teacher_forced_logits(model, source, target_input)
    encoded = {
        k: np.asarray(v)
        for k, v in inference.encoder({"source_ids": np.array([source], np.int32)}).items()
    }
    states = [encoded[name] for name in inference.state_names]
    for position, token in enumerate(target_input):
        inputs = {
            "previous_token": np.array([[token]], np.int32),
            "encoder_outputs": encoded["encoder_outputs"],
            "source_mask": encoded["source_mask"],
            **dict(zip(inference.state_names, states, strict=True)),
        }
        outputs = inference.step(inputs)
        np.testing.assert_allclose(outputs["logits"][0], expected[position], atol=1e-5)
        states = [np.asarray(outputs[name]) for name in inference.state_names]


def test_padding_ignored_by_training_model(models):
    model, _ = models
    alone = teacher_forced_logits(model, SOURCES[0], [BOS_ID, 14])
    padded = teacher_forced_logits(model, [*SOURCES[0], PAD_ID, PAD_ID], [BOS_ID, 14, PAD_ID])
    np.testing.assert_allclose(padded[:2], alone, atol=1e-5)


def test_attention_ignores_padding(models):
    _, inference = models
    padded, _ = pad_token_ids(SOURCES)
    _, weights = greedy_decode(inference, padded, LIMITS)
    third_row_padding = np.asarray(weights)[2, :, len(SOURCES[2]) :]
    assert np.abs(third_row_padding).max() < 1e-6


def test_attention_rows_sum_to_one(models):
    _, inference = models
    padded, _ = pad_token_ids(SOURCES)
    _, weights = greedy_decode(inference, padded, LIMITS)
    np.testing.assert_allclose(np.asarray(weights)[0].sum(axis=-1), 1.0, atol=1e-5)


def test_greedy_outputs_tokens(models):
    _, inference = models
    padded, _ = pad_token_ids(SOURCES)
    token_ids, _ = greedy_decode(inference, padded, LIMITS)
    assert sum(len(strip_special(row)) for row in np.asarray(token_ids)) > 0


def test_greedy_respects_length_limit(models):
    _, inference = models
    padded, _ = pad_token_ids(SOURCES)
    token_ids, _ = greedy_decode(inference, padded, LIMITS)
    # Source of 2 tokens: at most ceil(1.5 * 2) + 4 = 7 tokens, EOS included, so 6 before EOS.
    assert len(strip_special(np.asarray(token_ids)[2])) <= 6


def test_alone_equals_batched(models):
    _, inference = models
    padded, _ = pad_token_ids(SOURCES)
    batched = [
        strip_special(row) for row in np.asarray(greedy_decode(inference, padded, LIMITS)[0])
    ]
    alone = [
        strip_special(np.asarray(greedy_decode(inference, np.array([s], np.int32), LIMITS)[0])[0])
        for s in SOURCES
    ]
    assert batched == alone


def test_beam_one_equals_greedy(models):
    _, inference = models
    padded, _ = pad_token_ids(SOURCES)
    greedy = [strip_special(row) for row in np.asarray(greedy_decode(inference, padded, LIMITS)[0])]
    beam = [strip_special(row) for row in beam_search_decode(inference, padded, LIMITS, 1, 0.6)]
    assert beam == greedy


def test_beam_alone_equals_batched(models):
    _, inference = models
    padded, _ = pad_token_ids(SOURCES)
    batched = [strip_special(row) for row in beam_search_decode(inference, padded, LIMITS, 3, 0.6)]
    alone = [
        strip_special(beam_search_decode(inference, np.array([s], np.int32), LIMITS, 3, 0.6)[0])
        for s in SOURCES
    ]
    assert batched == alone


def test_beam_not_worse_than_greedy():
    model, inference = build_models()
    source = np.array([SOURCES[1]], np.int32)

    def log_prob(tokens):
        target = [*tokens, EOS_ID]
        logits = teacher_forced_logits(model, SOURCES[1], [BOS_ID, *target[:-1]]).astype(np.float64)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        return float(sum(log_probs[i, t] for i, t in enumerate(target)))

    greedy = strip_special(np.asarray(greedy_decode(inference, source, LIMITS)[0])[0])
    beam = strip_special(beam_search_decode(inference, source, LIMITS, 4, 0.0)[0])
    assert log_prob(beam) >= log_prob(greedy) - 1e-6


def test_length_penalty_value():
    # ((5 + 7) / 6) ** 0.5 = sqrt(2)
    assert compute_length_penalty(np.array([7.0]), 0.5)[0] == pytest.approx(2**0.5)


def test_finished_beam_continues_with_pad():
    log_probs = np.log(np.full((1, 2, 5), 0.2))
    restricted = restrict_continuations(log_probs, np.array([[True, False]]), np.array([[False]]))
    assert restricted[0, 0, PAD_ID] == 0.0


def test_limit_forces_eos():
    log_probs = np.log(np.full((1, 1, 5), 0.2))
    restricted = restrict_continuations(log_probs, np.array([[False]]), np.array([[True]]))
    assert int(np.argmax(restricted[0, 0])) == EOS_ID


def test_beam_state_keeps_best():
    beams = BeamState.start(1, 2)
    log_probs = np.log(np.array([[[0.1, 0.1, 0.1, 0.1, 0.6], [0.2] * 5]]))
    beams.advance(log_probs, 0, 0.0)
    assert beams.tokens[0, :, 0].tolist() == [4, 0]


def test_model_keras_round_trip(tmp_path):
    model, _ = build_models()
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, compile=False)
    inputs = {
        "source_ids": np.array([SOURCES[0]], np.int32),
        "target_input_ids": np.array([[BOS_ID, 9]], np.int32),
    }
    np.testing.assert_allclose(np.asarray(reloaded(inputs)), np.asarray(model(inputs)), atol=1e-6)
