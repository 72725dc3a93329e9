"""Test set-up shared by every test: fixed seeds and a quiet TensorFlow."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fixed_seed():
    """Seed Python, NumPy and TensorFlow before every test so results repeat."""
    keras.utils.set_random_seed(1234)


@pytest.fixture
def data_dir():
    """Return $PIPELINES_DATA_DIR as a Path, or skip the test when it is unset."""
    from pathlib import Path

    value = os.environ.get("PIPELINES_DATA_DIR")
    if not value:
        pytest.skip("PIPELINES_DATA_DIR is not set; real-data tests need the public datasets")
    return Path(value)
