"""Tests that a tune command killed with SIGKILL during a trial resumes with every tuner."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.tuning import KILL_AT_TRIAL_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
TOY_PIPELINE = Path(__file__).with_name("toy_pipeline.py")
TIMEOUT_S = 300


def run_tune(run_dir: Path, tuner: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    argv = [
        sys.executable,
        str(TOY_PIPELINE),
        "tune",
        "--run-dir",
        str(run_dir),
        "--data-dir",
        str(run_dir),
        "--tuner",
        tuner,
        "--max-trials",
        "3",
        "--set",
        "tune.epochs_per_trial=2",
        "--log-level",
        "WARNING",
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if kill_at is not None:
        environment[KILL_AT_TRIAL_ENV] = str(kill_at)
    return subprocess.run(
        argv, capture_output=True, text=True, env=environment, timeout=TIMEOUT_S, check=False
    )


def read_oracle(run_dir: Path) -> dict:
    return json.loads((run_dir / "tuning" / "learning_rate" / "oracle.json").read_text())


def read_trial_ids(run_dir: Path) -> list[str]:
    with open(run_dir / "trials.csv", encoding="utf-8", newline="") as handle:
        return [row["trial_id"] for row in csv.DictReader(handle) if row["status"] == "COMPLETED"]


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["random", "bayesian", "hyperband"])
def test_killed_search_resumes(tmp_path, tuner):
    killed = run_tune(tmp_path, tuner, kill_at=2)
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = read_trial_ids(tmp_path)
    running = list(read_oracle(tmp_path)["ongoing_trials"].values())
    assert before == ["0"]
    assert len(running) == 1  # The trial that was killed.

    resumed = run_tune(tmp_path, tuner)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = read_trial_ids(tmp_path)
    assert len(after) == len(set(after))  # No trial repeated.
    assert set(before) < set(after)  # No completed trial lost, and the search went on.
    assert running[0] in after  # The killed trial ran again and completed.
    assert json.loads(resumed.stdout)["new_trials"] == len(after) - len(before)
