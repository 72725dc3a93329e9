"""Tests of engine-table loading, bad-input handling and the capped RUL target."""

import gzip
import logging

import numpy as np
import pytest

from pipelines.predictive_maintenance.config import DataConfig
from pipelines.predictive_maintenance.data import (
    compute_rul_targets,
    load_engine_table,
    load_rul_file,
    load_test_set,
    load_train_table,
    locate_cmapss_files,
)
from shared.errors import ConfigError, DataError


@pytest.fixture
def rows(engine_rows):
    rng = np.random.default_rng(1)
    return np.concatenate([engine_rows(1, 5, rng), engine_rows(2, 4, rng)])


def test_load_whitespace_table(tmp_path, rows, table_writer):
    table = load_engine_table(table_writer(tmp_path / "t.txt", rows))
    assert table.unit_ids.tolist() == [1] * 5 + [2] * 4
    assert table.cycles.tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 4]
    assert table.sensors.shape == (9, 21)
    np.testing.assert_allclose(table.settings, np.round(rows[:, 2:5], 4))


def test_load_gzipped_table(tmp_path, rows, table_writer):
    text = table_writer(tmp_path / "t.txt", rows).read_text()
    path = tmp_path / "t.txt.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(text)
    assert load_engine_table(path).num_units == 2


def test_load_csv_with_header(tmp_path, rows):
    header = ",".join(["unit", "cycle"] + [f"c{i}" for i in range(24)])
    body = "\n".join(",".join(f"{v:.4f}" for v in row) for row in rows)
    path = tmp_path / "engines.csv"
    path.write_text(header + "\n" + body + "\n")
    table = load_engine_table(path)
    assert table.num_units == 2
    assert table.line_numbers[0] == 2


def test_wrong_column_count_error(tmp_path, rows, table_writer):
    path = table_writer(tmp_path / "t.txt", rows)
    lines = path.read_text().splitlines()
    lines[3] = " ".join(lines[3].split()[:-2])
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"t\.txt: line 4: found 24 columns"):
        load_engine_table(path)


def test_wrong_column_count_repair(tmp_path, rows, caplog, table_writer):
    path = table_writer(tmp_path / "t.txt", rows)
    lines = path.read_text().splitlines()
    lines[3] = " ".join(lines[3].split()[:-2])
    path.write_text("\n".join(lines))
    with caplog.at_level(logging.WARNING):
        table = load_engine_table(path, bad_input="repair")
    assert len(table.unit_ids) == 8
    assert "'malformed_lines_dropped': 1" in caplog.text


def test_nan_reading_error(tmp_path, rows, table_writer):
    rows[2, 7] = np.nan
    with pytest.raises(DataError, match=r"line 3: sensor_3 is nan"):
        load_engine_table(table_writer(tmp_path / "t.txt", rows))


def test_nan_and_inf_repair(tmp_path, rows, caplog, table_writer):
    expected_previous = np.round(rows[1, 7], 4)
    rows[2, 7] = np.nan
    rows[5, 8] = np.inf  # first row of unit 2: filled from the next reading
    expected_next = np.round(rows[6, 8], 4)
    with caplog.at_level(logging.WARNING):
        table = load_engine_table(table_writer(tmp_path / "t.txt", rows), bad_input="repair")
    assert table.sensors[2, 2] == pytest.approx(expected_previous)
    assert table.sensors[5, 3] == pytest.approx(expected_next)
    assert "'non_finite_readings_filled': 2" in caplog.text


def test_unit_all_nan_column(tmp_path, rows, table_writer):
    rows[5:, 7] = np.nan
    with pytest.raises(DataError, match="unit 2: every sensor_3 reading"):
        load_engine_table(table_writer(tmp_path / "t.txt", rows), bad_input="repair")


def test_non_monotonic_cycle_error(tmp_path, rows, table_writer):
    rows[[1, 2]] = rows[[2, 1]]
    with pytest.raises(DataError, match=r"line 3: unit 1: cycle 2 does not increase from cycle 3"):
        load_engine_table(table_writer(tmp_path / "t.txt", rows))


def test_non_monotonic_cycle_repair(tmp_path, rows, caplog, table_writer):
    rows[[1, 2]] = rows[[2, 1]]
    duplicated = np.concatenate([rows, rows[-1:]])
    with caplog.at_level(logging.WARNING):
        table = load_engine_table(table_writer(tmp_path / "t.txt", duplicated), bad_input="repair")
    assert table.cycles.tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 4]
    assert "'rows_reordered': 2" in caplog.text
    assert "'duplicate_cycles_dropped': 1" in caplog.text


