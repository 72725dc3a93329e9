"""Tests for shared.streaming: one-step models match full-sequence models, in Keras and TFLite."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from shared import export, streaming
from shared.config import RecurrentConfig
from shared.errors import ConfigError
from shared.recurrent import apply_recurrent_stack, build_recurrent_stack

TIMESTEPS = 6
FEATURES = 3
UNITS = 4
STACKS = [("simple_rnn", 1), ("lstm", 1), ("gru", 1), ("lstm", 2)]


def build_models(cell: str, layers: int, *, bidirectional: bool = False):
    """Return ``(full model, recurrent stack, dense head)`` over 6 steps of 3 features."""
    keras.utils.set_random_seed(7)
    config = RecurrentConfig(cell=cell, units=UNITS, layers=layers, bidirectional=bidirectional)
    stack = build_recurrent_stack(config)
    head = keras.layers.Dense(2, name="head")
    sequence = keras.Input((TIMESTEPS, FEATURES), batch_size=1, name="sequence")
    full_model = keras.Model(sequence, head(apply_recurrent_stack(stack, sequence)))
    return full_model, stack, head


def make_sequence(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(TIMESTEPS, FEATURES)).astype("float32")


@pytest.mark.parametrize(("cell", "layers"), STACKS)
def test_step_model_matches_full_model(cell, layers):
    full_model, stack, head = build_models(cell, layers)
    step_model = streaming.build_step_model(stack, input_features=FEATURES, head=head)
    sequence = make_sequence()
    _, results = streaming.stream_sequence(step_model, sequence)
    expected = np.asarray(full_model(sequence[np.newaxis]))
    assert np.max(np.abs(results[-1]["outputs"] - expected)) < 1e-5


@pytest.mark.parametrize(("cell", "layers"), STACKS)
def test_step_model_shares_weights(cell, layers):
    full_model, stack, head = build_models(cell, layers)
    step_model = streaming.build_step_model(stack, input_features=FEATURES, head=head)
    assert {id(w) for w in step_model.weights} == {id(w) for w in full_model.weights}


def test_step_model_follows_new_weights():
    full_model, stack, head = build_models("gru", 1)
    step_model = streaming.build_step_model(stack, input_features=FEATURES, head=head)
    kernel = stack[0].cell.kernel
    kernel.assign(np.asarray(kernel) * 2.0)
    _, results = streaming.stream_sequence(step_model, make_sequence())
    expected = np.asarray(full_model(make_sequence()[np.newaxis]))
    assert np.max(np.abs(results[-1]["outputs"] - expected)) < 1e-5


def test_state_names_lstm_two_layers():
    _, stack, head = build_models("lstm", 2)
    step_model = streaming.build_step_model(stack, input_features=FEATURES, head=head)
    assert sorted(step_model.input) == [
        "inputs",
        "state_0_c",
        "state_0_h",
        "state_1_c",
        "state_1_h",
    ]
    assert sorted(step_model.output) == [
        "outputs",
        "state_0_c",
        "state_0_h",
        "state_1_c",
        "state_1_h",
    ]
    assert streaming.list_state_names(step_model) == [
        "state_0_h",
        "state_0_c",
        "state_1_h",
        "state_1_c",
    ]


def test_state_names_gru():
    _, stack, _ = build_models("gru", 1)
    step_model = streaming.build_step_model(stack, input_features=FEATURES)
    assert sorted(step_model.output) == ["outputs", "state_0_h"]


def test_initial_state_is_zero():
    _, stack, _ = build_models("lstm", 1)
    state = streaming.make_initial_state(streaming.build_step_model(stack, input_features=FEATURES))
    assert sorted(state) == ["state_0_c", "state_0_h"]
    assert state["state_0_h"].shape == (1, UNITS)
    assert not state["state_0_c"].any()


def test_without_head_outputs_last_state():
    full_model, stack, _ = build_models("simple_rnn", 1)
    step_model = streaming.build_step_model(stack, input_features=FEATURES)
    _, results = streaming.stream_sequence(step_model, make_sequence())
    np.testing.assert_array_equal(results[-1]["outputs"], results[-1]["state_0_h"])


def test_token_id_steps():
    keras.utils.set_random_seed(3)
    embedding = keras.layers.Embedding(10, 5)
    stack = build_recurrent_stack(RecurrentConfig(cell="gru", units=UNITS, layers=1))
    token_ids = keras.Input((TIMESTEPS,), batch_size=1, dtype="int32")
    full_model = keras.Model(token_ids, apply_recurrent_stack(stack, embedding(token_ids)))
    step_model = streaming.build_step_model(
        stack,
        input_features=1,
        input_dtype="int32",
        input_layers=[embedding, keras.layers.Reshape((5,))],
    )
    sequence = np.array([[3], [1], [4], [1], [5], [9]], dtype="int32")
    _, results = streaming.stream_sequence(step_model, sequence)
    expected = np.asarray(full_model(sequence.reshape(1, TIMESTEPS)))
    assert np.max(np.abs(results[-1]["outputs"] - expected)) < 1e-5


def test_bidirectional_rejected():
    _, stack, _ = build_models("lstm", 1, bidirectional=True)
    with pytest.raises(ConfigError, match="bidirectional"):
        streaming.build_step_model(stack, input_features=FEATURES)


def test_go_backwards_rejected():
    with pytest.raises(ConfigError, match="go_backwards"):
        streaming.build_step_model(
            [keras.layers.GRU(UNITS, go_backwards=True)], input_features=FEATURES
        )


def test_non_recurrent_layer_rejected():
    with pytest.raises(ConfigError, match="Dense"):
        streaming.build_step_model([keras.layers.Dense(UNITS)], input_features=FEATURES)


def test_empty_stack_rejected():
    with pytest.raises(ConfigError, match="no recurrent layers"):
        streaming.build_step_model([], input_features=FEATURES)


def test_step_examples_layout():
    _, stack, head = build_models("lstm", 1)
    step_model = streaming.build_step_model(stack, input_features=FEATURES, head=head)
    sequences = np.stack([make_sequence(seed) for seed in range(3)])
    inputs, outputs = streaming.make_step_examples(step_model, sequences, max_examples=5)
    assert inputs["inputs"].shape == (5, FEATURES)
    assert inputs["state_0_c"].shape == (5, UNITS)
    assert outputs["outputs"].shape == (5, 2)
    # 18 steps in all; the 5 examples are steps 0, 4, 8, 13 and 17 (round half to even).
    assert not inputs["state_0_h"][0].any()
    np.testing.assert_array_equal(inputs["inputs"][1], sequences[0, 4])
    np.testing.assert_array_equal(inputs["inputs"][-1], sequences[2, -1])


# ---------------------------------------------------------------------------
# TFLite float32 step models, run step by step through the signature runner.


@pytest.fixture(scope="module")
def converted_step_models(tmp_path_factory):
    """Each stack's step model as SavedModel and float32 TFLite, with its full model."""
    converted = {}
    for cell, layers in STACKS:
        out_dir = tmp_path_factory.mktemp(f"{cell}_{layers}")
        full_model, stack, head = build_models(cell, layers)
        step_model = streaming.build_step_model(stack, input_features=FEATURES, head=head)
        saved_model = streaming.export_step_model(step_model, out_dir / "saved_model")
        tflite_path = export.convert_saved_model(
            saved_model, streaming.STEP_SIGNATURE_KEY, "float32", out_dir / "step.tflite"
        )
        converted[(cell, layers)] = (full_model, step_model, tflite_path)
    return converted


