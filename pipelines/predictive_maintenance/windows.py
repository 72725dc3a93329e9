"""Sliding windows over engine histories, right-padded and masked when an engine is short.

A window ends at one row and holds up to ``window_length`` readings of the same engine
that end there, never readings of another engine. A window ending before the engine's
``window_length``-th row contains the rows so far, then padding. It follows the padding
contract of `shared.padding`: padding is on the right, a boolean mask marks real steps
with True, and no window is all padding. A recurrent layer given the mask keeps its state
through the padded steps, so a padded window gives the same RUL as its real rows alone.
The target of a window is the target at its last real row.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from shared.errors import ConfigError, DataError
from shared.timeseries import make_last_windows

READINGS = "readings"
PADDING_MASK = "padding_mask"


@dataclasses.dataclass
class EngineWindows:
    """Windows with their mask, target and the engine and row each one ends at."""

    readings: np.ndarray  # (windows, window_length, features) float32, padding is 0
    padding_mask: np.ndarray  # (windows, window_length) bool, True on real readings
    targets: np.ndarray | None  # (windows,) float32 RUL at the last real reading
    unit_ids: np.ndarray  # (windows,)
    end_rows: np.ndarray  # (windows,) row of the last real reading

    def __len__(self) -> int:
        return len(self.readings)

    @property
    def lengths(self) -> np.ndarray:
        """Real readings per window."""
        return self.padding_mask.sum(axis=1).astype(np.int32)

    def inputs(self) -> dict[str, np.ndarray]:
        """Return the model inputs as a dict keyed by input name."""
        return {READINGS: self.readings, PADDING_MASK: self.padding_mask}


def compute_positions(unit_ids: np.ndarray) -> np.ndarray:
    """Return each row's 0-based index within its unit (rows of a unit are contiguous)."""
    unit_ids = np.asarray(unit_ids)
    starts = np.flatnonzero(np.r_[True, unit_ids[1:] != unit_ids[:-1]])
    lengths = np.diff(np.r_[starts, len(unit_ids)])
    return np.arange(len(unit_ids)) - np.repeat(starts, lengths)


def make_windows_per_row(
    features: np.ndarray,
    unit_ids: np.ndarray,
    window_length: int,
    min_length: int = 1,
    targets: np.ndarray | None = None,
) -> EngineWindows:
    """Make one window ending at every row that has at least ``min_length`` readings so far.

    With ``min_length == window_length`` these are the usual full sliding windows with
    stride 1; smaller ``min_length`` adds padded windows from each engine's first cycles.

    Args:
        features: float ``(rows, features)``, ordered by unit, then cycle.
        unit_ids: unit per row; each unit's rows contiguous.
        window_length: readings per window.
        min_length: minimum number of real readings in a window.
        targets: optional per-row targets.

    Returns:
        The windows in row order.

    Raises:
        ConfigError: lengths out of range.
        DataError: NaN or infinite features, mismatched shapes, or no row qualifies.
    """
    if not 1 <= min_length <= window_length:
        raise ConfigError(
            f"min_length must be in [1, window_length={window_length}], got {min_length}."
        )
    features = np.asarray(features, dtype=np.float32)
    unit_ids = np.asarray(unit_ids)
    if features.ndim != 2 or len(features) != len(unit_ids):
        raise DataError(f"features have shape {features.shape} for {len(unit_ids)} unit ids.")
    if not np.all(np.isfinite(features)):
        raise DataError("features contain NaN or infinite values; clean the input first.")
    positions = compute_positions(unit_ids)
    end_rows = np.flatnonzero(positions >= min_length - 1)
    if end_rows.size == 0:
        raise DataError(f"no engine has {min_length} readings; lower data.min_window_length.")
    lengths = np.minimum(positions[end_rows] + 1, window_length)
    steps = np.arange(window_length)
    padding_mask = steps[None, :] < lengths[:, None]
    row_index = (end_rows - lengths + 1)[:, None] + steps[None, :]
    readings = np.where(
        padding_mask[..., None], features[np.minimum(row_index, len(features) - 1)], 0.0
    )
    return EngineWindows(
        readings=readings.astype(np.float32),
        padding_mask=padding_mask,
        targets=None if targets is None else np.asarray(targets, dtype=np.float32)[end_rows],
        unit_ids=unit_ids[end_rows],
        end_rows=end_rows,
    )


def make_last_engine_windows(
    features: np.ndarray,
    unit_ids: np.ndarray,
    window_length: int,
    targets: np.ndarray | None = None,
) -> EngineWindows:
    """Make the window ending at each engine's last reading; short engines are padded, never dropped."""
    last = make_last_windows(features.astype(np.float32), unit_ids, window_length, targets=targets)
    end_rows = np.flatnonzero(np.r_[np.asarray(unit_ids)[1:] != np.asarray(unit_ids)[:-1], True])
    return EngineWindows(
        readings=last.values.astype(np.float32),
        padding_mask=last.mask,
        targets=None if last.targets is None else last.targets.astype(np.float32),
        unit_ids=last.entity_ids,
        end_rows=end_rows,
    )


def make_dataset(
    windows: EngineWindows,
    batch_size: int,
    *,
    shuffle: bool = False,
    repeat: bool = False,
    seed: int = 0,
) -> tf.data.Dataset:
    """Batch windows into ``({"readings", "padding_mask"}, rul)`` for Keras.

    Args:
        windows: windows with targets.
        batch_size: windows per batch.
        shuffle: shuffle all windows each epoch (after the engine split, never before).
        repeat: repeat forever, for a fixed ``steps_per_epoch``.
        seed: shuffle seed.
    """
    dataset = tf.data.Dataset.from_tensor_slices((windows.inputs(), windows.targets))
    if shuffle:
        dataset = dataset.shuffle(len(windows), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
