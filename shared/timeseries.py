"""Entity and time splits, sliding windows and normalizers for multivariate time series.

The contract every time-series pipeline follows:

* Rows are ordered by entity (an engine, a patient, a sensor unit), then by time. Each
  entity's rows are contiguous.
* Entity splits and time splits happen before any shuffle. An entity split puts each
  entity in exactly one split. A time split cuts each entity's rows at fixed points in
  time, so training rows always come before validation rows.
* A sliding window never crosses an entity boundary nor a split boundary. The target of
  a window is the target at its last step.
* Entities shorter than the window are kept for evaluation: `make_last_windows` pads them
  on the right with a boolean mask in which ``True`` marks a real step (the padding
  contract of `shared.padding`).
* Normalization statistics are fitted on the training split only and saved with the
  model as JSON, so evaluation and prediction apply the same transform.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from shared.errors import ConfigError, DataError
from shared.runs import write_text_atomic

TRAIN = "train"
VALIDATION = "validation"
TEST = "test"

NORMALIZER_FORMAT_VERSION = 1


def _plain_scalar(value: Any) -> Any:
    """Return a NumPy scalar as a Python scalar, for readable messages and JSON keys."""
    return value.item() if isinstance(value, np.generic) else value


# ---------------------------------------------------------------------------
# Splits


def resolve_fractions(
    fractions: Mapping[str, float] | None, validation_fraction: float | None
) -> dict[str, float]:
    """Return split fractions from either a mapping or a single validation fraction.

    Args:
        fractions: split name to fraction, in time order (for example train, then
            validation, then test). Fractions are in [0, 1] and sum to 1.
        validation_fraction: shorthand for ``{"train": 1 - v, "validation": v}``.

    Raises:
        ConfigError: both or neither argument given, a fraction outside [0, 1], fractions
            that do not sum to 1, or no training split.
    """
    if (fractions is None) == (validation_fraction is None):
        raise ConfigError("pass exactly one of fractions or validation_fraction.")
    if validation_fraction is not None:
        if not 0.0 < validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
        return {TRAIN: 1.0 - validation_fraction, VALIDATION: validation_fraction}
    resolved = {str(name): float(value) for name, value in fractions.items()}
    for name, value in resolved.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"fraction for split {name!r} must be in [0, 1], got {value}.")
    total = sum(resolved.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ConfigError(f"split fractions must sum to 1, got {total} from {resolved}.")
    if resolved.get(TRAIN, 0.0) <= 0.0:
        raise ConfigError(f"split fractions need a positive {TRAIN!r} fraction, got {resolved}.")
    return resolved


def compute_split_counts(num_items: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Share ``num_items`` between splits by largest remainder; every positive fraction gets one.

    Raises:
        DataError: fewer items than splits with a positive fraction.
    """
    positive = [name for name, value in fractions.items() if value > 0.0]
    if num_items < len(positive):
        raise DataError(
            f"cannot split {num_items} entities into {len(positive)} non-empty splits {positive}. "
            "Use more entities or fewer splits."
        )
    exact = {name: value * num_items for name, value in fractions.items()}
    counts = {name: int(math.floor(value)) for name, value in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - counts[name], reverse=True)
    for name in by_remainder[: num_items - sum(counts.values())]:
        counts[name] += 1
    # Rounding can leave a small positive split empty, so it takes one item from the largest split.
    for name in positive:
        if counts[name] == 0:
            counts[max(counts, key=counts.get)] -= 1
            counts[name] = 1
    return counts


