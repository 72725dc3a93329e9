"""Engine tables: C-MAPSS files and users' run-to-failure tables, bad-input checks, RUL targets.

A table has 26 numeric columns per row: unit id, cycle, three operating settings and 21
sensors, separated by whitespace (the NASA files, with trailing spaces) or by commas (a
header line is allowed). Files may be gzipped. Rows are ordered by unit, then by strictly
increasing cycle, and each unit's rows are contiguous.

With ``bad_input="error"`` bad input raises an error naming the file and line. With
``bad_input="repair"`` it is repaired, and each kind of repair is counted and logged as a
WARNING:

* NaN or infinite readings are filled from the unit's previous reading, or from the next
  one at the start of a unit.
* Rows are sorted by unit and cycle, and repeated cycles are dropped.
* Training units with one row are dropped, because they show no degradation.
* Lines with the wrong column count or a non-numeric field are dropped.

Test and prediction units with one row are kept: they are padded and masked like every
short engine.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from pipelines.predictive_maintenance.config import DataConfig
from shared.datafiles import RemoteFile, ensure_files
from shared.errors import DataError

logger = logging.getLogger(__name__)

DATASET_DIR = "predictive_maintenance/cmapss"
SETTING_NAMES = tuple(f"setting_{i}" for i in range(1, 4))
SENSOR_NAMES = tuple(f"sensor_{i}" for i in range(1, 22))
COLUMN_NAMES = ("unit", "cycle", *SETTING_NAMES, *SENSOR_NAMES)
NUM_COLUMNS = len(COLUMN_NAMES)
CMAPSS_SOURCE = (
    "CMAPSSData.zip, 'Turbofan Engine Degradation Simulation Data Set', NASA Ames Prognostics "
    "Center of Excellence, Prognostics Data Repository"
)


@dataclasses.dataclass
class EngineTable:
    """Rows of one table, ordered by unit, then cycle; ``line_numbers`` point into ``source``."""

    unit_ids: np.ndarray  # (rows,) int64
    cycles: np.ndarray  # (rows,) float64
    settings: np.ndarray  # (rows, 3) float64
    sensors: np.ndarray  # (rows, 21) float64
    line_numbers: np.ndarray  # (rows,) 1-based line of each row in the file
    source: str

    @property
    def num_units(self) -> int:
        """Number of distinct units."""
        return len(np.unique(self.unit_ids))

    def select_rows(self, rows: np.ndarray) -> EngineTable:
        """Return the table restricted to ``rows`` (a boolean mask or indices), order kept."""
        return EngineTable(
            self.unit_ids[rows],
            self.cycles[rows],
            self.settings[rows],
            self.sensors[rows],
            self.line_numbers[rows],
            self.source,
        )

    def unit_lengths(self) -> np.ndarray:
        """Return the number of rows of each unit, in row order."""
        _, first, counts = np.unique(self.unit_ids, return_index=True, return_counts=True)
        return counts[np.argsort(first)]


# ---------------------------------------------------------------------------
# Locating files


def locate_cmapss_files(
    subset: str, data_dir: str | Path, kinds=("train", "test", "RUL")
) -> dict[str, Path]:
    """Return the path of each C-MAPSS file of ``subset``, as ``.txt`` or ``.txt.gz``.

    Raises:
        DataError: files are missing; the message lists every expected file and its source.
    """
    root = Path(data_dir)
    files = []
    for kind in kinds:
        name = f"{DATASET_DIR}/{kind}_{subset}.txt"
        gzipped = f"{name}.gz"
        files.append(RemoteFile(gzipped if (root / gzipped).is_file() else name))
    try:
        found = ensure_files(f"C-MAPSS {subset}", files, root, download=False)
    except DataError as error:
        raise DataError(
            f"{error}\nEach file may also be gzipped (.txt.gz). The files come in {CMAPSS_SOURCE}; "
            f"unzip it into {root / DATASET_DIR}."
        ) from error
    return {kind: found[remote.path] for kind, remote in zip(kinds, files, strict=True)}


# ---------------------------------------------------------------------------
# Reading tables


def read_text_lines(path: str | Path) -> list[str]:
    """Read a text file, gunzipping it when its name ends in ``.gz``.

    Raises:
        DataError: the file is missing, unreadable or not text.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                return handle.read().splitlines()
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as error:
        raise DataError(f"{path}: file not found; check the path.") from error
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise DataError(f"{path}: cannot read the file as text ({error}).") from error


def split_fields(line: str, comma_separated: bool) -> list[str]:
    """Split one line into fields on commas or on runs of whitespace."""
    if comma_separated:
        return [field.strip() for field in line.split(",")]
    return line.split()


def is_header(fields: list[str]) -> bool:
    """Return whether a line's first field is not a number, as in a CSV header."""
    try:
        float(fields[0])
    except (ValueError, IndexError):
        return True
    return False


