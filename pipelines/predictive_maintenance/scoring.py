"""RUL error measures: RMSE and the asymmetric scoring function of the PHM08 challenge (NASA score).

The NASA score sums, over engines, ``exp(-d / 13) - 1`` for an early prediction
(``d = predicted - true < 0``) and ``exp(d / 10) - 1`` for a late one, so predicting
failure too late costs more than too early. It is defined in A. Saxena, K. Goebel,
D. Simon, N. Eklund, "Damage Propagation Modeling for Aircraft Engine Run-to-Failure
Simulation", PHM 2008. Lower is better for both measures; the score is a sum, so it
grows with the number of engines.
"""

from __future__ import annotations

import numpy as np

EARLY_DIVISOR = 13.0
LATE_DIVISOR = 10.0


def _check_pair(predicted: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predicted = np.asarray(predicted, dtype=np.float64).reshape(-1)
    true = np.asarray(true, dtype=np.float64).reshape(-1)
    if predicted.shape != true.shape or predicted.size == 0:
        raise ValueError(
            f"expected two non-empty arrays of one length, got {predicted.shape} and {true.shape}."
        )
    return predicted, true


def compute_rmse(predicted: np.ndarray, true: np.ndarray) -> float:
    """Return the root mean squared error between predicted and true RUL."""
    predicted, true = _check_pair(predicted, true)
    return float(np.sqrt(np.mean((predicted - true) ** 2)))


def compute_nasa_score(predicted: np.ndarray, true: np.ndarray) -> float:
    """Return the PHM08 asymmetric score summed over engines (late predictions cost more)."""
    predicted, true = _check_pair(predicted, true)
    errors = predicted - true
    per_engine = (
        np.where(errors < 0, np.exp(-errors / EARLY_DIVISOR), np.exp(errors / LATE_DIVISOR)) - 1.0
    )
    return float(per_engine.sum())


def compute_rul_metrics(
    predicted: np.ndarray, true: np.ndarray, rul_cap: float | None = None
) -> dict[str, float]:
    """Return RMSE, NASA score, mean error and MAE; with ``rul_cap`` also RMSE against the capped truth."""
    predicted, true = _check_pair(predicted, true)
    metrics = {
        "rmse": compute_rmse(predicted, true),
        "nasa_score": compute_nasa_score(predicted, true),
        "mae": float(np.mean(np.abs(predicted - true))),
        "mean_error": float(np.mean(predicted - true)),
        "engines": int(true.size),
    }
    if rul_cap is not None:
        metrics["rmse_capped_truth"] = compute_rmse(predicted, np.minimum(true, rul_cap))
    return metrics
