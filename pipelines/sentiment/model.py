"""Recurrent text classifier: embedding, recurrent stack, masked pooling over time, softmax.

The model takes ``token_ids`` ``(batch_size, timesteps)`` padded on the right with
``PAD_ID = 0`` and returns class probabilities ``(batch_size, num_classes)``. The padding
mask (True on real tokens) is computed from the ids and passed to every recurrent layer
and to the pooling, so a text gives the same probabilities alone and inside a padded batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import keras
import numpy as np

from pipelines.sentiment.config import ModelConfig
from shared.padding import PAD_ID, pad_token_ids
from shared.recurrent import apply_recurrent_stack, build_recurrent_stack

logger = logging.getLogger(__name__)

# Added to the scores of padding steps before the softmax, so they get (near) zero weight.
MASKED_SCORE = -1e9
WIDTH_MULTIPLE = 32


@keras.saving.register_keras_serializable(package="sentiment")
class MaskedAttentionPooling(keras.layers.Layer):
    """Weighted mean over real steps, with weights from a one-hidden-layer scorer.

    ``score_t = v . tanh(W h_t + b)``; padding steps get ``MASKED_SCORE`` before the softmax
    over time. Input ``(batch_size, timesteps, features)`` and a boolean ``padding_mask``
    ``(batch_size, timesteps)``; output ``(batch_size, features)``.
    """

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.supports_masking = True  # The mask arrives as ``padding_mask``; the output has no time axis.
        self.hidden = keras.layers.Dense(units, activation="tanh", name="score_hidden")
        self.score = keras.layers.Dense(1, use_bias=False, name="score")

    def build(self, input_shape):
        self.hidden.build(input_shape)
        self.score.build((*input_shape[:-1], self.units))
        self.built = True

    def call(self, sequences, padding_mask):
        scores = keras.ops.squeeze(self.score(self.hidden(sequences)), axis=-1)
        scores = keras.ops.where(padding_mask, scores, keras.ops.full_like(scores, MASKED_SCORE))
        weights = keras.ops.softmax(scores, axis=-1)
        weights = weights * keras.ops.cast(padding_mask, weights.dtype)
        return keras.ops.einsum("bt,btf->bf", weights, sequences)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="sentiment")
class MaskedMaxPooling(keras.layers.Layer):
    """Largest value of each feature over the real steps.

    Padding steps take the first step's values, which are real because padding is on the
    right and no row is all padding. So they never raise the maximum. Every value also
    stays in the range of the real ones, so full-int8 quantization gets a tight scale,
    which a -1e9 fill would spoil. Input ``(batch_size, timesteps, features)`` and a boolean
    ``padding_mask`` ``(batch_size, timesteps)``; output ``(batch_size, features)``.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True  # The mask arrives as ``padding_mask``, and the output has no time axis.

    def call(self, sequences, padding_mask):
        first = keras.ops.broadcast_to(sequences[:, :1, :], keras.ops.shape(sequences))
        filled = keras.ops.where(keras.ops.expand_dims(padding_mask, -1), sequences, first)
        return keras.ops.max(filled, axis=1)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


