"""Tests for distributed KerasTuner search: a chief and two workers on 127.0.0.1."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.distributed import configure_tuning_role, parse_oracle_address
from shared.errors import ConfigError
from shared.tuning import KILL_AT_TRIAL_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
TOY_PIPELINE = Path(__file__).with_name("toy_pipeline.py")
TIMEOUT_S = 420


def pick_free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_tune(run_dir: Path, log_name: str, *flags: str, env: dict[str, str] | None = None):
    argv = [
        sys.executable,
        str(TOY_PIPELINE),
        "tune",
        "--run-dir",
        str(run_dir),
        "--data-dir",
        str(run_dir),
        "--log-level",
        "INFO",
        *flags,
    ]
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **(env or {}),
    }
    log = open(run_dir.parent / f"{log_name}.log", "w", encoding="utf-8")  # noqa: SIM115
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=environment, text=True)


def wait_all(processes, deadline: float) -> None:
    for process in processes:
        process.wait(timeout=max(1.0, deadline - time.monotonic()))


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------
# Roles and addresses.


def test_oracle_address_parsed():
    assert parse_oracle_address("10.0.0.5:8000") == ("10.0.0.5", 8000)
    assert parse_oracle_address("[::1]:9000") == ("::1", 9000)


@pytest.mark.parametrize("text", ["10.0.0.5", "host:0", "host:70000", ":8000"])
def test_oracle_address_invalid(text):
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_oracle_address(text)


def test_role_chief_sets_variables():
    environ: dict[str, str] = {}
    assert configure_tuning_role("chief", "0.0.0.0:8000", None, environ) == ("chief", None)
    assert environ == {
        "KERASTUNER_TUNER_ID": "chief",
        "KERASTUNER_ORACLE_IP": "0.0.0.0",
        "KERASTUNER_ORACLE_PORT": "8000",
    }


def test_role_worker_needs_id():
    with pytest.raises(ConfigError, match="--worker-id"):
        configure_tuning_role("worker", "host:8000", None, {})


def test_role_worker_needs_oracle():
    with pytest.raises(ConfigError, match="--oracle"):
        configure_tuning_role("worker", None, "tuner0", {})


def test_role_from_keras_tuner_variables():
    environ = {
        "KERASTUNER_TUNER_ID": "tuner3",
        "KERASTUNER_ORACLE_IP": "10.0.0.5",
        "KERASTUNER_ORACLE_PORT": "8000",
    }
    assert configure_tuning_role(None, None, None, environ) == ("worker", "tuner3")


def test_role_standalone_clears_variables():
    environ = {
        "KERASTUNER_TUNER_ID": "chief",
        "KERASTUNER_ORACLE_IP": "h",
        "KERASTUNER_ORACLE_PORT": "1",
    }
    assert configure_tuning_role("standalone", None, None, environ) == ("standalone", None)
    assert environ == {}


# ---------------------------------------------------------------------------
# A chief and two workers; one worker is killed during its first trial and restarted.


@pytest.mark.slow
def test_chief_and_two_workers(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    port = pick_free_port()
    common = ("--max-trials", "4", "--stage", "learning_rate", "--oracle", f"127.0.0.1:{port}")
    deadline = time.monotonic() + TIMEOUT_S
    processes = []
    try:
        chief = start_tune(run_dir, "chief", *common, "--role", "chief")
        worker0 = start_tune(
            run_dir, "worker0", *common, "--role", "worker", "--worker-id", "tuner0"
        )
        killed = start_tune(
            run_dir,
            "worker1",
            *common,
            "--role",
            "worker",
            "--worker-id",
            "tuner1",
            env={KILL_AT_TRIAL_ENV: "1"},
        )
        processes = [chief, worker0, killed]
        killed.wait(timeout=TIMEOUT_S)
        assert killed.returncode == -9  # SIGKILL during its first trial.
        restarted = start_tune(
            run_dir, "worker1b", *common, "--role", "worker", "--worker-id", "tuner1"
        )
        processes.append(restarted)
        wait_all([worker0, restarted, chief], deadline)
        chief_result = json.loads(chief.stdout.read())
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert chief.returncode == 0
    assert worker0.returncode == 0
    assert restarted.returncode == 0
    rows = read_rows(run_dir / "trials.csv")
    assert sorted(row["trial_id"] for row in rows) == ["0", "1", "2", "3"]  # Each trial once.
    assert all(row["status"] == "COMPLETED" for row in rows)
    assert all(row["parameters"] == "133" for row in rows)  # Reported by the workers.
    best = min(rows, key=lambda row: float(row["val_loss"]))
    assert chief_result["role"] == "chief"
    assert chief_result["best_trial_id"] == best["trial_id"]
    assert (run_dir / "best.yaml").is_file()
    # Each trial was built on exactly one worker; tuner1's killed trial was finished by tuner1.
    built = sorted(
        path.parent.name
        for path in (run_dir / "workers").glob(
            "tuner*/tuning/learning_rate/trial_*/build_config.json"
        )
    )
    assert built == ["trial_0", "trial_1", "trial_2", "trial_3"]


# ---------------------------------------------------------------------------
# Trials in child processes: this process serves the oracle on loopback.


@pytest.mark.slow
def test_trials_in_child_processes(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    process = start_tune(run_dir, "parent", "--max-trials", "3", "--trials-per-process", "2")
    try:
        process.wait(timeout=TIMEOUT_S)
        result = json.loads(process.stdout.read())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0
    rows = read_rows(run_dir / "trials.csv")
    assert sorted(row["trial_id"] for row in rows) == ["0", "1", "2"]
    assert all(row["status"] == "COMPLETED" for row in rows)
    assert result["role"] == "standalone"
    assert (run_dir / "best.yaml").is_file()
    log = (run_dir / "tuning" / "learning_rate" / "processes.log").read_text(encoding="utf-8")
    assert log.count("this process ran its 2 trials") == 1  # The first child ran two trials.
