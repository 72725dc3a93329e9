"""One-step streaming models that share the weights of a trained recurrent stack.

A step model processes one time step per call and carries the recurrent state as
explicit inputs and outputs, so a phone app can feed a sensor stream step by step:

- Inputs: ``"inputs"`` of shape ``(1, input_features)`` (one step, batch size 1), and
  for each recurrent layer ``i`` the state ``"state_{i}_h"`` of shape ``(1, units)``,
  plus ``"state_{i}_c"`` for LSTM layers.
- Outputs: ``"outputs"`` (the head applied to the last layer's new ``h``, or ``h``
  itself without a head) and the new states under the same names as the state inputs,
  so a caller loops with ``state = {name: result[name] for name in state_names}``.
- The first call takes zero states (`make_initial_state`), which is also how Keras
  starts each sequence. Feed only real steps: the full model skips masked (padding)
  steps and keeps its state, which is the same as not calling the step model.

The step model calls each trained layer's ``.cell`` directly, so weights are shared
with the full model and never copied. Bidirectional and ``go_backwards`` layers need
the whole sequence before their first output and cannot stream.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from shared import export
from shared.errors import ConfigError

logger = logging.getLogger(__name__)

STEP_INPUT_NAME = "inputs"
STEP_OUTPUT_NAME = "outputs"
STEP_SIGNATURE_KEY = "step"

_STATE_SUFFIXES = {
    keras.layers.LSTMCell: ("h", "c"),
    keras.layers.GRUCell: ("h",),
    keras.layers.SimpleRNNCell: ("h",),
}


def list_layer_state_names(layer_index: int, cell: keras.layers.Layer) -> list[str]:
    """Return the state names of one layer: ``state_{i}_h`` (and ``state_{i}_c`` for LSTM)."""
    return [f"state_{layer_index}_{suffix}" for suffix in _state_suffixes(cell)]


def _state_suffixes(cell: keras.layers.Layer) -> tuple[str, ...]:
    for cell_class, suffixes in _STATE_SUFFIXES.items():
        if isinstance(cell, cell_class):
            return suffixes
    raise ConfigError(
        f"cannot stream a recurrent layer with cell {type(cell).__name__}; "
        "expected SimpleRNNCell, LSTMCell or GRUCell."
    )


class CellStep(keras.layers.Layer):
    """One step of a shared recurrent cell, returning ``(output, flat list of new states)``.

    Each call of a cell in a functional model needs a unique name, but the cells of a
    stack built by layer constructors share default names (``gru_cell``), so every cell
    is wrapped under its layer's name. The wrapper tracks the cell, whose weights stay
    shared with the trained layer.
    """

    def __init__(self, cell: keras.layers.Layer, **kwargs):
        super().__init__(**kwargs)
        self.cell = cell

    def call(self, inputs, states):
        output, new_states = self.cell(inputs, states, training=False)
        return output, keras.tree.flatten(new_states)


def _check_streamable(index: int, layer: keras.layers.Layer) -> None:
    if isinstance(layer, keras.layers.Bidirectional):
        raise ConfigError(
            f"recurrent layer {index} ({layer.name}) is bidirectional, and a bidirectional stack "
            "cannot stream because its backward direction needs the whole sequence. "
            "Set model.bidirectional=false to export a streaming model."
        )
    if not isinstance(layer, keras.layers.RNN):
        raise ConfigError(
            f"layer {index} ({layer.name}) is a {type(layer).__name__}, "
            "not a SimpleRNN, LSTM or GRU layer; "
            "pass the layers returned by shared.recurrent.build_recurrent_stack."
        )
    if layer.go_backwards:
        raise ConfigError(
            f"recurrent layer {index} ({layer.name}) has go_backwards=True and cannot stream; "
            "it reads the sequence from its end."
        )


def build_step_model(
    recurrent_layers: Sequence[keras.layers.Layer],
    *,
    input_features: int,
    head: keras.layers.Layer | Sequence[keras.layers.Layer] | None = None,
    input_layers: Sequence[keras.layers.Layer] = (),
    input_dtype: str = "float32",
    name: str = "step_model",
) -> keras.Model:
    """Build a one-step model from trained unidirectional recurrent layers.

    Args:
        recurrent_layers: the stack from `shared.recurrent.build_recurrent_stack`, in
            order; each layer's cell is reused, so its weights are shared.
        input_features: features per step; the step input has shape ``(1, input_features)``.
        head: layer or layers applied, in order, to the last layer's output ``h``
            (e.g. the trained ``Dense`` output layer).
        input_layers: trained layers applied to the step input before the stack, e.g.
            ``[embedding, keras.layers.Reshape((embedding_dim,))]`` for a step input of
            one token id with ``input_features=1`` and ``input_dtype="int32"``.
        input_dtype: dtype of the step input.
        name: model name.

    Returns:
        A Keras model with dict inputs ``{"inputs", "state_0_h", ...}`` and dict outputs
        ``{"outputs", "state_0_h", ...}``, batch size 1.

    Raises:
        ConfigError: a layer is bidirectional, runs backwards or is not a SimpleRNN,
            LSTM or GRU layer, or no layer is given.
    """
    if not recurrent_layers:
        raise ConfigError(
            "build_step_model got no recurrent layers; pass the stack from build_recurrent_stack."
        )
    for index, layer in enumerate(recurrent_layers):
        _check_streamable(index, layer)

    step_input = keras.Input(
        (input_features,), batch_size=1, dtype=input_dtype, name=STEP_INPUT_NAME
    )
    inputs = {STEP_INPUT_NAME: step_input}
    outputs = {}
    hidden = step_input
    for layer in input_layers:
        hidden = layer(hidden)
    for index, layer in enumerate(recurrent_layers):
        names = list_layer_state_names(index, layer.cell)
        states = [
            keras.Input((layer.cell.units,), batch_size=1, name=state_name) for state_name in names
        ]
        inputs.update(zip(names, states, strict=True))
        hidden, new_states = CellStep(layer.cell, name=f"{layer.name}_step")(hidden, states)
        outputs.update(zip(names, keras.tree.flatten(new_states), strict=True))
    for layer in _as_list(head):
        hidden = layer(hidden)
    return keras.Model(inputs, {STEP_OUTPUT_NAME: hidden, **outputs}, name=name)


def apply_stack_unrolled(recurrent_layers: Sequence[keras.layers.Layer], sequence, padding_mask):
    """Run trained unidirectional layers over a fixed-length window as a static loop of cell steps.

    The graph has no ``While`` op: each time step calls the cells once. On a padding step
    every layer keeps its state and output (``where(mask, new, old)``), as a masked
    Keras layer does, so the result is the last layer's output at the last real step.
    Full-int8 TFLite conversion, which crashes on a Keras recurrent layer in loop form,
    quantizes these cell steps.

    Args:
        recurrent_layers: the trained stack, in order.
        sequence: Keras tensor ``(batch_size, timesteps, features)`` with static sizes.
        padding_mask: boolean Keras tensor ``(batch_size, timesteps)``, True on real steps.

    Raises:
        ConfigError: a layer cannot stream (see `build_step_model`).
    """
    steps = [sequence[:, t, :] for t in range(sequence.shape[1])]
    step_mask = [padding_mask[:, t : t + 1] for t in range(sequence.shape[1])]
    zero = keras.ops.zeros_like(sequence[:, 0, :1])  # (batch_size, 1), a tensor of the graph.
    for index, layer in enumerate(recurrent_layers):
        _check_streamable(index, layer)
        step = CellStep(layer.cell, name=f"{layer.name}_unrolled")
        states = [zero + keras.ops.zeros((1, layer.cell.units)) for _ in _state_suffixes(layer.cell)]
        output = states[0]
        outputs = []
        for inputs, real in zip(steps, step_mask, strict=True):
            new_output, new_states = step(inputs, states)
            states = [keras.ops.where(real, new, old) for new, old in zip(new_states, states, strict=True)]
            output = keras.ops.where(real, new_output, output)
            outputs.append(output)
        steps = outputs
    return steps[-1]


def _as_list(
    layers: keras.layers.Layer | Sequence[keras.layers.Layer] | None,
) -> list[keras.layers.Layer]:
    if layers is None:
        return []
    if isinstance(layers, keras.layers.Layer):
        return [layers]
    return list(layers)


def list_state_names(step_model: keras.Model) -> list[str]:
    """Return the state input names of a step model, in layer order."""
    return [name for name in step_model.input if name != STEP_INPUT_NAME]


def make_initial_state(step_model: keras.Model) -> dict[str, np.ndarray]:
    """Return zero states, one ``(1, units)`` float32 array per state name."""
    return {
        name: np.zeros(tuple(step_model.input[name].shape), dtype="float32")
        for name in list_state_names(step_model)
    }


def stream_sequence(step_model: keras.Model, sequence: np.ndarray) -> tuple[list[dict], list[dict]]:
    """Feed ``sequence`` ``(timesteps, input_features)`` one step at a time from zero state.

    Returns:
        ``(feeds, results)``: per step, the inputs fed (step input and states) and the
        outputs (name to ``(1, ...)`` array). ``results[-1]["outputs"]`` corresponds to
        the full model's output on the whole sequence.
    """
    state = make_initial_state(step_model)
    feeds, results = [], []
    for step in np.asarray(sequence):
        feed = {STEP_INPUT_NAME: step[np.newaxis], **state}
        result = {
            name: np.asarray(value) for name, value in step_model(feed, training=False).items()
        }
        feeds.append(feed)
        results.append(result)
        state = {name: result[name] for name in state}
    return feeds, results


def make_step_examples(
    step_model: keras.Model, sequences: np.ndarray, max_examples: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Collect step inputs and Keras step outputs by streaming each sequence from zero state.

    Steps are taken evenly across all sequences and steps (not only the first steps,
    whose states are near zero), so they suit int8 calibration and parity checks.

    Args:
        step_model: from `build_step_model`.
        sequences: ``(n, timesteps, input_features)`` real steps (no padding).
        max_examples: at most this many step examples are returned.

    Returns:
        ``(inputs, outputs)``: name to stacked arrays ``(examples, ...)``, in the layout
        that `shared.export.export_tflite_variants` takes.
    """
    feeds, results = [], []
    for sequence in sequences:
        sequence_feeds, sequence_results = stream_sequence(step_model, sequence)
        feeds.extend(sequence_feeds)
        results.extend(sequence_results)
    chosen = np.unique(
        np.linspace(0, len(feeds) - 1, num=min(max_examples, len(feeds))).round().astype(int)
    )
    inputs = {name: np.concatenate([feeds[i][name] for i in chosen]) for name in feeds[0]}
    outputs = {name: np.concatenate([results[i][name] for i in chosen]) for name in results[0]}
    return inputs, outputs


def export_step_model(
    step_model: keras.Model, export_dir: str | Path, signature_key: str = STEP_SIGNATURE_KEY
) -> Path:
    """Write ``step_model`` as a SavedModel whose ``signature_key`` signature keeps its names.

    Convert it with `shared.export.export_tflite_variants` (or `convert_saved_model`),
    and the state input and output names survive into the TFLite signature.
    """
    endpoint = export.make_model_endpoint(step_model)
    return export.export_saved_model(export_dir, {signature_key: endpoint}, [step_model])
