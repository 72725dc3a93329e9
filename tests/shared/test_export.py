"""Tests for shared.export: SavedModel signatures, TFLite variants, op checks and parity."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from shared import export
from shared.config import ExportConfig
from shared.errors import ExportError

TIMESTEPS = 6
FEATURES = 3
UNITS = 4


def build_window_model(batch_size: int | None = 1) -> keras.Model:
    """LSTM(4) over 6 steps of 3 features, then Dense(2); batch size 1 unless given."""
    keras.utils.set_random_seed(1)
    window = keras.Input((TIMESTEPS, FEATURES), batch_size=batch_size, name="window")
    hidden = keras.layers.LSTM(UNITS)(window)
    return keras.Model(window, keras.layers.Dense(2)(hidden))


def build_cell_step_model() -> keras.Model:
    """One LSTMCell step with the state as named inputs and outputs."""
    keras.utils.set_random_seed(2)
    cell = keras.layers.LSTMCell(UNITS)
    step = keras.Input((FEATURES,), batch_size=1, name="inputs")
    h = keras.Input((UNITS,), batch_size=1, name="h")
    c = keras.Input((UNITS,), batch_size=1, name="c")
    output, (new_h, new_c) = cell(step, [h, c])
    return keras.Model({"inputs": step, "h": h, "c": c}, {"score": output, "h": new_h, "c": new_c})


def keras_outputs_per_example(
    model: keras.Model, inputs: dict[str, np.ndarray], name: str
) -> np.ndarray:
    """Run ``model`` one example at a time, as the parity check runs TFLite."""
    count = len(next(iter(inputs.values())))
    if isinstance(model.input, dict):
        rows = [model({k: v[i : i + 1] for k, v in inputs.items()}) for i in range(count)]
    else:
        rows = [model(inputs[model.input.name][i : i + 1]) for i in range(count)]
    return np.concatenate([np.asarray(row[name] if isinstance(row, dict) else row) for row in rows])


def mean_score(outputs) -> float:
    return float(np.mean(outputs["score"]))


@pytest.fixture(scope="module")
def window_export(tmp_path_factory):
    """The window model exported to SavedModel and converted to three variants."""
    out_dir = tmp_path_factory.mktemp("window_export")
    model = build_window_model()
    saved_model = export.export_saved_model(
        out_dir / "saved_model", {"serve": export.make_model_endpoint(model, ["score"])}, [model]
    )
    rng = np.random.default_rng(0)
    windows = rng.normal(size=(4, TIMESTEPS, FEATURES)).astype("float32")
    keras_scores = keras_outputs_per_example(model, {"window": windows}, "score")
    entry = export.export_tflite_variants(
        saved_model,
        "serve",
        out_dir,
        "window",
        parity_inputs={"window": windows},
        keras_outputs={"score": keras_scores},
        export_config=ExportConfig(latency_runs=5),
        variants=["float32", "dynamic_range", "float16"],
        metric_fn=mean_score,
    )
    return {
        "dir": out_dir,
        "entry": entry,
        "windows": windows,
        "keras_scores": keras_scores,
        "saved_model": saved_model,
    }


@pytest.fixture(scope="module")
def int8_step_export(tmp_path_factory):
    """An LSTMCell one-step model converted to full int8 with float inputs and outputs."""
    out_dir = tmp_path_factory.mktemp("int8_export")
    model = build_cell_step_model()
    saved_model = export.export_saved_model(
        out_dir / "saved_model", {"step": export.make_model_endpoint(model)}, [model]
    )
    rng = np.random.default_rng(3)
    calibration = {
        name: rng.uniform(-1, 1, size=(50, dim)).astype("float32")
        for name, dim in [("inputs", FEATURES), ("h", UNITS), ("c", UNITS)]
    }
    held_out = {
        name: rng.uniform(-1, 1, size=(8, values.shape[1])).astype("float32")
        for name, values in calibration.items()
    }
    keras_outputs = {
        name: keras_outputs_per_example(model, held_out, name) for name in ("score", "h", "c")
    }
    entry = export.export_tflite_variants(
        saved_model,
        "step",
        out_dir,
        "streaming",
        parity_inputs=held_out,
        keras_outputs=keras_outputs,
        representative_inputs=calibration,
        export_config=ExportConfig(latency_runs=5),
        variants=["int8"],
        quantized_tolerances={"int8": 0.1},
    )
    return {"dir": out_dir, "entry": entry, "held_out": held_out, "keras_outputs": keras_outputs}


# ---------------------------------------------------------------------------
# Float32 conversion, names and parity.


@pytest.mark.slow
def test_float32_signature_names(window_export):
    interpreter = Interpreter(model_path=str(window_export["dir"] / "window_float32.tflite"))
    signature = interpreter.get_signature_list()["serve"]
    assert signature["inputs"] == ["window"]
    assert signature["outputs"] == ["score"]


@pytest.mark.slow
def test_float32_has_builtin_ops_only(window_export):
    path = window_export["dir"] / "window_float32.tflite"
    assert export.list_custom_ops(path) == []
    assert not any(op.startswith("Flex") for op in export.list_tflite_ops(path))


@pytest.mark.slow
def test_op_listing_includes_loop_body(window_export):
    ops = export.list_tflite_ops(window_export["dir"] / "window_float32.tflite")
    # The LSTM step runs inside WHILE, whose body subgraph contains the activations.
    assert "WHILE" in ops
    assert "TANH" in ops
    assert ops == sorted(ops)


@pytest.mark.slow
def test_float32_matches_keras_by_name(window_export):
    outputs = export.run_tflite(
        window_export["dir"] / "window_float32.tflite",
        "serve",
        {"window": window_export["windows"]},
    )
    assert list(outputs) == ["score"]
    assert outputs["score"].shape == (4, 1, 2)
    difference = np.max(np.abs(outputs["score"].reshape(4, 2) - window_export["keras_scores"]))
    assert difference < 1e-5


@pytest.mark.slow
def test_float32_report_entry(window_export):
    entry = window_export["entry"]["variants"]["float32"]
    path = window_export["dir"] / "window_float32.tflite"
    assert entry["status"] == "passed"
    assert entry["file"] == "window_float32.tflite"
    assert entry["size_bytes"] == path.stat().st_size
    assert entry["ops"] == export.list_tflite_ops(path)
    assert entry["latency_ms"] > 0
    assert set(entry["max_abs_diff"]) == {"score"}
    assert entry["max_abs_diff"]["score"] < 1e-5
    assert entry["tolerance"] == 1e-4


@pytest.mark.slow
def test_report_metric_delta(window_export):
    entry = window_export["entry"]
    keras_metric = float(np.mean(window_export["keras_scores"]))
    assert entry["keras_metric"] == pytest.approx(keras_metric, abs=1e-7)
    float32 = entry["variants"]["float32"]
    assert float32["metric_delta"] == pytest.approx(float32["metric"] - keras_metric, abs=1e-7)
    assert abs(float32["metric_delta"]) < 1e-5


@pytest.mark.slow
def test_report_file_matches_entry(window_export):
    report = json.loads((window_export["dir"] / export.REPORT_FILENAME).read_text())
    assert set(report) == {"window"}
    assert set(report["window"]["variants"]) == {"float32", "dynamic_range", "float16"}
    assert report["window"]["variants"]["float16"]["size_bytes"] > 0


@pytest.mark.slow
def test_quantized_variants_run(window_export):
    for variant in ("dynamic_range", "float16"):
        entry = window_export["entry"]["variants"][variant]
        assert entry["status"] == "unchecked", variant
        assert entry["tolerance"] is None, variant
        assert entry["max_abs_diff"]["score"] < 0.05, variant


@pytest.mark.slow
def test_float16_dequantizes_weights(window_export):
    assert "DEQUANTIZE" in window_export["entry"]["variants"]["float16"]["ops"]


@pytest.mark.slow
def test_parity_failure_raises(window_export):
    shifted = {"score": window_export["keras_scores"] + 0.01}
    entry = export.check_variant(
        window_export["dir"] / "window_float32.tflite",
        "serve",
        "float32",
        {"window": window_export["windows"]},
        shifted,
        tolerance=1e-4,
        latency_runs=1,
    )
    assert entry["status"] == "failed"
    assert "'score'" in entry["error"]
    assert "0.01" in entry["error"]


@pytest.mark.slow
def test_parity_rejects_wrong_input_name(window_export):
    with pytest.raises(ExportError, match="expects inputs \\['window'\\]"):
        export.run_tflite(
            window_export["dir"] / "window_float32.tflite",
            "serve",
            {"series": window_export["windows"]},
        )


@pytest.mark.slow
def test_parity_rejects_wrong_shape(window_export):
    with pytest.raises(ExportError, match="input 'window'"):
        export.run_tflite(
            window_export["dir"] / "window_float32.tflite", "serve", {"window": np.zeros((2, 5, 3))}
        )


class FailingRunner:
    """A signature runner whose calls fail the way XNNPACK fails to prepare a model."""

    def get_input_details(self):
        return {"window": {"shape": np.array([1, 4]), "dtype": np.float32}}

    def __call__(self, **feed):
        raise RuntimeError(
            "failed to create XNNPACK runtime" * 3
            + "Node number 11611 (TfLiteXNNPackDelegate) failed to prepare."
        )


def test_runtime_failure_is_export_error(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_signature_runner", lambda path, key: FailingRunner())
    with pytest.raises(ExportError) as caught:
        export.run_tflite(tmp_path / "model.tflite", "serve", {"window": np.zeros((2, 4))})
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'model.tflite'}: the stock LiteRT runtime failed")
    assert message.count("failed to create XNNPACK runtime") == 1
    assert "Node number 11611" in message
    assert "calibrate with inputs that use every time step" in message


# ---------------------------------------------------------------------------
# int8 of a one-step cell model.


@pytest.mark.slow
def test_int8_step_within_tolerance(int8_step_export):
    entry = int8_step_export["entry"]["variants"]["int8"]
    assert entry["status"] == "passed"
    assert set(entry["max_abs_diff"]) == {"score", "h", "c"}
    assert max(entry["max_abs_diff"].values()) < 0.1


@pytest.mark.slow
def test_int8_keeps_float_io(int8_step_export):
    interpreter = Interpreter(model_path=str(int8_step_export["dir"] / "streaming_int8.tflite"))
    runner = interpreter.get_signature_runner("step")
    assert {d["dtype"] for d in runner.get_input_details().values()} == {np.float32}
    assert {d["dtype"] for d in runner.get_output_details().values()} == {np.float32}
    ops = int8_step_export["entry"]["variants"]["int8"]["ops"]
    assert "QUANTIZE" in ops
    assert "DEQUANTIZE" in ops


def test_int8_needs_representative_inputs(tmp_path):
    with pytest.raises(ExportError, match="representative_inputs"):
        export.convert_saved_model(tmp_path / "missing", "step", "int8", tmp_path / "model.tflite")


# ---------------------------------------------------------------------------
# Rejections: Flex ops, crashes, timeouts.


@pytest.mark.slow
def test_flex_ops_rejected(tmp_path):
    model = build_window_model(batch_size=None)
    saved_model = export.export_saved_model(
        tmp_path / "saved_model", {"serve": export.make_model_endpoint(model, ["score"])}, [model]
    )
    with pytest.raises(ExportError) as raised:
        export.convert_saved_model(saved_model, "serve", "float32", tmp_path / "model.tflite")
    assert "TensorListReserve" in str(raised.value)
    assert "built-in op set" in str(raised.value)
    assert not (tmp_path / "model.tflite").exists()


@pytest.mark.slow
def test_converter_crash_is_export_error(window_export, tmp_path, monkeypatch):
    monkeypatch.setenv(export.FAULT_INJECTION_ENV, "abort:dynamic_range")
    results = export.convert_saved_model_variants(
        window_export["saved_model"],
        "serve",
        {
            "dynamic_range": tmp_path / "dynamic_range.tflite",
            "float32": tmp_path / "float32.tflite",
        },
    )
    crash = results["dynamic_range"]
    assert isinstance(crash, ExportError)
    assert "signal 6 (SIGABRT)" in str(crash)
    assert "'dynamic_range'" in str(crash)
    assert not (tmp_path / "dynamic_range.tflite").exists()
    # The variant after the crash still converts, in a fresh process.
    assert results["float32"] == tmp_path / "float32.tflite"


def test_converter_timeout_is_export_error(tmp_path):
    # Importing TensorFlow alone takes longer than 0.2 s, so the child always times out
    # before it looks for the SavedModel.
    with pytest.raises(ExportError, match="timed out after 0.2 s per variant on variant 'float32'"):
        export.convert_saved_model(
            tmp_path / "saved_model", "serve", "float32", tmp_path / "m.tflite", timeout_s=0.2
        )


def test_parse_converter_ops():
    message = (
        "error: 'tf.TensorListReserve' op requires element_shape to be static\n"
        "error: failed to legalize operation 'tf.TensorListSetItem'\n"
        "converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]"
    )
    assert export.parse_converter_ops(message) == ["TensorListReserve", "TensorListSetItem"]


# ---------------------------------------------------------------------------
# SavedModel export and the report file, without conversion.


def test_saved_model_keeps_names(tmp_path):
    model = build_window_model()
    export.export_saved_model(
        tmp_path / "model", {"serve": export.make_model_endpoint(model, ["score"])}, [model]
    )
    signature = tf.saved_model.load(str(tmp_path / "model")).signatures["serve"]
    assert list(signature.structured_input_signature[1]) == ["window"]
    assert list(signature.structured_outputs) == ["score"]


def test_endpoint_without_dict_outputs(tmp_path):
    model = build_window_model()
    spec = [tf.TensorSpec((1, TIMESTEPS, FEATURES), tf.float32, name="window")]
    with pytest.raises(ExportError, match="expected a dict"):
        export.export_saved_model(
            tmp_path / "model", {"serve": (lambda window: model(window), spec)}, [model]
        )


def test_endpoint_with_unnamed_spec(tmp_path):
    model = build_window_model()
    spec = [tf.TensorSpec((1, TIMESTEPS, FEATURES), tf.float32)]
    with pytest.raises(ExportError, match="no name"):
        export.export_saved_model(
            tmp_path / "model", {"serve": (lambda window: {"score": model(window)}, spec)}, [model]
        )


def test_interrupted_export_keeps_old_model(tmp_path, monkeypatch):
    model = build_window_model()
    endpoints = {"serve": export.make_model_endpoint(model, ["score"])}
    export.export_saved_model(tmp_path / "model", endpoints, [model])
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "model").rglob("*"))

    def write_partially(self, filepath, **kwargs):
        os.makedirs(filepath)
        open(os.path.join(filepath, "saved_model.pb"), "wb").close()
        raise KeyboardInterrupt

    # ExportArchive() returns an instance of a backend-specific class; patch that class.
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", write_partially)
    with pytest.raises(KeyboardInterrupt):
        export.export_saved_model(tmp_path / "model", endpoints, [model])
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "model").rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_export_replaces_existing_model(tmp_path):
    model = build_window_model()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "stale.txt").write_text("old")
    export.export_saved_model(
        tmp_path / "model", {"serve": export.make_model_endpoint(model, ["score"])}, [model]
    )
    assert not (tmp_path / "model" / "stale.txt").exists()
    assert (tmp_path / "model" / "saved_model.pb").exists()


def test_endpoint_output_name_count(tmp_path):
    model = build_window_model()
    with pytest.raises(ExportError, match="2 output names"):
        export.make_model_endpoint(model, ["score", "extra"])


def test_max_abs_diff_values():
    diffs = export.compute_max_abs_diff(
        {"a": np.array([[1.0, 2.0]]), "b": np.array([[np.nan]])},
        {"a": np.array([[1.0, 2.5]]), "b": np.array([[0.0]])},
    )
    assert diffs["a"] == 0.5
    assert diffs["b"] is None


def test_max_abs_diff_rejects_other_names():
    with pytest.raises(ExportError, match="differ from Keras outputs"):
        export.compute_max_abs_diff({"a": np.zeros((1, 1))}, {"b": np.zeros((1, 1))})


def test_report_update_keeps_entries(tmp_path):
    export.write_export_report(tmp_path, "window", {"variants": {"float32": {"status": "passed"}}})
    export.write_export_report(tmp_path, "streaming", {"variants": {}})
    export.write_export_report(tmp_path, "window", {"variants": {}})
    report = json.loads((tmp_path / export.REPORT_FILENAME).read_text())
    assert report == {"streaming": {"variants": {}}, "window": {"variants": {}}}
    assert [p.name for p in tmp_path.iterdir()] == [export.REPORT_FILENAME]


def test_corrupt_report_rejected(tmp_path):
    (tmp_path / export.REPORT_FILENAME).write_text('{\n  "window": ,\n}')
    with pytest.raises(ExportError, match="line 2"):
        export.write_export_report(tmp_path, "streaming", {})
    assert (tmp_path / export.REPORT_FILENAME).read_text() == '{\n  "window": ,\n}'
