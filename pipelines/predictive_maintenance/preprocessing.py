"""Sensor preprocessing fitted on training engines only: constant sensors, operating conditions, scaling.

Every decision is taken from the rows of the training split and saved as JSON next to
the model, so validation, test and prediction rows (and an edge device) apply exactly the
same transform:

* Operating conditions: the three settings are standardized and clustered with k-means,
  because C-MAPSS FD002 and FD004 fly six conditions. Each row goes to its nearest centre.
* Constant sensors: a sensor whose range is at most the tolerance (within every
  condition, when conditions are used) carries no information and is dropped.
* Scaling: z-score or min-max per sensor, per condition when conditions are used.
* The cycle number (the engine's age in cycles) is an extra input feature when
  ``data.cycle_feature`` is true, scaled like a sensor.
* Smoothing: after scaling, each engine's sensors (not the cycle number) pass through a
  causal exponential moving average, ``s_0 = x_0`` and ``s_t = a x_t + (1 - a) s_{t-1}``
  with ``a = data.smoothing_alpha``. Nothing is fitted, and it reads only the engine's
  own past. A device keeps one smoothed reading per engine and calls
  `compute_smoothed_step` on each new scaled reading before the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.cluster import KMeans

from pipelines.predictive_maintenance.config import DataConfig
from pipelines.predictive_maintenance.data import SENSOR_NAMES, EngineTable
from shared.errors import DataError
from shared.runs import write_json
from shared.timeseries import Normalizer, build_normalizer, find_constant_features

logger = logging.getLogger(__name__)

PREPROCESSING_FILE = "preprocessing.json"
CYCLE_FEATURE = "cycle"
FORMAT_VERSION = 1


@dataclasses.dataclass
class OperatingConditions:
    """K-means centres of the standardized settings; a row's condition is its nearest centre."""

    settings_mean: np.ndarray  # (3,)
    settings_scale: np.ndarray  # (3,)
    centers: np.ndarray  # (conditions, 3), in standardized units

    def assign(self, settings: np.ndarray) -> np.ndarray:
        """Return the condition id (0..conditions-1) of each row of ``settings`` ``(rows, 3)``."""
        scaled = (np.asarray(settings, dtype=np.float64) - self.settings_mean) / self.settings_scale
        distances = ((scaled[:, None, :] - self.centers[None, :, :]) ** 2).sum(axis=-1)
        return distances.argmin(axis=1).astype(np.int64)


def fit_operating_conditions(
    settings: np.ndarray, num_conditions: int, seed: int = 0
) -> OperatingConditions:
    """Cluster training settings into ``num_conditions`` operating conditions.

    Raises:
        DataError: fewer distinct setting rows than conditions.
    """
    settings = np.asarray(settings, dtype=np.float64)
    distinct = len(np.unique(np.round(settings, 6), axis=0))
    if distinct < num_conditions:
        raise DataError(
            f"the training settings hold {distinct} distinct rows, fewer than data.num_conditions="
            f"{num_conditions}; lower num_conditions or set data.condition_normalization=off."
        )
    mean = settings.mean(axis=0)
    scale = settings.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    kmeans = KMeans(n_clusters=num_conditions, n_init=10, random_state=seed).fit(
        (settings - mean) / scale
    )
    # Sort centres so that condition ids do not depend on k-means' initialization order.
    centers = kmeans.cluster_centers_[np.lexsort(kmeans.cluster_centers_.T[::-1])]
    return OperatingConditions(mean, scale, centers)


@dataclasses.dataclass
class SensorPreprocessor:
    """The fitted transform from raw table rows to model features."""

    kept_sensors: list[int]  # indices into SENSOR_NAMES
    normalizer: Normalizer
    conditions: OperatingConditions | None = None
    fit_units: int = 0
    cycle_feature: bool = False
    smoothing_alpha: float = 1.0

    @property
    def feature_names(self) -> list[str]:
        """Names of the model's input features, in order."""
        names = [SENSOR_NAMES[i] for i in self.kept_sensors]
        return [*names, CYCLE_FEATURE] if self.cycle_feature else names

    def transform(self, table: EngineTable) -> np.ndarray:
        """Return float32 features ``(rows, len(feature_names))`` for every row of ``table``."""
        groups = None if self.conditions is None else self.conditions.assign(table.settings)
        features = self.normalizer.transform(
            select_raw_features(table, self.kept_sensors, self.cycle_feature), groups
        )
        if self.smoothing_alpha < 1.0:
            sensors = len(self.kept_sensors)
            features[:, :sensors] = compute_smoothed_features(
                features[:, :sensors], table.unit_ids, self.smoothing_alpha
            )
        return features

    def to_dict(self) -> dict[str, Any]:
        """Return the fitted transform as a JSON-ready dict."""
        conditions = None
        if self.conditions is not None:
            conditions = {
                name: getattr(self.conditions, name).tolist()
                for name in ("settings_mean", "settings_scale", "centers")
            }
        return {
            "format_version": FORMAT_VERSION,
            "kept_sensors": [SENSOR_NAMES[i] for i in self.kept_sensors],
            "dropped_sensors": [
                name for i, name in enumerate(SENSOR_NAMES) if i not in self.kept_sensors
            ],
            "fit_units": self.fit_units,
            "cycle_feature": self.cycle_feature,
            "smoothing_alpha": self.smoothing_alpha,
            "operating_conditions": conditions,
            "normalizer": self.normalizer.to_dict(),
        }

    def describe_device_steps(self) -> dict[str, Any]:
        """Return what a device does to each raw reading before the model, for the export report."""
        steps = [
            f"keep the sensors {[SENSOR_NAMES[i] for i in self.kept_sensors]}",
            "append the cycle number" if self.cycle_feature else "append nothing",
            "scale with the statistics of the reading's operating condition"
            if self.conditions is not None
            else "scale with the saved statistics",
        ]
        if self.smoothing_alpha < 1.0:
            steps.append(
                f"smooth the scaled sensors (not the cycle) with s = {self.smoothing_alpha:g} * x "
                f"+ {1.0 - self.smoothing_alpha:g} * s_previous, starting from the engine's first "
                "reading; keep s per engine between readings"
            )
        return {"file": PREPROCESSING_FILE, "smoothing_alpha": self.smoothing_alpha, "steps": steps}

    def save(self, path: str | Path) -> Path:
        """Write the fitted transform as JSON atomically and return the path."""
        return write_json(path, self.to_dict())


