"""Tests of the translation export: the string SavedModel and the TFLite loop against Keras."""

import numpy as np
import pytest

from pipelines.translation.data import load_split, train_tokenizers
from pipelines.translation.decoding import DecodingLimits, Translator
from pipelines.translation.export import (
    check_saved_model,
    export_string_saved_model,
    export_translation,
    prepare_source_rows,
)
from pipelines.translation.model import (
    build_edge_model,
    build_inference_models,
    build_training_model,
)
from shared.text import BOS_ID


@pytest.fixture
def untrained(tiny_config, tmp_path):
    """Return tokenizers of the tiny corpus and an untrained model (random weights vary output)."""
    train = load_split(tiny_config.data, tmp_path, "train")
    tokenizers = train_tokenizers(tiny_config.data, train, tmp_path / "run", seed=0)
    model = build_training_model(
        tiny_config.model, tokenizers.source.vocab_size, tokenizers.target.vocab_size
    )
    return model, tokenizers, train.source


def test_cut_rows_keep_eos(untrained):
    _, tokenizers, sentences = untrained
    rows = prepare_source_rows(tokenizers, sentences, 4)
    assert {len(r) <= 4 and r[-1] == 3 for r in rows} == {True}


@pytest.mark.slow
def test_saved_model_translations_equal(untrained, tiny_config, tmp_path):
    model, tokenizers, sentences = untrained
    limits = DecodingLimits(tiny_config.model.max_output_ratio, tiny_config.model.max_output_extra)
    models = build_inference_models(model, tiny_config.model)
    expected = Translator(models, tokenizers, limits).translate(sentences, beam_size=1)
    path = export_string_saved_model(models, tokenizers, limits, tmp_path / "export")
    assert any(expected)
    assert check_saved_model(path, sentences, expected) == 1.0


@pytest.mark.slow
def test_tflite_loop_equals_keras(untrained, tiny_config, tmp_path):
    model, tokenizers, sentences = untrained
    summary = export_translation(
        tiny_config, model, tokenizers, tmp_path, sentences, variants=["float32"]
    )
    entry = summary["translation"]
    assert entry["variants"]["float32"]["exact_match_rate"] == 1.0
    assert entry["saved_model_exact_match_rate"] == 1.0
    assert (tmp_path / "export" / "target.model").is_file()
    assert np.isfinite(summary["decoder_step"]["variants"]["float32"]["latency_ms"])


def test_edge_model_equals_first_step(untrained, tiny_config):
    model, tokenizers, sentences = untrained
    length = 8
    rows = prepare_source_rows(tokenizers, sentences, length)
    source_ids = np.zeros((1, length), dtype="int32")
    source_ids[0, : len(rows[0])] = rows[0]
    previous_token = np.array([[BOS_ID]], dtype="int32")
    edge = build_edge_model(model, tiny_config.model, length)
    logits = edge({"source_ids": source_ids, "previous_token": previous_token})["logits"]
    models = build_inference_models(model, tiny_config.model)
    encoded = models.encoder.predict({"source_ids": source_ids}, verbose=0)
    expected = models.step.predict({"previous_token": previous_token, **encoded}, verbose=0)["logits"]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-6)
