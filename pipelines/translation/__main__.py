"""Command line of the translation pipeline: python -m pipelines.translation <command>."""

import sys

from pipelines.translation.config import PRESETS
from pipelines.translation.pipeline import COMMANDS
from shared.cli import run_cli

if __name__ == "__main__":
    sys.exit(
        run_cli(
            "translation",
            PRESETS,
            COMMANDS,
            description="Attention encoder-decoder translation of Multi30k, Anki or own pairs.",
        )
    )
