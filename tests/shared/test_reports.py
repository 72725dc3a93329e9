"""Tests for learning-curve plots and report.md."""

from shared.config import TrainConfig
from shared.reports import load_history_csv, plot_learning_curves, write_report


def write_history(path):
    path.write_text("epoch,loss,val_loss\n0,2.0,2.5\n1,1.0,NA\n")
    return path




def test_history_csv_parsed(tmp_path):
    history = load_history_csv(write_history(tmp_path / "history.csv"))
    assert history["loss"] == [2.0, 1.0]
    assert history["val_loss"][0] == 2.5
    assert history["val_loss"][1] != history["val_loss"][1]  # NaN for the missing value.


def test_learning_curves_png_written(tmp_path):
    path = plot_learning_curves(write_history(tmp_path / "history.csv"), tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_lists_metrics_config_artifacts(tmp_path):
    (tmp_path / "model.keras").write_text("x")
    report = write_report(
        tmp_path,
        "Toy run",
        {"rmse": 12.3456, "per_subset": {"FD001": 12.5}},
        TrainConfig(epochs=3),
        artifacts=["model.keras", "absent.png"],
        sections={"Samples": "one\ntwo"},
    ).read_text()
    assert "# Toy run" in report
    assert "| rmse | 12.35 |" in report
    assert "| per_subset.FD001 | 12.5 |" in report
    assert "- `model.keras`" in report
    assert "absent.png" not in report
    assert "epochs: 3" in report
    assert "## Samples" in report
