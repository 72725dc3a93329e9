"""PNG plots of RUL predictions: predicted against true per test engine, and RUL over an engine's life."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Headless: plots are written on servers and in CI.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

logger = logging.getLogger(__name__)


def save_figure(figure, path: Path) -> Path:
    """Save a figure as PNG through a temporary file and a rename, then close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(staged, dpi=100)
    plt.close(figure)
    staged.replace(path)
    logger.info("Wrote %s", path)
    return path


def plot_predicted_vs_true(
    predicted: np.ndarray, true: np.ndarray, unit_ids: np.ndarray, path: str | Path, title: str
) -> Path:
    """Plot the predicted and true RUL of each test engine, engines sorted by true RUL.

    Args:
        predicted: RUL per engine at its last reading, in cycles.
        true: true RUL per engine.
        unit_ids: engine ids, for the axis note.
        path: the PNG to write.
        title: the subset name, shown in the title.
    """
    order = np.argsort(true, kind="stable")
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    positions = np.arange(len(order))
    axes[0].plot(positions, true[order], color="black", label="true RUL")
    axes[0].scatter(positions, predicted[order], s=10, color="tab:red", label="predicted RUL")
    axes[0].set_xlabel(f"test engine ({len(unit_ids)} engines, sorted by true RUL)")
    axes[0].set_ylabel("RUL (cycles)")
    axes[0].legend()
    limit = float(max(np.max(true), np.max(predicted))) * 1.05
    axes[1].scatter(true, predicted, s=10)
    axes[1].plot([0, limit], [0, limit], color="black", linewidth=1)
    axes[1].set_xlabel("true RUL (cycles)")
    axes[1].set_ylabel("predicted RUL (cycles)")
    figure.suptitle(f"{title}: predicted against true RUL at each engine's last reading")
    figure.tight_layout()
    return save_figure(figure, Path(path))


def plot_trajectories(
    unit_ids: np.ndarray,
    cycles: np.ndarray,
    capped_true: np.ndarray,
    predicted: np.ndarray,
    true: np.ndarray,
    path: str | Path,
    title: str,
) -> Path:
    """Plot predicted, capped true and true RUL against cycle for a few engines, one panel each.

    Args:
        unit_ids: engine of each point.
        cycles: cycle of each point.
        capped_true: the capped RUL target at each point.
        predicted: the predicted RUL from the window ending at each point.
        true: the uncapped true RUL at each point.
        path: the PNG to write.
        title: the subset name, shown in the title.
    """
    units = list(dict.fromkeys(np.asarray(unit_ids).tolist()))
    figure, axes = plt.subplots(1, len(units), figsize=(4 * len(units), 3.5), squeeze=False)
    for axis, unit in zip(axes[0], units, strict=True):
        rows = unit_ids == unit
        axis.plot(cycles[rows], true[rows], color="gray", linestyle=":", label="true RUL")
        axis.plot(cycles[rows], capped_true[rows], color="black", label="capped true RUL")
        axis.plot(cycles[rows], predicted[rows], color="tab:red", label="predicted RUL")
        axis.set_title(f"engine {unit}")
        axis.set_xlabel("cycle")
    axes[0][0].set_ylabel("RUL (cycles)")
    axes[0][0].legend(fontsize="small")
    figure.suptitle(f"{title}: RUL over each engine's recorded life")
    figure.tight_layout()
    return save_figure(figure, Path(path))