@pytest.mark.slow
@pytest.mark.parametrize(("cell", "layers"), STACKS)
def test_tflite_step_matches_full_model(converted_step_models, cell, layers):
    full_model, step_model, tflite_path = converted_step_models[(cell, layers)]
    runner = Interpreter(model_path=str(tflite_path)).get_signature_runner(
        streaming.STEP_SIGNATURE_KEY
    )
    state = streaming.make_initial_state(step_model)
    sequence = make_sequence(seed=1)
    for step in sequence:
        result = runner(inputs=step[np.newaxis], **state)
        state = {name: result[name] for name in state}
    expected = np.asarray(full_model(sequence[np.newaxis]))
    assert np.max(np.abs(result["outputs"] - expected)) < 1e-4


@pytest.mark.slow
def test_tflite_step_signature_names(converted_step_models):
    _, _, tflite_path = converted_step_models[("lstm", 2)]
    signature = Interpreter(model_path=str(tflite_path)).get_signature_list()[
        streaming.STEP_SIGNATURE_KEY
    ]
    names = ["state_0_c", "state_0_h", "state_1_c", "state_1_h"]
    assert sorted(signature["inputs"]) == ["inputs", *names]
    assert sorted(signature["outputs"]) == ["outputs", *names]


@pytest.mark.slow
def test_tflite_step_builtin_ops_only(converted_step_models):
    for key, (_, _, tflite_path) in converted_step_models.items():
        assert export.list_custom_ops(tflite_path) == [], key
        assert "WHILE" not in export.list_tflite_ops(tflite_path), key


@pytest.mark.parametrize(("cell", "layers"), STACKS)
@pytest.mark.parametrize("real_steps", [TIMESTEPS, 2])
def test_unrolled_stack_matches_masked_stack(cell, layers, real_steps):
    _, stack, _ = build_models(cell, layers)
    sequence = keras.Input((TIMESTEPS, FEATURES), batch_size=1)
    padding_mask = keras.Input((TIMESTEPS,), batch_size=1, dtype="bool")
    masked = keras.Model([sequence, padding_mask], apply_recurrent_stack(stack, sequence, mask=padding_mask))
    unrolled = keras.Model(
        [sequence, padding_mask], streaming.apply_stack_unrolled(stack, sequence, padding_mask)
    )
    inputs = [make_sequence()[np.newaxis], np.arange(TIMESTEPS)[np.newaxis] < real_steps]
    np.testing.assert_allclose(np.asarray(unrolled(inputs)), np.asarray(masked(inputs)), atol=1e-6)
