"""Synthetic engine tables in the C-MAPSS file format, written to a temporary data directory."""

from pathlib import Path

import numpy as np
import pytest

NUM_SENSORS = 21
CONSTANT_SENSORS = (0, 4, 9)  # sensor_1, sensor_5, sensor_10 never change


def make_engine_rows(
    unit: int, cycles: int, rng: np.random.Generator, failure_cycle: int | None = None
) -> np.ndarray:
    """Return ``(cycles, 26)`` rows of one engine whose sensors drift towards failure."""
    failure_cycle = failure_cycle or cycles
    cycle = np.arange(1, cycles + 1, dtype=np.float64)
    wear = np.maximum(0.0, 1.0 - (failure_cycle - cycle) / 60.0)
    settings = rng.normal(0.0, 0.001, size=(cycles, 3))
    sensors = (
        100.0
        + np.arange(NUM_SENSORS)[None, :]
        + wear[:, None] * 5.0
        + rng.normal(0, 0.2, (cycles, NUM_SENSORS))
    )
    sensors[:, list(CONSTANT_SENSORS)] = 7.0
    return np.column_stack([np.full(cycles, unit), cycle, settings, sensors])


def write_table(path: Path, rows: np.ndarray) -> Path:
    """Write rows like the NASA files: unit and cycle as integers, readings with 4 decimals, trailing spaces."""
    lines = [
        " ".join([f"{int(row[0])}", f"{int(row[1])}"] + [f"{value:.4f}" for value in row[2:]])
        + "  "
        for row in rows
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_cmapss_dir(root: Path) -> Path:
    """Write a small FD001 look-alike under ``root/data``: 12 training engines, 4 test engines.

    Test engine 2 has 12 readings, fewer than the default window of 30.
    """
    rng = np.random.default_rng(0)
    folder = root / "data" / "predictive_maintenance" / "cmapss"
    train = np.concatenate([make_engine_rows(unit, 60 + 5 * unit, rng) for unit in range(1, 13)])
    write_table(folder / "train_FD001.txt", train)
    lengths, final_rul = (50, 12, 40, 70), (20, 90, 35, 5)
    test = np.concatenate(
        [
            make_engine_rows(unit, length, rng, failure_cycle=length + rul)
            for unit, (length, rul) in enumerate(zip(lengths, final_rul, strict=True), start=1)
        ]
    )
    write_table(folder / "test_FD001.txt", test)
    (folder / "RUL_FD001.txt").write_text(
        "".join(f"{rul}\n" for rul in final_rul), encoding="utf-8"
    )
    return root / "data"


@pytest.fixture
def cmapss_dir(tmp_path) -> Path:
    """Return a data directory holding the synthetic FD001 files."""
    return write_cmapss_dir(tmp_path)


@pytest.fixture(scope="session")
def engine_rows():
    """Return `make_engine_rows`, for tests that build their own tables."""
    return make_engine_rows


@pytest.fixture(scope="session")
def table_writer():
    """Return `write_table`, for tests that write their own tables."""
    return write_table


@pytest.fixture(scope="session")
def cmapss_writer():
    """Return `write_cmapss_dir`, for module-scoped fixtures that cannot use tmp_path."""
    return write_cmapss_dir