def parse_table_lines(
    lines: list[str], source: str, bad_input: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Parse lines into a float64 array ``(rows, 26)``.

    Returns:
        ``(values, line_numbers, dropped_lines)``.

    Raises:
        DataError: a line with the wrong column count or a non-numeric field when
            ``bad_input`` is "error", or no data rows at all.
    """
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise DataError(
            f"{source}: the file has no data rows; expected {NUM_COLUMNS} columns per line."
        )
    comma_separated = "," in numbered[0][1]
    if is_header(split_fields(numbered[0][1], comma_separated)):
        logger.info("%s: line %d is a header; skipped.", source, numbered[0][0])
        numbered = numbered[1:]
    rows, line_numbers, dropped = [], [], 0
    for number, line in numbered:
        fields = split_fields(line, comma_separated)
        problem = check_fields(fields)
        if problem is None:
            rows.append([float(field) for field in fields])
            line_numbers.append(number)
            continue
        if bad_input == "error":
            raise DataError(
                f"{source}: line {number}: {problem}. Expected {NUM_COLUMNS} numeric columns "
                f"({', '.join(COLUMN_NAMES[:3])}, ..., {COLUMN_NAMES[-1]}); fix the line, or set "
                "data.bad_input=repair to drop such lines."
            )
        dropped += 1
    if not rows:
        raise DataError(
            f"{source}: no valid data rows; expected {NUM_COLUMNS} numeric columns per line."
        )
    return np.asarray(rows, dtype=np.float64), np.asarray(line_numbers, dtype=np.int64), dropped


def check_fields(fields: list[str]) -> str | None:
    """Return what is wrong with one line's fields, or None when it is a valid row."""
    if len(fields) != NUM_COLUMNS:
        return f"found {len(fields)} columns"
    for name, field in zip(COLUMN_NAMES, fields, strict=True):
        try:
            float(field)
        except ValueError:
            return f"column {name!r} holds {field!r}, which is not a number"
    return None


def build_table(values: np.ndarray, line_numbers: np.ndarray, source: str) -> EngineTable:
    """Split parsed values into an `EngineTable`.

    Raises:
        DataError: a unit id that is not a finite whole number.
    """
    units = values[:, 0]
    bad = np.flatnonzero(~np.isfinite(units) | (units != np.round(units)))
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{source}: line {line_numbers[row]}: unit id {units[row]!r} is not a whole number; "
            "the first column must be the engine's unit id."
        )
    return EngineTable(
        unit_ids=units.astype(np.int64),
        cycles=values[:, 1].copy(),
        settings=values[:, 2:5].copy(),
        sensors=values[:, 5:].copy(),
        line_numbers=line_numbers,
        source=source,
    )


# ---------------------------------------------------------------------------
# Checks and repairs


def fix_row_order(table: EngineTable, bad_input: str, repairs: Counter) -> EngineTable:
    """Check that units are contiguous and cycles strictly increase; sort and deduplicate on repair.

    Raises:
        DataError: rows out of order, a non-finite cycle or a repeated cycle, with "error".
    """
    bad_cycles = np.flatnonzero(~np.isfinite(table.cycles))
    if bad_cycles.size:
        row = int(bad_cycles[0])
        raise DataError(
            f"{table.source}: line {table.line_numbers[row]}: cycle {table.cycles[row]!r} "
            "is not a finite number; every row needs its cycle number."
        )
    problem = find_order_problem(table)
    if problem is None:
        return table
    if bad_input == "error":
        raise DataError(
            f"{table.source}: {problem}. Sort the rows by unit, then cycle, with each cycle "
            "once per unit, or set data.bad_input=repair to sort and deduplicate them."
        )
    order = np.lexsort((table.cycles, table.unit_ids))
    repairs["rows_reordered"] += int(np.sum(order != np.arange(len(order))))
    table = table.select_rows(order)
    duplicate = np.zeros(len(order), dtype=bool)
    duplicate[1:] = (table.unit_ids[1:] == table.unit_ids[:-1]) & (
        table.cycles[1:] == table.cycles[:-1]
    )
    repairs["duplicate_cycles_dropped"] += int(duplicate.sum())
    return table.select_rows(~duplicate)


def find_order_problem(table: EngineTable) -> str | None:
    """Describe the first row-order problem (a split unit or a non-increasing cycle), or None."""
    units, cycles, lines = table.unit_ids, table.cycles, table.line_numbers
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
    seen_units = units[starts]
    if len(np.unique(seen_units)) != len(seen_units):
        _, first_seen = np.unique(seen_units, return_index=True)
        again = starts[np.setdiff1d(np.arange(len(starts)), first_seen)[0]]
        return f"line {lines[again]}: unit {units[again]} appears again after other units"
    same_unit = units[1:] == units[:-1]
    bad = np.flatnonzero(same_unit & ~(cycles[1:] > cycles[:-1]))
    if bad.size:
        row = int(bad[0]) + 1
        return (
            f"line {lines[row]}: unit {units[row]}: cycle {cycles[row]:g} does not increase from "
            f"cycle {cycles[row - 1]:g} on line {lines[row - 1]}"
        )
    return None


