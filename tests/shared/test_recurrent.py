"""Tests for the recurrent-stack factory: cell switching, depth, direction and settings."""

import keras
import numpy as np
import pytest

from shared.config import RecurrentConfig
from shared.recurrent import apply_recurrent_stack, build_cell, build_recurrent_stack, state_size


@pytest.mark.parametrize(
    ("cell", "layer_class"),
    [("simple_rnn", keras.layers.SimpleRNN), ("lstm", keras.layers.LSTM), ("gru", keras.layers.GRU)],
)
def test_cell_type_selects_layer(cell, layer_class):
    (layer,) = build_recurrent_stack(RecurrentConfig(cell=cell, units=3))
    assert isinstance(layer, layer_class)


def test_bidirectional_wraps_and_doubles_width():
    layers = build_recurrent_stack(RecurrentConfig(cell="gru", units=3, bidirectional=True))
    outputs = apply_recurrent_stack(layers, np.zeros((2, 5, 4), np.float32))
    assert isinstance(layers[0], keras.layers.Bidirectional)
    assert outputs.shape == (2, 6)


def test_inner_layers_return_sequences():
    layers = build_recurrent_stack(RecurrentConfig(units=3, layers=3))
    assert [layer.return_sequences for layer in layers] == [True, True, False]
    assert [layer.name for layer in layers] == ["recurrent_0", "recurrent_1", "recurrent_2"]


def test_return_sequences_on_last_layer():
    layers = build_recurrent_stack(RecurrentConfig(units=3, layers=2), return_sequences=True)
    outputs = apply_recurrent_stack(layers, np.zeros((2, 5, 4), np.float32))
    assert outputs.shape == (2, 5, 3)


def test_config_reaches_layer():
    config = RecurrentConfig(cell="lstm", units=7, dropout=0.25, recurrent_dropout=0.1,
                             kernel_initializer="he_normal", recurrent_initializer="glorot_normal")
    (layer,) = build_recurrent_stack(config)
    assert layer.units == 7
    assert layer.dropout == 0.25
    assert layer.recurrent_dropout == 0.1
    assert isinstance(layer.cell.kernel_initializer, keras.initializers.HeNormal)
    assert isinstance(layer.cell.recurrent_initializer, keras.initializers.GlorotNormal)


def test_lstm_parameter_count_hand_computed():
    # An LSTM has 4 gates, each with input, recurrent and bias weights: 4 * (units * (features + units) + units).
    (layer,) = build_recurrent_stack(RecurrentConfig(cell="lstm", units=5))
    layer.build((None, None, 3))
    assert layer.count_params() == 4 * (5 * (3 + 5) + 5)


def test_build_cell_matches_layer_cell():
    cell = build_cell(RecurrentConfig(cell="gru", units=4))
    assert isinstance(cell, keras.layers.GRUCell)
    assert state_size("lstm") == 2
    assert state_size("gru") == 1
