"""Tests of the TFLite window and streaming models: built-in ops, names, and streaming equal to window."""

import io
import json

import numpy as np
import pytest

from pipelines.predictive_maintenance.config import PRESETS, ModelConfig
from pipelines.predictive_maintenance.edge import (
    STEP_SIGNATURE,
    STREAMING,
    WINDOW,
    build_streaming_model,
    build_unrolled_window_model,
    build_window_export_model,
    collect_step_examples,
    export_model_variants,
    load_tflite_step_fn,
    make_prefix_inputs,
    make_zero_state,
    stream_readings,
)
from pipelines.predictive_maintenance.model import build_rul_model
from pipelines.predictive_maintenance.pipeline import COMMANDS
from pipelines.predictive_maintenance.windows import make_last_engine_windows
from shared.cli import run_cli
from shared.config import ExportConfig
from shared.export import run_tflite

pytestmark = pytest.mark.slow

WINDOW_LENGTH, FEATURES, CAP = 8, 4, 125.0


def export_random_model(export_dir, members):
    """Export a random 2-layer LSTM (an ensemble when ``members`` > 1) to float32 TFLite."""
    config = ModelConfig(
        units=6, layers=2, dropout=0.0, head_units=4, head_dropout=0.0, members=members
    )
    model = build_rul_model(config, FEATURES, WINDOW_LENGTH, CAP)
    rng = np.random.default_rng(7)
    model.set_weights([rng.normal(0, 0.4, w.shape).astype(np.float32) for w in model.get_weights()])
    window_model = build_window_export_model(model, config, WINDOW_LENGTH, CAP)
    streaming_model = build_streaming_model(window_model)

    features = rng.normal(size=(30, FEATURES)).astype(np.float32)
    windows = make_last_engine_windows(features, np.repeat([1, 2, 3], [12, 5, 13]), WINDOW_LENGTH)
    export_config = ExportConfig(tflite_variants=("float32",), parity_samples=8, latency_runs=2)

    window_parity = (
        windows.inputs(),
        {"rul": window_model.predict(windows.inputs(), batch_size=1, verbose=0)},
    )
    unrolled = build_unrolled_window_model(window_model, WINDOW_LENGTH)
    export_model_variants(
        unrolled, WINDOW, WINDOW, export_dir, ("float32",), export_config, window_parity, None
    )

    step_parity = collect_step_examples(streaming_model, windows, 8)
    export_model_variants(
        streaming_model,
        STREAMING,
        STEP_SIGNATURE,
        export_dir,
        ("float32",),
        export_config,
        step_parity,
        None,
    )
    return export_dir, window_model, streaming_model, windows


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A single 2-layer LSTM exported to float32 window and streaming TFLite models."""
    return export_random_model(tmp_path_factory.mktemp("export"), members=1)


@pytest.fixture(scope="module")
def exported_ensemble(tmp_path_factory):
    """An ensemble of two 2-layer LSTMs exported to float32 window and streaming TFLite models."""
    return export_random_model(tmp_path_factory.mktemp("export_ensemble"), members=2)


def test_float32_variants_pass(exported):
    export_dir = exported[0]
    report = json.loads((export_dir / "export_report.json").read_text())
    assert report[WINDOW]["variants"]["float32"]["status"] == "passed"
    assert report[STREAMING]["variants"]["float32"]["status"] == "passed"


def test_streaming_signature_names(exported):
    export_dir = exported[0]
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(export_dir / "streaming_float32.tflite"))
    signature = interpreter.get_signature_list()[STEP_SIGNATURE]
    assert sorted(signature["inputs"]) == [
        "reading",
        "state_0_c",
        "state_0_h",
        "state_1_c",
        "state_1_h",
    ]
    assert sorted(signature["outputs"]) == [
        "rul",
        "state_0_c",
        "state_0_h",
        "state_1_c",
        "state_1_h",
    ]


def check_streaming_tflite(exported, engine):
    """Assert that the streaming TFLite model matches the window models at each reading."""
    export_dir, window_model, streaming_model, windows = exported
    length = windows.lengths[engine]
    readings = windows.readings[engine, :length]
    step_fn = load_tflite_step_fn(export_dir / "streaming_float32.tflite", STEP_SIGNATURE)
    _, streamed = stream_readings(step_fn, make_zero_state(streaming_model), readings)
    prefixes = make_prefix_inputs(readings, WINDOW_LENGTH)
    window_tflite = run_tflite(export_dir / "window_float32.tflite", WINDOW, prefixes)[
        "rul"
    ].reshape(-1)
    window_keras = window_model.predict(prefixes, batch_size=1, verbose=0).reshape(-1)
    assert len(streamed) == length
    np.testing.assert_allclose(streamed, window_tflite, atol=1e-4)
    np.testing.assert_allclose(streamed, window_keras, atol=1e-4)
    assert np.ptp(streamed) > 1.0


@pytest.mark.parametrize("engine", [0, 1])  # a full window, and an engine shorter than the window
def test_streaming_tflite_equals_window(exported, engine):
    check_streaming_tflite(exported, engine)


@pytest.mark.parametrize("engine", [0, 1])
def test_ensemble_streaming_tflite_equals_window(exported_ensemble, engine):
    check_streaming_tflite(exported_ensemble, engine)


def test_ensemble_streaming_has_eight_states(exported_ensemble):
    from ai_edge_litert.interpreter import Interpreter

    path = exported_ensemble[0] / "streaming_float32.tflite"
    signature = Interpreter(model_path=str(path)).get_signature_list()[STEP_SIGNATURE]
    assert len(signature["inputs"]) == 9  # the reading and 2 members x 2 layers x (h, c)


def test_export_command_reports_rmse(tmp_path, cmapss_writer):
    data_dir = cmapss_writer(tmp_path)
    run_dir = tmp_path / "run"
    common = ["--data-dir", str(data_dir), "--run-dir", str(run_dir)]
    assert (
        run_cli(
            "predictive_maintenance",
            PRESETS,
            COMMANDS,
            argv=["train", "--preset", "tiny", *common],
            stdout=io.StringIO(),
        )
        == 0
    )
    stdout = io.StringIO()
    code = run_cli(
        "predictive_maintenance",
        PRESETS,
        COMMANDS,
        argv=["export", *common, "--variants", "float32,int8"],
        stdout=stdout,
    )
    assert code == 0
    summary = json.loads(stdout.getvalue())
    assert summary[STREAMING]["streaming_vs_window_max_abs_diff"] <= 1e-4
    report = json.loads((run_dir / "export" / "export_report.json").read_text())
    for name in (WINDOW, STREAMING):
        for variant in ("float32", "int8"):
            assert report[name]["variants"][variant]["status"] != "failed"
            assert np.isfinite(report[name]["variants"][variant]["test_rmse"])
    assert "FlexTensorListReserve" not in report[WINDOW]["variants"]["float32"]["ops"]


def test_ensemble_train_and_export(tmp_path, cmapss_writer):
    data_dir = cmapss_writer(tmp_path)
    run_dir = tmp_path / "run"
    common = ["--data-dir", str(data_dir), "--run-dir", str(run_dir)]
    settings = ["--set", "model.members=2", "--set", "data.smoothing_alpha=0.3"]
    train_argv = ["train", "--preset", "tiny", *common, *settings]
    stdout = io.StringIO()
    code = run_cli("predictive_maintenance", PRESETS, COMMANDS, argv=train_argv, stdout=stdout)
    assert code == 0
    metrics = json.loads(stdout.getvalue())
    assert len(metrics["members"]) == 2
    assert (run_dir / "members" / "member1" / "model.keras").is_file()
    stdout = io.StringIO()
    export_argv = ["export", *common, "--variants", "float32"]
    code = run_cli("predictive_maintenance", PRESETS, COMMANDS, argv=export_argv, stdout=stdout)
    assert code == 0
    assert json.loads(stdout.getvalue())[STREAMING]["streaming_vs_window_max_abs_diff"] <= 1e-4
