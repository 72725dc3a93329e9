"""Command line of the sentiment pipeline: python -m pipelines.sentiment <command>."""

import sys

from pipelines.sentiment.config import PRESETS
from pipelines.sentiment.pipeline import COMMANDS
from shared.cli import run_cli

if __name__ == "__main__":
    sys.exit(run_cli("sentiment", PRESETS, COMMANDS,
                     description="Classify text by sentiment (IMDB, SST or your own CSV) with a recurrent network."))
