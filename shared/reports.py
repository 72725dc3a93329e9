"""Run reports: learning curves as PNG and a short report.md listing metrics, config and artifacts."""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Headless: reports are written on servers and in CI.
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from shared.config import config_to_dict  # noqa: E402
from shared.runs import write_text_atomic  # noqa: E402

logger = logging.getLogger(__name__)


def load_history_csv(path: str | Path) -> dict[str, list[float]]:
    """Read a CSVLogger history into metric name -> values per epoch (the epoch column dropped)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for name, value in row.items():
            if name == "epoch" or value in (None, ""):
                continue
            try:
                number = float(value)
            except ValueError:  # CSVLogger writes "NA" for a metric missing from an epoch.
                number = float("nan")
            columns.setdefault(name, []).append(number)
    return columns


def plot_learning_curves(history_csv: str | Path, output_png: str | Path) -> Path | None:
    """Plot each metric and its ``val_`` twin per epoch into one PNG; None if there is no history."""
    history = load_history_csv(history_csv)
    names = sorted(n for n in history if not n.startswith("val_") and n != "learning_rate")
    if not names:
        return None
    figure, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for axis, name in zip(axes[0], names):
        epochs = range(1, len(history[name]) + 1)
        axis.plot(epochs, history[name], marker="o", label="train")
        if f"val_{name}" in history:
            axis.plot(range(1, len(history[f"val_{name}"]) + 1), history[f"val_{name}"], marker="o",
                      label="validation")
        axis.set_xlabel("epoch")
        axis.set_title(name)
        axis.legend()
    figure.tight_layout()
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_png, dpi=100)
    plt.close(figure)
    return output_png


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """Format flat or one-level nested metrics as a Markdown table."""
    lines = ["| metric | value |", "|---|---|"]
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            for inner, inner_value in value.items():
                lines.append(f"| {name}.{inner} | {_format_value(inner_value)} |")
        else:
            lines.append(f"| {name} | {_format_value(value)} |")
    return "\n".join(lines)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(
    run_dir: str | Path,
    title: str,
    metrics: Mapping[str, Any],
    config: Any,
    artifacts: Iterable[str | Path] = (),
    sections: Mapping[str, str] | None = None,
) -> Path:
    """Write ``report.md`` in ``run_dir``: metrics, extra sections, artifacts and the config.

    Args:
        run_dir: the run directory; artifact paths are shown relative to it.
        title: the report heading.
        metrics: metric name -> value (one level of nesting allowed); when empty, the
            report has no Metrics section (a pipeline may give its own table in ``sections``).
        config: the resolved config dataclass.
        artifacts: files to list (missing ones are skipped).
        sections: extra Markdown sections, heading -> body, in order.
    """
    run_dir = Path(run_dir)
    parts = [f"# {title}", ""]
    if metrics:
        parts += ["## Metrics", "", format_metrics_table(metrics), ""]
    for heading, body in (sections or {}).items():
        parts += [f"## {heading}", "", body.rstrip(), ""]
    listed = []
    for artifact in artifacts:
        path = Path(artifact)
        path = path if path.is_absolute() else run_dir / path
        if path.exists():
            listed.append(f"- `{path.relative_to(run_dir) if path.is_relative_to(run_dir) else path}`")
    if listed:
        parts += ["## Artifacts", "", *listed, ""]
    config_text = yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip()
    parts += ["## Config", "", "```yaml", config_text, "```", ""]
    report_path = write_text_atomic(run_dir / "report.md", "\n".join(parts))
    logger.info("Wrote %s", report_path)
    return report_path