def split_entities(
    entity_ids: Iterable,
    fractions: Mapping[str, float] | None = None,
    *,
    validation_fraction: float | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Assign each distinct entity to one split at random, reproducibly for a given seed.

    The distinct ids are sorted before the seeded permutation, so the result depends only
    on the set of ids and the seed, not on row order.

    Args:
        entity_ids: entity id per row (repeats allowed) or the distinct ids.
        fractions: split name to fraction of entities, summing to 1.
        validation_fraction: shorthand for a train/validation split.
        seed: seed of the permutation.

    Returns:
        Split name to the sorted array of entity ids in that split. The arrays are disjoint.

    Raises:
        ConfigError: invalid fractions (see `resolve_fractions`).
        DataError: fewer entities than non-empty splits.
    """
    resolved = resolve_fractions(fractions, validation_fraction)
    unique_ids = np.unique(
        np.asarray(list(entity_ids) if not isinstance(entity_ids, np.ndarray) else entity_ids)
    )
    counts = compute_split_counts(len(unique_ids), resolved)
    shuffled = np.random.default_rng(seed).permutation(unique_ids)
    splits = {}
    start = 0
    for name, count in counts.items():
        splits[name] = np.sort(shuffled[start : start + count])
        start += count
    return splits


def check_disjoint_entities(splits: Mapping[str, Iterable]) -> None:
    """Raise if any entity id belongs to more than one split.

    Raises:
        DataError: naming the first entity found in two splits and both split names.
    """
    owner: dict[Any, str] = {}
    for name, ids in splits.items():
        for entity in np.asarray(list(ids)).tolist():
            if entity in owner and owner[entity] != name:
                raise DataError(
                    f"entity {entity!r} is in both the {owner[entity]!r} and the {name!r} split; "
                    "each entity must belong to one split, or its rows leak between splits."
                )
            owner[entity] = name


def assign_entity_splits(entity_ids: np.ndarray, splits: Mapping[str, Iterable]) -> np.ndarray:
    """Return the split name of each row from an entity-to-split assignment.

    Args:
        entity_ids: entity id per row, shape ``(rows,)``.
        splits: split name to entity ids, as returned by `split_entities`.

    Returns:
        A string array ``(rows,)`` of split names.

    Raises:
        DataError: an entity in two splits, or a row whose entity is in no split.
    """
    check_disjoint_entities(splits)
    entity_ids = np.asarray(entity_ids)
    split_ids = np.full(entity_ids.shape, "", dtype=object)
    for name, ids in splits.items():
        split_ids[np.isin(entity_ids, np.asarray(list(ids)))] = name
    missing = np.flatnonzero(split_ids == "")
    if missing.size:
        row = int(missing[0])
        raise DataError(
            f"row {row}: entity {_plain_scalar(entity_ids[row])!r} is in no split. "
            "Build the splits from the same entity ids as the rows."
        )
    return split_ids.astype(str)


def split_by_time(
    entity_ids: np.ndarray,
    fractions: Mapping[str, float] | None = None,
    *,
    validation_fraction: float | None = None,
) -> np.ndarray:
    """Cut each entity's rows by time: the first share goes to the first split, and so on.

    For a single long series pass the same id for every row. Rows must be ordered by
    entity, then time. Each cut point is ``round(cumulative_fraction * length)`` (halves
    round up), so a very short entity can leave a later split without rows.

    Args:
        entity_ids: entity id per row, shape ``(rows,)``.
        fractions: split name to fraction of each entity's rows, in time order.
        validation_fraction: shorthand for a train/validation split.

    Returns:
        A string array ``(rows,)`` of split names.

    Raises:
        ConfigError: invalid fractions.
        DataError: rows of an entity that are not contiguous, or a split with a positive
            fraction that gets no rows from any entity.
    """
    resolved = resolve_fractions(fractions, validation_fraction)
    entity_ids = np.asarray(entity_ids)
    check_entity_order(entity_ids)
    starts, ends = find_segments(entity_ids)
    split_ids = np.empty(entity_ids.shape, dtype=object)
    for start, end in zip(starts, ends, strict=True):
        length = end - start
        cut_start = start
        cumulative = 0.0
        for name, value in resolved.items():
            cumulative += value
            cut_end = start + min(length, int(math.floor(cumulative * length + 0.5)))
            split_ids[cut_start:cut_end] = name
            cut_start = cut_end
        split_ids[cut_start:end] = name  # float error in the last cut leaves no row unassigned
    split_ids = split_ids.astype(str)
    for name, value in resolved.items():
        if value > 0.0 and not np.any(split_ids == name):
            raise DataError(
                f"the time split gave no rows to split {name!r}; every entity is too short. "
                "Use longer series or a larger fraction."
            )
    return split_ids


def make_split_mask(split_ids: np.ndarray, split: str) -> np.ndarray:
    """Return a boolean row mask that is True on rows of ``split``.

    Raises:
        DataError: no row belongs to ``split``.
    """
    split_ids = np.asarray(split_ids)
    mask = split_ids == split
    if not np.any(mask):
        raise DataError(
            f"no row belongs to split {split!r}; splits present: {sorted(set(split_ids.tolist()))}."
        )
    return mask


# ---------------------------------------------------------------------------
# Row order checks and segments


def check_entity_order(entity_ids: np.ndarray, source: str = "input") -> None:
    """Raise unless each entity's rows are contiguous.

    Raises:
        DataError: naming the entity and the row where it appears again after other rows.
    """
    entity_ids = np.asarray(entity_ids)
    starts, _ = find_segments(entity_ids)
    seen: set = set()
    for start in starts.tolist():
        entity = _plain_scalar(entity_ids[start])
        if entity in seen:
            raise DataError(
                f"{source}: entity {entity!r} appears again at row {start} after other entities; "
                "sort rows by entity, then time."
            )
        seen.add(entity)


def check_time_order(entity_ids: np.ndarray, times: np.ndarray, source: str = "input") -> None:
    """Raise unless time strictly increases within each entity.

    Raises:
        DataError: naming the entity and the first row whose time does not increase.
    """
    entity_ids = np.asarray(entity_ids)
    times = np.asarray(times)
    if times.shape != entity_ids.shape:
        raise DataError(f"{source}: times have shape {times.shape}, expected {entity_ids.shape}.")
    same_entity = entity_ids[1:] == entity_ids[:-1]
    bad = np.flatnonzero(same_entity & ~(times[1:] > times[:-1]))
    if bad.size:
        row = int(bad[0]) + 1
        entity, time, previous = (
            _plain_scalar(x) for x in (entity_ids[row], times[row], times[row - 1])
        )
        raise DataError(
            f"{source}: entity {entity!r}: time {time!r} at row {row} does not increase from "
            f"{previous!r} at row {row - 1}. Sort rows by entity, then time, and drop duplicates."
        )


def find_segments(
    entity_ids: np.ndarray, split_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return start and end row indices of runs where entity and split stay the same."""
    entity_ids = np.asarray(entity_ids)
    changes = np.ones(len(entity_ids), dtype=bool)
    changes[1:] = entity_ids[1:] != entity_ids[:-1]
    if split_ids is not None:
        split_ids = np.asarray(split_ids)
        changes[1:] |= split_ids[1:] != split_ids[:-1]
    starts = np.flatnonzero(changes)
    ends = np.append(starts[1:], len(entity_ids))
    return starts, ends


# ---------------------------------------------------------------------------
# Windows


class Windows(NamedTuple):
    """Full-length sliding windows and what each window belongs to."""

    values: np.ndarray  # (windows, window_length, features)
    targets: np.ndarray | None  # target at each window's last step, or None
    entity_ids: np.ndarray  # (windows,)
    end_rows: np.ndarray  # (windows,) input row index of each window's last step
    split_ids: np.ndarray | None  # (windows,) split of each window, or None


class LastWindows(NamedTuple):
    """The last window of each entity (and split), right-padded when the entity is short."""

    values: np.ndarray  # (entities, window_length, features), padding filled with fill_value
    mask: np.ndarray  # (entities, window_length) bool, True on real steps
    lengths: np.ndarray  # (entities,) real steps per window
    targets: np.ndarray | None  # target at the last real step, or None
    entity_ids: np.ndarray  # (entities,)
    split_ids: np.ndarray | None  # (entities,) or None


def check_window_inputs(
    values: np.ndarray,
    entity_ids: np.ndarray,
    window_length: int,
    targets: np.ndarray | None,
    split_ids: np.ndarray | None,
    times: np.ndarray | None,
    source: str,
) -> None:
    """Validate shapes, finiteness and row order of the inputs to the window functions.

    Raises:
        ConfigError: ``window_length`` below 1.
        DataError: wrong shapes, NaN or infinite values, or rows out of order.
    """
    if window_length < 1:
        raise ConfigError(f"window_length must be at least 1, got {window_length}.")
    if values.ndim != 2:
        raise DataError(f"{source}: values have shape {values.shape}; expected (rows, features).")
    rows = values.shape[0]
    for name, array in (("entity_ids", entity_ids), ("targets", targets), ("split_ids", split_ids)):
        if array is not None and array.shape[0] != rows:
            raise DataError(f"{source}: {name} has {array.shape[0]} rows but values have {rows}.")
    if rows == 0:
        raise DataError(f"{source}: no rows to make windows from.")
    bad_rows = np.flatnonzero(~np.all(np.isfinite(values), axis=1))
    if bad_rows.size:
        raise DataError(
            f"{source}: row {int(bad_rows[0])} contains NaN or infinite values. "
            "Clean or impute them first."
        )
    check_entity_order(entity_ids, source)
    if times is not None:
        check_time_order(entity_ids, times, source)


def make_windows(
    values: np.ndarray,
    entity_ids: np.ndarray,
    window_length: int,
    stride: int = 1,
    targets: np.ndarray | None = None,
    split_ids: np.ndarray | None = None,
    times: np.ndarray | None = None,
    source: str = "input",
) -> Windows:
    """Cut full-length sliding windows that never cross an entity or a split boundary.

    Windows start at the first row of each run of rows with the same entity and split, then
    every ``stride`` rows while a whole window fits. A run shorter than ``window_length``
    gives no window here; use `make_last_windows` to keep short entities for evaluation.

    Args:
        values: float features ``(rows, features)``, ordered by entity, then time.
        entity_ids: entity id per row ``(rows,)``; each entity's rows are contiguous.
        window_length: steps per window.
        stride: rows between the starts of consecutive windows of one run.
        targets: optional per-row targets ``(rows, ...)``; each window takes the target
            of its last row.
        split_ids: optional split name per row; windows stay inside one split.
        times: optional time per row, checked to increase strictly within each entity.
        source: name of the data, used in error messages.

    Returns:
        A `Windows` tuple.

    Raises:
        ConfigError: ``window_length`` or ``stride`` below 1.
        DataError: malformed input (see `check_window_inputs`), or no run long enough
            for one window.
    """
    values, entity_ids, targets, split_ids = _as_arrays(values, entity_ids, targets, split_ids)
    if stride < 1:
        raise ConfigError(f"stride must be at least 1, got {stride}.")
    check_window_inputs(values, entity_ids, window_length, targets, split_ids, times, source)
    starts, ends = find_segments(entity_ids, split_ids)
    window_starts = [
        np.arange(start, end - window_length + 1, stride)
        for start, end in zip(starts, ends, strict=True)
    ]
    window_starts = np.concatenate(window_starts).astype(np.int64)
    if window_starts.size == 0:
        raise DataError(
            f"{source}: no entity has {window_length} consecutive rows within one split "
            f"(longest run: {int((ends - starts).max())}). "
            "Lower window_length or use make_last_windows."
        )
    end_rows = window_starts + window_length - 1
    row_index = window_starts[:, None] + np.arange(window_length)[None, :]
    return Windows(
        values=values[row_index],
        targets=None if targets is None else targets[end_rows],
        entity_ids=entity_ids[end_rows],
        end_rows=end_rows,
        split_ids=None if split_ids is None else split_ids[end_rows],
    )


def make_last_windows(
    values: np.ndarray,
    entity_ids: np.ndarray,
    window_length: int,
    targets: np.ndarray | None = None,
    split_ids: np.ndarray | None = None,
    times: np.ndarray | None = None,
    fill_value: float = 0.0,
    source: str = "input",
) -> LastWindows:
    """Take the last ``window_length`` rows of each entity, right-padding short entities.

    Used for evaluation, where every entity counts once and none may be dropped. An
    entity with fewer rows than the window keeps all its rows at the start of the window,
    followed by ``fill_value`` padding. Its mask is True exactly on those rows. Its last
    real step is at index ``length - 1``, not at the end of the window. A recurrent
    layer given this mask carries its state unchanged through the padded steps, so its
    final output equals the output for the unpadded rows.

    Args:
        values: float features ``(rows, features)``, ordered by entity, then time.
        entity_ids: entity id per row ``(rows,)``; each entity's rows are contiguous.
        window_length: steps per window.
        targets: optional per-row targets; each window takes the target at its last real step.
        split_ids: optional split name per row; with it, each run of one entity within
            one split gives its own last window (for time splits).
        times: optional time per row, checked to increase strictly within each entity.
        fill_value: value of padded steps; the mask, not this value, marks padding.
        source: name of the data, used in error messages.

    Returns:
        A `LastWindows` tuple with one window per entity (per entity and split with
        ``split_ids``), in row order.

    Raises:
        ConfigError: ``window_length`` below 1.
        DataError: malformed input (see `check_window_inputs`).
    """
    values, entity_ids, targets, split_ids = _as_arrays(values, entity_ids, targets, split_ids)
    check_window_inputs(values, entity_ids, window_length, targets, split_ids, times, source)
    starts, ends = find_segments(entity_ids, split_ids)
    lengths = np.minimum(ends - starts, window_length)
    window_values = np.full(
        (len(starts), window_length, values.shape[1]), fill_value, dtype=values.dtype
    )
    mask = np.arange(window_length)[None, :] < lengths[:, None]
    for index, (end, length) in enumerate(zip(ends, lengths, strict=True)):
        window_values[index, :length] = values[end - length : end]
    last_rows = ends - 1
    return LastWindows(
        values=window_values,
        mask=mask,
        lengths=lengths.astype(np.int32),
        targets=None if targets is None else targets[last_rows],
        entity_ids=entity_ids[last_rows],
        split_ids=None if split_ids is None else split_ids[last_rows],
    )


def _as_arrays(values, entity_ids, targets, split_ids):
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float32)
    targets = None if targets is None else np.asarray(targets)
    split_ids = None if split_ids is None else np.asarray(split_ids)
    return values, np.asarray(entity_ids), targets, split_ids


