"""Greedy and batched beam search over the one-step decoder, and sentence-level translation.

Conventions:

* Decoding starts from BOS and ends at EOS. A sentence of ``n`` source tokens (EOS
  included) may produce at most ``ceil(max_output_ratio * n) + max_output_extra`` tokens,
  EOS included; at that limit EOS is forced. The limit is per sentence, so a sentence
  decodes the same alone and inside a padded batch.
* Decoded rows are right-padded with ``PAD_ID`` after EOS; returned token lists exclude EOS.
* Beam search ranks hypotheses by ``log_prob / ((5 + length) / 6) ** length_penalty``
  (the GNMT length penalty; 0 disables it). With one beam it picks the arg-max token at
  every step, so it equals greedy search.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from pipelines.translation.data import Tokenizers, encode_sources
from pipelines.translation.model import InferenceModels
from shared.padding import PAD_ID, pad_token_ids
from shared.text import BOS_ID, EOS_ID

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DecodingLimits:
    """Maximum output length relative to the source length: ``ceil(ratio * n) + extra``."""

    ratio: float = 1.5
    extra: int = 10


def compute_output_limits(source_ids, limits: DecodingLimits):
    """Return the maximum number of output tokens (EOS included) of each row of ``source_ids``."""
    lengths = tf.reduce_sum(tf.cast(tf.not_equal(source_ids, PAD_ID), tf.float32), axis=1)
    return tf.cast(tf.math.ceil(limits.ratio * lengths), tf.int32) + limits.extra


def run_step(models: InferenceModels, previous_token, states, encoded):
    """Run the one-step decoder; return ``(logits, new_states, attention_weights)``."""
    inputs = {
        "previous_token": previous_token,
        "encoder_outputs": encoded["encoder_outputs"],
        "source_mask": encoded["source_mask"],
    }
    inputs.update(zip(models.state_names, states, strict=True))
    outputs = models.step(inputs, training=False)
    return (
        outputs["logits"],
        [outputs[name] for name in models.state_names],
        outputs["attention_weights"],
    )


def encode_source(models: InferenceModels, source_ids) -> dict:
    """Run the encoder; outputs are copied so that no Keras mask rides along into the step model."""
    encoded = models.encoder({"source_ids": source_ids}, training=False)
    return {name: tf.identity(value) for name, value in encoded.items()}


def greedy_decode(models: InferenceModels, source_ids, limits: DecodingLimits):
    """Decode a batch greedily with TensorFlow ops (usable eagerly and inside ``tf.function``).

    Args:
        models: encoder and one-step decoder.
        source_ids: int32 ``(batch_size, source_steps)``, right-padded, each row ending with EOS.
        limits: maximum output length relative to the source length.

    Returns:
        ``(token_ids, attention_weights)``: int32 ``(batch_size, steps)`` padded with PAD_ID
        after EOS, and float32 ``(batch_size, steps, source_steps)``.
    """
    source_ids = tf.convert_to_tensor(source_ids, tf.int32)
    encoded = encode_source(models, source_ids)
    output_limits = compute_output_limits(source_ids, limits)
    batch_size = tf.shape(source_ids)[0]
    max_steps = tf.reduce_max(output_limits)
    tokens_ta = tf.TensorArray(tf.int32, size=max_steps)
    weights_ta = tf.TensorArray(tf.float32, size=max_steps)

    def keep_going(step, previous, finished, states, tokens_ta, weights_ta):
        return tf.logical_and(step < max_steps, tf.logical_not(tf.reduce_all(finished)))

    def decode_one(step, previous, finished, states, tokens_ta, weights_ta):
        logits, states, weights = run_step(models, previous[:, None], states, encoded)
        tokens = tf.argmax(logits, axis=-1, output_type=tf.int32)
        tokens = tf.where(step + 1 >= output_limits, EOS_ID, tokens)
        tokens = tf.where(finished, PAD_ID, tokens)
        finished = tf.logical_or(finished, tf.equal(tokens, EOS_ID))
        return (
            step + 1,
            tokens,
            finished,
            states,
            tokens_ta.write(step, tokens),
            weights_ta.write(step, weights),
        )

    initial = (
        tf.constant(0),
        tf.fill([batch_size], BOS_ID),
        tf.zeros([batch_size], tf.bool),
        [encoded[name] for name in models.state_names],
        tokens_ta,
        weights_ta,
    )
    steps, _, _, _, tokens_ta, weights_ta = tf.while_loop(keep_going, decode_one, initial)
    token_ids = tf.transpose(tokens_ta.stack()[:steps], (1, 0))
    attention = tf.transpose(weights_ta.stack()[:steps], (1, 0, 2))
    return token_ids, attention


def compute_length_penalty(lengths: np.ndarray, alpha: float) -> np.ndarray:
    """Return the GNMT length penalty ``((5 + length) / 6) ** alpha``."""
    return ((5.0 + lengths) / 6.0) ** alpha


def compute_log_softmax(logits: np.ndarray) -> np.ndarray:
    """Return log-probabilities along the last axis, in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def beam_search_decode(
    models: InferenceModels,
    source_ids: np.ndarray,
    limits: DecodingLimits,
    beam_size: int,
    length_penalty: float,
) -> np.ndarray:
    """Decode a batch with beam search, all sentences and beams in one step call.

    Args:
        models: encoder and one-step decoder.
        source_ids: int32 ``(batch_size, source_steps)``, right-padded.
        limits: maximum output length relative to the source length.
        beam_size: hypotheses kept per sentence.
        length_penalty: GNMT exponent; 0 ranks by raw log-probability.

    Returns:
        int32 ``(batch_size, steps)``: the best hypothesis per sentence, PAD after EOS.
    """
    source_ids = np.asarray(source_ids, np.int32)
    batch_size, vocab = source_ids.shape[0], models.target_vocab_size
    encoded = {
        name: np.repeat(np.asarray(value), beam_size, axis=0)
        for name, value in encode_source(models, source_ids).items()
    }
    output_limits = compute_output_limits(source_ids, limits).numpy()[:, None]
    beams = BeamState.start(batch_size, beam_size)
    states = [encoded[name] for name in models.state_names]
    previous = np.full((batch_size * beam_size, 1), BOS_ID, np.int32)
    for step in range(int(output_limits.max())):
        logits, states, _ = run_step(models, previous, states, encoded)
        log_probs = compute_log_softmax(np.asarray(logits)).reshape(batch_size, beam_size, vocab)
        log_probs = restrict_continuations(log_probs, beams.finished, step + 1 >= output_limits)
        flat_parents = beams.advance(log_probs, step, length_penalty)
        states = [np.asarray(s)[flat_parents] for s in states]
        previous = beams.tokens[:, :, -1].reshape(-1, 1)
        if beams.finished.all():
            break
    return beams.tokens[:, 0, :]


