"""Attention encoder-decoder: the teacher-forced training model, its encoder and one-step decoder.

Conventions:

* The training model takes ``{"source_ids", "target_input_ids"}`` (int32, right-padded with
  ``PAD_ID = 0``) and returns logits ``(batch_size, target_steps, target_vocab_size)``.
* Attention follows the decoder RNN (Luong placement): during training the scores of all
  decoder steps are computed at once. The score is ``multiplicative`` (Luong's "general",
  ``h W s``) or ``additive`` (Bahdanau's ``v tanh(W h + U s)``).
* The source mask is boolean in the Keras graph and float (1.0 real, 0.0 padding) at the
  inputs and outputs of the inference models, because TFLite signatures carry numbers.
* The inference models reuse the training model's layers, so they share its weights. The
  encoder maps ``source_ids`` to ``encoder_outputs``, ``source_mask`` and the initial
  decoder state. The step model maps ``previous_token``, the state, ``encoder_outputs``
  and ``source_mask`` to ``logits``, the new state and ``attention_weights``.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from pipelines.translation.config import TranslationModelConfig
from shared.padding import PAD_ID, MaskedSparseCategoricalCrossentropy, MaskedTokenAccuracy
from shared.recurrent import (
    apply_recurrent_stack,
    build_recurrent_layer,
    build_recurrent_stack,
    state_size,
)

# Added to the scores of padded source steps; large enough that softmax gives them zero weight.
MASKED_SCORE = -1e9


@keras.saving.register_keras_serializable(package="rnn_pipelines")
class PaddingMask(keras.layers.Layer):
    """Boolean mask of real tokens: True where the id differs from PAD_ID."""

    def call(self, token_ids):
        return keras.ops.not_equal(token_ids, PAD_ID)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="rnn_pipelines")
class SourceAttention(keras.layers.Layer):
    """Attention of decoder states over encoder outputs, ignoring padded source steps.

    Call with ``query`` ``(batch_size, target_steps, query_dim)``, ``memory``
    ``(batch_size, source_steps, memory_dim)`` and ``memory_mask`` ``(batch_size,
    source_steps)`` (bool or float, nonzero on real steps). Returns ``(context, weights)``:
    ``(batch_size, target_steps, memory_dim)`` and ``(batch_size, target_steps, source_steps)``.
    """

    def __init__(self, score: str = "multiplicative", units: int = 128, **kwargs):
        super().__init__(**kwargs)
        self.score = score
        self.units = units
        # The query's padding mask is consumed here; the loss masks padded target steps itself.
        self.supports_masking = True

    def compute_mask(self, inputs, previous_mask=None):
        return None

    def build(self, query_shape, memory_shape, memory_mask_shape=None):
        query_dim, memory_dim = query_shape[-1], memory_shape[-1]
        if self.score == "multiplicative":
            self.memory_kernel = self.add_weight(
                name="memory_kernel", shape=(memory_dim, query_dim), initializer="glorot_uniform"
            )
        else:
            self.query_kernel = self.add_weight(
                name="query_kernel", shape=(query_dim, self.units), initializer="glorot_uniform"
            )
            self.memory_kernel = self.add_weight(
                name="memory_kernel", shape=(memory_dim, self.units), initializer="glorot_uniform"
            )
            self.score_vector = self.add_weight(
                name="score_vector", shape=(self.units,), initializer="glorot_uniform"
            )

    def compute_scores(self, query, memory):
        """Return unmasked scores ``(batch_size, target_steps, source_steps)``."""
        keys = keras.ops.matmul(memory, self.memory_kernel)
        if self.score == "multiplicative":
            return keras.ops.matmul(query, keras.ops.transpose(keys, (0, 2, 1)))
        queries = keras.ops.matmul(query, self.query_kernel)
        hidden = keras.ops.tanh(keras.ops.expand_dims(queries, 2) + keras.ops.expand_dims(keys, 1))
        return keras.ops.sum(hidden * self.score_vector, axis=-1)

    def call(self, query, memory, memory_mask):
        scores = self.compute_scores(query, memory)
        is_real = keras.ops.expand_dims(keras.ops.cast(memory_mask, "bool"), 1)
        scores = keras.ops.where(is_real, scores, keras.ops.cast(MASKED_SCORE, scores.dtype))
        weights = keras.ops.softmax(scores, axis=-1)
        return keras.ops.matmul(weights, memory), weights

    def compute_output_shape(self, query_shape, memory_shape, memory_mask_shape=None):
        return (*query_shape[:-1], memory_shape[-1]), (*query_shape[:-1], memory_shape[1])

    def get_config(self):
        return {**super().get_config(), "score": self.score, "units": self.units}


def decoder_config(config: TranslationModelConfig) -> TranslationModelConfig:
    """Return the recurrent config of the decoder: same cell, one direction, one layer."""
    return dataclasses.replace(config, units=config.decoder_units, bidirectional=False, layers=1)


def build_encoder(config: TranslationModelConfig, source_ids, source_mask, source_vocab_size: int):
    """Embed and encode the source; return ``(encoder_outputs, initial_state)`` symbolic tensors."""
    embedded = keras.layers.Embedding(
        source_vocab_size, config.embedding_dim, mask_zero=True, name="source_embedding"
    )(source_ids)
    embedded = keras.layers.Dropout(config.embedding_dropout, name="source_embedding_dropout")(
        embedded
    )
    encoder_layers = build_recurrent_stack(config, return_sequences=True, name="encoder")
    encoder_outputs = apply_recurrent_stack(encoder_layers, embedded, mask=source_mask)
    pooled = keras.layers.GlobalAveragePooling1D(name="encoder_pooling")(
        encoder_outputs, mask=source_mask
    )
    initial_state = [
        keras.layers.Dense(config.decoder_units, activation="tanh", name=f"bridge_{index}")(pooled)
        for index in range(state_size(config.cell))
    ]
    return encoder_outputs, initial_state


def build_output_head(
    config: TranslationModelConfig, target_vocab_size: int, output_bias: np.ndarray | None = None
) -> list[keras.layers.Layer]:
    """Build attention, the attentional hidden layer, its dropout and the vocabulary projection."""
    bias_initializer = "zeros" if output_bias is None else keras.initializers.Constant(output_bias)
    return [
        SourceAttention(config.attention, config.attention_units, name="attention"),
        keras.layers.Dense(config.attention_units, activation="tanh", name="attentional_hidden"),
        keras.layers.Dropout(config.output_dropout, name="output_dropout"),
        keras.layers.Dense(target_vocab_size, bias_initializer=bias_initializer, name="logits"),
    ]


def apply_output_head(
    head: list[keras.layers.Layer], decoder_outputs, encoder_outputs, source_mask
):
    """Attend over the source and project to logits; return ``(logits, attention_weights)``."""
    attention, hidden_layer, dropout, projection = head
    context, weights = attention(decoder_outputs, encoder_outputs, source_mask)
    hidden = hidden_layer(keras.ops.concatenate([decoder_outputs, context], axis=-1))
    return projection(dropout(hidden)), weights


def build_training_model(
    config: TranslationModelConfig,
    source_vocab_size: int,
    target_vocab_size: int,
    output_bias: np.ndarray | None = None,
) -> keras.Model:
    """Build the teacher-forced training model (uncompiled).

    Args:
        config: model section of the config.
        source_vocab_size: source tokenizer size.
        target_vocab_size: target tokenizer size (the logits width).
        output_bias: initial bias of the logits, usually the log frequency of each target
            token. Starting from the unigram distribution spares the recurrent layers from
            learning it first, which otherwise saturates them into a constant state.

    Returns:
        A functional model ``{"source_ids", "target_input_ids"} -> logits``.
    """
    source_ids = keras.Input(shape=(None,), dtype="int32", name="source_ids")
    target_input_ids = keras.Input(shape=(None,), dtype="int32", name="target_input_ids")
    source_mask = PaddingMask(name="source_mask")(source_ids)
    target_mask = PaddingMask(name="target_mask")(target_input_ids)
    encoder_outputs, initial_state = build_encoder(
        config, source_ids, source_mask, source_vocab_size
    )
    embedded = keras.layers.Embedding(
        target_vocab_size, config.embedding_dim, mask_zero=True, name="target_embedding"
    )(target_input_ids)
    embedded = keras.layers.Dropout(config.embedding_dropout, name="target_embedding_dropout")(
        embedded
    )
    decoder_rnn = build_recurrent_layer(
        decoder_config(config), return_sequences=True, name="decoder_rnn"
    )
    decoder_outputs = decoder_rnn(embedded, initial_state=initial_state, mask=target_mask)
    logits, _ = apply_output_head(
        build_output_head(config, target_vocab_size, output_bias),
        decoder_outputs,
        encoder_outputs,
        source_mask,
    )
    return keras.Model(
        {"source_ids": source_ids, "target_input_ids": target_input_ids}, logits, name="translator"
    )


def compile_model(
    model: keras.Model, config: TranslationModelConfig, optimizer: keras.optimizers.Optimizer
) -> None:
    """Compile with the masked, label-smoothed token loss and masked token accuracy."""
    model.compile(
        optimizer=optimizer,
        loss=MaskedSparseCategoricalCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing
        ),
        metrics=[MaskedTokenAccuracy()],
    )


@dataclasses.dataclass(frozen=True)
class InferenceModels:
    """The encoder and the one-step decoder sharing a trained model's weights."""

    encoder: keras.Model
    step: keras.Model
    state_names: tuple[str, ...]
    target_vocab_size: int


