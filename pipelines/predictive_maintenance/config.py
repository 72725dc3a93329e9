"""Config of the predictive-maintenance pipeline: C-MAPSS data, recurrent RUL model, presets."""

from __future__ import annotations

import dataclasses

from shared.config import (
    ExportConfig,
    RecurrentConfig,
    TrainConfig,
    TuneConfig,
    check_choice,
    check_range,
)
from shared.errors import ConfigError

SUBSETS = ("FD001", "FD002", "FD003", "FD004")
MULTI_CONDITION_SUBSETS = ("FD002", "FD004")
NORMALIZATIONS = ("zscore", "minmax")
CONDITION_MODES = ("auto", "on", "off")
BAD_INPUT_MODES = ("error", "repair")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data: C-MAPSS subset or the user's own tables, preprocessing, target and windows.

    Attributes:
        subset: C-MAPSS subset used when no ``train_file`` is given.
        train_file: the user's run-to-failure table (C-MAPSS column layout), used in place
            of ``train_<subset>``; relative paths are read from the working directory.
        test_file: the user's truncated test table; needs ``rul_file``.
        rul_file: true RUL at the last cycle of each engine in ``test_file``, one per line.
        window_length: readings per model input window.
        min_window_length: shortest training window; windows shorter than
            ``window_length`` come from an engine's first cycles and are right-padded and
            masked, like short test engines. Equal to ``window_length`` turns them off.
        rul_cap: the piecewise-linear target is ``min(rul_cap, cycles to failure)``.
        normalization: per-sensor scaling fitted on training engines.
        condition_normalization: scale each operating condition on its own; "auto" does
            it for FD002 and FD004 (six conditions).
        num_conditions: operating conditions clustered from the three settings.
        constant_tolerance: a sensor whose range on training rows is at most this is dropped.
        cycle_feature: feed the cycle number (the engine's age) as an input next to the
            sensors, so the model receives how long the engine has run.
        smoothing_alpha: weight of the newest reading in the causal exponential moving
            average applied to each engine's scaled sensors (not the cycle number);
            1.0 turns smoothing off.
        validation_fraction: share of training engines held out for early stopping.
        bad_input: "error" raises on NaN or infinite readings, a non-increasing cycle
            column, a one-row training engine or a line with the wrong column count;
            "repair" fixes or drops them and logs how many.
    """

    subset: str = "FD001"
    train_file: str | None = None
    test_file: str | None = None
    rul_file: str | None = None
    window_length: int = 30
    min_window_length: int = 1
    rul_cap: float = 125.0
    normalization: str = "zscore"
    condition_normalization: str = "auto"
    num_conditions: int = 6
    constant_tolerance: float = 0.0
    cycle_feature: bool = True
    smoothing_alpha: float = 1.0
    validation_fraction: float = 0.15
    bad_input: str = "error"

    def __post_init__(self) -> None:
        check_choice("data.subset", self.subset, SUBSETS)
        check_range("data.window_length", self.window_length, 1, 10000)
        check_range("data.min_window_length", self.min_window_length, 1, self.window_length)
        check_range("data.rul_cap", self.rul_cap, 0.0, low_inclusive=False)
        check_choice("data.normalization", self.normalization, NORMALIZATIONS)
        check_choice("data.condition_normalization", self.condition_normalization, CONDITION_MODES)
        check_range("data.num_conditions", self.num_conditions, 1, 100)
        check_range("data.constant_tolerance", self.constant_tolerance, 0.0)
        check_range("data.smoothing_alpha", self.smoothing_alpha, 0.0, 1.0, low_inclusive=False)
        check_range(
            "data.validation_fraction",
            self.validation_fraction,
            0.0,
            1.0,
            low_inclusive=False,
            high_inclusive=False,
        )
        check_choice("data.bad_input", self.bad_input, BAD_INPUT_MODES)
        if self.test_file and not self.rul_file:
            raise ConfigError(
                f"data.test_file is set ({self.test_file!r}) but data.rul_file is not; "
                "give the file with the true RUL of each test engine."
            )

    def uses_conditions(self) -> bool:
        """Return whether sensors are normalized per operating condition."""
        if self.condition_normalization == "auto":
            return self.train_file is None and self.subset in MULTI_CONDITION_SUBSETS
        return self.condition_normalization == "on"


@dataclasses.dataclass(frozen=True)
class ModelConfig(RecurrentConfig):
    """Recurrent stack over the sensor window, then a dense head that outputs RUL in cycles.

    ``members`` above 1 builds that many stacks with their own heads inside one model and
    averages their outputs. ``train`` trains each member on its own, then joins them.
    """

    cell: str = "lstm"
    units: int = 32
    layers: int = 2
    dropout: float = 0.1
    head_units: int = 32
    head_dropout: float = 0.1
    members: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("model.members", self.members, 1, 16)
        check_range("model.head_units", self.head_units, 0, 8192)
        check_range("model.head_dropout", self.head_dropout, 0.0, 1.0, high_inclusive=False)


@dataclasses.dataclass(frozen=True)
class PredictiveMaintenanceConfig:
    """Every section of the predictive-maintenance pipeline's config."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    tune: TuneConfig = dataclasses.field(default_factory=TuneConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)


# Sizes and batch sizes that train in minutes on a CPU; the shared default space goes to 512 units.
SEARCH_SPACE = {
    "learning_rate": {"type": "float", "min": 3e-4, "max": 3e-3, "sampling": "log", "stage": "learning_rate"},
    "batch_size": {"type": "choice", "values": [128, 256, 512], "stage": "learning_rate"},
    "units": {"type": "int", "min": 16, "max": 128, "step": 16, "stage": "size"},
    "dropout": {"type": "float", "min": 0.0, "max": 0.3, "stage": "regularization"},
    "head_dropout": {"type": "float", "min": 0.0, "max": 0.3, "stage": "regularization"},
}

# Smoothing, the GRU cell and the 3-member ensemble were chosen by validation RMSE on the
# held-out FD001 training engines (docs/predictive_maintenance.md lists the candidates).
DEFAULT = PredictiveMaintenanceConfig(
    data=DataConfig(smoothing_alpha=0.05),
    model=ModelConfig(cell="gru", members=3),
    tune=TuneConfig(search_space=SEARCH_SPACE, epochs_per_trial=10),
    train=TrainConfig(
        epochs=60,
        batch_size=256,
        learning_rate=1e-3,
        lr_schedule="cosine",
        early_stopping_patience=15,
    ),
)

TINY = dataclasses.replace(
    DEFAULT,
    model=ModelConfig(units=8, layers=1, dropout=0.0, head_units=0, head_dropout=0.0),
    train=dataclasses.replace(
        DEFAULT.train, epochs=2, steps_per_epoch=15, validation_steps=5, early_stopping_patience=2
    ),
    tune=dataclasses.replace(DEFAULT.tune, max_trials=2, epochs_per_trial=1),
    export=dataclasses.replace(
        DEFAULT.export, parity_samples=4, representative_samples=16, latency_runs=5
    ),
)

PRESETS = {"default": DEFAULT, "tiny": TINY}