def restrict_continuations(
    log_probs: np.ndarray, finished: np.ndarray, at_limit: np.ndarray
) -> np.ndarray:
    """Let finished beams continue only with PAD at no cost, and force EOS at the length limit."""
    log_probs = log_probs.copy()
    forced = np.logical_and(at_limit, np.logical_not(finished))
    eos_scores = log_probs[..., EOS_ID].copy()
    log_probs[forced] = -np.inf
    log_probs[..., EOS_ID] = np.where(forced, eos_scores, log_probs[..., EOS_ID])
    log_probs[finished] = -np.inf
    log_probs[..., PAD_ID] = np.where(finished, 0.0, log_probs[..., PAD_ID])
    return log_probs


@dataclasses.dataclass
class BeamState:
    """Hypotheses of a batch: tokens ``(batch, beam, steps)``, scores, lengths, finished flags."""

    tokens: np.ndarray
    scores: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray

    @classmethod
    def start(cls, batch_size: int, beam_size: int) -> BeamState:
        """Return the initial state: one live hypothesis per sentence, the other beams empty."""
        scores = np.full((batch_size, beam_size), -np.inf)
        scores[:, 0] = 0.0
        return cls(
            np.zeros((batch_size, beam_size, 0), np.int32),
            scores,
            np.zeros((batch_size, beam_size), np.int64),
            np.zeros((batch_size, beam_size), bool),
        )

    def advance(self, log_probs: np.ndarray, step: int, length_penalty: float) -> np.ndarray:
        """Keep the best ``beam`` extensions; return the flat parent index of each new beam."""
        batch_size, beam_size, vocab = log_probs.shape
        candidates = self.scores[:, :, None] + log_probs
        new_lengths = np.where(self.finished, self.lengths, step + 1)
        ranking = candidates / compute_length_penalty(new_lengths, length_penalty)[:, :, None]
        flat = ranking.reshape(batch_size, -1)
        best = np.argsort(-flat, axis=1, kind="stable")[:, :beam_size]
        parents, tokens = best // vocab, (best % vocab).astype(np.int32)
        rows = np.arange(batch_size)[:, None]
        self.scores = candidates.reshape(batch_size, -1)[rows, best]
        self.lengths = new_lengths[rows, parents]
        self.finished = np.logical_or(self.finished[rows, parents], tokens == EOS_ID)
        self.tokens = np.concatenate([self.tokens[rows, parents], tokens[:, :, None]], axis=2)
        return (rows * beam_size + parents).reshape(-1)


