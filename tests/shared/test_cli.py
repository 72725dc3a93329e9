"""Tests for the shared command line: dispatch, config handling, output streams and exit codes."""

import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.cli import run_cli
from shared.config import ExportConfig, RecurrentConfig, TrainConfig, TuneConfig
from shared.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class ToyData:
    rows: int = 4


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    data: ToyData = ToyData()
    model: RecurrentConfig = RecurrentConfig(units=8)
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    export: ExportConfig = ExportConfig()


PRESETS = {"default": ToyConfig(), "tiny": ToyConfig(model=RecurrentConfig(units=2))}


def echo_units(config, context):
    return {"units": config.model.units, "seed": config.train.seed, "command": context.command}


def fail_with_data_error(config, context):
    raise DataError("train.txt line 3: invalid reading 'abc'")


COMMANDS = {
    "train": echo_units,
    "evaluate": echo_units,
    "predict": fail_with_data_error,
    "tune": echo_units,
    "export": echo_units,
}


def run(argv, tmp_path):
    stdout = io.StringIO()
    code = run_cli("toy", PRESETS, COMMANDS, argv=[*argv, "--run-dir", str(tmp_path / "run")], stdout=stdout)
    return code, stdout.getvalue()


def test_train_prints_result_json(tmp_path):
    code, output = run(["train", "--preset", "tiny", "--seed", "7"], tmp_path)
    assert code == 0
    assert json.loads(output) == {"units": 2, "seed": 7, "command": "train"}


def test_train_saves_resolved_config(tmp_path):
    run(["train", "--set", "model.units=3"], tmp_path)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["units"] == 3


def test_evaluate_uses_saved_config(tmp_path):
    run(["train", "--set", "model.units=3"], tmp_path)
    code, output = run(["evaluate"], tmp_path)
    assert code == 0
    assert json.loads(output)["units"] == 3


def test_evaluate_warns_model_override(tmp_path, capsys):
    run(["train", "--preset", "tiny"], tmp_path)
    capsys.readouterr()
    code, _ = run(["evaluate", "--set", "model.units=5"], tmp_path)
    logs = capsys.readouterr().err
    assert code == 0
    assert "changes nothing here" in logs
    assert "Config for toy evaluate: saved " in logs


def test_config_file_then_override(tmp_path):
    path = tmp_path / "extra.yaml"
    path.write_text("model:\n  units: 5\ntrain:\n  seed: 3\n")
    code, output = run(["train", "--config", str(path), "--set", "model.units=6"], tmp_path)
    assert code == 0
    assert json.loads(output) == {"units": 6, "seed": 3, "command": "train"}


def test_bad_config_value_exits_2(tmp_path, capsys):
    code, output = run(["train", "--set", "model.units=0"], tmp_path)
    assert code == 2
    assert output == ""
    assert "model.units: value 0 is out of range" in capsys.readouterr().err


def test_unknown_flag_exits_2(tmp_path):
    code, _ = run(["train", "--epochs", "3"], tmp_path)
    assert code == 2


def test_unknown_preset_exits_2(tmp_path, capsys):
    code, _ = run(["train", "--preset", "huge"], tmp_path)
    assert code == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_data_error_exits_1(tmp_path, capsys):
    code, output = run(["predict"], tmp_path)
    assert code == 1
    assert output == ""
    assert "train.txt line 3" in capsys.readouterr().err


def test_help_exits_0(tmp_path, capsys):
    code, _ = run(["export", "--help"], tmp_path)
    assert code == 0
    assert "--variants" in capsys.readouterr().out


def test_resume_with_other_config_rejected(tmp_path, capsys):
    run(["train", "--set", "model.units=3"], tmp_path)
    (tmp_path / "run" / "backup").mkdir()
    code, _ = run(["train", "--set", "model.units=4"], tmp_path)
    assert code == 2
    assert "interrupted run trained with another config" in capsys.readouterr().err


def test_ensemble_rerun_with_other_config_rejected(tmp_path, capsys):
    run(["train", "--set", "model.units=3"], tmp_path)
    (tmp_path / "run" / "members" / "member0").mkdir(parents=True)
    code, _ = run(["train", "--set", "model.units=4"], tmp_path)
    assert code == 2
    assert "members contains ensemble members trained with another config" in capsys.readouterr().err


def test_ensemble_rerun_with_same_config_allowed(tmp_path):
    run(["train", "--set", "model.units=3"], tmp_path)
    (tmp_path / "run" / "members" / "member0").mkdir(parents=True)
    code, _ = run(["train", "--set", "model.units=3"], tmp_path)
    assert code == 0


def test_resume_with_same_config_allowed(tmp_path):
    run(["train", "--set", "model.units=3"], tmp_path)
    (tmp_path / "run" / "backup").mkdir()
    code, _ = run(["train", "--set", "model.units=3"], tmp_path)
    assert code == 0


def test_pipelines_module_lists_pipelines():
    listed = subprocess.run(
        [sys.executable, "-m", "pipelines"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0
    from pipelines import list_pipelines

    assert listed.stdout.split() == list_pipelines()


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "tune", "export"])
def test_every_command_has_help(command, tmp_path, capsys):
    code, _ = run([command, "--help"], tmp_path)
    assert code == 0
    assert "--preset" in capsys.readouterr().out


def make_predict_context(tmp_path, output):
    import argparse

    from shared.cli import CommandContext

    args = argparse.Namespace(output=output)
    return CommandContext("toy", "predict", tmp_path, tmp_path, "default", args, io.StringIO())


def test_write_predictions_to_stdout(tmp_path):
    from shared.cli import write_predictions

    context = make_predict_context(tmp_path, "-")
    assert write_predictions(context, "a\nb\n", 2, "labels") is None
    assert context.stdout.getvalue() == "a\nb\n"


def test_write_predictions_to_file(tmp_path):
    from shared.cli import write_predictions

    context = make_predict_context(tmp_path, str(tmp_path / "out.txt"))
    summary = write_predictions(context, "a\n", 1, "labels")
    assert summary == {"labels": 1, "output": str(tmp_path / "out.txt")}
    assert (tmp_path / "out.txt").read_text() == "a\n"
    assert context.stdout.getvalue() == ""