def test_unit_split_in_two_error(tmp_path, rows, table_writer):
    moved = np.concatenate([rows[:3], rows[5:], rows[3:5]])
    with pytest.raises(DataError, match="unit 1 appears again after other units"):
        load_engine_table(table_writer(tmp_path / "t.txt", moved))


def test_single_row_unit_error(tmp_path, rows, table_writer, engine_rows):
    single = np.concatenate([rows, engine_rows(3, 1, np.random.default_rng(0))])
    with pytest.raises(DataError, match=r"line 10: unit 3 has one row"):
        load_engine_table(table_writer(tmp_path / "t.txt", single))


def test_single_row_unit_repair(tmp_path, rows, caplog, table_writer, engine_rows):
    single = np.concatenate([rows, engine_rows(3, 1, np.random.default_rng(0))])
    with caplog.at_level(logging.WARNING):
        table = load_engine_table(table_writer(tmp_path / "t.txt", single), bad_input="repair")
    assert table.num_units == 2
    assert "'single_row_units_dropped': 1" in caplog.text


def test_single_row_test_unit_kept(tmp_path, rows, table_writer, engine_rows):
    single = np.concatenate([rows, engine_rows(3, 1, np.random.default_rng(0))])
    table = load_engine_table(table_writer(tmp_path / "t.txt", single), run_to_failure=False)
    assert table.num_units == 3


def test_non_numeric_field_error(tmp_path, rows, table_writer):
    path = table_writer(tmp_path / "t.txt", rows)
    lines = path.read_text().splitlines()
    fields = lines[0].split()
    fields[6] = "abc"
    lines[0] = " ".join(fields)
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match="line 1: column 'sensor_2' holds 'abc'"):
        load_engine_table(path)


def test_capped_target_hand_made_engine():
    unit_ids = np.array([7] * 6 + [8] * 3)
    cycles = np.array([1, 2, 3, 4, 5, 6, 1, 2, 3])
    targets = compute_rul_targets(unit_ids, cycles, rul_cap=3)
    assert targets.tolist() == [3, 3, 3, 2, 1, 0, 2, 1, 0]


def test_target_with_final_rul():
    targets = compute_rul_targets(
        np.array([1, 1, 1, 2, 2]), np.array([1, 2, 3, 1, 2]), rul_cap=10, final_rul=np.array([4, 9])
    )
    assert targets.tolist() == [6, 5, 4, 10, 9]


def test_target_follows_cycle_gaps():
    targets = compute_rul_targets(np.array([1, 1, 1]), np.array([1, 5, 6]), rul_cap=None)
    assert targets.tolist() == [5, 1, 0]


def test_rul_file_count_mismatch(tmp_path):
    path = tmp_path / "RUL.txt"
    path.write_text("10\n20\n")
    with pytest.raises(DataError, match="2 RUL values for 3 test units"):
        load_rul_file(path, 3)


def test_rul_file_negative(tmp_path):
    path = tmp_path / "RUL.txt"
    path.write_text("10\n-2\n")
    with pytest.raises(DataError, match="line 2"):
        load_rul_file(path, 2)


def test_missing_files_listed(tmp_path):
    with pytest.raises(DataError) as raised:
        locate_cmapss_files("FD003", tmp_path)
    message = str(raised.value)
    for name in ("train_FD003.txt", "test_FD003.txt", "RUL_FD003.txt", ".txt.gz", "CMAPSSData.zip"):
        assert name in message


def test_train_and_test_from_data_dir(cmapss_dir):
    config = DataConfig()
    assert load_train_table(config, cmapss_dir).num_units == 12
    table, final_rul = load_test_set(config, cmapss_dir)
    assert table.num_units == 4
    assert final_rul.tolist() == [20, 90, 35, 5]


def test_user_train_file(tmp_path, rows, table_writer):
    path = table_writer(tmp_path / "mine.txt", rows)
    assert load_train_table(DataConfig(train_file=str(path)), tmp_path).num_units == 2


def test_user_train_file_without_test(tmp_path, rows, table_writer):
    config = DataConfig(train_file=str(table_writer(tmp_path / "mine.txt", rows)))
    with pytest.raises(DataError, match="data.test_file is not set"):
        load_test_set(config, tmp_path)


def test_test_file_needs_rul_file():
    with pytest.raises(ConfigError, match="data.rul_file"):
        DataConfig(test_file="test.txt")
