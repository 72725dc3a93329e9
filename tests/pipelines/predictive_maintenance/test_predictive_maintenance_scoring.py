"""Tests of RMSE and the PHM08 asymmetric score against hand-computed values."""

import math

import pytest

from pipelines.predictive_maintenance.scoring import (
    compute_nasa_score,
    compute_rmse,
    compute_rul_metrics,
)


def test_rmse_hand_computed():
    assert compute_rmse([10, 20, 30], [13, 16, 30]) == pytest.approx(math.sqrt((9 + 16) / 3))


def test_nasa_score_early_and_late():
    # 13 cycles early costs e - 1; 10 cycles late costs e - 1 as well.
    assert compute_nasa_score([37, 60], [50, 50]) == pytest.approx(2 * (math.e - 1))


def test_nasa_score_late_costs_more():
    assert compute_nasa_score([60], [50]) > compute_nasa_score([40], [50])


def test_nasa_score_perfect():
    assert compute_nasa_score([5, 80], [5, 80]) == 0.0


def test_metrics_capped_truth():
    metrics = compute_rul_metrics([125, 100], [140, 100], rul_cap=125)
    assert metrics["rmse"] == pytest.approx(math.sqrt(225 / 2))
    assert metrics["rmse_capped_truth"] == 0.0
    assert metrics["engines"] == 2


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="one length"):
        compute_rmse([1, 2], [1])
