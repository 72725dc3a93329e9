"""Tests of the RUL window model, its loss, and the Keras streaming model built from it."""

import keras
import numpy as np
import pytest

from pipelines.predictive_maintenance.config import ModelConfig
from pipelines.predictive_maintenance.edge import (
    build_streaming_model,
    build_window_export_model,
    make_prefix_inputs,
    make_zero_state,
    stream_readings,
)
from pipelines.predictive_maintenance.model import ScaledMeanSquaredError, build_rul_model
from shared.errors import ConfigError

WINDOW, FEATURES, CAP = 6, 3, 125.0


def build_model(cell="lstm", layers=2, head_units=4, members=1):
    config = ModelConfig(
        cell=cell,
        units=5,
        layers=layers,
        dropout=0.0,
        head_units=head_units,
        head_dropout=0.0,
        members=members,
    )
    model = build_rul_model(config, FEATURES, WINDOW, CAP)
    # Larger random weights than the initializers' so that outputs differ clearly between steps.
    rng = np.random.default_rng(3)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    return model, config


def test_output_in_cycles():
    model, _ = build_model()
    assert model.get_layer("rul").scale == CAP
    assert model.output.shape == (None, 1)


def test_padding_does_not_change_rul():
    model, _ = build_model()
    readings = np.random.default_rng(0).normal(size=(1, WINDOW, FEATURES)).astype(np.float32)
    mask = np.array([[True, True, True, False, False, False]])
    garbage = readings.copy()
    garbage[0, 3:] = 99.0
    zeros = readings.copy()
    zeros[0, 3:] = 0.0
    first = model.predict({"readings": garbage, "padding_mask": mask}, verbose=0)
    second = model.predict({"readings": zeros, "padding_mask": mask}, verbose=0)
    np.testing.assert_allclose(first, second, atol=1e-5)


def test_scaled_loss_hand_computed():
    loss = ScaledMeanSquaredError(10.0)
    value = loss(np.array([[20.0], [0.0]]), np.array([[25.0], [10.0]]))
    assert float(value) == pytest.approx((0.25 + 1.0) / 2)


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple_rnn"])
def test_streaming_equals_window_keras(cell):
    model, _ = build_model(cell)
    streaming = build_streaming_model(model)
    readings = np.random.default_rng(1).normal(size=(WINDOW, FEATURES)).astype(np.float32)
    _, streamed = stream_readings(
        lambda feed: streaming(feed, training=False), make_zero_state(streaming), readings
    )
    windowed = model.predict(make_prefix_inputs(readings, WINDOW), verbose=0).reshape(-1)
    np.testing.assert_allclose(streamed, windowed, atol=1e-4)
    assert np.ptp(streamed) > 1.0  # the check compares distinct values, not a constant


def test_streaming_names():
    model, _ = build_model("lstm", layers=2)
    streaming = build_streaming_model(model)
    assert sorted(streaming.input) == [
        "reading",
        "state_0_c",
        "state_0_h",
        "state_1_c",
        "state_1_h",
    ]
    assert sorted(streaming.output) == ["rul", "state_0_c", "state_0_h", "state_1_c", "state_1_h"]


def test_streaming_without_head_hidden():
    model, _ = build_model("gru", layers=1, head_units=0)
    streaming = build_streaming_model(model)
    readings = np.ones((2, FEATURES), dtype=np.float32)
    _, streamed = stream_readings(
        lambda feed: streaming(feed, training=False), make_zero_state(streaming), readings
    )
    windowed = model.predict(make_prefix_inputs(readings, WINDOW), verbose=0).reshape(-1)
    np.testing.assert_allclose(streamed, windowed, atol=1e-4)


def test_ensemble_is_mean_of_members():
    model, _ = build_model(members=3)
    inputs = make_prefix_inputs(np.ones((4, FEATURES), dtype=np.float32), WINDOW)
    fractions = [
        keras.Model(model.input, model.get_layer(f"member{k}_rul_fraction").output).predict(
            inputs, verbose=0
        )
        for k in range(3)
    ]
    expected = CAP * np.mean(fractions, axis=0)
    np.testing.assert_allclose(model.predict(inputs, verbose=0), expected, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_ensemble_streaming_equals_window(cell):
    model, _ = build_model(cell, members=2)
    streaming = build_streaming_model(model)
    readings = np.random.default_rng(2).normal(size=(WINDOW, FEATURES)).astype(np.float32)
    _, streamed = stream_readings(
        lambda feed: streaming(feed, training=False), make_zero_state(streaming), readings
    )
    windowed = model.predict(make_prefix_inputs(readings, WINDOW), verbose=0).reshape(-1)
    np.testing.assert_allclose(streamed, windowed, atol=1e-4)
    assert np.ptp(streamed) > 1.0


def test_ensemble_state_names():
    model, _ = build_model("gru", layers=2, members=2)
    streaming = build_streaming_model(model)
    expected = ["reading", "state_0_h", "state_1_h", "state_2_h", "state_3_h"]
    assert sorted(streaming.input) == expected


def test_ensemble_member_state_is_its_own():
    model, _ = build_model("gru", layers=1, members=2)
    streaming = build_streaming_model(model)
    state = make_zero_state(streaming)
    feed = {"reading": np.ones((1, FEATURES), dtype=np.float32), **state}
    changed = {**feed, "state_1_h": np.full((1, 5), 0.5, dtype=np.float32)}
    first = streaming(feed, training=False)
    second = streaming(changed, training=False)
    np.testing.assert_allclose(first["state_0_h"], second["state_0_h"], atol=1e-6)


def test_window_export_copy_batch_one():
    model, config = build_model()
    exported = build_window_export_model(model, config, WINDOW, CAP)
    inputs = make_prefix_inputs(np.ones((3, FEATURES), dtype=np.float32), WINDOW)
    assert exported.input["readings"].shape == (1, WINDOW, FEATURES)
    np.testing.assert_allclose(
        exported.predict(inputs, batch_size=1, verbose=0),
        model.predict(inputs, verbose=0),
        atol=1e-5,
    )


def test_bidirectional_export_rejected():
    config = ModelConfig(units=4, layers=1, bidirectional=True, head_units=0)
    model = build_rul_model(config, FEATURES, WINDOW, CAP)
    with pytest.raises(ConfigError, match="bidirectional"):
        build_window_export_model(model, config, WINDOW, CAP)


def test_model_saves_and_loads(tmp_path):
    model, _ = build_model()
    model.compile(loss=ScaledMeanSquaredError(CAP))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.loss.scale == CAP