def fill_non_finite(table: EngineTable, bad_input: str, repairs: Counter) -> EngineTable:
    """Check settings and sensors for NaN or infinity; fill them from the same unit on repair.

    Raises:
        DataError: a non-finite reading with "error", or a unit whose column has no
            finite reading to fill from.
    """
    readings = np.concatenate([table.settings, table.sensors], axis=1)
    bad_rows, bad_columns = np.nonzero(~np.isfinite(readings))
    if bad_rows.size == 0:
        return table
    if bad_input == "error":
        row, column = int(bad_rows[0]), int(bad_columns[0])
        raise DataError(
            f"{table.source}: line {table.line_numbers[row]}: {COLUMN_NAMES[column + 2]} is "
            f"{float(readings[row, column])}; {bad_rows.size} reading(s) in the file are NaN or infinite. "
            "Clean the file, or set data.bad_input=repair to fill them from the unit's previous reading."
        )
    filled = readings.copy()
    for unit in np.unique(table.unit_ids[bad_rows]):
        rows = np.flatnonzero(table.unit_ids == unit)
        filled[rows] = fill_unit_gaps(filled[rows], unit, table.source)
    repairs["non_finite_readings_filled"] += int(bad_rows.size)
    return dataclasses.replace(table, settings=filled[:, :3], sensors=filled[:, 3:])


def fill_unit_gaps(readings: np.ndarray, unit: int, source: str) -> np.ndarray:
    """Fill non-finite readings of one unit forward in time, then backward for leading gaps.

    Raises:
        DataError: a column of the unit has no finite reading at all.
    """
    readings = readings.copy()
    for column in range(readings.shape[1]):
        values = readings[:, column]
        finite = np.isfinite(values)
        if not finite.any():
            raise DataError(
                f"{source}: unit {unit}: every {COLUMN_NAMES[column + 2]} reading is NaN or "
                "infinite, so there is nothing to fill from; fix or remove the unit."
            )
        last_finite = np.maximum.accumulate(np.where(finite, np.arange(len(values)), -1))
        first_finite = int(np.argmax(finite))
        readings[:, column] = values[np.where(last_finite < 0, first_finite, last_finite)]
    return readings


def drop_single_row_units(table: EngineTable, bad_input: str, repairs: Counter) -> EngineTable:
    """Reject (or drop, on repair) training units with a single row, which cannot show degradation.

    Raises:
        DataError: such a unit with "error", or no unit left after dropping them.
    """
    units, counts = np.unique(table.unit_ids, return_counts=True)
    single = units[counts == 1]
    if single.size == 0:
        return table
    if bad_input == "error":
        row = int(np.flatnonzero(table.unit_ids == single[0])[0])
        raise DataError(
            f"{table.source}: line {table.line_numbers[row]}: unit {single[0]} has one row; a run-to-failure "
            f"unit needs at least two ({single.size} such unit(s)). Remove it, or set data.bad_input=repair."
        )
    repairs["single_row_units_dropped"] += int(single.size)
    keep = ~np.isin(table.unit_ids, single)
    if not keep.any():
        raise DataError(
            f"{table.source}: every unit has one row; no run-to-failure history is left."
        )
    return table.select_rows(keep)


def load_engine_table(
    path: str | Path, bad_input: str = "error", run_to_failure: bool = True
) -> EngineTable:
    """Read, check and (with ``bad_input="repair"``) repair one engine table.

    Args:
        path: a whitespace- or comma-separated file, optionally gzipped.
        bad_input: "error" or "repair" (see the module docstring).
        run_to_failure: a training table, whose one-row units are invalid.

    Returns:
        The table, ordered by unit, then cycle.

    Raises:
        DataError: the file is missing or malformed; the message names the file and line.
    """
    source = str(path)
    repairs: Counter = Counter()
    values, line_numbers, dropped_lines = parse_table_lines(
        read_text_lines(path), source, bad_input
    )
    repairs["malformed_lines_dropped"] += dropped_lines
    table = build_table(values, line_numbers, source)
    table = fix_row_order(table, bad_input, repairs)
    table = fill_non_finite(table, bad_input, repairs)
    if run_to_failure:
        table = drop_single_row_units(table, bad_input, repairs)
    log_table(table, repairs, run_to_failure)
    return table