def build_classifier(
    config: ModelConfig,
    vocab_size: int,
    num_classes: int,
    *,
    timesteps: int | None = None,
    batch_size: int | None = None,
    name: str = "sentiment_classifier",
) -> keras.Model:
    """Build the uncompiled classifier from ``token_ids`` to ``probabilities``.

    Args:
        config: model section of the config.
        vocab_size: tokenizer vocabulary size (id 0 is padding).
        num_classes: number of labels (2 or more).
        timesteps: fixed input length, or None for any length.
        batch_size: fixed batch size, or None.
        name: the model's name; ensemble members are ``member_<k>``.

    Returns:
        A functional model with layers named ``embedding``, ``recurrent_<i>``,
        ``attention_pooling`` or ``max_pooling`` (with that pooling) and ``probabilities``.
    """
    token_ids = keras.Input((timesteps,), batch_size=batch_size, dtype="int32", name="token_ids")
    padding_mask = keras.ops.not_equal(token_ids, PAD_ID)
    embedded = keras.layers.Embedding(vocab_size, config.embedding_dim, name="embedding")(token_ids)
    embedded = keras.layers.SpatialDropout1D(config.embedding_dropout, name="embedding_dropout")(embedded)
    sequences = config.pooling != "last_state"
    layers = build_recurrent_stack(config, return_sequences=sequences, name="recurrent")
    encoded = apply_recurrent_stack(layers, embedded, mask=padding_mask)
    if config.pooling == "attention":
        encoded = MaskedAttentionPooling(config.attention_units, name="attention_pooling")(encoded, padding_mask)
    elif config.pooling == "max":
        encoded = MaskedMaxPooling(name="max_pooling")(encoded, padding_mask)
    encoded = keras.layers.Dropout(config.head_dropout, name="head_dropout")(encoded)
    probabilities = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(encoded)
    return keras.Model(token_ids, probabilities, name=name)


def build_ensemble(
    configs: Sequence[ModelConfig],
    members: Sequence[keras.Model],
    vocab_size: int,
    num_classes: int,
    *,
    timesteps: int | None = None,
    batch_size: int | None = None,
) -> keras.Model:
    """Join trained classifiers, built from ``configs`` in order, into one averaging model.

    Each member becomes a nested model ``member_<k>`` (built by `build_classifier`) holding
    a copy of its weights, so `list_members` finds them again in the saved model.
    """
    token_ids = keras.Input((timesteps,), batch_size=batch_size, dtype="int32", name="token_ids")
    outputs = []
    for index, (config, trained) in enumerate(zip(configs, members, strict=True)):
        member = build_classifier(config, vocab_size, num_classes, timesteps=timesteps, batch_size=batch_size,
                                  name=f"member_{index}")
        member.set_weights(trained.get_weights())
        outputs.append(member(token_ids))
    probabilities = keras.layers.Average(name="probabilities")(outputs)
    return keras.Model(token_ids, probabilities, name="sentiment_ensemble")


def list_members(model: keras.Model) -> list[keras.Model]:
    """Return the member classifiers of an ensemble, or ``[model]`` for a single classifier."""
    return [layer for layer in model.layers if isinstance(layer, keras.Model)] or [model]


def compile_classifier(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> keras.Model:
    """Compile with sparse categorical cross-entropy and accuracy; return the model."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def compute_probabilities(model: keras.Model, token_ids: Sequence[Sequence[int]], batch_size: int = 128) -> np.ndarray:
    """Return ``(n, num_classes)`` probabilities, batching texts of similar length together.

    Sorting by length keeps padding low, and widths rounded up to a multiple of
    ``WIDTH_MULTIPLE`` keep the number of traced shapes small. The mask makes the result
    independent of the padding.
    """
    order = np.argsort([len(ids) for ids in token_ids], kind="stable")
    probabilities = None
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        width = -(-max(len(token_ids[i]) for i in chosen) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
        padded, _ = pad_token_ids([token_ids[i] for i in chosen], max_length=width)
        batch = np.asarray(model.predict_on_batch(padded))
        if probabilities is None:
            probabilities = np.zeros((len(order), batch.shape[-1]), dtype=np.float32)
        probabilities[chosen] = batch
    return probabilities


def copy_matching_weights(source: keras.Model, target: keras.Model) -> list[str]:
    """Copy the weights of every ``source`` layer whose name and weight shapes match in ``target``.

    Returns:
        The names of the target layers with weights that were not copied.
    """
    skipped = []
    source_layers = {layer.name: layer for layer in source.layers}
    for layer in target.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        match = source_layers.get(layer.name)
        source_weights = match.get_weights() if match is not None else []
        if [w.shape for w in source_weights] != [w.shape for w in weights]:
            skipped.append(layer.name)
            continue
        layer.set_weights(source_weights)
    return skipped
