"""RUL model: a masked recurrent stack over a window of sensor readings, then a dense head.

Inputs are ``readings`` ``(batch_size, window_length, features)`` and the boolean
``padding_mask`` ``(batch_size, window_length)`` (True on real readings, padding on the
right). The recurrent stack returns its output at the last real reading, so a short,
padded window gives the same RUL as its real readings alone. The output ``rul`` is in
cycles: the last dense layer predicts RUL as a fraction of the cap and a fixed
rescaling multiplies it back, which keeps the weights' scale independent of the cap.
With ``model.members`` above 1 the model is an ensemble inside one Keras model: each
member ``k`` has its own stack and head (layers named ``member{k}_recurrent_0``, ...,
``member{k}_rul_fraction``) and reads the same inputs. The mean of their fractions is
rescaled to cycles, so the ensemble saves and exports as one model.
No convolution layer is used, because Keras ``Conv1D`` does not pass masks on.
"""

from __future__ import annotations

import keras

from pipelines.predictive_maintenance.config import ModelConfig
from pipelines.predictive_maintenance.windows import PADDING_MASK, READINGS
from shared.config import TrainConfig
from shared.recurrent import apply_recurrent_stack, build_recurrent_stack
from shared.training import build_optimizer

RUL_OUTPUT = "rul"
MEAN_FRACTION = "rul_fraction_mean"


@keras.saving.register_keras_serializable(package="rnn_pipelines")
class ScaledMeanSquaredError(keras.losses.Loss):
    """Mean squared error of ``y / scale``: the loss of RUL measured in units of the cap."""

    def __init__(self, scale: float = 1.0, name: str = "scaled_mse", **kwargs):
        super().__init__(name=name, **kwargs)
        self.scale = float(scale)

    def call(self, y_true, y_pred):
        y_true = keras.ops.reshape(keras.ops.cast(y_true, y_pred.dtype), keras.ops.shape(y_pred))
        return keras.ops.mean(keras.ops.square((y_pred - y_true) / self.scale), axis=-1)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


def build_head(config: ModelConfig, prefix: str = "") -> list[keras.layers.Layer]:
    """Build one dense head: optional hidden layer and dropout, then a linear unit (RUL / cap)."""
    layers: list[keras.layers.Layer] = []
    if config.head_units:
        layers.append(
            keras.layers.Dense(config.head_units, activation="relu", name=f"{prefix}head_hidden")
        )
        if config.head_dropout:
            layers.append(keras.layers.Dropout(config.head_dropout, name=f"{prefix}head_dropout"))
    layers.append(keras.layers.Dense(1, name=f"{prefix}rul_fraction"))
    return layers


def list_member_prefixes(members: int) -> list[str]:
    """Return the layer-name prefix of each ensemble member: ``[""]`` for a single model."""
    return [""] if members == 1 else [f"member{index}_" for index in range(members)]


def apply_member(config: ModelConfig, prefix: str, readings, padding_mask):
    """Build one member's recurrent stack and head and return its RUL fraction."""
    layers = build_recurrent_stack(config, name=f"{prefix}recurrent")
    hidden = apply_recurrent_stack(layers, readings, mask=padding_mask)
    for layer in build_head(config, prefix):
        hidden = layer(hidden)
    return hidden


def build_rul_model(
    config: ModelConfig,
    num_features: int,
    window_length: int,
    rul_cap: float,
    batch_size: int | None = None,
) -> keras.Model:
    """Build the window model (uncompiled).

    Args:
        config: recurrent stack and head sizes.
        num_features: sensors per reading.
        window_length: readings per window.
        rul_cap: the target cap, used to rescale the output to cycles.
        batch_size: fixed batch size (1 for TFLite export) or None.

    Returns:
        A functional model ``{"readings", "padding_mask"} -> rul`` of shape ``(batch_size, 1)``.
    """
    readings = keras.Input((window_length, num_features), batch_size=batch_size, name=READINGS)
    padding_mask = keras.Input(
        (window_length,), batch_size=batch_size, dtype="bool", name=PADDING_MASK
    )
    fractions = [
        apply_member(config, prefix, readings, padding_mask)
        for prefix in list_member_prefixes(config.members)
    ]
    fraction = fractions[0]
    if len(fractions) > 1:
        fraction = keras.layers.Average(name=MEAN_FRACTION)(fractions)
    rul = keras.layers.Rescaling(rul_cap, name=RUL_OUTPUT)(fraction)
    return keras.Model(
        {READINGS: readings, PADDING_MASK: padding_mask}, rul, name="rul_window_model"
    )


def compile_rul_model(
    model: keras.Model, config: TrainConfig, rul_cap: float, total_steps: int | None
) -> None:
    """Compile with the configured optimizer, the cap-scaled MSE loss and RMSE in cycles."""
    model.compile(
        optimizer=build_optimizer(config, total_steps),
        loss=ScaledMeanSquaredError(rul_cap),
        metrics=[keras.metrics.RootMeanSquaredError(name="rmse")],
    )
