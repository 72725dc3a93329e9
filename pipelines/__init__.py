"""The rnn-pipelines pipelines, one subpackage each, run as ``python -m pipelines.<name>``."""

import pkgutil
from pathlib import Path


def list_pipelines() -> list[str]:
    """Return the names of the pipeline subpackages that have a command line."""
    root = Path(__file__).parent
    return sorted(
        module.name
        for module in pkgutil.iter_modules([str(root)])
        if module.ispkg and (root / module.name / "__main__.py").is_file()
    )