def log_table(table: EngineTable, repairs: Counter, run_to_failure: bool) -> None:
    """Log the table's size and unit lengths, and a WARNING listing every repair."""
    lengths = table.unit_lengths()
    logger.info(
        "%s: %d rows, %d units, rows per unit min %d / median %d / max %d",
        table.source,
        len(table.unit_ids),
        len(lengths),
        lengths.min(),
        np.median(lengths),
        lengths.max(),
    )
    done = {name: count for name, count in repairs.items() if count}
    if done:
        logger.warning("%s: repaired bad input (data.bad_input=repair): %s", table.source, done)
    single = int(np.sum(lengths == 1))
    if single and not run_to_failure:
        logger.warning(
            "%s: %d unit(s) have one reading; they are kept, padded and masked, but their "
            "RUL estimate rests on a single reading.",
            table.source,
            single,
        )


def load_rul_file(path: str | Path, num_units: int) -> np.ndarray:
    """Read the true RUL at the last cycle of each test unit, one number per line.

    Raises:
        DataError: a line that is not a finite non-negative number, or a line count that
            differs from ``num_units``.
    """
    numbered = [
        (n, line.split()) for n, line in enumerate(read_text_lines(path), start=1) if line.strip()
    ]
    values = []
    for number, fields in numbered:
        try:
            value = float(fields[0]) if len(fields) == 1 else float("nan")
        except ValueError:
            value = float("nan")
        if not np.isfinite(value) or value < 0:
            raise DataError(
                f"{path}: line {number}: expected one non-negative RUL value, got {' '.join(fields)!r}."
            )
        values.append(value)
    if len(values) != num_units:
        raise DataError(
            f"{path}: {len(values)} RUL values for {num_units} test units; the file needs one "
            "line per unit, in the order of the units in the test table."
        )
    return np.asarray(values, dtype=np.float64)


# ---------------------------------------------------------------------------
# Targets


def compute_rul_targets(
    unit_ids: np.ndarray,
    cycles: np.ndarray,
    rul_cap: float | None,
    final_rul: np.ndarray | None = None,
) -> np.ndarray:
    """Return the piecewise-linear RUL of every row: cycles left until failure, capped.

    The RUL of a row is ``last_cycle_of_its_unit - cycle + final_rul_of_the_unit``, where
    ``final_rul`` is 0 for run-to-failure units. With a cap the target is flat at
    ``rul_cap`` early in life and falls linearly to 0 at failure.

    Args:
        unit_ids: unit per row, each unit's rows contiguous.
        cycles: cycle per row, increasing within a unit.
        rul_cap: upper bound of the target, or None for no cap.
        final_rul: RUL at the last row of each unit, in unit order; None means 0.

    Returns:
        float32 ``(rows,)``.
    """
    unit_ids = np.asarray(unit_ids)
    cycles = np.asarray(cycles, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, unit_ids[1:] != unit_ids[:-1]])
    ends = np.r_[starts[1:], len(unit_ids)]
    unit_index = np.repeat(np.arange(len(starts)), ends - starts)
    last_cycles = cycles[ends - 1][unit_index]
    offsets = 0.0 if final_rul is None else np.asarray(final_rul, dtype=np.float64)[unit_index]
    rul = last_cycles - cycles + offsets
    if rul_cap is not None:
        rul = np.minimum(rul, rul_cap)
    return rul.astype(np.float32)


# ---------------------------------------------------------------------------
# Tables named by the config


def load_train_table(config: DataConfig, data_dir: str | Path) -> EngineTable:
    """Load the run-to-failure table: ``data.train_file`` if set, else C-MAPSS ``train_<subset>``."""
    if config.train_file:
        path = Path(config.train_file)
    else:
        path = locate_cmapss_files(config.subset, data_dir, ("train",))["train"]
    return load_engine_table(path, config.bad_input, run_to_failure=True)


def load_test_set(
    config: DataConfig, data_dir: str | Path, subset: str | None = None
) -> tuple[EngineTable, np.ndarray]:
    """Load a test table and the true RUL at each unit's last row.

    Args:
        config: names the user's test files, or the subset.
        data_dir: data root holding ``predictive_maintenance/cmapss``.
        subset: a C-MAPSS subset to load instead of the configured test set.

    Raises:
        DataError: missing or malformed files, or no test set configured for the user's
            own training table.
    """
    if subset is None and config.test_file:
        test_path, rul_path = Path(config.test_file), Path(config.rul_file)
    elif subset is None and config.train_file:
        raise DataError(
            f"data.train_file is {config.train_file!r} but data.test_file is not set, so there is no test set. "
            "Set data.test_file and data.rul_file, or evaluate with --split validation."
        )
    else:
        paths = locate_cmapss_files(subset or config.subset, data_dir, ("test", "RUL"))
        test_path, rul_path = paths["test"], paths["RUL"]
    table = load_engine_table(test_path, config.bad_input, run_to_failure=False)
    return table, load_rul_file(rul_path, table.num_units)
