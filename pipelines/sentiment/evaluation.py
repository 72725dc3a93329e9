"""Classification scores and the evaluation report: metrics, confusion matrix and confident mistakes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Headless: reports are written on servers and in CI.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support  # noqa: E402

from pipelines.sentiment.data import LabeledTexts  # noqa: E402
from shared.reports import write_report  # noqa: E402
from shared.runs import write_json  # noqa: E402

logger = logging.getLogger(__name__)

MISTAKES_SHOWN = 10
MISTAKE_TEXT_CHARS = 300


def compute_classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, label_names: Sequence[str]
) -> dict[str, Any]:
    """Return accuracy, macro-F1, per-class precision and recall and the confusion matrix.

    A class never predicted has precision 0 (scikit-learn's ``zero_division=0``).
    """
    predicted = np.argmax(probabilities, axis=-1)
    classes = list(range(len(label_names)))
    precision, recall, _, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "support": int(support[i])}
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).tolist(),
    }


def find_confident_mistakes(
    data: LabeledTexts, probabilities: np.ndarray, count: int = MISTAKES_SHOWN
) -> list[dict[str, Any]]:
    """Return the ``count`` wrong predictions with the highest predicted probability."""
    predicted = np.argmax(probabilities, axis=-1)
    confidence = probabilities[np.arange(len(predicted)), predicted]
    wrong = np.flatnonzero(predicted != data.labels)
    ranked = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    return [
        {
            "origin": data.origins[i],
            "label": data.label_names[data.labels[i]],
            "predicted": data.label_names[predicted[i]],
            "probability": float(confidence[i]),
            "text": data.texts[i],
        }
        for i in ranked
    ]


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], label_names: Sequence[str], path: Path) -> Path:
    """Draw the confusion matrix (rows: true label, columns: predicted) with counts as a PNG."""
    matrix = np.asarray(matrix)
    size = 1.2 + 0.9 * len(label_names)
    figure, axis = plt.subplots(figsize=(size + 1.5, size))
    image = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axis)
    ticks = range(len(label_names))
    axis.set_xticks(ticks, label_names, rotation=30, ha="right")
    axis.set_yticks(ticks, label_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    for row in ticks:
        for column in ticks:
            color = "white" if matrix[row, column] > matrix.max() / 2 else "black"
            axis.text(column, row, str(matrix[row, column]), ha="center", va="center", color=color)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def format_mistakes(mistakes: Sequence[dict[str, Any]]) -> str:
    """Format mistakes as a Markdown table, texts shortened and pipes escaped."""
    if not mistakes:
        return "No mistakes on this split."
    lines = ["| # | origin | true | predicted | probability | text |", "|---|---|---|---|---|---|"]
    for rank, mistake in enumerate(mistakes, start=1):
        text = " ".join(mistake["text"].split())
        if len(text) > MISTAKE_TEXT_CHARS:
            text = text[:MISTAKE_TEXT_CHARS] + "…"
        text = text.replace("|", "\\|")
        lines.append(f"| {rank} | `{mistake['origin']}` | {mistake['label']} | {mistake['predicted']} | "
                     f"{mistake['probability']:.4f} | {text} |")
    return "\n".join(lines)


def format_per_class(metrics: dict[str, Any]) -> str:
    """Format per-class precision, recall and support as a Markdown table."""
    lines = ["| class | precision | recall | support |", "|---|---|---|---|"]
    for name, scores in metrics["per_class"].items():
        lines.append(f"| {name} | {scores['precision']:.4f} | {scores['recall']:.4f} | {scores['support']} |")
    return "\n".join(lines)


def write_evaluation_report(
    run_dir: Path, config: Any, data: LabeledTexts, probabilities: np.ndarray, metrics: dict[str, Any]
) -> Path:
    """Write ``evaluation_<split>.json``, ``confusion_matrix_<split>.png`` and ``report.md``."""
    split = metrics["split"]
    json_path = write_json(run_dir / f"evaluation_{split}.json", metrics)
    png_path = plot_confusion_matrix(metrics["confusion_matrix"], data.label_names,
                                     run_dir / f"confusion_matrix_{split}.png")
    mistakes = find_confident_mistakes(data, probabilities)
    summary = {"split": split, "examples": metrics["examples"], "accuracy": metrics["accuracy"],
               "macro_f1": metrics["macro_f1"]}
    sections = {
        "Per-class precision and recall": format_per_class(metrics),
        "Confusion matrix": f"Rows are true labels, columns predicted labels.\n\n![confusion matrix]({png_path.name})",
        f"The {MISTAKES_SHOWN} most confident mistakes": format_mistakes(mistakes),
    }
    artifacts = ["model.keras", "tokenizer/spm.model", json_path.name, png_path.name, "metrics.json",
                 "learning_curves.png", "export/export_report.json"]
    logger.info("Wrote %s and %s", json_path, png_path)
    return write_report(run_dir, f"Sentiment classifier: evaluation on {split}", summary, config, artifacts, sections)
