"""Tests for shared.timeseries: splits, sliding windows, normalizers and constant features."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.errors import ConfigError, DataError
from shared.timeseries import (
    MinMaxNormalizer,
    Normalizer,
    ZScoreNormalizer,
    assign_entity_splits,
    build_normalizer,
    check_disjoint_entities,
    find_constant_features,
    fit_normalizer_on_split,
    make_last_windows,
    make_split_mask,
    make_windows,
    split_by_time,
    split_entities,
)


@pytest.fixture
def two_entities():
    """Entity "A" on rows 0-3 and entity "B" on rows 4-6; feature 0 is the row index."""
    rows = np.arange(7, dtype=np.float32)
    values = np.stack([rows, 10.0 * rows], axis=1)
    entity_ids = np.array(["A"] * 4 + ["B"] * 3)
    targets = 100.0 + rows
    return values, entity_ids, targets


def window_rows(windows) -> np.ndarray:
    """Return the input row index of every step of every window (feature 0 stores it)."""
    return windows.values[:, :, 0].astype(int)


# ---------------------------------------------------------------------------
# make_windows


def test_windows_exact_contents(two_entities):
    values, entity_ids, targets = two_entities
    windows = make_windows(values, entity_ids, window_length=2, targets=targets)
    assert window_rows(windows).tolist() == [[0, 1], [1, 2], [2, 3], [4, 5], [5, 6]]
    assert windows.values[:, :, 1].tolist() == [[0, 10], [10, 20], [20, 30], [40, 50], [50, 60]]
    assert windows.entity_ids.tolist() == ["A", "A", "A", "B", "B"]
    assert windows.targets.tolist() == [101, 102, 103, 105, 106]
    assert windows.end_rows.tolist() == [1, 2, 3, 5, 6]
    assert windows.values.shape == (5, 2, 2)


def test_windows_skip_entity_crossing(two_entities):
    values, entity_ids, _ = two_entities
    windows = make_windows(values, entity_ids, window_length=3)
    assert window_rows(windows).tolist() == [[0, 1, 2], [1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize("window_length", [1, 2, 3, 4])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_windows_one_entity_each(two_entities, window_length, stride):
    values, entity_ids, _ = two_entities
    windows = make_windows(values, entity_ids, window_length=window_length, stride=stride)
    row_entities = entity_ids[window_rows(windows)]
    assert np.all(row_entities == row_entities[:, :1])
    assert np.array_equal(row_entities[:, 0], windows.entity_ids)
    expected_count = len(range(0, 4 - window_length + 1, stride)) + len(
        range(0, 3 - window_length + 1, stride)
    )
    assert len(windows.entity_ids) == expected_count


def test_windows_stride(two_entities):
    values, entity_ids, _ = two_entities
    windows = make_windows(values, entity_ids, window_length=2, stride=2)
    assert window_rows(windows).tolist() == [[0, 1], [2, 3], [4, 5]]


def test_windows_skip_split_crossing():
    values = np.arange(6, dtype=np.float32)[:, None]
    entity_ids = np.zeros(6, dtype=int)
    split_ids = np.array(["train"] * 4 + ["validation"] * 2)
    windows = make_windows(values, entity_ids, window_length=2, split_ids=split_ids)
    assert window_rows(windows).tolist() == [[0, 1], [1, 2], [2, 3], [4, 5]]
    assert windows.split_ids.tolist() == ["train", "train", "train", "validation"]


def test_windows_split_inside_entity_split(two_entities):
    values, entity_ids, _ = two_entities
    split_ids = np.array(["train"] * 4 + ["validation"] * 3)
    windows = make_windows(values, entity_ids, window_length=2, split_ids=split_ids)
    row_splits = split_ids[window_rows(windows)]
    assert np.all(row_splits == row_splits[:, :1])


def test_windows_drop_short_entity(two_entities):
    values, entity_ids, _ = two_entities
    windows = make_windows(values, entity_ids, window_length=4)
    assert windows.entity_ids.tolist() == ["A"]


def test_windows_none_fit_raises(two_entities):
    values, entity_ids, _ = two_entities
    with pytest.raises(DataError, match="longest run: 4"):
        make_windows(values, entity_ids, window_length=5)


def test_windows_time_not_increasing(two_entities):
    values, entity_ids, _ = two_entities
    times = np.array([1, 2, 2, 3, 1, 2, 3])
    with pytest.raises(DataError, match=r"entity 'A'.*row 2"):
        make_windows(values, entity_ids, window_length=2, times=times)


def test_windows_time_restarts_per_entity(two_entities):
    values, entity_ids, _ = two_entities
    times = np.array([1, 2, 3, 4, 1, 2, 3])
    windows = make_windows(values, entity_ids, window_length=2, times=times)
    assert len(windows.entity_ids) == 5


def test_windows_entity_not_contiguous():
    values = np.zeros((5, 1), dtype=np.float32)
    entity_ids = np.array([1, 1, 2, 2, 1])
    with pytest.raises(DataError, match="entity 1 appears again at row 4"):
        make_windows(values, entity_ids, window_length=2)


def test_windows_nan_row_raises(two_entities):
    values, entity_ids, _ = two_entities
    values[5, 1] = np.nan
    with pytest.raises(DataError, match="row 5"):
        make_windows(values, entity_ids, window_length=2)


@pytest.mark.parametrize("window_length, stride", [(0, 1), (2, 0)])
def test_windows_bad_sizes(two_entities, window_length, stride):
    values, entity_ids, _ = two_entities
    with pytest.raises(ConfigError):
        make_windows(values, entity_ids, window_length=window_length, stride=stride)


# ---------------------------------------------------------------------------
# make_last_windows


def test_last_windows_pad_short_entity(two_entities):
    values, entity_ids, targets = two_entities
    last = make_last_windows(values, entity_ids, window_length=4, targets=targets, fill_value=-1.0)
    assert last.entity_ids.tolist() == ["A", "B"]
    assert last.lengths.tolist() == [4, 3]
    assert last.mask.tolist() == [[True, True, True, True], [True, True, True, False]]
    assert last.values[:, :, 0].tolist() == [[0, 1, 2, 3], [4, 5, 6, -1]]
    assert last.targets.tolist() == [103, 106]


def test_last_windows_take_last_rows(two_entities):
    values, entity_ids, targets = two_entities
    last = make_last_windows(values, entity_ids, window_length=2, targets=targets)
    assert last.values[:, :, 0].tolist() == [[2, 3], [5, 6]]
    assert last.mask.all()
    assert last.targets.tolist() == [103, 106]


def test_last_windows_mask_matches_lengths(two_entities):
    values, entity_ids, _ = two_entities
    last = make_last_windows(values, entity_ids, window_length=6)
    assert last.mask.sum(axis=1).tolist() == last.lengths.tolist()
    assert last.lengths.tolist() == [4, 3]


def test_last_windows_per_split():
    values = np.arange(6, dtype=np.float32)[:, None]
    entity_ids = np.zeros(6, dtype=int)
    split_ids = np.array(["train"] * 4 + ["validation"] * 2)
    last = make_last_windows(values, entity_ids, window_length=3, split_ids=split_ids)
    assert last.values[:, :, 0].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert last.split_ids.tolist() == ["train", "validation"]


# ---------------------------------------------------------------------------
# Entity and time splits


def test_split_entities_disjoint_and_complete():
    entity_ids = np.repeat(np.arange(20), 3)
    splits = split_entities(entity_ids, {"train": 0.7, "validation": 0.15, "test": 0.15}, seed=3)
    assert {name: len(ids) for name, ids in splits.items()} == {
        "train": 14,
        "validation": 3,
        "test": 3,
    }
    combined = np.concatenate(list(splits.values()))
    assert sorted(combined.tolist()) == list(range(20))
    check_disjoint_entities(splits)


def test_split_entities_reproducible():
    entity_ids = np.arange(20)
    first = split_entities(entity_ids, validation_fraction=0.25, seed=7)
    second = split_entities(entity_ids[::-1], validation_fraction=0.25, seed=7)
    assert first["validation"].tolist() == second["validation"].tolist()
    assert first["train"].tolist() == second["train"].tolist()


def test_split_entities_seed_changes():
    entity_ids = np.arange(20)
    first = split_entities(entity_ids, validation_fraction=0.25, seed=7)
    other = split_entities(entity_ids, validation_fraction=0.25, seed=8)
    assert first["validation"].tolist() != other["validation"].tolist()


def test_split_entities_small_split_kept():
    splits = split_entities(["a", "b", "c"], {"train": 0.9, "validation": 0.1}, seed=0)
    assert len(splits["validation"]) == 1
    assert len(splits["train"]) == 2


def test_split_entities_too_few():
    with pytest.raises(DataError, match="cannot split 1 entities"):
        split_entities(["a"], validation_fraction=0.5)


@pytest.mark.parametrize(
    "fractions, validation_fraction",
    [
        (None, None),
        ({"train": 0.5, "validation": 0.4}, None),
        ({"validation": 1.0}, None),
        (None, 1.0),
    ],
)
def test_split_fractions_invalid(fractions, validation_fraction):
    with pytest.raises(ConfigError):
        split_entities(np.arange(10), fractions, validation_fraction=validation_fraction)


def test_disjoint_check_names_entity():
    splits = {"train": ["engine-1", "engine-7"], "validation": ["engine-7", "engine-9"]}
    with pytest.raises(DataError, match="'engine-7' is in both the 'train' and the 'validation'"):
        check_disjoint_entities(splits)


def test_assign_entity_splits_rows(two_entities):
    _, entity_ids, _ = two_entities
    split_ids = assign_entity_splits(entity_ids, {"train": ["B"], "validation": ["A"]})
    assert split_ids.tolist() == ["validation"] * 4 + ["train"] * 3
    assert make_split_mask(split_ids, "train").tolist() == [False] * 4 + [True] * 3


def test_assign_entity_splits_missing(two_entities):
    _, entity_ids, _ = two_entities
    with pytest.raises(DataError, match="row 4: entity 'B' is in no split"):
        assign_entity_splits(entity_ids, {"train": ["A"]})


def test_assign_entity_splits_overlap(two_entities):
    _, entity_ids, _ = two_entities
    with pytest.raises(DataError, match="'A' is in both"):
        assign_entity_splits(entity_ids, {"train": ["A", "B"], "validation": ["A"]})


def test_split_by_time_single_series():
    split_ids = split_by_time(np.zeros(10, dtype=int), validation_fraction=0.2)
    assert split_ids.tolist() == ["train"] * 8 + ["validation"] * 2


def test_split_by_time_per_entity():
    entity_ids = np.array([0] * 5 + [1] * 10)
    split_ids = split_by_time(entity_ids, {"train": 0.6, "validation": 0.2, "test": 0.2})
    assert split_ids[:5].tolist() == ["train"] * 3 + ["validation", "test"]
    assert split_ids[5:].tolist() == ["train"] * 6 + ["validation"] * 2 + ["test"] * 2


def test_split_by_time_empty_split():
    with pytest.raises(DataError, match="no rows to split 'validation'"):
        split_by_time(np.zeros(2, dtype=int), validation_fraction=0.1)


def test_split_mask_unknown_split():
    with pytest.raises(DataError, match="no row belongs to split 'test'"):
        make_split_mask(np.array(["train", "validation"]), "test")


# ---------------------------------------------------------------------------
# Normalizers


@pytest.fixture
def split_rows():
    """Three training rows and two validation rows with very different levels."""
    values = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [100.0, 7.0], [200.0, 9.0]])
    split_ids = np.array(["train", "train", "train", "validation", "validation"])
    return values, split_ids


def test_zscore_fits_train_only(split_rows):
    values, split_ids = split_rows
    normalizer = fit_normalizer_on_split(values, split_ids, "train")
    offset, scale = normalizer.stats[None]
    assert np.allclose(offset, [2.0, 5.0])
    assert np.allclose(scale, [np.sqrt(2.0 / 3.0), 1.0])
    assert not np.allclose(offset, values.mean(axis=0))
    assert normalizer.fit_split == "train"
    assert normalizer.num_fit_rows == 3


def test_zscore_transform_values(split_rows):
    values, split_ids = split_rows
    normalizer = fit_normalizer_on_split(values, split_ids, "train")
    transformed = normalizer.transform(values)
    train = transformed[:3]
    assert np.allclose(train.mean(axis=0), [0.0, 0.0])
    assert np.allclose(train[:, 0].std(), 1.0)
    assert np.isclose(transformed[3, 0], (100.0 - 2.0) / np.sqrt(2.0 / 3.0))


def test_minmax_fits_train_only(split_rows):
    values, split_ids = split_rows
    normalizer = fit_normalizer_on_split(values, split_ids, "train", kind="minmax")
    transformed = normalizer.transform(values)
    assert transformed[:3, 0].tolist() == [0.0, 0.5, 1.0]
    assert np.isclose(transformed[3, 0], 49.5)


@pytest.mark.parametrize("kind", ["zscore", "minmax"])
def test_constant_feature_no_nan(split_rows, kind):
    values, split_ids = split_rows
    normalizer = fit_normalizer_on_split(values, split_ids, "train", kind=kind)
    transformed = normalizer.transform(values)
    assert np.all(np.isfinite(transformed))
    assert normalizer.stats[None][1][1] == 1.0
    assert transformed[:3, 1].tolist() == [0.0, 0.0, 0.0]


def test_constant_feature_float_mean():
    # 0.1 repeated has a float mean that is not exactly 0.1, so std is tiny but nonzero.
    values = np.full((7, 1), 0.1)
    transformed = ZScoreNormalizer().fit(values).transform(values)
    assert np.all(np.abs(transformed) < 1e-12)


def test_inverse_transform_round_trip(split_rows):
    values, _ = split_rows
    for kind in ("zscore", "minmax"):
        normalizer = build_normalizer(kind).fit(values[:3])
        restored = normalizer.inverse_transform(normalizer.transform(values.astype(np.float64)))
        assert np.allclose(restored, values)


def test_transform_keeps_float64_and_windows(split_rows):
    values, _ = split_rows
    normalizer = ZScoreNormalizer().fit(values[:3])
    assert normalizer.transform(values).dtype == np.float64
    assert normalizer.transform(values.astype(np.float32)).dtype == np.float32
    windows = np.stack([values[:2], values[2:4]])
    assert np.allclose(normalizer.transform(windows)[1], normalizer.transform(values[2:4]))


def test_save_load_identical(tmp_path, split_rows):
    values, split_ids = split_rows
    normalizer = fit_normalizer_on_split(
        values, split_ids, "train", feature_names=["speed", "load"]
    )
    path = normalizer.save(tmp_path / "model" / "normalizer.json")
    loaded = Normalizer.load(path)
    assert isinstance(loaded, ZScoreNormalizer)
    assert np.array_equal(loaded.transform(values), normalizer.transform(values))
    assert loaded.feature_names == ["speed", "load"]
    assert loaded.fit_split == "train"
    assert [p.name for p in path.parent.iterdir()] == ["normalizer.json"]


def test_save_load_grouped(tmp_path, split_rows):
    values, _ = split_rows
    group_ids = np.array([3, 3, 4, 4, 4], dtype=np.int64)
    normalizer = MinMaxNormalizer().fit(values, group_ids)
    loaded = MinMaxNormalizer.load(normalizer.save(tmp_path / "normalizer.json"))
    assert np.array_equal(
        loaded.transform(values, group_ids), normalizer.transform(values, group_ids)
    )


def test_load_wrong_kind(tmp_path, split_rows):
    values, _ = split_rows
    path = MinMaxNormalizer().fit(values).save(tmp_path / "normalizer.json")
    with pytest.raises(DataError, match="contains a 'minmax' normalizer"):
        ZScoreNormalizer.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Normalizer.load(tmp_path / "absent.json")


def test_load_bad_version(tmp_path, split_rows):
    values, _ = split_rows
    path = ZScoreNormalizer().fit(values).save(tmp_path / "normalizer.json")
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="format version 99"):
        Normalizer.load(path)


def test_per_group_own_stats():
    values = np.array([[1.0], [3.0], [10.0], [30.0]])
    group_ids = np.array(["low", "low", "high", "high"])
    normalizer = ZScoreNormalizer().fit(values, group_ids)
    assert np.allclose(normalizer.stats["low"][0], [2.0])
    assert np.allclose(normalizer.stats["high"][0], [20.0])
    transformed = normalizer.transform(np.array([[3.0], [30.0]]), np.array(["low", "high"]))
    assert np.allclose(transformed[:, 0], [1.0, 1.0])


def test_per_group_split_fit():
    values = np.array([[1.0], [3.0], [10.0], [30.0], [500.0]])
    group_ids = np.array([0, 0, 1, 1, 1])
    split_ids = np.array(["train"] * 4 + ["validation"])
    normalizer = fit_normalizer_on_split(values, split_ids, group_ids=group_ids)
    assert np.allclose(normalizer.stats[1][0], [20.0])


def test_per_group_unseen_group():
    normalizer = ZScoreNormalizer().fit(np.array([[1.0], [3.0]]), np.array([0, 0]))
    with pytest.raises(DataError, match="group 5 was not seen"):
        normalizer.transform(np.array([[1.0]]), np.array([5]))


def test_per_group_needs_group_ids():
    normalizer = ZScoreNormalizer().fit(np.array([[1.0], [3.0]]), np.array([0, 0]))
    with pytest.raises(DataError, match="pass group_ids"):
        normalizer.transform(np.array([[1.0]]))


def test_fit_rejects_nan():
    with pytest.raises(DataError, match="NaN"):
        ZScoreNormalizer().fit(np.array([[1.0], [np.nan]]))


def test_transform_wrong_feature_count(split_rows):
    values, _ = split_rows
    normalizer = ZScoreNormalizer().fit(values)
    with pytest.raises(DataError, match="fitted on 2 features"):
        normalizer.transform(values[:, :1])


def test_transform_before_fit():
    with pytest.raises(DataError, match="not fitted"):
        MinMaxNormalizer().transform(np.zeros((1, 1)))


def test_build_normalizer_unknown():
    with pytest.raises(ConfigError, match="unknown normalizer 'robust'"):
        build_normalizer("robust")


# ---------------------------------------------------------------------------
# find_constant_features


def test_constant_features_found():
    values = np.array([[1.0, 5.0, 2.00], [2.0, 5.0, 2.01], [3.0, 5.0, 2.00]])
    assert find_constant_features(values).tolist() == [1]
    assert find_constant_features(values, tolerance=0.02).tolist() == [1, 2]


def test_constant_features_per_group():
    values = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 9.0], [4.0, 9.0]])
    group_ids = np.array([0, 0, 1, 1])
    assert find_constant_features(values).tolist() == []
    assert find_constant_features(values, group_ids=group_ids).tolist() == [1]
