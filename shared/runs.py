"""Run directories and the files written into them, always atomically.

A run directory contains everything one training run produces: ``config.yaml``,
``metrics.json``, ``history.csv``, ``model.keras``, ``checkpoints/``, ``backup/``
(deleted when training finishes), ``logs/`` (TensorBoard), ``report.md`` and exports.
Files are written to a temporary name and renamed, so a crash or a kill never leaves a
half-written file in place of a good one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

RUNS_ROOT_ENV = "PIPELINES_RUNS_DIR"
DEFAULT_RUNS_ROOT = Path("saved_models")


def default_run_dir(pipeline: str, preset: str) -> Path:
    """Return ``saved_models/<pipeline>/<preset>`` (root overridable by $PIPELINES_RUNS_DIR)."""
    root = Path(os.environ.get(RUNS_ROOT_ENV) or DEFAULT_RUNS_ROOT)
    return root / pipeline / preset


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy and tensor scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically; NaN and inf become strings."""
    return write_text_atomic(path, json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file written by `write_json`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
