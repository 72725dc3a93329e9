"""End-to-end tests of the sentiment commands on a synthetic CSV, and bounded real-data runs."""

import io
import json
import os
import random

import numpy as np
import pytest
import tensorflow as tf

from pipelines.sentiment.config import IMDB_SENTENCES_RUN, PRESETS, DataConfig
from pipelines.sentiment.data import truncate_ids
from pipelines.sentiment.pipeline import COMMANDS
from pipelines.sentiment.serving import QUANTIZED_TOLERANCES, truncate_ragged
from shared.cli import run_cli

POSITIVE = ["great", "superb", "lovely", "moving", "brilliant"]
NEGATIVE = ["awful", "boring", "dreadful", "clumsy", "tedious"]
FILLER = ["the", "film", "plot", "actor", "scene", "music", "story", "ending", "camera", "script"]


def write_reviews(path, count, seed):
    """Write a CSV whose label follows the sentiment words in each text."""
    rng = random.Random(seed)
    rows = ["text,label"]
    for index in range(count):
        label = "pos" if index % 2 else "neg"
        words = rng.choices(FILLER, k=rng.randint(3, 12)) + rng.choices(POSITIVE if label == "pos" else NEGATIVE, k=2)
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def cli(command, run_dir, *extra):
    stdout = io.StringIO()
    code = run_cli("sentiment", PRESETS, COMMANDS, argv=[command, "--preset", "tiny", "--run-dir", str(run_dir),
                                                         *extra], stdout=stdout)
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Train the tiny preset once on a synthetic CSV (max length 16)."""
    folder = tmp_path_factory.mktemp("sentiment")
    train_file = write_reviews(folder / "train.csv", 400, seed=1)
    test_file = write_reviews(folder / "test.csv", 120, seed=2)
    run_dir = folder / "run"
    settings = ["--set", "data.dataset=csv", "--set", f"data.train_file={train_file}",
                "--set", f"data.test_file={test_file}", "--set", "data.vocab_size=300",
                "--set", "data.max_length=16", "--set", "train.epochs=2", "--data-dir", str(folder)]
    code, output = cli("train", run_dir, *settings)
    assert code == 0
    return {"run_dir": run_dir, "metrics": json.loads(output), "folder": folder}


def test_train_writes_run(trained_run):
    run_dir = trained_run["run_dir"]
    for name in ("model.keras", "metrics.json", "tokenizer/spm.model", "labels.json", "config.yaml"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "labels.json").read_text())["label_names"] == ["neg", "pos"]


def test_train_learns_synthetic(trained_run):
    assert trained_run["metrics"]["best"] >= 0.9


def test_evaluate_report(trained_run):
    run_dir = trained_run["run_dir"]
    code, output = cli("evaluate", run_dir, "--data-dir", str(trained_run["folder"]))
    assert code == 0
    metrics = json.loads(output)
    assert metrics["split"] == "test"
    assert metrics["examples"] == 120
    assert metrics["accuracy"] >= 0.9
    assert sum(map(sum, metrics["confusion_matrix"])) == 120
    assert (run_dir / "confusion_matrix_test.png").stat().st_size > 0
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "most confident mistakes" in report
    assert "| negative" not in report  # label names come from the CSV
    assert "| neg |" in report


def test_predict_file(trained_run, tmp_path):
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("the plot superb film brilliant\nawful story tedious film\n", encoding="utf-8")
    outputs = tmp_path / "predictions.jsonl"
    code, _ = cli("predict", trained_run["run_dir"], "--input", str(inputs), "--output", str(outputs),
                  "--data-dir", str(trained_run["folder"]))
    assert code == 0
    rows = [json.loads(line) for line in outputs.read_text().splitlines()]
    assert [row["label"] for row in rows] == ["pos", "neg"]
    assert rows[0]["probability"] > 0.5


def test_predict_empty_line_fails(trained_run, tmp_path):
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("fine film\n\n", encoding="utf-8")
    code, output = cli("predict", trained_run["run_dir"], "--input", str(inputs),
                       "--data-dir", str(trained_run["folder"]))
    assert code == 1
    assert output == ""


@pytest.mark.slow
def test_export_tflite_parity(trained_run):
    run_dir = trained_run["run_dir"]
    code, _ = cli("export", run_dir, "--data-dir", str(trained_run["folder"]), "--variants", "float32,int8")
    assert code == 0
    report = json.loads((run_dir / "export" / "export_report.json").read_text())
    variants = report["classifier"]["variants"]
    assert variants["float32"]["max_abs_diff"]["probabilities"] <= 1e-4
    assert variants["int8"]["max_abs_diff"]["probabilities"] <= QUANTIZED_TOLERANCES["int8"]
    assert variants["int8"]["metric"] >= report["classifier"]["keras_metric"] - 0.05
    assert not [op for op in variants["int8"]["ops"] if op.startswith("Flex")]
    assert report["text_savedmodel"]["status"] == "passed"


@pytest.mark.slow
def test_int8_short_texts_run(trained_run, tmp_path):
    """Every calibration text is shorter than 48 ids, yet the int8 model must run on XNNPACK."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run["run_dir"], run_dir, ignore=shutil.ignore_patterns("export"))
    code, _ = cli("export", run_dir, "--data-dir", str(trained_run["folder"]), "--variants", "int8",
                  "--set", "export.max_length=48")
    assert code == 0
    int8 = json.loads((run_dir / "export" / "export_report.json").read_text())["classifier"]["variants"]["int8"]
    assert int8["status"] == "passed"
    assert int8["metric"] >= 0.85