def strip_special(token_ids: Sequence[int]) -> list[int]:
    """Return the tokens before the first EOS, without padding."""
    kept = []
    for token in token_ids:
        if token == EOS_ID:
            break
        if token != PAD_ID:
            kept.append(int(token))
    return kept


class Translator:
    """Translates sentences with a trained model's inference models and tokenizers."""

    def __init__(
        self,
        models: InferenceModels,
        tokenizers: Tokenizers,
        limits: DecodingLimits,
        beam_size: int = 1,
        length_penalty: float = 0.0,
        batch_size: int = 64,
    ) -> None:
        self.models = models
        self.tokenizers = tokenizers
        self.limits = limits
        self.beam_size = beam_size
        self.length_penalty = length_penalty
        self.batch_size = batch_size
        self._greedy = tf.function(
            lambda ids: greedy_decode(models, ids, limits), reduce_retracing=True
        )

    def decode_batch(self, source_ids: np.ndarray, beam_size: int | None = None) -> list[list[int]]:
        """Decode a padded batch of source ids; return token lists without EOS."""
        beam_size = self.beam_size if beam_size is None else beam_size
        if beam_size == 1:
            token_ids, _ = self._greedy(tf.constant(source_ids, tf.int32))
            token_ids = token_ids.numpy()
        else:
            token_ids = beam_search_decode(
                self.models, source_ids, self.limits, beam_size, self.length_penalty
            )
        return [strip_special(row) for row in token_ids]

    def translate_ids(
        self, source_rows: Sequence[Sequence[int]], beam_size: int | None = None
    ) -> list[list[int]]:
        """Translate token-id rows (each ending with EOS), batching rows of similar length."""
        order = sorted(range(len(source_rows)), key=lambda i: len(source_rows[i]))
        results: list[list[int]] = [[] for _ in source_rows]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            padded, _ = pad_token_ids([source_rows[i] for i in chunk], source="source sentences")
            for index, tokens in zip(chunk, self.decode_batch(padded, beam_size), strict=True):
                results[index] = tokens
        return results

    def translate(self, sentences: Sequence[str], beam_size: int | None = None) -> list[str]:
        """Translate sentences; a blank sentence translates to an empty string."""
        filled = [i for i, sentence in enumerate(sentences) if sentence.strip()]
        source_rows = encode_sources(self.tokenizers.source, [sentences[i] for i in filled])
        translations = [""] * len(sentences)
        for index, tokens in zip(filled, self.translate_ids(source_rows, beam_size), strict=True):
            translations[index] = self.tokenizers.target.decode(tokens)
        return translations

    def attend(self, sentence: str) -> tuple[list[str], list[str], np.ndarray]:
        """Translate one sentence greedily; return source and output pieces and attention."""
        source_row = encode_sources(self.tokenizers.source, [sentence])[0]
        token_ids, weights = self._greedy(tf.constant([source_row], tf.int32))
        output = [int(t) for t in token_ids.numpy()[0] if t != PAD_ID]
        pieces = self.tokenizers.source.processor.id_to_piece
        target_pieces = self.tokenizers.target.processor.id_to_piece
        return (
            [pieces(t) for t in source_row],
            [target_pieces(t) for t in output],
            weights.numpy()[0, : len(output), : len(source_row)],
        )