# ---------------------------------------------------------------------------
# Constant features


def find_constant_features(
    values: np.ndarray, tolerance: float = 0.0, group_ids: np.ndarray | None = None
) -> np.ndarray:
    """Return the indices of features whose range (max - min) is at most ``tolerance``.

    Call it on training rows only. With ``group_ids`` (for example an operating condition
    per row) a feature counts as constant when it is constant within every group, even if
    its level differs between groups.

    Args:
        values: ``(rows, features)``.
        tolerance: largest range still treated as constant, in the feature's units.
        group_ids: optional group id per row.

    Returns:
        Sorted int64 indices of the constant features.

    Raises:
        DataError: no rows, a shape mismatch or a NaN value.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        raise DataError(
            f"values have shape {values.shape}; expected (rows, features) with at least one row."
        )
    if np.isnan(values).any():
        raise DataError(
            "values contain NaN; clean or impute them before looking for constant features."
        )
    if group_ids is None:
        return np.flatnonzero(np.ptp(values, axis=0) <= tolerance)
    group_ids = np.asarray(group_ids)
    if group_ids.shape != values.shape[:1]:
        raise DataError(f"group_ids have shape {group_ids.shape}, expected {values.shape[:1]}.")
    constant = np.ones(values.shape[1], dtype=bool)
    for group in np.unique(group_ids):
        constant &= np.ptp(values[group_ids == group], axis=0) <= tolerance
    return np.flatnonzero(constant)


# ---------------------------------------------------------------------------
# Normalizers


class Normalizer:
    """Per-feature affine normalization ``(x - offset) / scale``, optionally per group.

    A feature whose range on the fitted rows is at most ``tolerance`` is constant: its
    scale is 1, so it maps to ``x - offset`` and never to NaN or infinity.

    Subclasses set ``kind`` and `compute_offset_scale`.
    """

    kind: ClassVar[str] = ""

    def __init__(self, tolerance: float = 0.0) -> None:
        self.tolerance = tolerance
        self.stats: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
        self.grouped = False
        self.feature_names: list[str] | None = None
        self.num_fit_rows = 0
        self.fit_split: str | None = None

    def compute_offset_scale(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the offset and raw scale of ``values`` ``(rows, features)``, per feature."""
        raise NotImplementedError

    @property
    def num_features(self) -> int:
        """Number of features seen by `fit`; 0 before fitting."""
        if not self.stats:
            return 0
        return len(next(iter(self.stats.values()))[0])

    def fit(
        self,
        values: np.ndarray,
        group_ids: np.ndarray | None = None,
        feature_names: Iterable[str] | None = None,
    ) -> Normalizer:
        """Fit the statistics on ``values``; pass training rows only, e.g. ``values[train_mask]``.

        Args:
            values: ``(..., features)``; every leading axis counts as rows.
            group_ids: optional group id per row, shape ``values.shape[:-1]``; each
                group gets its own statistics.
            feature_names: optional name per feature, saved with the statistics.

        Returns:
            ``self``, fitted.

        Raises:
            DataError: no rows, NaN or infinite values, or a shape mismatch.
        """
        values = np.asarray(values, dtype=np.float64)
        if values.ndim < 2 or values.size == 0:
            raise DataError(
                f"cannot fit a normalizer on values of shape {values.shape}: "
                "expected (rows, features) with at least one row."
            )
        if not np.all(np.isfinite(values)):
            raise DataError(
                "cannot fit a normalizer on NaN or infinite values; clean or impute them first."
            )
        names = None if feature_names is None else [str(name) for name in feature_names]
        if names is not None and len(names) != values.shape[-1]:
            raise DataError(f"got {len(names)} feature names for {values.shape[-1]} features.")
        self.feature_names = names
        self.num_fit_rows = int(np.prod(values.shape[:-1]))
        self.fit_split = None
        self.grouped = group_ids is not None
        if group_ids is None:
            self.stats = {None: self._fit_rows(values.reshape(-1, values.shape[-1]))}
            return self
        group_ids = self._check_group_ids(values, group_ids)
        self.stats = {
            _plain_scalar(group): self._fit_rows(values[group_ids == group])
            for group in np.unique(group_ids)
        }
        return self

    def _fit_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        offset, scale = self.compute_offset_scale(rows)
        constant = np.ptp(rows, axis=0) <= self.tolerance
        return offset, np.where(constant | (scale == 0.0), 1.0, scale)

    def transform(self, values: np.ndarray, group_ids: np.ndarray | None = None) -> np.ndarray:
        """Return ``(values - offset) / scale`` with the fitted statistics.

        Float64 input stays float64; any other input becomes float32.

        Raises:
            DataError: not fitted, a feature count that differs from the fit, group ids
                missing or unexpected, or a group not seen by `fit` (named).
        """
        return self._apply(values, group_ids, lambda x, offset, scale: (x - offset) / scale)

    def inverse_transform(
        self, values: np.ndarray, group_ids: np.ndarray | None = None
    ) -> np.ndarray:
        """Return ``values * scale + offset``, undoing `transform`.

        Raises:
            DataError: as `transform`.
        """
        return self._apply(values, group_ids, lambda x, offset, scale: x * scale + offset)

    def _apply(self, values, group_ids, operation) -> np.ndarray:
        values = np.asarray(values)
        dtype = np.result_type(values.dtype, np.float32)
        values = values.astype(np.float64)
        self._check_features(values)
        if not self.grouped:
            if group_ids is not None:
                raise DataError(
                    "group_ids were given, but this normalizer was fitted without groups."
                )
            offset, scale = self.stats[None]
            return operation(values, offset, scale).astype(dtype)
        group_ids = self._check_group_ids(values, group_ids)
        result = np.empty_like(values)
        for group in np.unique(group_ids):
            offset, scale = self._group_stats(group)
            rows = group_ids == group
            result[rows] = operation(values[rows], offset, scale)
        return result.astype(dtype)

    def _check_features(self, values: np.ndarray) -> None:
        if not self.stats:
            raise DataError(
                f"the {self.kind} normalizer is not fitted; call fit on training rows first."
            )
        if values.ndim < 1 or values.shape[-1] != self.num_features:
            raise DataError(
                f"values have shape {values.shape}, but the normalizer was fitted on "
                f"{self.num_features} features."
            )

    def _check_group_ids(self, values: np.ndarray, group_ids: np.ndarray | None) -> np.ndarray:
        if group_ids is None:
            raise DataError("this normalizer was fitted per group; pass group_ids with the values.")
        group_ids = np.asarray(group_ids)
        if group_ids.shape != values.shape[:-1]:
            raise DataError(
                f"group_ids have shape {group_ids.shape}, expected {values.shape[:-1]}."
            )
        return group_ids

    def _group_stats(self, group: Any) -> tuple[np.ndarray, np.ndarray]:
        key = _plain_scalar(group)
        if key not in self.stats:
            raise DataError(
                f"group {key!r} was not seen when the normalizer was fitted (known groups: "
                f"{sorted(self.stats, key=str)}). Fit on training rows that cover every group."
            )
        return self.stats[key]

    def to_dict(self) -> dict[str, Any]:
        """Return the fitted normalizer as a JSON-ready dict."""
        return {
            "format_version": NORMALIZER_FORMAT_VERSION,
            "kind": self.kind,
            "tolerance": self.tolerance,
            "feature_names": self.feature_names,
            "num_fit_rows": self.num_fit_rows,
            "fit_split": self.fit_split,
            "grouped": self.grouped,
            "groups": [
                {"group": key, "offset": offset.tolist(), "scale": scale.tolist()}
                for key, (offset, scale) in self.stats.items()
            ],
        }

    def save(self, path: str | Path) -> Path:
        """Write the fitted statistics as JSON and return the path.

        The file is written to a temporary name and renamed, so an existing file is
        either kept whole or replaced whole.

        Raises:
            DataError: the normalizer is not fitted.
        """
        if not self.stats:
            raise DataError(f"the {self.kind} normalizer is not fitted; nothing to save to {path}.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        """Read a normalizer saved by `save`, returning an instance of the saved kind.

        Raises:
            DataError: the file is missing, not valid JSON, of an unknown kind or format,
                or of another kind than the class it is loaded through.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise DataError(f"normalizer file {path} not found; train the model first.") from error
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {error.lineno}: invalid JSON ({error.msg}).") from error
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "normalizer") -> Normalizer:
        """Rebuild a normalizer from `to_dict` output.

        Raises:
            DataError: an unknown kind or format version, a missing field, or a kind
                other than ``cls.kind`` when called on a subclass.
        """
        kind = data.get("kind")
        if kind not in NORMALIZER_KINDS:
            raise DataError(
                f"{source}: unknown normalizer kind {kind!r}, expected one of "
                f"{sorted(NORMALIZER_KINDS)}."
            )
        if cls.kind and kind != cls.kind:
            raise DataError(f"{source}: contains a {kind!r} normalizer, not {cls.kind!r}.")
        if data.get("format_version") != NORMALIZER_FORMAT_VERSION:
            raise DataError(
                f"{source}: normalizer format version {data.get('format_version')!r} is not "
                f"supported (expected {NORMALIZER_FORMAT_VERSION}). Retrain the model."
            )
        try:
            normalizer = NORMALIZER_KINDS[kind](tolerance=float(data["tolerance"]))
            normalizer.feature_names = data["feature_names"]
            normalizer.num_fit_rows = int(data["num_fit_rows"])
            normalizer.fit_split = data["fit_split"]
            normalizer.grouped = bool(data["grouped"])
            normalizer.stats = {
                entry["group"]: (
                    np.asarray(entry["offset"], dtype=np.float64),
                    np.asarray(entry["scale"], dtype=np.float64),
                )
                for entry in data["groups"]
            }
        except KeyError as error:
            raise DataError(
                f"{source}: normalizer field {error.args[0]!r} is missing; retrain the model."
            ) from error
        return normalizer