def state_names(cell: str) -> tuple[str, ...]:
    """Return the decoder state names: ``state_h`` and, for LSTM, ``state_c``."""
    return ("state_h", "state_c")[: state_size(cell)]


def build_encoder_model(
    model: keras.Model,
    config: TranslationModelConfig,
    max_length: int | None = None,
    batch_size: int | None = None,
) -> keras.Model:
    """Build ``source_ids -> {encoder_outputs, source_mask, state_h[, state_c]}`` from ``model``."""
    source_ids = keras.Input(
        shape=(max_length,), batch_size=batch_size, dtype="int32", name="source_ids"
    )
    source_mask = model.get_layer("source_mask")(source_ids)
    embedded = model.get_layer("source_embedding")(source_ids)
    encoder_layers = [model.get_layer(f"encoder_{index}") for index in range(config.layers)]
    encoder_outputs = apply_recurrent_stack(
        encoder_layers, embedded, mask=source_mask, training=False
    )
    pooled = model.get_layer("encoder_pooling")(encoder_outputs, mask=source_mask)
    outputs = {
        "encoder_outputs": encoder_outputs,
        "source_mask": keras.ops.cast(source_mask, "float32"),
    }
    for index, name in enumerate(state_names(config.cell)):
        outputs[name] = model.get_layer(f"bridge_{index}")(pooled)
    return keras.Model({"source_ids": source_ids}, outputs, name="encoder")


