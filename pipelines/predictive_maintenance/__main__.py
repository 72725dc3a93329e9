"""Command line of the predictive_maintenance pipeline: python -m pipelines.predictive_maintenance <command>."""

import sys

from pipelines.predictive_maintenance.config import PRESETS
from pipelines.predictive_maintenance.pipeline import COMMANDS
from shared.cli import run_cli

if __name__ == "__main__":
    sys.exit(
        run_cli(
            "predictive_maintenance",
            PRESETS,
            COMMANDS,
            description="Predict the remaining useful life (RUL) of turbofan engines from their sensor histories "
            "(NASA C-MAPSS or your own run-to-failure tables) and export it for edge devices.",
        )
    )
