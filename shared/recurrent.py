"""Recurrent blocks: one factory for SimpleRNN, LSTM and GRU stacks, optionally bidirectional.

Every pipeline builds its recurrent part through `build_recurrent_stack` from a
`RecurrentConfig`, so switching the cell type, depth or direction is a config change.
Masks flow through the stack: pass the boolean padding mask ``(batch_size, timesteps)``
to `apply_recurrent_stack`, or let an ``Embedding(mask_zero=True)`` produce it.
"""

from __future__ import annotations

import keras

from shared.config import RecurrentConfig

_LAYER_CLASSES = {
    "simple_rnn": keras.layers.SimpleRNN,
    "lstm": keras.layers.LSTM,
    "gru": keras.layers.GRU,
}
_CELL_CLASSES = {
    "simple_rnn": keras.layers.SimpleRNNCell,
    "lstm": keras.layers.LSTMCell,
    "gru": keras.layers.GRUCell,
}


def state_size(cell: str) -> int:
    """Return how many state tensors the cell carries: 2 for LSTM (h, c), else 1."""
    return 2 if cell == "lstm" else 1


def build_recurrent_layer(
    config: RecurrentConfig,
    *,
    units: int | None = None,
    return_sequences: bool = False,
    return_state: bool = False,
    name: str | None = None,
) -> keras.layers.Layer:
    """Build one recurrent layer of ``config.cell``, wrapped in Bidirectional if configured.

    Args:
        config: cell type, units, direction, dropout and initializers.
        units: overrides ``config.units`` (a bidirectional layer outputs twice this).
        return_sequences: output every step ``(batch_size, timesteps, units)`` instead of
            the last real step ``(batch_size, units)``.
        return_state: also return the final state tensors.
        name: layer name.
    """
    layer_class = _LAYER_CLASSES[config.cell]
    layer = layer_class(
        units or config.units,
        return_sequences=return_sequences,
        return_state=return_state,
        dropout=config.dropout,
        recurrent_dropout=config.recurrent_dropout,
        kernel_initializer=config.kernel_initializer,
        recurrent_initializer=config.recurrent_initializer,
        name=None if config.bidirectional else name,
    )
    if config.bidirectional:
        return keras.layers.Bidirectional(layer, name=name)
    return layer


def build_recurrent_stack(
    config: RecurrentConfig,
    *,
    return_sequences: bool = False,
    name: str = "recurrent",
) -> list[keras.layers.Layer]:
    """Build ``config.layers`` recurrent layers; all but the last return sequences.

    Returns:
        The layers in order, named ``{name}_0``, ``{name}_1``, ...; apply them with
        `apply_recurrent_stack` so that the mask reaches every layer.
    """
    layers = []
    for index in range(config.layers):
        is_last = index == config.layers - 1
        layers.append(
            build_recurrent_layer(
                config,
                return_sequences=return_sequences or not is_last,
                name=f"{name}_{index}",
            )
        )
    return layers


def apply_recurrent_stack(layers: list[keras.layers.Layer], inputs, mask=None, training=None):
    """Run ``inputs`` ``(batch_size, timesteps, features)`` through the stack with ``mask``."""
    outputs = inputs
    for layer in layers:
        outputs = layer(outputs, mask=mask, training=training)
    return outputs


def build_cell(config: RecurrentConfig, *, units: int | None = None, name: str | None = None) -> keras.layers.Layer:
    """Build a single recurrent cell (``SimpleRNNCell``, ``LSTMCell`` or ``GRUCell``)."""
    return _CELL_CLASSES[config.cell](
        units or config.units,
        kernel_initializer=config.kernel_initializer,
        recurrent_initializer=config.recurrent_initializer,
        name=name,
    )