def build_step_model(
    model: keras.Model,
    config: TranslationModelConfig,
    max_length: int | None = None,
    batch_size: int | None = None,
) -> keras.Model:
    """Build the one-step decoder from ``model``'s layers (named inputs, dict outputs)."""
    memory_dim = model.get_layer(f"encoder_{config.layers - 1}").output.shape[-1]
    previous_token = keras.Input(
        shape=(1,), batch_size=batch_size, dtype="int32", name="previous_token"
    )
    states = [
        keras.Input(shape=(config.decoder_units,), batch_size=batch_size, name=name)
        for name in state_names(config.cell)
    ]
    encoder_outputs = keras.Input(
        shape=(max_length, memory_dim), batch_size=batch_size, name="encoder_outputs"
    )
    source_mask = keras.Input(shape=(max_length,), batch_size=batch_size, name="source_mask")
    embedded = model.get_layer("target_embedding")(previous_token)[:, 0, :]
    cell = model.get_layer("decoder_rnn").cell
    output, new_states = cell(embedded, states if len(states) > 1 else states[0], training=False)
    new_states = list(new_states) if isinstance(new_states, (list, tuple)) else [new_states]
    head = [
        model.get_layer(name)
        for name in ("attention", "attentional_hidden", "output_dropout", "logits")
    ]
    logits, weights = apply_output_head(
        head, keras.ops.expand_dims(output, 1), encoder_outputs, source_mask
    )
    outputs = {"logits": logits[:, 0, :], "attention_weights": weights[:, 0, :]}
    outputs.update(dict(zip(state_names(config.cell), new_states, strict=True)))
    inputs = {
        "previous_token": previous_token,
        "encoder_outputs": encoder_outputs,
        "source_mask": source_mask,
    }
    inputs.update(dict(zip(state_names(config.cell), states, strict=True)))
    return keras.Model(inputs, outputs, name="decoder_step")


def build_edge_model(model: keras.Model, config: TranslationModelConfig, max_length: int) -> keras.Model:
    """Build a batch-1 model that encodes ``source_ids`` and runs the first decoder step.

    Tuning's edge objective converts this model to measure a trial. Its TFLite file contains
    every weight of the exported encoder and decoder step, and one call costs the encoder
    plus one step. Each further target token adds one step.
    """
    encoder = build_encoder_model(model, config, max_length, 1)
    step = build_step_model(model, config, max_length, 1)
    source_ids = keras.Input(shape=(max_length,), batch_size=1, dtype="int32", name="source_ids")
    previous_token = keras.Input(shape=(1,), batch_size=1, dtype="int32", name="previous_token")
    encoded = encoder({"source_ids": source_ids})
    step_outputs = step({"previous_token": previous_token, **encoded})
    return keras.Model(
        {"source_ids": source_ids, "previous_token": previous_token},
        {"logits": step_outputs["logits"]},
        name="edge_translation",
    )


def build_inference_models(model: keras.Model, config: TranslationModelConfig) -> InferenceModels:
    """Build the dynamic-shape encoder and step models used by greedy and beam search."""
    return InferenceModels(
        encoder=build_encoder_model(model, config),
        step=build_step_model(model, config),
        state_names=state_names(config.cell),
        target_vocab_size=int(model.get_layer("logits").units),
    )


def load_training_model(path) -> keras.Model:
    """Load a saved training model (custom layers are registered by importing this module)."""
    return keras.saving.load_model(path, compile=False)
