"""The translation commands: train, evaluate, predict, tune and export."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import sacrebleu

from pipelines.translation.config import TranslationConfig
from pipelines.translation.data import (
    Tokenizers,
    compute_log_unigram,
    default_test_split,
    load_split,
    load_tokenizers,
    make_datasets,
    train_tokenizers,
)
from pipelines.translation.decoding import DecodingLimits, Translator
from pipelines.translation.model import (
    build_edge_model,
    build_inference_models,
    build_training_model,
    compile_model,
    load_training_model,
)
from shared.cli import CommandContext, write_predictions
from shared.errors import DataError
from shared.reports import write_report
from shared.runs import write_json, write_text_atomic
from shared.text import decode_line, read_lines

logger = logging.getLogger(__name__)


def estimate_steps_per_epoch(num_pairs: int, batch_size: int, num_buckets: int) -> int:
    """Return an upper estimate of bucketed batches per epoch (each bucket may end part-full)."""
    return math.ceil(num_pairs / batch_size) + num_buckets


def planned_steps_per_epoch(config: TranslationConfig, num_pairs: int) -> int:
    """Return ``train.steps_per_epoch``, or the estimated batches of one pass over the data."""
    return config.train.steps_per_epoch or estimate_steps_per_epoch(
        num_pairs, config.train.batch_size, len(config.data.bucket_boundaries) + 1
    )


def train(config: TranslationConfig, context: CommandContext) -> dict[str, Any]:
    """Train tokenizers and the attention model on the training split; write the run directory."""
    from shared.training import build_optimizer, train_model

    run_dir = Path(context.run_dir)
    train_split = load_split(config.data, context.data_dir, "train")
    val_split = load_split(config.data, context.data_dir, "val")
    tokenizers = train_tokenizers(config.data, train_split, run_dir, config.train.seed)
    train_ds, val_ds, counts = make_datasets(config, tokenizers, train_split, val_split)
    model = build_training_model(
        config.model,
        tokenizers.source.vocab_size,
        tokenizers.target.vocab_size,
        output_bias=counts.pop("target_log_unigram"),
    )
    logger.info("Model %s: %d parameters", model.name, model.count_params())
    steps = planned_steps_per_epoch(config, counts["train_pairs"])
    compile_model(
        model, config.model, build_optimizer(config.train, total_steps=steps * config.train.epochs)
    )
    metrics = train_model(
        model,
        train_ds,
        val_ds,
        config.train,
        run_dir,
        monitor="val_loss",
        mode="min",
        num_train_samples=counts["train_pairs"],
    )
    metrics.update(counts)
    metrics.update(compute_throughput(metrics, counts, config, steps))
    write_json(run_dir / "metrics.json", metrics)  # Rewritten with the counts and throughput added.
    return metrics


def compute_throughput(
    metrics: dict[str, Any], counts: dict[str, int], config: TranslationConfig, steps: int
) -> dict[str, float]:
    """Return target tokens per second of training, counting the epochs actually run."""
    epochs = metrics.get("epochs_run", config.train.epochs)
    if config.train.steps_per_epoch is None:
        tokens = counts["train_target_tokens"] * epochs
    else:
        tokens_per_pair = counts["train_target_tokens"] / max(1, counts["train_pairs"])
        tokens = tokens_per_pair * config.train.batch_size * steps * epochs
    seconds = max(metrics.get("train_seconds", 0.0), 1e-9)
    return {
        "target_tokens_per_second": round(tokens / seconds, 1),
        "seconds_per_epoch": round(seconds / max(1, epochs), 1),
    }


def load_trained(config: TranslationConfig, run_dir: Path) -> tuple[Any, Tokenizers]:
    """Load the trained model (best weights) and its tokenizers from ``run_dir``."""
    model_path = run_dir / "model.keras"
    if not model_path.is_file():
        raise DataError(
            f"{model_path}: no trained model. Run `python -m pipelines.translation train` with the "
            "same --run-dir first."
        )
    return load_training_model(model_path), load_tokenizers(config.data, run_dir)


def build_translator(config: TranslationConfig, model, tokenizers: Tokenizers) -> Translator:
    """Return a Translator over ``model`` with the config's beam size, length penalty and limits."""
    limits = DecodingLimits(config.model.max_output_ratio, config.model.max_output_extra)
    return Translator(
        build_inference_models(model, config.model),
        tokenizers,
        limits,
        beam_size=config.model.beam_size,
        length_penalty=config.model.length_penalty,
    )


