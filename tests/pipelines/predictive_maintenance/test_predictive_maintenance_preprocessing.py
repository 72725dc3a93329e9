"""Tests of the preprocessing fitted on training engines: splits, constant sensors, conditions, scaling."""

import dataclasses

import numpy as np
import pytest

from pipelines.predictive_maintenance.config import PRESETS, DataConfig
from pipelines.predictive_maintenance.data import EngineTable, load_train_table
from pipelines.predictive_maintenance.pipeline import prepare_training_data
from pipelines.predictive_maintenance.preprocessing import (
    compute_smoothed_features,
    compute_smoothed_step,
    fit_operating_conditions,
    fit_preprocessor,
    load_preprocessor,
)
from shared.errors import DataError
from shared.runs import read_json

CENTERS = np.array(
    [
        [0.0, 0.0, 100.0],
        [10.0, 0.25, 100.0],
        [20.0, 0.7, 100.0],
        [25.0, 0.62, 60.0],
        [35.0, 0.84, 100.0],
        [42.0, 0.84, 100.0],
    ]
)


def make_condition_table(rows_per_condition=20, seed=0):
    """A table flying six conditions; sensor level depends on the condition, sensor_2 is constant."""
    rng = np.random.default_rng(seed)
    conditions = np.tile(np.arange(6), rows_per_condition)
    settings = CENTERS[conditions] + rng.normal(0, 0.001, (len(conditions), 3))
    sensors = rng.normal(0, 1, (len(conditions), 21)) + 50.0 * conditions[:, None]
    sensors[:, 1] = 3.0
    rows = len(conditions)
    table = EngineTable(
        np.repeat([1, 2], rows // 2),
        np.tile(np.arange(1, rows // 2 + 1), 2).astype(float),
        settings,
        sensors,
        np.arange(1, rows + 1),
        "memory",
    )
    return table, conditions


@pytest.fixture
def prepared(cmapss_dir, tmp_path):
    config = dataclasses.replace(PRESETS["tiny"], data=DataConfig(validation_fraction=0.25))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    preprocessor, windows, engine_ids = prepare_training_data(config, cmapss_dir, run_dir)
    return config, cmapss_dir, run_dir, preprocessor, windows, engine_ids


def test_no_engine_in_two_splits(prepared):
    *_, windows, engine_ids = prepared
    assert set(engine_ids["train"]).isdisjoint(engine_ids["validation"])
    assert sorted(engine_ids["train"] + engine_ids["validation"]) == list(range(1, 13))
    assert set(windows["validation"].unit_ids.tolist()) == set(engine_ids["validation"])


def test_split_file_saved(prepared):
    _, _, run_dir, _, _, engine_ids = prepared
    assert read_json(run_dir / "splits.json")["validation"] == engine_ids["validation"]


def test_stats_from_training_engines_only(prepared):
    config, data_dir, run_dir, _, _, engine_ids = prepared
    table = load_train_table(config.data, data_dir)
    train_rows = np.isin(table.unit_ids, engine_ids["train"])
    saved = load_preprocessor(run_dir / "preprocessing.json")
    offset, scale = saved.normalizer.stats[None]
    raw = np.column_stack([table.sensors[:, saved.kept_sensors], table.cycles])[train_rows]
    np.testing.assert_allclose(offset, raw.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(scale, raw.std(axis=0), rtol=1e-6)
    assert saved.fit_units == len(engine_ids["train"])


def test_stats_differ_from_all_engines(prepared):
    config, data_dir, run_dir, *_ = prepared
    table = load_train_table(config.data, data_dir)
    saved = load_preprocessor(run_dir / "preprocessing.json")
    all_mean = table.sensors[:, saved.kept_sensors].mean(axis=0)
    assert not np.allclose(saved.normalizer.stats[None][0][:-1], all_mean, rtol=1e-6)


def test_constant_sensors_dropped(prepared):
    preprocessor = prepared[3]
    assert preprocessor.to_dict()["dropped_sensors"] == ["sensor_1", "sensor_5", "sensor_10"]
    assert len(preprocessor.feature_names) == 19


def test_cycle_feature_last(prepared):
    assert prepared[3].feature_names[-1] == "cycle"


def test_cycle_feature_off():
    table, _ = make_condition_table()
    preprocessor = fit_preprocessor(table, DataConfig(cycle_feature=False))
    assert "cycle" not in preprocessor.feature_names
    assert preprocessor.transform(table).shape == (len(table.unit_ids), 20)


def test_six_conditions_found():
    table, conditions = make_condition_table()
    found = fit_operating_conditions(table.settings, 6).assign(table.settings)
    # The same partition as the true conditions, whatever the numbering.
    pairs = set(zip(found.tolist(), conditions.tolist(), strict=True))
    assert len(pairs) == 6


def test_too_few_conditions_in_settings():
    table, _ = make_condition_table()
    with pytest.raises(DataError, match="num_conditions"):
        fit_operating_conditions(table.settings[:5], 6)


def test_condition_normalization():
    table, conditions = make_condition_table()
    preprocessor = fit_preprocessor(table, DataConfig(condition_normalization="on"))
    features = preprocessor.transform(table)
    for condition in range(6):
        rows = conditions == condition
        np.testing.assert_allclose(features[rows].mean(axis=0), 0.0, atol=1e-4)


def test_constant_within_conditions_dropped():
    table, _ = make_condition_table()
    table.sensors[:, 5] = 10.0 * np.argmax(
        np.isclose(table.settings[:, :1], CENTERS[None, :, 0], atol=0.1), axis=1
    )
    preprocessor = fit_preprocessor(table, DataConfig(condition_normalization="on"))
    assert "sensor_6" in preprocessor.to_dict()["dropped_sensors"]
    assert "sensor_2" in preprocessor.to_dict()["dropped_sensors"]


def test_auto_conditions_for_fd002():
    assert DataConfig(subset="FD002").uses_conditions()
    assert not DataConfig(subset="FD003").uses_conditions()


def test_preprocessor_round_trip(tmp_path):
    table, _ = make_condition_table()
    preprocessor = fit_preprocessor(
        table, DataConfig(condition_normalization="on", normalization="minmax")
    )
    loaded = load_preprocessor(preprocessor.save(tmp_path / "p.json"))
    np.testing.assert_allclose(loaded.transform(table), preprocessor.transform(table), atol=1e-6)


def test_missing_preprocessor(tmp_path):
    with pytest.raises(DataError, match="train a model"):
        load_preprocessor(tmp_path / "p.json")


def test_smoothing_by_hand():
    features = np.array([[1.0], [3.0], [5.0], [10.0], [20.0]], dtype=np.float32)
    smoothed = compute_smoothed_features(features, np.array([1, 1, 1, 2, 2]), 0.5)
    # 1, 0.5*3+0.5*1, 0.5*5+0.5*2, then unit 2 restarts: 10, 0.5*20+0.5*10.
    np.testing.assert_allclose(smoothed.ravel(), [1.0, 2.0, 3.5, 10.0, 15.0])


def test_smoothing_step_matches_table():
    table, _ = make_condition_table()
    preprocessor = fit_preprocessor(table, DataConfig(smoothing_alpha=0.3))
    plain = fit_preprocessor(table, DataConfig())
    sensors = len(preprocessor.kept_sensors)
    rows = table.unit_ids == 1
    previous = None
    streamed = []
    for reading in plain.transform(table)[rows, :sensors]:
        previous = compute_smoothed_step(previous, reading, 0.3)
        streamed.append(previous)
    np.testing.assert_allclose(
        preprocessor.transform(table)[rows, :sensors], np.array(streamed), atol=1e-5
    )


def test_smoothing_leaves_cycle():
    table, _ = make_condition_table()
    smoothed = fit_preprocessor(table, DataConfig(smoothing_alpha=0.2)).transform(table)
    plain = fit_preprocessor(table, DataConfig()).transform(table)
    np.testing.assert_array_equal(smoothed[:, -1], plain[:, -1])


def test_smoothing_alpha_saved(tmp_path):
    table, _ = make_condition_table()
    preprocessor = fit_preprocessor(table, DataConfig(smoothing_alpha=0.2))
    loaded = load_preprocessor(preprocessor.save(tmp_path / "p.json"))
    np.testing.assert_allclose(loaded.transform(table), preprocessor.transform(table), atol=1e-6)


def test_smoothing_alpha_zero_rejected():
    with pytest.raises(ValueError, match="smoothing_alpha"):
        DataConfig(smoothing_alpha=0.0)
