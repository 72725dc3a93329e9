"""Commands of the sentiment pipeline: train, evaluate, predict, tune and export."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipelines.sentiment.config import IMDB_SENTENCES_RUN, SentimentConfig
from pipelines.sentiment.data import (
    LabeledTexts,
    clean_text,
    compute_class_weights,
    encode_texts,
    read_input_lines,
    load_splits,
    log_length_summary,
    make_dataset,
)
from pipelines.sentiment.evaluation import compute_classification_metrics, write_evaluation_report
from pipelines.sentiment.model import (
    build_classifier,
    build_ensemble,
    compile_classifier,
    compute_probabilities,
    copy_matching_weights,
    list_members,
)
from shared.cli import CommandContext, write_predictions
from shared.errors import DataError
from shared.runs import read_json, write_json
from shared.text import SentencePieceTokenizer, load_sentencepiece, train_sentencepiece
from shared.training import build_optimizer, set_seeds, train_model

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
TOKENIZER_NAME = "spm"
LABELS_FILE = "labels.json"
# Maximum text length in UTF-8 bytes that tokenizer training reads. The longest IMDB reviews
# are about 14 kB.
TOKENIZER_MAX_TEXT_BYTES = 1 << 16


# ---------------------------------------------------------------------------
# Shared steps.


def prepare_tokenizer(config: SentimentConfig, train: LabeledTexts, run_dir: Path) -> SentencePieceTokenizer:
    """Train SentencePiece on the training split, or reuse the one an interrupted run left.

    With ``model.init_from``, the tokenizer of that run is copied instead, because its
    embedding rows are indexed by that tokenizer's ids.
    """
    if config.model.init_from:
        return copy_tokenizer(Path(config.model.init_from), run_dir)
    model_path = run_dir / TOKENIZER_DIR / f"{TOKENIZER_NAME}.model"
    # An interrupted run leaves backup/ (one classifier) or members/ (an ensemble). Their
    # embedding rows are indexed by this tokenizer's pieces.
    if model_path.is_file() and ((run_dir / "backup").exists() or (run_dir / "members").exists()):
        logger.info("Resuming: reusing the tokenizer %s", model_path)
        return load_sentencepiece(model_path)
    texts = train.texts
    if config.data.tokenizer_max_texts and config.data.tokenizer_max_texts < len(texts):
        chosen = np.random.default_rng(config.train.seed).choice(len(texts), config.data.tokenizer_max_texts,
                                                                  replace=False)
        texts = [texts[i] for i in np.sort(chosen)]
        logger.info("Training the tokenizer on %d of %d training texts", len(texts), len(train.texts))
    started = time.monotonic()
    trained = train_sentencepiece(
        (clean_text(text, config.data) for text in texts), run_dir / TOKENIZER_DIR, config.data.vocab_size,
        name=TOKENIZER_NAME, model_type=config.data.tokenizer_model_type, seed=config.train.seed,
        max_sentence_length=TOKENIZER_MAX_TEXT_BYTES,
    )
    logger.info("Trained a %d-piece tokenizer in %.1f s: %s", trained.vocab_size, time.monotonic() - started,
                trained.path)
    return load_sentencepiece(trained.path)


def copy_tokenizer(source_run: Path, run_dir: Path) -> SentencePieceTokenizer:
    """Copy the tokenizer files of ``source_run`` into ``run_dir`` and load them (sha256 checked)."""
    source = load_sentencepiece(source_run / TOKENIZER_DIR / f"{TOKENIZER_NAME}.model")
    target_dir = run_dir / TOKENIZER_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    for suffix in (".model", ".vocab", ".sha256"):
        shutil.copyfile(source_run / TOKENIZER_DIR / f"{TOKENIZER_NAME}{suffix}", target_dir / f"{TOKENIZER_NAME}{suffix}")
    logger.info("Using the tokenizer of %s (%d pieces, sha256 %s)", source_run, source.vocab_size, source.sha256)
    return load_sentencepiece(target_dir / f"{TOKENIZER_NAME}.model", source.sha256)


def require_trained_run(source_run: Path) -> Path:
    """Return the ``model.keras`` path of the ``model.init_from`` run.

    Raises:
        DataError: that run has no trained model; the message names the command that trains it
            and the setting that skips it.
    """
    source_path = source_run / "model.keras"
    if not source_path.is_file():
        preset_hint = ""
        if source_run == Path(IMDB_SENTENCES_RUN):
            preset_hint = (" That is where `python -m pipelines.sentiment train --preset imdb_sentences` writes the "
                           "sentence model the SST presets start from; run it first (about 40 minutes on 2 cores).")
        raise DataError(f"{source_path}: model.init_from names a run without a trained model.{preset_hint} Train "
                        "that run, fix the path, or pass --set model.init_from=null to train from scratch.")
    return source_path


def load_run_members(source_run: Path) -> list[keras.Model]:
    """Load the model trained in ``source_run`` and return its members (itself when single).

    Raises:
        DataError: ``source_run`` has no trained model.
    """
    return list_members(keras.saving.load_model(require_trained_run(source_run)))


def initialize_from_run(model: keras.Model, source_run: Path, member_index: int = 0,
                        sources: list[keras.Model] | None = None) -> None:
    """Start ``model`` from the weights of the model trained in ``source_run``, layer by layer.

    When that model is an ensemble, member ``member_index`` (modulo its size) is the source.
    ``sources`` are its members when already loaded by `load_run_members`.

    Raises:
        DataError: ``source_run`` has no trained model.
    """
    source_path = source_run / "model.keras"
    sources = sources or load_run_members(source_run)
    source_index = member_index % len(sources)
    skipped = copy_matching_weights(sources[source_index], model)
    if len(sources) > 1:
        logger.info("Initialized from member %d of %d in %s", source_index + 1, len(sources), source_path)
    else:
        logger.info("Initialized from %s", source_path)
    if skipped:
        logger.warning("Layers %s keep their random initialization: their weight shapes differ in %s.",
                       skipped, source_path)


def load_trained(context: CommandContext) -> tuple[keras.Model, SentencePieceTokenizer, tuple[str, ...]]:
    """Load the trained model, its tokenizer and its label names from the run directory.

    Raises:
        DataError: the run directory has no trained model.
    """
    run_dir = context.run_dir
    model_path = run_dir / "model.keras"
    if not model_path.is_file():
        raise DataError(f"{model_path}: no trained model. Run `python -m pipelines.sentiment train "
                        f"--preset {context.preset} --run-dir {run_dir}` first, or pass the --run-dir of a "
                        "trained run.")
    import pipelines.sentiment.model  # noqa: F401  Registers MaskedAttentionPooling for loading.

    model = keras.saving.load_model(model_path)
    tokenizer = load_sentencepiece(run_dir / TOKENIZER_DIR / f"{TOKENIZER_NAME}.model")
    label_names = tuple(read_json(run_dir / LABELS_FILE)["label_names"])
    return model, tokenizer, label_names


def encode_split(tokenizer: SentencePieceTokenizer, data: LabeledTexts, config: SentimentConfig, name: str):
    """Tokenize one split, truncating and logging its length summary."""
    token_ids = encode_texts(tokenizer, data.texts, config.data, data.origins)
    log_length_summary(name, token_ids, config.data.max_length)
    return token_ids


def encode_training_splits(config: SentimentConfig, splits: dict[str, LabeledTexts], tokenizer) -> dict[str, Any]:
    """Tokenize the training and validation splits once; validation is shuffled with the seed.

    Validation is shuffled once with a fixed seed, so that ``validation_steps`` batches mix
    the labels (the splits are stored sorted by label).
    """
    train = splits["train"]
    validation = splits["validation"].subset(
        np.random.default_rng(config.train.seed).permutation(len(splits["validation"])))
    return {
        "train": (encode_split(tokenizer, train, config, "train"), train.labels),
        "validation": (encode_split(tokenizer, validation, config, "validation"), validation.labels),
        "num_classes": len(train.label_names),
        "label_names": train.label_names,
    }


def make_training_datasets(config: SentimentConfig, encoded: dict[str, Any], repeat: bool = True):
    """Return ``(train_ds, val_ds, steps_per_epoch)``, with class weights as sample weights.

    ``repeat`` makes the shuffled training data endless, so ``steps_per_epoch`` decides the
    epoch; without it each epoch is one pass.
    """
    token_ids, labels = encoded["train"]
    class_weights = compute_class_weights(labels, encoded["num_classes"], config.model.class_weights,
                                          config.model.imbalance_ratio)
    sample_weights = None
    if class_weights is not None:
        logger.info("Class weights on: %s", dict(zip(encoded["label_names"], np.round(class_weights, 3).tolist())))
        sample_weights = class_weights[labels]
    train_ds = make_dataset(token_ids, labels, config.train.batch_size, sample_weights=sample_weights,
                            shuffle_seed=config.train.seed, repeat=repeat, max_length=config.data.max_length)
    val_ds = make_dataset(*encoded["validation"], config.train.batch_size, max_length=config.data.max_length)
    steps = config.train.steps_per_epoch or math.ceil(len(labels) / config.train.batch_size)
    return train_ds, val_ds, steps


def build_compiled_model(config: SentimentConfig, vocab_size: int, num_classes: int, steps_per_epoch: int):
    """Build and compile the classifier with the configured optimizer and schedule."""
    model = build_classifier(config.model, vocab_size, num_classes)
    optimizer = build_optimizer(config.train, total_steps=config.train.epochs * steps_per_epoch)
    return compile_classifier(model, optimizer)


# ---------------------------------------------------------------------------
# Commands.


def train(config: SentimentConfig, context: CommandContext) -> dict[str, Any]:
    """Train the tokenizer and the classifier (or each ensemble member); write the run directory.

    With ``model.members`` above 1, member ``k`` trains on its own under
    ``members/member{k}/`` with seed ``train.seed + k`` (weights, dropout and shuffling), on
    the same split and tokenizer. The members are then joined into one averaging model saved
    as ``model.keras``. A rerun keeps every member that finished and trains the others.
    """
    run_dir = context.run_dir
    if config.model.init_from:
        require_trained_run(Path(config.model.init_from))
    splits = load_splits(config.data, context.data_dir, config.train.seed)
    tokenizer = prepare_tokenizer(config, splits["train"], run_dir)
    label_names = splits["train"].label_names
    write_json(run_dir / LABELS_FILE, {"label_names": list(label_names), "tokenizer_sha256": tokenizer.sha256})
    encoded = encode_training_splits(config, splits, tokenizer)
    if config.model.members == 1:
        if config.model.member_poolings:
            logger.warning("model.member_poolings %s is unused with model.members=1, so the classifier uses "
                           "model.pooling=%s.", list(config.model.member_poolings), config.model.pooling)
        _, metrics = train_classifier(config, encoded, tokenizer.vocab_size, run_dir)
    else:
        metrics = train_ensemble(config, encoded, tokenizer.vocab_size, run_dir)
    metrics["model_bytes"] = (run_dir / "model.keras").stat().st_size
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def train_classifier(config: SentimentConfig, encoded: dict[str, Any], vocab_size: int, run_dir: Path,
                     member_index: int = 0):
    """Train one classifier (ensemble member ``member_index``) into ``run_dir``; return it with its metrics."""
    train_ds, val_ds, steps = make_training_datasets(config, encoded)
    model = build_compiled_model(config, vocab_size, encoded["num_classes"], steps)
    if config.model.init_from:
        initialize_from_run(model, Path(config.model.init_from), member_index)
    logger.info("Model has %d parameters", model.count_params())
    validation_batches = math.ceil(len(encoded["validation"][1]) / config.train.batch_size)
    train_config = dataclasses.replace(config.train, steps_per_epoch=steps, validation_steps=min(
        config.train.validation_steps or validation_batches, validation_batches))
    metrics = train_model(model, train_ds, val_ds, train_config, run_dir, monitor="val_accuracy", mode="max",
                          num_train_samples=len(encoded["train"][1]), verbose=2)
    return model, metrics


def train_ensemble(config: SentimentConfig, encoded: dict[str, Any], vocab_size: int, run_dir: Path) -> dict[str, Any]:
    """Train or reload each member, join them, save ``model.keras``; return the metrics."""
    members, member_metrics = [], []
    for index in range(config.model.members):
        member_dir = run_dir / "members" / f"member{index}"
        seed = config.train.seed + index
        if is_finished_member(member_dir):
            logger.info("Member %d of %d already trained; reusing %s", index + 1, config.model.members, member_dir)
            model, metrics = keras.saving.load_model(member_dir / "model.keras"), read_json(member_dir / "metrics.json")
        else:
            logger.info("Training ensemble member %d of %d in %s", index + 1, config.model.members, member_dir)
            member_dir.mkdir(parents=True, exist_ok=True)
            set_seeds(seed)
            member_config = dataclasses.replace(config, model=config.model.member(index),
                                                train=dataclasses.replace(config.train, seed=seed))
            model, metrics = train_classifier(member_config, encoded, vocab_size, member_dir, index)
            write_json(member_dir / "metrics.json", metrics)
        members.append(model)
        member_metrics.append(metrics)
    ensemble = build_ensemble([config.model.member(k) for k in range(len(members))], members, vocab_size,
                              encoded["num_classes"])
    ensemble.save(run_dir / "model.keras")
    logger.info("Wrote %s", run_dir / "model.keras")
    token_ids, labels = encoded["validation"]
    accuracy = float(np.mean(np.argmax(compute_probabilities(ensemble, token_ids), axis=-1) == labels))
    logger.info("Ensemble validation accuracy %.4f; members %s", accuracy,
                [round(m["best"], 4) for m in member_metrics])
    return {"members": member_metrics, "val_accuracy": accuracy, "parameters": int(ensemble.count_params()),
            "train_seconds": round(sum(m["train_seconds"] for m in member_metrics), 2)}


def is_finished_member(member_dir: Path) -> bool:
    """Return whether a member finished training: model and metrics written, no backup left."""
    return ((member_dir / "model.keras").is_file() and (member_dir / "metrics.json").is_file()
            and not (member_dir / "backup").exists())


def evaluate(config: SentimentConfig, context: CommandContext) -> dict[str, Any]:
    """Score the trained model on a split; write evaluation JSON, confusion matrix and report.md."""
    model, tokenizer, label_names = load_trained(context)
    splits = load_splits(config.data, context.data_dir, config.train.seed)
    split = context.args.split or ("test" if "test" in splits else "validation")
    if split not in splits:
        raise DataError(f"unknown split {split!r} for dataset {config.data.dataset!r}; choose from {sorted(splits)}.")
    data = splits[split]
    if context.args.limit:
        # Splits are stored sorted by label, so the first N of a seeded shuffle is taken instead.
        order = np.random.default_rng(config.train.seed).permutation(len(data))[: context.args.limit]
        data = data.subset(np.sort(order))
        logger.info("Evaluating %d examples of %s drawn with seed %d (--limit)", len(data), split, config.train.seed)
    started = time.monotonic()
    probabilities = compute_probabilities(model, encode_split(tokenizer, data, config, split))
    metrics = compute_classification_metrics(data.labels, probabilities, label_names)
    metrics.update({"split": split, "examples": len(data), "seconds": round(time.monotonic() - started, 2)})
    write_evaluation_report(context.run_dir, config, data, probabilities, metrics)
    return metrics


def predict(config: SentimentConfig, context: CommandContext) -> dict[str, Any] | None:
    """Write the label and its probability for each line of the input, as JSON lines."""
    import json

    model, tokenizer, label_names = load_trained(context)
    source, lines = read_input_lines(context.args.input)
    origins = [f"{source}: line {number}" for number, _ in lines]
    token_ids = encode_texts(tokenizer, [text for _, text in lines], config.data, origins)
    probabilities = compute_probabilities(model, token_ids)
    rows = []
    for (number, _), row in zip(lines, probabilities):
        best = int(np.argmax(row))
        rows.append(json.dumps({"line": number, "label": label_names[best], "probability": round(float(row[best]), 6)}))
    return write_predictions(context, "\n".join(rows) + "\n", len(rows), "predictions")


def tune(config: SentimentConfig, context: CommandContext) -> dict[str, Any]:
    """Run the shared staged hyperparameter search on the training and validation splits.

    The tokenizer is trained once and the splits tokenized once; each trial only batches them.
    With ``model.init_from``, every trial starts from that run's model (its first member),
    as ``train`` would.
    """
    from shared.tuning import run_tuning

    # Loaded once here, because every trial starts from these weights.
    init_members = load_run_members(Path(config.model.init_from)) if config.model.init_from else None
    splits = load_splits(config.data, context.data_dir, config.train.seed)
    tokenizer = prepare_tokenizer(config, splits["train"], context.run_dir)
    encoded = encode_training_splits(config, splits, tokenizer)

    def make_datasets(trial_config: SentimentConfig):
        train_ds, val_ds, _ = make_training_datasets(trial_config, encoded, repeat=False)
        return train_ds, val_ds

    def build_model(trial_config: SentimentConfig) -> keras.Model:
        steps = trial_config.train.steps_per_epoch or math.ceil(len(encoded["train"][1]) /
                                                                trial_config.train.batch_size)
        model = build_compiled_model(trial_config, tokenizer.vocab_size, encoded["num_classes"], steps)
        if trial_config.model.init_from:
            initialize_from_run(model, Path(trial_config.model.init_from), sources=init_members)
        return model

    def build_export_model(trial_config: SentimentConfig, model: keras.Model) -> keras.Model:
        return build_fixed_shape_copy(trial_config, model, tokenizer.vocab_size, encoded["num_classes"])

    return run_tuning(config, context, build_model=build_model, make_datasets=make_datasets,
                      build_export_model=build_export_model)


def build_fixed_shape_copy(config: SentimentConfig, model: keras.Model, vocab_size: int, num_classes: int):
    """Return a batch-1 copy of ``model`` at the TFLite input length, for edge measurements.

    NOTE: this copy keeps the Keras recurrent layers in loop form, which convert to float32
    TFLite. `export` converts an unrolled graph instead, so the sizes and latencies that
    tuning measures on this copy are close to the exported ones but not equal.
    """
    copy = build_classifier(config.model, vocab_size, num_classes, timesteps=config.fixed_length(), batch_size=1)
    copy.set_weights(model.get_weights())
    return copy


def export(config: SentimentConfig, context: CommandContext) -> dict[str, Any]:
    """Export the SavedModels (raw strings, token ids) and the TFLite variants with parity checks."""
    from pipelines.sentiment.serving import export_all

    model, tokenizer, label_names = load_trained(context)
    splits = load_splits(config.data, context.data_dir, config.train.seed)
    variants = context.args.variants.split(",") if context.args.variants else None
    return export_all(model, tokenizer, label_names, splits, config, context.run_dir / "export", variants)


COMMANDS = {"train": train, "evaluate": evaluate, "predict": predict, "tune": tune, "export": export}
