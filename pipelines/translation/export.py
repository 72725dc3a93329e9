"""Export of a trained translator: a string SavedModel, a TFLite encoder and a TFLite decoder step.

Layout of ``<run_dir>/export/``:

* ``saved_model/``: signature ``translate`` takes ``sentences`` (a 1-D string tensor) and
  returns ``translations`` (greedy decoding). SentencePiece runs inside the graph through
  ``tensorflow_text``, so loading it needs ``import tensorflow_text`` first.
* ``encoder_<variant>.tflite``, signature ``encode``. Its input ``source_ids`` is int32
  ``(1, max_source_length)``, right-padded with 0 and ending with EOS. Its outputs are
  ``encoder_outputs``, ``source_mask`` and the initial decoder state (``state_h``, plus
  ``state_c`` for LSTM).
* ``decoder_step_<variant>.tflite``, signature ``decode_step``. Its inputs are
  ``previous_token`` int32 ``(1, 1)``, the state, ``encoder_outputs`` and ``source_mask``.
  Its outputs are ``logits``, the new state and ``attention_weights``.
* ``source.model`` / ``target.model`` (SentencePiece) beside them, and ``export_report.json``.

A Python reference loop (`translate_with_tflite`) drives the two TFLite files exactly
as an app would; its greedy translations are compared with Keras greedy translations.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipelines.translation.config import TranslationConfig
from pipelines.translation.data import Tokenizers, encode_sources
from pipelines.translation.decoding import DecodingLimits, Translator, greedy_decode
from pipelines.translation.model import (
    InferenceModels,
    build_encoder_model,
    build_inference_models,
    build_step_model,
    state_names,
)
from shared.errors import ExportError
from shared.export import (
    export_saved_model,
    export_tflite_variants,
    load_export_report,
    make_model_endpoint,
    write_export_report,
)
from shared.padding import PAD_ID, pad_token_ids
from shared.text import BOS_ID, EOS_ID

logger = logging.getLogger(__name__)

ENCODER_SIGNATURE = "encode"
STEP_SIGNATURE = "decode_step"


def import_tensorflow_text():
    """Import ``tensorflow_text``, which provides the in-graph SentencePiece ops.

    Raises:
        ExportError: the package is not installed.
    """
    try:
        import tensorflow_text
    except ImportError as error:
        raise ExportError(
            "The SavedModel 'translate' signature runs SentencePiece in the graph and needs "
            "tensorflow-text of the same minor version as TensorFlow: "
            "pip install 'tensorflow-text~=2.21.0'."
        ) from error
    return tensorflow_text


def build_translate_endpoint(
    models: InferenceModels, tokenizers: Tokenizers, limits: DecodingLimits
):
    """Return ``(function, signature, trackables)`` of the string ``translate`` endpoint."""
    tensorflow_text = import_tensorflow_text()
    source_tokenizer = tensorflow_text.SentencepieceTokenizer(
        model=tokenizers.source.path.read_bytes(),
        out_type=tf.int32,
        add_eos=True,
        name="source_sentencepiece",
    )
    target_tokenizer = tensorflow_text.SentencepieceTokenizer(
        model=tokenizers.target.path.read_bytes(), out_type=tf.int32, name="target_sentencepiece"
    )

    def translate(sentences):
        source_ids = source_tokenizer.tokenize(sentences).to_tensor(default_value=PAD_ID)
        token_ids, _ = greedy_decode(models, source_ids, limits)
        before_eos = tf.equal(tf.cumsum(tf.cast(tf.equal(token_ids, EOS_ID), tf.int32), axis=1), 0)
        kept = tf.ragged.boolean_mask(
            token_ids, tf.logical_and(before_eos, tf.not_equal(token_ids, PAD_ID))
        )
        return {"translations": target_tokenizer.detokenize(kept)}

    signature = [tf.TensorSpec([None], tf.string, name="sentences")]
    return translate, signature, [models.encoder, models.step, source_tokenizer, target_tokenizer]


def export_string_saved_model(
    models: InferenceModels, tokenizers: Tokenizers, limits: DecodingLimits, export_dir: Path
) -> Path:
    """Write the SavedModel whose ``translate`` signature maps sentences to translations."""
    function, signature, trackables = build_translate_endpoint(models, tokenizers, limits)
    path = export_saved_model(
        export_dir / "saved_model", {"translate": (function, signature)}, trackables
    )
    logger.info("Wrote SavedModel with signature 'translate' to %s", path)
    return path


def prepare_source_rows(
    tokenizers: Tokenizers, sentences: Sequence[str], max_length: int
) -> list[list[int]]:
    """Encode sentences, cutting rows longer than ``max_length`` (EOS kept last), with a warning."""
    rows = encode_sources(tokenizers.source, sentences)
    too_long = sum(len(r) > max_length for r in rows)
    if too_long:
        logger.warning(
            "%d of %d sentences exceed export.max_source_length=%d tokens and are cut to it.",
            too_long,
            len(rows),
            max_length,
        )
    return [r if len(r) <= max_length else [*r[: max_length - 1], EOS_ID] for r in rows]


def translate_with_tflite(
    encoder_path: Path,
    step_path: Path,
    source_rows: Sequence[Sequence[int]],
    max_length: int,
    limits: DecodingLimits,
) -> list[list[int]]:
    """Greedy-decode each row with the TFLite encoder and decoder step (the reference loop).

    Returns:
        The output token ids of each row, without EOS.
    """
    from ai_edge_litert.interpreter import Interpreter

    encode = Interpreter(model_path=str(encoder_path), num_threads=1).get_signature_runner(
        ENCODER_SIGNATURE
    )
    step = Interpreter(model_path=str(step_path), num_threads=1).get_signature_runner(
        STEP_SIGNATURE
    )
    names = [n for n in step.get_input_details() if n.startswith("state_")]
    results = []
    for row in source_rows:
        padded, _ = pad_token_ids([row], max_length)
        encoded = encode(source_ids=padded)
        states = {name: encoded[name] for name in names}
        limit = int(np.ceil(limits.ratio * len(row))) + limits.extra
        token, output = BOS_ID, []
        for position in range(limit):
            result = step(
                previous_token=np.array([[token]], np.int32),
                encoder_outputs=encoded["encoder_outputs"],
                source_mask=encoded["source_mask"],
                **states,
            )
            token = EOS_ID if position + 1 >= limit else int(np.argmax(result["logits"][0]))
            if token == EOS_ID:
                break
            output.append(token)
            states = {name: result[name] for name in names}
        results.append(output)
    return results


def make_parity_inputs(
    models: InferenceModels, source_rows: Sequence[Sequence[int]], max_length: int
):
    """Return padded encoder inputs and first-step decoder inputs for tensor-level parity."""
    padded, _ = pad_token_ids(source_rows, max_length)
    encoded = {
        k: np.asarray(v) for k, v in models.encoder({"source_ids": padded}, training=False).items()
    }
    step_inputs = {
        "previous_token": np.full((len(padded), 1), BOS_ID, np.int32),
        "encoder_outputs": encoded["encoder_outputs"],
        "source_mask": encoded["source_mask"],
    }
    step_inputs.update({name: encoded[name] for name in models.state_names})
    step_outputs = {k: np.asarray(v) for k, v in models.step(step_inputs, training=False).items()}
    return {"source_ids": padded}, encoded, step_inputs, step_outputs


def export_fixed_model(
    model: keras.Model,
    signature: str,
    name: str,
    export_dir: Path,
    config: TranslationConfig,
    parity: tuple[dict, dict],
    variants: Sequence[str] | None,
) -> dict[str, Any]:
    """Write a batch-1 fixed-length model as a SavedModel, convert it and check tensor parity."""
    saved = export_saved_model(
        export_dir / f"{name}_savedmodel", {signature: make_model_endpoint(model)}, [model]
    )
    inputs, outputs = parity
    return export_tflite_variants(
        saved,
        signature,
        export_dir,
        name,
        parity_inputs=inputs,
        keras_outputs=outputs,
        export_config=config.export,
        variants=variants,
        representative_inputs=inputs,
    )


def export_translation(
    config: TranslationConfig,
    model: keras.Model,
    tokenizers: Tokenizers,
    run_dir: Path,
    test_sentences: Sequence[str],
    variants: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Export everything and compare TFLite greedy translations with Keras on ``test_sentences``.

    Returns:
        The summary written to ``export_report.json`` under ``translation``.

    Raises:
        ExportError: a conversion failed, or the float32 TFLite loop disagrees with Keras.
    """
    export_dir = run_dir / "export"
    export_dir.mkdir(parents=True, exist_ok=True)
    limits = DecodingLimits(config.model.max_output_ratio, config.model.max_output_extra)
    models = build_inference_models(model, config.model)
    saved_model = export_string_saved_model(models, tokenizers, limits, export_dir)
    copy_tokenizers(tokenizers, export_dir)
    max_length = config.export.max_source_length
    sentences = list(test_sentences[: config.export.parity_sentences])
    rows = prepare_source_rows(tokenizers, sentences, max_length)
    fixed = InferenceModels(
        build_encoder_model(model, config.model, max_length, 1),
        build_step_model(model, config.model, max_length, 1),
        state_names(config.model.cell),
        models.target_vocab_size,
    )
    encoder_inputs, encoder_outputs, step_inputs, step_outputs = make_parity_inputs(
        models, rows, max_length
    )
    encoder_entry = export_fixed_model(
        fixed.encoder,
        ENCODER_SIGNATURE,
        "encoder",
        export_dir,
        config,
        (encoder_inputs, encoder_outputs),
        variants,
    )
    export_fixed_model(
        fixed.step,
        STEP_SIGNATURE,
        "decoder_step",
        export_dir,
        config,
        (step_inputs, step_outputs),
        variants,
    )
    translator = Translator(models, tokenizers, limits)
    keras_tokens = translator.translate_ids(rows, beam_size=1)
    summary = {
        "saved_model": str(saved_model),
        "signature": "translate",
        "max_source_length": max_length,
        "parity_sentences": len(rows),
        "variants": {},
    }
    for variant in encoder_entry["variants"]:
        tokens = translate_with_tflite(
            export_dir / f"encoder_{variant}.tflite",
            export_dir / f"decoder_step_{variant}.tflite",
            rows,
            max_length,
            limits,
        )
        matches = sum(a == b for a, b in zip(tokens, keras_tokens, strict=True))
        summary["variants"][variant] = {
            "exact_match_rate": round(matches / max(1, len(rows)), 4),
            "exact_matches": matches,
        }
        logger.info(
            "TFLite %s greedy loop: %d of %d translations equal Keras greedy",
            variant,
            matches,
            len(rows),
        )
    summary["saved_model_exact_match_rate"] = check_saved_model(
        saved_model, sentences, translator.translate(sentences, beam_size=1)
    )
    write_export_report(export_dir, "translation", summary)
    if summary["variants"].get("float32", {}).get("exact_match_rate", 1.0) < 1.0:
        raise ExportError(
            f"The float32 TFLite loop disagrees with Keras greedy decoding on some sentences; see "
            f"{export_dir / 'export_report.json'}."
        )
    return {"export_dir": str(export_dir), **load_export_report(export_dir)}


def check_saved_model(
    saved_model: Path, sentences: Sequence[str], expected: Sequence[str]
) -> float:
    """Reload the SavedModel and return the share of its translations equal to ``expected``."""
    import_tensorflow_text()  # Registers the SentencePiece ops that the graph uses.
    loaded = tf.saved_model.load(str(saved_model))
    outputs = loaded.signatures["translate"](sentences=tf.constant(list(sentences)))[
        "translations"
    ].numpy()
    matches = sum(o.decode("utf-8") == e for o, e in zip(outputs, expected, strict=True))
    return round(matches / max(1, len(sentences)), 4)


def copy_tokenizers(tokenizers: Tokenizers, export_dir: Path) -> None:
    """Copy the SentencePiece models (and their sha256 files) next to the TFLite files."""
    for tokenizer in {
        id(tokenizers.source): tokenizers.source,
        id(tokenizers.target): tokenizers.target,
    }.values():
        for path in (tokenizer.path, tokenizer.path.with_suffix(".sha256")):
            if path.is_file():
                shutil.copy2(path, export_dir / path.name)
