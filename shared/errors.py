"""Exceptions raised on bad user input, named by what the caller should fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value, file or override is invalid; the message names the field and the fix."""


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, the line and the fix."""


class ExportError(RuntimeError):
    """A model could not be exported or its exported copy disagrees with Keras."""