def sacrebleu_tokenizer(language: str) -> str:
    """Return the sacreBLEU tokenizer for a target language (characters for Japanese)."""
    return "char" if language == "ja" else "13a"


def score_translations(
    hypotheses: list[str], references: list[str], language: str
) -> dict[str, float]:
    """Return corpus sacreBLEU and chrF of detokenized hypotheses against references."""
    bleu = sacrebleu.metrics.BLEU(tokenize=sacrebleu_tokenizer(language))
    chrf = sacrebleu.metrics.CHRF()
    return {
        "bleu": round(bleu.corpus_score(hypotheses, [references]).score, 2),
        "chrf": round(chrf.corpus_score(hypotheses, [references]).score, 2),
        "bleu_signature": str(bleu.get_signature()),
    }


def evaluate(config: TranslationConfig, context: CommandContext) -> dict[str, Any]:
    """Translate a split with beam search (and greedily), score it and write report.md."""
    run_dir = Path(context.run_dir)
    split_name = context.args.split or default_test_split(config.data)
    split = load_split(config.data, context.data_dir, split_name)
    limit = getattr(context.args, "limit", None)
    sources, references = split.source[:limit], split.target[:limit]
    model, tokenizers = load_trained(config, run_dir)
    translator = build_translator(config, model, tokenizers)
    hypotheses = translator.translate(sources)
    greedy = translator.translate(sources, beam_size=1)
    language = config.data.target_language
    metrics = {
        "split": split_name,
        "sentences": len(sources),
        "beam_size": config.model.beam_size,
        **score_translations(hypotheses, references, language),
        "greedy_bleu": score_translations(greedy, references, language)["bleu"],
        "empty_translations": sum(not h.strip() for h in hypotheses),
    }
    sections = {}
    if metrics["empty_translations"] > len(hypotheses) // 2:
        note = (
            f"{metrics['empty_translations']} of {len(hypotheses)} translations are empty: the model "
            "ends most sentences at once, which an undertrained model does (the tiny preset trains "
            "for seconds to check a set-up). Train with the default preset for real translations."
        )
        logger.warning("%s", note)
        sections["Warning"] = note
    write_text_atomic(
        run_dir / f"translations_{split_name}.txt", "".join(h + "\n" for h in hypotheses)
    )
    heatmap = plot_attention(translator, sources[:3], run_dir / f"attention_{split_name}.png")
    write_json(run_dir / f"evaluation_{split_name}.json", metrics)
    write_report(
        run_dir,
        f"Translation {config.data.source_language} -> {language}: {split_name}",
        {k: v for k, v in metrics.items() if k != "bleu_signature"},
        config,
        artifacts=[
            f"translations_{split_name}.txt",
            heatmap.name,
            "metrics.json",
            "learning_curves.png",
        ],
        sections={
            **sections,
            "sacreBLEU signature": f"`{metrics['bleu_signature']}`",
            "Sample translations": format_samples(sources, references, hypotheses),
            "Attention": f"![attention]({heatmap.name})",
        },
    )
    logger.info(
        "%s: BLEU %.2f, chrF %.2f on %d sentences",
        split_name,
        metrics["bleu"],
        metrics["chrf"],
        len(sources),
    )
    return metrics


def format_samples(
    sources: list[str], references: list[str], hypotheses: list[str], count: int = 10
) -> str:
    """Format the first ``count`` source, reference and model outputs as a Markdown list."""
    lines = []
    for index in range(min(count, len(sources))):
        lines += [
            f"{index + 1}. source: {sources[index]}",
            f"   - reference: {references[index]}",
            f"   - model: {hypotheses[index]}",
        ]
    return "\n".join(lines)