@pytest.mark.slow
def test_tune_one_stage(trained_run, tmp_path):
    folder = trained_run["folder"]
    settings = ["--set", "data.dataset=csv", "--set", f"data.train_file={folder / 'train.csv'}",
                "--set", "data.vocab_size=300", "--set", "data.max_length=16", "--data-dir", str(folder)]
    code, output = cli("tune", tmp_path / "tune", *settings, "--max-trials", "2", "--stage", "size")
    assert code == 0
    summary = json.loads(output)
    assert summary["trials"] == 2
    assert 4 <= summary["best_hyperparameters"]["units"] <= 16
    assert (tmp_path / "tune" / "best.yaml").is_file()


@pytest.mark.slow
def test_tune_starts_from_init_run(trained_run, tmp_path):
    """With a learning rate too small to learn anything, only the trained start scores well."""
    folder = trained_run["folder"]
    settings = ["--set", "data.dataset=csv", "--set", f"data.train_file={folder / 'train.csv'}",
                "--set", "data.max_length=16", "--set", "train.learning_rate=1e-9", "--data-dir", str(folder),
                "--max-trials", "1", "--stage", "regularization"]
    code, output = cli("tune", tmp_path / "tune", *settings, "--set", f"model.init_from={trained_run['run_dir']}")
    assert code == 0
    assert json.loads(output)["best_value"] >= 0.9


@pytest.fixture(scope="module")
def ensemble_run(trained_run):
    """Train a 2-member ensemble of the tiny preset on the same synthetic CSV."""
    folder = trained_run["folder"]
    run_dir = folder / "ensemble"
    settings = ["--set", "data.dataset=csv", "--set", f"data.train_file={folder / 'train.csv'}",
                "--set", f"data.test_file={folder / 'test.csv'}", "--set", "data.vocab_size=300",
                "--set", "data.max_length=16", "--set", "train.epochs=2", "--set", "model.members=2",
                "--set", "model.member_poolings=[attention, max]", "--data-dir", str(folder)]
    code, output = cli("train", run_dir, *settings)
    assert code == 0
    return {"run_dir": run_dir, "metrics": json.loads(output), "folder": folder, "settings": settings}


@pytest.mark.slow
def test_ensemble_averages_members(ensemble_run):
    import keras

    import pipelines.sentiment.model as model_module

    run_dir = ensemble_run["run_dir"]
    assert len(ensemble_run["metrics"]["members"]) == 2
    ensemble = keras.saving.load_model(run_dir / "model.keras")
    members = model_module.list_members(ensemble)
    token_ids = np.array([[5, 9, 14, 3, 0, 0], [7, 2, 0, 0, 0, 0]], dtype="int32")
    expected = np.mean([np.asarray(member(token_ids)) for member in members], axis=0)
    assert len(members) == 2
    assert [member.layers[-3].name for member in members] == ["attention_pooling", "max_pooling"]
    np.testing.assert_allclose(np.asarray(ensemble(token_ids)), expected, atol=1e-6)


@pytest.mark.slow
def test_ensemble_rerun_keeps_members(ensemble_run):
    run_dir = ensemble_run["run_dir"]
    member_model = run_dir / "members" / "member1" / "model.keras"
    tokenizer = run_dir / "tokenizer" / "spm.model"
    written = member_model.stat().st_mtime_ns
    tokenizer_written = tokenizer.stat().st_mtime_ns
    code, output = cli("train", run_dir, *ensemble_run["settings"])
    assert code == 0
    assert member_model.stat().st_mtime_ns == written
    assert tokenizer.stat().st_mtime_ns == tokenizer_written
    assert json.loads(output)["val_accuracy"] == ensemble_run["metrics"]["val_accuracy"]


@pytest.mark.slow
def test_ensemble_export_parity(ensemble_run):
    run_dir = ensemble_run["run_dir"]
    code, _ = cli("export", run_dir, "--data-dir", str(ensemble_run["folder"]), "--variants", "float32")
    assert code == 0
    report = json.loads((run_dir / "export" / "export_report.json").read_text())
    assert report["classifier"]["variants"]["float32"]["max_abs_diff"]["probabilities"] <= 1e-4
    assert report["text_savedmodel"]["status"] == "passed"