class ZScoreNormalizer(Normalizer):
    """Standardization: subtract the mean, divide by the population standard deviation."""

    kind = "zscore"

    def compute_offset_scale(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the per-feature mean and population standard deviation (ddof 0)."""
        return values.mean(axis=0), values.std(axis=0)


class MinMaxNormalizer(Normalizer):
    """Min-max scaling: fitted rows map to [0, 1]."""

    kind = "minmax"

    def compute_offset_scale(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the per-feature minimum and range."""
        return values.min(axis=0), np.ptp(values, axis=0)


NORMALIZER_KINDS: dict[str, type[Normalizer]] = {
    ZScoreNormalizer.kind: ZScoreNormalizer,
    MinMaxNormalizer.kind: MinMaxNormalizer,
}


def build_normalizer(kind: str, tolerance: float = 0.0) -> Normalizer:
    """Return an unfitted normalizer of ``kind`` (``"zscore"`` or ``"minmax"``).

    Raises:
        ConfigError: an unknown kind.
    """
    if kind not in NORMALIZER_KINDS:
        raise ConfigError(
            f"unknown normalizer {kind!r}; expected one of {sorted(NORMALIZER_KINDS)}."
        )
    return NORMALIZER_KINDS[kind](tolerance=tolerance)


def fit_normalizer_on_split(
    values: np.ndarray,
    split_ids: np.ndarray,
    split: str = TRAIN,
    *,
    kind: str = "zscore",
    group_ids: np.ndarray | None = None,
    feature_names: Iterable[str] | None = None,
    tolerance: float = 0.0,
) -> Normalizer:
    """Fit a normalizer on the rows of one split only, so no other split leaks into it.

    Args:
        values: all rows ``(rows, features)``.
        split_ids: split name per row ``(rows,)``.
        split: the split to fit on, normally ``"train"``.
        kind: ``"zscore"`` or ``"minmax"``.
        group_ids: optional group id per row for per-group statistics.
        feature_names: optional feature names saved with the statistics.
        tolerance: largest range treated as constant.

    Returns:
        The fitted normalizer, with ``fit_split`` set to ``split``.

    Raises:
        ConfigError: an unknown kind.
        DataError: no row in ``split``, or a shape mismatch.
    """
    values = np.asarray(values)
    split_ids = np.asarray(split_ids)
    if split_ids.shape != values.shape[:1]:
        raise DataError(f"split_ids have shape {split_ids.shape}, expected {values.shape[:1]}.")
    rows = make_split_mask(split_ids, split)
    normalizer = build_normalizer(kind, tolerance)
    normalizer.fit(
        values[rows], None if group_ids is None else np.asarray(group_ids)[rows], feature_names
    )
    normalizer.fit_split = split
    return normalizer
