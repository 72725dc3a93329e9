"""End-to-end tests of the predictive-maintenance commands on synthetic and real C-MAPSS data."""

import io
import json
import time

import numpy as np
import pytest

from pipelines.predictive_maintenance.config import PRESETS
from pipelines.predictive_maintenance.pipeline import (
    COMMANDS,
    format_subset_table,
    format_training_summary,
)
from shared.cli import run_cli


def run_command(argv):
    """Run the CLI in-process; return the exit code and the parsed JSON printed on stdout."""
    stdout = io.StringIO()
    code = run_cli("predictive_maintenance", PRESETS, COMMANDS, argv=argv, stdout=stdout)
    text = stdout.getvalue()
    return code, json.loads(text) if text.strip() else None


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cmapss_writer):
    """Train the tiny preset once for this module's tests."""
    root = tmp_path_factory.mktemp("predictive_maintenance")
    cmapss_dir = cmapss_writer(root)
    run_dir = root / "run"
    started = time.monotonic()
    code, metrics = run_command(
        ["train", "--preset", "tiny", "--data-dir", str(cmapss_dir), "--run-dir", str(run_dir)]
    )
    return code, metrics, time.monotonic() - started, cmapss_dir, run_dir


def test_tiny_trains_in_seconds(trained_run):
    code, metrics, seconds, _, run_dir = trained_run
    assert code == 0
    assert metrics["epochs_run"] == 2
    assert seconds < 60
    for name in ("model.keras", "preprocessing.json", "splits.json", "metrics.json", "config.yaml"):
        assert (run_dir / name).is_file()


def test_evaluate_keeps_short_engine(trained_run):
    _, _, _, data_dir, run_dir = trained_run
    code, results = run_command(
        ["evaluate", "--data-dir", str(data_dir), "--run-dir", str(run_dir)]
    )
    assert code == 0
    assert results["FD001"]["engines"] == 4
    assert results["FD001"]["short_engines_padded"] == 1
    assert np.isfinite(results["FD001"]["rmse"])
    assert (run_dir / "plots" / "FD001_predicted_vs_true.png").is_file()
    assert (run_dir / "plots" / "FD001_trajectories.png").is_file()
    report = (run_dir / "report.md").read_text()
    assert "| FD001 | 4 |" in report
    assert "## Metrics" not in report


def test_evaluate_limit(trained_run):
    _, _, _, data_dir, run_dir = trained_run
    code, results = run_command(
        ["evaluate", "--data-dir", str(data_dir), "--run-dir", str(run_dir), "--limit", "2"]
    )
    assert code == 0
    assert results["FD001"]["engines"] == 2


def test_evaluate_validation_split(trained_run):
    _, _, _, data_dir, run_dir = trained_run
    code, results = run_command(
        [
            "evaluate",
            "--data-dir",
            str(data_dir),
            "--run-dir",
            str(run_dir),
            "--split",
            "validation",
        ]
    )
    assert code == 0
    assert results["validation"]["windows"] > 0


def test_evaluate_unknown_split(trained_run):
    _, _, _, data_dir, run_dir = trained_run
    code, _ = run_command(
        ["evaluate", "--data-dir", str(data_dir), "--run-dir", str(run_dir), "--split", "FD009"]
    )
    assert code == 2


def test_predict_per_engine_csv(trained_run, tmp_path, table_writer, engine_rows):
    _, _, _, data_dir, run_dir = trained_run
    rng = np.random.default_rng(5)
    history = table_writer(
        tmp_path / "fleet.txt",
        np.concatenate([engine_rows(11, 40, rng), engine_rows(12, 1, rng)]),
    )
    output = tmp_path / "rul.csv"
    code, result = run_command(
        [
            "predict",
            "--data-dir",
            str(data_dir),
            "--run-dir",
            str(run_dir),
            "--input",
            str(history),
            "--output",
            str(output),
        ]
    )
    assert code == 0
    assert result["engines"] == 2
    lines = output.read_text().splitlines()
    assert lines[0] == "unit,readings,last_cycle,rul"
    assert [line.split(",")[:3] for line in lines[1:]] == [["11", "40", "40.0"], ["12", "1", "1.0"]]


def test_predict_to_stdout(trained_run, tmp_path, table_writer, engine_rows):
    _, _, _, data_dir, run_dir = trained_run
    history = table_writer(tmp_path / "fleet.txt", engine_rows(3, 35, np.random.default_rng(6)))
    code, result = run_command(
        ["predict", "--data-dir", str(data_dir), "--run-dir", str(run_dir), "--input", str(history)]
    )
    assert code == 0
    assert result["predictions"][0]["unit"] == 3


def test_predict_bad_input_exit_code(trained_run, tmp_path):
    _, _, _, data_dir, run_dir = trained_run
    bad = tmp_path / "bad.txt"
    bad.write_text("1 1 0 0\n")
    code, _ = run_command(
        ["predict", "--data-dir", str(data_dir), "--run-dir", str(run_dir), "--input", str(bad)]
    )
    assert code == 1


def test_evaluate_without_training(cmapss_dir, tmp_path):
    code, _ = run_command(
        ["evaluate", "--data-dir", str(cmapss_dir), "--run-dir", str(tmp_path / "none")]
    )
    assert code == 1


def test_missing_data_exit_code(tmp_path):
    code, _ = run_command(
        ["train", "--preset", "tiny", "--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "r")]
    )
    assert code == 1


@pytest.mark.slow
def test_tune_one_trial(cmapss_dir, tmp_path):
    code, summary = run_command(
        [
            "tune",
            "--preset",
            "tiny",
            "--data-dir",
            str(cmapss_dir),
            "--run-dir",
            str(tmp_path / "tune"),
            "--max-trials",
            "1",
            "--stage",
            "learning_rate",
        ]
    )
    assert code == 0
    assert summary["trials"] == 1
    assert (tmp_path / "tune" / "best.yaml").is_file()


@pytest.mark.realdata
@pytest.mark.slow
def test_tiny_fd001_train_evaluate(data_dir, tmp_path):
    run_dir = tmp_path / "fd001"
    code, metrics = run_command(
        ["train", "--preset", "tiny", "--data-dir", str(data_dir), "--run-dir", str(run_dir)]
    )
    assert code == 0
    assert metrics["epochs_run"] == 2
    code, results = run_command(
        ["evaluate", "--data-dir", str(data_dir), "--run-dir", str(run_dir)]
    )
    assert code == 0
    assert results["FD001"]["engines"] == 100
    assert np.isfinite(results["FD001"]["nasa_score"])


def test_report_lists_each_metric_once():
    results = {"FD001": {"engines": 3, "rmse": 12.5, "mae": 9.0, "nasa_score": 210.0, "mean_error": -1.5}}
    table = format_subset_table(results)
    assert table.splitlines()[2] == "| FD001 | 3 | 12.50 | 210.0 | 9.00 | -1.50 |"


def test_training_summary_member_rows():
    training = {
        "train_seconds": 12.0,
        "members": [{"epochs_run": 4, "best_epoch": 2, "best": 0.01, "train_seconds": 6.0}] * 2,
    }
    text = format_training_summary(training)
    assert "| 1 | 4 | 2 | 0.01000 | 6.0 |" in text
    assert "'epochs_run'" not in text