@pytest.mark.parametrize("truncation", ["head", "tail", "head_tail"])
def test_ragged_truncation_matches_python(truncation):
    config = DataConfig(max_length=5, truncation=truncation, head_fraction=0.4)
    rows = [list(range(1, 12)), [4, 5], list(range(20, 25)), list(range(30, 36))]
    truncated = truncate_ragged(tf.ragged.constant(rows, dtype=tf.int32), config).to_list()
    assert truncated == [truncate_ids(row, 5, truncation, 0.4) for row in rows]


def run_real_tiny(tmp_path, preset_overrides, evaluate_limit):
    data_dir = os.environ["PIPELINES_DATA_DIR"]
    run_dir = tmp_path / "run"
    code, output = cli("train", run_dir, "--data-dir", data_dir, *preset_overrides)
    assert code == 0
    code, output = cli("evaluate", run_dir, "--data-dir", data_dir, "--limit", str(evaluate_limit))
    assert code == 0
    return json.loads(output)


@pytest.mark.realdata
@pytest.mark.slow
def test_real_imdb_slice(data_dir, tmp_path):
    metrics = run_real_tiny(tmp_path, [], 300)
    assert metrics["examples"] == 300
    assert np.isfinite(metrics["accuracy"])


@pytest.mark.realdata
@pytest.mark.slow
def test_real_sst2_slice(data_dir, tmp_path):
    metrics = run_real_tiny(tmp_path, ["--set", "data.dataset=sst2", "--set", "data.strip_html=false"], 300)
    assert metrics["examples"] == 300
    assert set(metrics["per_class"]) == {"negative", "positive"}


@pytest.mark.realdata
@pytest.mark.slow
def test_real_imdb_sentences_then_sst2(data_dir, tmp_path):
    """Pretrain on a slice of IMDB sentences, then start an SST-2 run from it (the sst2 recipe)."""
    source = run_real_tiny(tmp_path, ["--set", "data.dataset=imdb_sentences"], 300)
    assert source["examples"] == 300
    data_dir = os.environ["PIPELINES_DATA_DIR"]
    code, output = cli("train", tmp_path / "sst2", "--data-dir", data_dir, "--set", "data.dataset=sst2",
                       "--set", "data.validation_from=dev", "--set", f"model.init_from={tmp_path / 'run'}")
    assert code == 0
    assert json.loads(output)["epochs_run"] == 1
    spm = "tokenizer/spm.model"
    assert (tmp_path / "sst2" / spm).read_bytes() == (tmp_path / "run" / spm).read_bytes()


def test_evaluate_missing_model_hint(tmp_path, capsys):
    code, _ = cli("evaluate", tmp_path / "run", "--data-dir", str(tmp_path))
    assert code == 1
    assert f"train --preset tiny --run-dir {tmp_path / 'run'}` first" in capsys.readouterr().err


def test_train_missing_init_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = run_cli("sentiment", PRESETS, COMMANDS, argv=["train", "--preset", "sst2", "--run-dir",
                                                         str(tmp_path / "run"), "--data-dir", str(tmp_path)],
                   stdout=io.StringIO())
    assert code == 1
    logs = capsys.readouterr().err
    assert f"{IMDB_SENTENCES_RUN}/model.keras: model.init_from names a run without" in logs
    assert "--preset imdb_sentences" in logs
    assert "model.init_from=null" in logs


@pytest.mark.slow
def test_multi_worker_train(trained_run, tmp_path):
    import subprocess
    import sys

    folder = trained_run["folder"]
    argv = [sys.executable, "-m", "pipelines.sentiment", "train", "--preset", "tiny", "--strategy", "multi-worker",
            "--run-dir", str(tmp_path / "run"), "--data-dir", str(folder), "--set", "data.dataset=csv",
            "--set", f"data.train_file={folder / 'train.csv'}", "--set", "data.vocab_size=300",
            "--set", "data.max_length=16"]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    environment.pop("TF_CONFIG", None)
    finished = subprocess.run(argv, capture_output=True, text=True, env=environment, timeout=300, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert json.loads(finished.stdout)["epochs_run"] == 1


@pytest.mark.slow
def test_init_from_ensemble_member(ensemble_run):
    import keras

    from pipelines.sentiment.model import build_classifier, list_members
    from pipelines.sentiment.pipeline import initialize_from_run

    run_dir = ensemble_run["run_dir"]
    members = list_members(keras.saving.load_model(run_dir / "model.keras"))
    embedding = members[1].get_layer("embedding").get_weights()[0]
    model = build_classifier(PRESETS["tiny"].model, embedding.shape[0], 2)
    initialize_from_run(model, run_dir, member_index=3)
    np.testing.assert_array_equal(model.get_layer("embedding").get_weights()[0], embedding)
