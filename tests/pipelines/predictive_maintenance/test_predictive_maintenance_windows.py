"""Tests of per-engine windows: no mixing of engines, padding and masking of short engines."""

import numpy as np
import pytest

from pipelines.predictive_maintenance.windows import (
    compute_positions,
    make_dataset,
    make_last_engine_windows,
    make_windows_per_row,
)
from shared.errors import ConfigError, DataError


def make_rows(lengths):
    """Rows whose single feature is ``unit * 100 + position`` and unit ids 1, 2, ..."""
    unit_ids = np.concatenate(
        [np.full(length, unit) for unit, length in enumerate(lengths, start=1)]
    )
    positions = compute_positions(unit_ids)
    return (unit_ids * 100 + positions).astype(np.float32)[:, None], unit_ids


def test_positions():
    assert compute_positions(np.array([4, 4, 4, 9, 9])).tolist() == [0, 1, 2, 0, 1]


def test_full_windows_count():
    features, unit_ids = make_rows([7, 5])
    windows = make_windows_per_row(features, unit_ids, window_length=4, min_length=4)
    assert len(windows) == (7 - 3) + (5 - 3)
    assert windows.padding_mask.all()


def test_windows_never_mix_engines():
    features, unit_ids = make_rows([6, 2, 9])
    windows = make_windows_per_row(features, unit_ids, window_length=4, min_length=1)
    for readings, mask, unit in zip(
        windows.readings, windows.padding_mask, windows.unit_ids, strict=True
    ):
        assert np.all(readings[mask, 0] // 100 == unit)


def test_windows_end_at_their_row():
    features, unit_ids = make_rows([6])
    windows = make_windows_per_row(features, unit_ids, window_length=4, min_length=1)
    last_real = windows.readings[np.arange(len(windows)), windows.lengths - 1, 0]
    assert last_real.tolist() == features[windows.end_rows, 0].tolist()


def test_prefix_windows_padded_right():
    features, unit_ids = make_rows([6])
    windows = make_windows_per_row(features, unit_ids, window_length=4, min_length=2)
    assert windows.lengths.tolist() == [2, 3, 4, 4, 4]
    assert windows.padding_mask[0].tolist() == [True, True, False, False]
    assert windows.readings[0, :, 0].tolist() == [100, 101, 0, 0]


def test_window_target_at_last_row():
    features, unit_ids = make_rows([5])
    targets = np.array([4, 3, 2, 1, 0], dtype=np.float32)
    windows = make_windows_per_row(
        features, unit_ids, window_length=3, min_length=1, targets=targets
    )
    assert windows.targets.tolist() == [4, 3, 2, 1, 0]


def test_short_test_engine_kept_and_masked():
    features, unit_ids = make_rows([8, 3, 5])
    windows = make_last_engine_windows(features, unit_ids, window_length=5)
    assert windows.unit_ids.tolist() == [1, 2, 3]
    assert windows.lengths.tolist() == [5, 3, 5]
    assert windows.padding_mask[1].tolist() == [True, True, True, False, False]
    assert windows.readings[1, :3, 0].tolist() == [200, 201, 202]
    assert windows.readings[0, :, 0].tolist() == [103, 104, 105, 106, 107]


def test_last_windows_end_rows():
    features, unit_ids = make_rows([8, 3])
    assert make_last_engine_windows(features, unit_ids, 5).end_rows.tolist() == [7, 10]


def test_min_length_out_of_range():
    features, unit_ids = make_rows([5])
    with pytest.raises(ConfigError, match="min_length"):
        make_windows_per_row(features, unit_ids, window_length=3, min_length=4)


def test_nan_features_rejected():
    features, unit_ids = make_rows([5])
    features[2, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        make_windows_per_row(features, unit_ids, window_length=3)


def test_dataset_batches():
    features, unit_ids = make_rows([6])
    windows = make_windows_per_row(features, unit_ids, 4, 1, targets=np.arange(6, dtype=np.float32))
    inputs, targets = next(iter(make_dataset(windows, batch_size=4)))
    assert inputs["readings"].shape == (4, 4, 1)
    assert inputs["padding_mask"].dtype.name == "bool"
    assert targets.numpy().tolist() == [0, 1, 2, 3]