def compute_smoothed_step(
    previous: np.ndarray | None, reading: np.ndarray, alpha: float
) -> np.ndarray:
    """Return the next smoothed reading of one engine: the reading itself when it is the first.

    Args:
        previous: the engine's smoothed previous reading, or None at its first reading.
        reading: the new scaled sensor values.
        alpha: weight of the new reading, in (0, 1].
    """
    reading = np.asarray(reading, dtype=np.float64)
    if previous is None:
        return reading
    return alpha * reading + (1.0 - alpha) * np.asarray(previous, dtype=np.float64)


def compute_smoothed_features(
    features: np.ndarray, unit_ids: np.ndarray, alpha: float
) -> np.ndarray:
    """Return the causal exponential moving average of ``features`` ``(rows, n)`` within each unit.

    Rows of a unit are contiguous and in time order; the average restarts at each unit's
    first row, so no unit's readings reach another unit.
    """
    smoothed = np.empty(features.shape, dtype=np.float64)
    previous = None
    for row in range(len(features)):
        if row == 0 or unit_ids[row] != unit_ids[row - 1]:
            previous = None
        previous = compute_smoothed_step(previous, features[row], alpha)
        smoothed[row] = previous
    return smoothed.astype(features.dtype)


def select_raw_features(
    table: EngineTable, kept_sensors: list[int], cycle_feature: bool
) -> np.ndarray:
    """Return the kept sensors, then the cycle number when ``cycle_feature``, as float32 ``(rows, features)``."""
    columns = [table.sensors[:, kept_sensors]]
    if cycle_feature:
        columns.append(table.cycles[:, None])
    return np.concatenate(columns, axis=1).astype(np.float32)


def load_preprocessor(path: str | Path) -> SensorPreprocessor:
    """Read a transform written by `SensorPreprocessor.save`.

    Raises:
        DataError: the file is missing, malformed or of another format version.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise DataError(f"{path} not found; train a model in this run directory first.") from error
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: line {error.lineno}: invalid JSON ({error.msg}).") from error
    if data.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format version {data.get('format_version')!r} is not {FORMAT_VERSION}; retrain."
        )
    conditions = data["operating_conditions"]
    if conditions is not None:
        conditions = OperatingConditions(
            **{name: np.asarray(value) for name, value in conditions.items()}
        )
    return SensorPreprocessor(
        kept_sensors=[SENSOR_NAMES.index(name) for name in data["kept_sensors"]],
        normalizer=Normalizer.from_dict(data["normalizer"], source=str(path)),
        conditions=conditions,
        fit_units=int(data["fit_units"]),
        cycle_feature=bool(data["cycle_feature"]),
        smoothing_alpha=float(data.get("smoothing_alpha", 1.0)),
    )


def fit_preprocessor(
    train_table: EngineTable, config: DataConfig, seed: int = 0
) -> SensorPreprocessor:
    """Fit conditions, constant-sensor selection and scaling on the training engines' rows.

    Args:
        train_table: rows of the training split only (never validation or test rows).
        config: normalization kind, condition mode, tolerance.
        seed: k-means seed.

    Raises:
        DataError: every sensor is constant, or too few distinct settings for the conditions.
    """
    conditions = None
    groups = None
    if config.uses_conditions():
        conditions = fit_operating_conditions(train_table.settings, config.num_conditions, seed)
        groups = conditions.assign(train_table.settings)
        logger.info(
            "Operating conditions: %d, training rows per condition %s",
            config.num_conditions,
            np.bincount(groups, minlength=config.num_conditions).tolist(),
        )
    constant = set(
        find_constant_features(train_table.sensors, config.constant_tolerance, groups).tolist()
    )
    kept = [i for i in range(len(SENSOR_NAMES)) if i not in constant]
    if not kept:
        raise DataError(
            f"{train_table.source}: every sensor is constant on the training engines; nothing to learn."
        )
    logger.info(
        "Dropped %d constant sensor(s) (decided on training engines): %s",
        len(constant),
        [SENSOR_NAMES[i] for i in sorted(constant)],
    )
    preprocessor = SensorPreprocessor(
        kept,
        build_normalizer(config.normalization),
        conditions,
        train_table.num_units,
        config.cycle_feature,
        config.smoothing_alpha,
    )
    raw = select_raw_features(train_table, kept, config.cycle_feature)
    preprocessor.normalizer.fit(raw, groups, preprocessor.feature_names)
    preprocessor.normalizer.fit_split = "train"
    return preprocessor