def plot_attention(translator: Translator, sentences: list[str], path: Path) -> Path:
    """Draw the greedy attention weights of each sentence as a heatmap into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, max(1, len(sentences)), figsize=(6 * max(1, len(sentences)), 6), squeeze=False
    )
    for axis, sentence in zip(axes[0], sentences, strict=False):
        source_pieces, target_pieces, weights = translator.attend(sentence)
        axis.imshow(weights, cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
        axis.set_xticks(range(len(source_pieces)), source_pieces, rotation=90, fontsize=7)
        axis.set_yticks(range(len(target_pieces)), target_pieces, fontsize=7)
        axis.set_xlabel("source tokens")
        axis.set_ylabel("output tokens")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    logger.info("Wrote %s", path)
    return path


def read_input_lines(source: str, stdin: TextIO | None = None) -> list[str]:
    """Read sentences from a file or, for "-", standard input; blank lines are kept.

    Raises:
        DataError: the file is missing or a line is not valid UTF-8 (file and line named).
    """
    if source != "-":
        lines = read_lines(source, "predict input", allow_empty=True)
    else:
        stream = (stdin or sys.stdin).buffer
        lines = [
            decode_line(raw, number, "standard input") for number, raw in enumerate(stream, start=1)
        ]
    if not lines:
        where = "standard input" if source == "-" else source
        raise DataError(f"{where}: no sentences to translate. Give one sentence per line.")
    return lines


def predict(config: TranslationConfig, context: CommandContext) -> dict[str, Any] | None:
    """Translate lines from ``--input`` (default stdin) to ``--output`` (default stdout)."""
    sentences = read_input_lines(context.args.input)
    model, tokenizers = load_trained(config, Path(context.run_dir))
    translations = build_translator(config, model, tokenizers).translate(sentences)
    text = "".join(translation + "\n" for translation in translations)
    return write_predictions(context, text, len(translations), "translations")


def tune(config: TranslationConfig, context: CommandContext) -> dict[str, Any]:
    """Search the shared space plus cell and attention type with KerasTuner; objective val_loss."""
    from shared.training import build_optimizer
    from shared.tuning import run_tuning

    train_split = load_split(config.data, context.data_dir, "train")
    val_split = load_split(config.data, context.data_dir, "val")
    tokenizers = train_tokenizers(
        config.data, train_split, Path(context.run_dir), config.train.seed
    )
    num_pairs = len(train_split)
    output_bias = compute_log_unigram(
        tokenizers.target.encode(train_split.target, add_eos=True), tokenizers.target.vocab_size
    )

    def build_model(trial_config: TranslationConfig):
        model = build_training_model(
            trial_config.model,
            tokenizers.source.vocab_size,
            tokenizers.target.vocab_size,
            output_bias=output_bias,
        )
        steps = planned_steps_per_epoch(trial_config, num_pairs) * trial_config.train.epochs
        compile_model(
            model, trial_config.model, build_optimizer(trial_config.train, total_steps=steps)
        )
        return model

    def make_trial_datasets(trial_config: TranslationConfig):
        train_ds, val_ds, _ = make_datasets(trial_config, tokenizers, train_split, val_split)
        return train_ds, val_ds

    def build_export_model(trial_config: TranslationConfig, model):
        return build_edge_model(model, trial_config.model, trial_config.export.max_source_length)

    return run_tuning(
        config,
        context,
        build_model=build_model,
        make_datasets=make_trial_datasets,
        build_export_model=build_export_model,
    )


def export(config: TranslationConfig, context: CommandContext) -> dict[str, Any]:
    """Export the SavedModel ``translate`` signature and the TFLite encoder and decoder step."""
    from pipelines.translation.export import export_translation

    run_dir = Path(context.run_dir)
    model, tokenizers = load_trained(config, run_dir)
    split = load_split(config.data, context.data_dir, default_test_split(config.data))
    variants = context.args.variants.split(",") if getattr(context.args, "variants", None) else None
    return export_translation(config, model, tokenizers, run_dir, split.source, variants)


COMMANDS: dict[str, Any] = {
    "train": train,
    "evaluate": evaluate,
    "predict": predict,
    "tune": tune,
    "export": export,
}
