"""SavedModel and TFLite export with parity checks against Keras.

Conventions every exported model follows:

- A SavedModel is written with `keras.export.ExportArchive`. Each endpoint takes named
  inputs (``tf.TensorSpec(..., name=...)``) and returns a dict, so input and output names
  survive into the SavedModel signature and from there into the TFLite signature.
- A `.tflite` file contains built-in ops only (``TFLITE_BUILTINS``, or
  ``TFLITE_BUILTINS_INT8`` for int8). A model that would need Flex (Select TF) ops or
  custom ops raises `ExportError` naming the ops, because the stock LiteRT runtime on a
  phone cannot run them. Recurrent layers convert to built-ins only with static shapes
  (batch size 1; a ``None`` batch dimension needs ``TensorListReserve``).
- The converter runs in a child process (``python -m shared.export convert ...``) with a
  timeout, because some conversions crash the process (full-int8 conversion of a Keras 3
  LSTM in loop form segfaults in TF 2.21). A crash becomes an `ExportError`.
- int8 is full-integer quantization of weights and activations, but the model keeps
  float32 inputs and outputs (quantize/dequantize ops at the edges), so callers feed the
  same tensors to every variant and need no scale or zero point.
- Parity runs each `.tflite` through ``ai_edge_litert.interpreter.Interpreter`` and its
  signature runner, binding inputs and outputs by name, one example at a time (batch 1).
- Inputs and outputs passed between functions are dicts from tensor name to an array
  whose first axis indexes examples: example ``i`` is ``array[i:i+1]``, so a signature
  input of shape ``(1, 6, 3)`` takes an array of shape ``(n, 6, 3)``.
- ``export_report.json`` in the export directory contains one entry per model name, so a
  "window" model and a "streaming" model can share a directory. Every file is written
  to a temporary path and renamed, so an interrupted export never replaces a good file
  with a partial one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from shared.config import TFLITE_VARIANTS, ExportConfig, check_choice
from shared.errors import ExportError

logger = logging.getLogger(__name__)

REPORT_FILENAME = "export_report.json"
QUANTIZED_VARIANTS = ("dynamic_range", "float16", "int8")
DEFAULT_CONVERTER_TIMEOUT_S = 900.0
LATENCY_WARMUP_RUNS = 3

# Test-only fault injection: with this variable set to "abort:<variant>", the converter
# child process calls os.abort() when it reaches that variant, so tests can check crash
# handling without depending on a real converter bug.
FAULT_INJECTION_ENV = "PIPELINES_EXPORT_FAULT"

InputSignature = Mapping[str, tf.TensorSpec] | Sequence[tf.TensorSpec]
Endpoint = tuple[Callable[..., Mapping[str, Any]], InputSignature]
ArrayDict = Mapping[str, np.ndarray]


# ---------------------------------------------------------------------------
# SavedModel export.


def make_model_endpoint(model: keras.Model, output_names: Sequence[str] | None = None) -> Endpoint:
    """Build an endpoint that calls a functional ``model`` with named inputs and dict outputs.

    Input names and static shapes (batch dimension included) come from the model's
    ``keras.Input`` layers, so build the model with ``batch_size=1`` and a fixed length
    to get a built-ins-only TFLite model.

    Args:
        model: a functional Keras model whose inputs all have names.
        output_names: names for the outputs when the model does not return a dict;
            defaults to ``model.output_names``.

    Returns:
        ``(function, input_signature)`` for `export_saved_model`; the function takes one
        dict of input tensors and returns a dict of output tensors.

    Raises:
        ExportError: the number of output names does not match the model's outputs.
    """
    input_struct = model.input
    named_inputs = input_struct if isinstance(input_struct, Mapping) else None
    input_tensors = (
        list(named_inputs.values()) if named_inputs else keras.tree.flatten(input_struct)
    )
    input_names = list(named_inputs) if named_inputs else [t.name for t in input_tensors]
    specs = {
        name: tf.TensorSpec(tuple(tensor.shape), tensor.dtype, name=name)
        for name, tensor in zip(input_names, input_tensors, strict=True)
    }
    dict_outputs = isinstance(model.output, Mapping)
    names = None if dict_outputs else list(output_names or model.output_names)
    if names is not None and len(names) != len(keras.tree.flatten(model.output)):
        raise ExportError(
            f"got {len(names)} output names {names} for a model with "
            f"{len(keras.tree.flatten(model.output))} outputs; pass one name per output."
        )

    def call_model(features):
        if named_inputs:
            model_inputs = features
        else:
            model_inputs = keras.tree.pack_sequence_as(
                input_struct, [features[name] for name in input_names]
            )
        outputs = model(model_inputs, training=False)
        if dict_outputs:
            return dict(outputs)
        return dict(zip(names, keras.tree.flatten(outputs), strict=True))

    return call_model, specs


def _name_specs(input_signature: InputSignature) -> list:
    """Return the signature as ExportArchive expects it, each spec named after its key."""
    if isinstance(input_signature, Mapping):
        return [
            {
                key: tf.TensorSpec(spec.shape, spec.dtype, name=key)
                for key, spec in input_signature.items()
            }
        ]
    unnamed = [index for index, spec in enumerate(input_signature) if not spec.name]
    if unnamed:
        raise ExportError(
            f"input specs at positions {unnamed} have no name; give each tf.TensorSpec a "
            "name=... so that the TFLite signature can be fed by name."
        )
    return list(input_signature)


def _require_dict_outputs(endpoint_name: str, function: Callable) -> Callable:
    """Wrap ``function`` so that tracing fails unless it returns a dict of named outputs."""

    def checked(*args):
        outputs = function(*args)
        if not isinstance(outputs, Mapping):
            raise ExportError(
                f"endpoint {endpoint_name!r} returned {type(outputs).__name__}, expected a dict "
                "from output name to tensor; without names the TFLite outputs become output_0, ..."
            )
        return dict(outputs)

    return checked


def export_saved_model(
    export_dir: str | Path,
    endpoints: Mapping[str, Endpoint],
    trackables: Sequence[Any],
) -> Path:
    """Write a SavedModel with one named signature per endpoint, atomically.

    The archive is written to a temporary directory next to ``export_dir`` and then
    renamed into place. An existing SavedModel at ``export_dir`` is replaced only once
    the new one is complete.

    Args:
        export_dir: where the SavedModel goes.
        endpoints: signature key to ``(function, input_signature)``. The signature is a
            dict of name to `tf.TensorSpec` (the function takes one dict) or a list of
            named specs (the function takes one positional argument per spec). The
            function must return a dict of output name to tensor.
        trackables: the Keras models or layers whose variables the endpoints use.

    Returns:
        The path of the SavedModel directory.

    Raises:
        ExportError: an endpoint has unnamed inputs or does not return a dict.
    """
    export_dir = Path(export_dir)
    if not endpoints:
        raise ExportError(f"no endpoints given for {export_dir}; pass at least one signature.")
    archive = keras.export.ExportArchive()
    for trackable in trackables:
        archive.track(trackable)
    for key, (function, input_signature) in endpoints.items():
        archive.add_endpoint(
            key, _require_dict_outputs(key, function), input_signature=_name_specs(input_signature)
        )

    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.", dir=export_dir.parent))
    try:
        archive.write_out(str(staging_dir / "model"), verbose=False)
        _replace_directory(staging_dir / "model", export_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    logger.info("Wrote SavedModel %s with signatures %s", export_dir, sorted(endpoints))
    return export_dir


def _replace_directory(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; an old ``target`` is deleted only after the move."""
    if not target.exists():
        os.replace(source, target)
        return
    # POSIX rename cannot replace a non-empty directory, so move the old one aside first.
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------
# Op listing.


def list_tflite_ops(tflite_path: str | Path) -> list[str]:
    """List the op names a `.tflite` file uses, across all its subgraphs, sorted.

    Reads the flatbuffer through ``ai_edge_litert.schema_py_generated`` instead of the
    interpreter: the interpreter lists only the main subgraph (not the bodies of WHILE
    loops) and shows ops taken by the XNNPACK delegate as ``DELEGATE``. Built-in ops
    have their schema name (``FULLY_CONNECTED``); custom ops, Flex ops included, have
    their custom code (``FlexTensorListReserve``).

    Raises:
        ExportError: the file is missing or is not a TFLite flatbuffer.
    """
    return sorted({name for name, _ in _read_ops(Path(tflite_path))})


def list_custom_ops(tflite_path: str | Path) -> list[str]:
    """List the ops of a `.tflite` file that are not built-ins (Flex and other custom ops)."""
    return sorted({name for name, is_custom in _read_ops(Path(tflite_path)) if is_custom})


def _read_ops(path: Path) -> list[tuple[str, bool]]:
    """Return ``(op name, is custom)`` for every operator in every subgraph of ``path``."""
    from ai_edge_litert import schema_py_generated as schema

    builtin_names = {
        code: name
        for name, code in vars(schema.BuiltinOperator).items()
        if not name.startswith("_")
    }
    try:
        model = schema.Model.GetRootAsModel(path.read_bytes(), 0)
        ops = []
        for subgraph_index in range(model.SubgraphsLength()):
            subgraph = model.Subgraphs(subgraph_index)
            for op_index in range(subgraph.OperatorsLength()):
                op_code = model.OperatorCodes(subgraph.Operators(op_index).OpcodeIndex())
                ops.append(_op_name(op_code, builtin_names))
    except (OSError, IndexError, ValueError, TypeError) as error:
        raise ExportError(
            f"could not read ops from {path}: {error}. Check that it is a .tflite file."
        ) from error
    return ops


def _op_name(op_code, builtin_names: Mapping[int, str]) -> tuple[str, bool]:
    custom_code = op_code.CustomCode()
    if custom_code:
        return custom_code.decode("utf-8"), True
    # Codes below 127 are also stored in the deprecated int8 field, so take the larger value.
    code = max(op_code.BuiltinCode(), op_code.DeprecatedBuiltinCode())
    return builtin_names.get(code, f"BUILTIN_{code}"), False


def parse_converter_ops(message: str) -> list[str]:
    """Extract the TensorFlow op names (``TensorListReserve``) a converter error mentions."""
    return sorted(set(re.findall(r"\btf\.([A-Z]\w*)", message)))


# ---------------------------------------------------------------------------
# Conversion in child processes.


def convert_saved_model(
    saved_model_dir: str | Path,
    signature_key: str,
    variant: str,
    output_path: str | Path,
    *,
    representative_inputs: ArrayDict | None = None,
    timeout_s: float = DEFAULT_CONVERTER_TIMEOUT_S,
) -> Path:
    """Convert one SavedModel signature to one built-ins-only `.tflite` variant.

    Args and errors as in `convert_saved_model_variants`, for a single variant.

    Returns:
        ``output_path``.

    Raises:
        ExportError: the conversion needs non-built-in ops (named in the message), the
            converter failed, crashed or timed out, or int8 lacks representative inputs.
    """
    result = convert_saved_model_variants(
        saved_model_dir,
        signature_key,
        {variant: output_path},
        representative_inputs=representative_inputs,
        timeout_s=timeout_s,
    )[variant]
    if isinstance(result, ExportError):
        raise result
    return result


def convert_saved_model_variants(
    saved_model_dir: str | Path,
    signature_key: str,
    output_paths: Mapping[str, str | Path],
    *,
    representative_inputs: ArrayDict | None = None,
    timeout_s: float = DEFAULT_CONVERTER_TIMEOUT_S,
) -> dict[str, Path | ExportError]:
    """Convert one SavedModel signature to several built-ins-only `.tflite` variants.

    The variants are converted in order by one child process, which saves importing
    TensorFlow once per variant. When the child crashes or times out, the variant it was
    converting gets the error and the remaining variants go on in a fresh child. Each
    file is staged in a temporary directory and moved to its output path only once it
    is complete and contains built-in ops only.

    Args:
        saved_model_dir: a SavedModel written by `export_saved_model`.
        signature_key: the signature to convert; its names become the TFLite signature's.
        output_paths: variant (``float32``, ``dynamic_range``, ``float16`` or ``int8``)
            to the `.tflite` file to write.
        representative_inputs: for ``int8``, input name to calibration examples from
            the training split (first axis indexes examples).
        timeout_s: seconds allowed per variant.

    Returns:
        Variant to its output path, or to the `ExportError` that explains its failure:
        non-built-in ops (named in the message), a converter error, crash or timeout,
        or int8 without representative inputs.

    Raises:
        ConfigError: a variant name is unknown.
    """
    for variant in output_paths:
        check_choice("export variant", variant, TFLITE_VARIANTS)
    results: dict[str, Path | ExportError] = {}
    pending = list(output_paths)
    if "int8" in pending and not representative_inputs:
        results["int8"] = ExportError(
            "variant 'int8' needs representative_inputs (training-split examples) for calibration."
        )
        pending.remove("int8")
    with tempfile.TemporaryDirectory(prefix="tflite-convert-") as work:
        work_dir = Path(work)
        representative_path = (
            _save_representative(work_dir, representative_inputs) if "int8" in pending else None
        )
        while pending:
            process_error = _run_converter(
                Path(saved_model_dir),
                signature_key,
                pending,
                work_dir,
                representative_path,
                timeout_s,
            )
            for variant in list(pending):
                result_path = work_dir / f"{variant}.json"
                if not result_path.exists():
                    break
                results[variant] = _collect_variant(
                    variant, signature_key, work_dir, Path(output_paths[variant])
                )
                pending.remove(variant)
            if pending:
                # The child died or exited early while converting the first variant left.
                results[pending.pop(0)] = process_error or ExportError(
                    "the TFLite converter process exited without a result."
                )
    return {variant: results[variant] for variant in output_paths}


def _save_representative(work_dir: Path, representative_inputs: ArrayDict) -> Path:
    path = work_dir / "representative.npz"
    np.savez(path, **{name: np.asarray(values) for name, values in representative_inputs.items()})
    return path


def _converter_command(
    saved_model_dir: Path,
    signature_key: str,
    variants: Sequence[str],
    work_dir: Path,
    representative_path: Path | None,
) -> list[str]:
    command = [sys.executable, "-m", "shared.export", "convert"]
    command += [
        "--saved-model-dir",
        str(saved_model_dir.resolve()),
        "--signature-key",
        signature_key,
    ]
    command += ["--work-dir", str(work_dir)]
    command += [argument for variant in variants for argument in ("--variant", variant)]
    if representative_path is not None:
        command += ["--representative", str(representative_path)]
    return command


def _child_environment() -> dict[str, str]:
    """Return this process's environment with the repository root on PYTHONPATH."""
    env = dict(os.environ)
    repo_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run_converter(
    saved_model_dir: Path,
    signature_key: str,
    variants: Sequence[str],
    work_dir: Path,
    representative_path: Path | None,
    timeout_s: float,
) -> ExportError | None:
    """Run one converter child over ``variants``; return the error if it crashed or timed out."""
    command = _converter_command(
        saved_model_dir, signature_key, variants, work_dir, representative_path
    )
    log_path = work_dir / "converter.log"
    try:
        with open(log_path, "wb") as log:
            process = subprocess.run(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_environment(),
                timeout=timeout_s * len(variants),
                check=False,
            )
    except subprocess.TimeoutExpired:
        in_progress = _first_unfinished(variants, work_dir, signature_key)
        return ExportError(
            f"the TFLite converter timed out after {timeout_s:g} s per variant on {in_progress}; "
            "raise the timeout or export a smaller model (fewer steps or units)."
        )
    in_progress = _first_unfinished(variants, work_dir, signature_key)
    if process.returncode < 0:
        return ExportError(_crash_message(-process.returncode, in_progress, log_path))
    if process.returncode != 0:
        return ExportError(
            f"the TFLite converter process exited with status {process.returncode} "
            f"on {in_progress}. "
            f"Last output:\n{_tail(log_path)}"
        )
    return None


def _first_unfinished(variants: Sequence[str], work_dir: Path, signature_key: str) -> str:
    for variant in variants:
        if not (work_dir / f"{variant}.json").exists():
            return f"variant {variant!r} of signature {signature_key!r}"
    return f"signature {signature_key!r}"


def _collect_variant(
    variant: str, signature_key: str, work_dir: Path, output_path: Path
) -> Path | ExportError:
    """Check the child's result for ``variant`` and move its file to ``output_path``."""
    result = json.loads((work_dir / f"{variant}.json").read_text(encoding="utf-8"))
    if result["status"] != "ok":
        return ExportError(_converter_error_message(result["error"], variant, signature_key))
    staged = work_dir / f"{variant}.tflite"
    try:
        custom_ops = list_custom_ops(staged)
    except ExportError as error:
        return error
    if custom_ops:
        return ExportError(_non_builtin_message(variant, signature_key, custom_ops))
    output_path.parent.mkdir(parents=True, exist_ok=True)
    staged_next_to_output = output_path.with_name(f".{output_path.name}.tmp")
    shutil.copyfile(staged, staged_next_to_output)
    os.replace(staged_next_to_output, output_path)
    return output_path


def _crash_message(signal_number: int, in_progress: str, log_path: Path) -> str:
    try:
        signal_name = signal.Signals(signal_number).name
    except ValueError:
        signal_name = "unknown signal"
    advice = (
        "For int8, export a one-step model built from cells (shared.streaming.build_step_model), "
        "which quantizes, or ship the dynamic_range or float16 variant."
        if "'int8'" in in_progress
        else "Try another variant; if every variant crashes, export a one-step model "
        "(shared.streaming)."
    )
    return (
        f"the TFLite converter process died with signal {signal_number} ({signal_name}) "
        "while converting "
        f"{in_progress}. {advice} Last converter output:\n{_tail(log_path, lines=5)}"
    )


def _converter_error_message(error_text: str, variant: str, signature_key: str) -> str:
    ops = parse_converter_ops(error_text)
    if ops and ("legalize" in error_text or "Select TF ops" in error_text or "Flex" in error_text):
        return (
            _non_builtin_message(variant, signature_key, ops)
            + f"\nConverter message (truncated):\n{error_text[:1500]}"
        )
    return (
        f"TFLite conversion of variant {variant!r} of signature {signature_key!r} failed:\n"
        f"{error_text[:3000]}"
    )


def _non_builtin_message(variant: str, signature_key: str, ops: Sequence[str]) -> str:
    return (
        f"variant {variant!r} of signature {signature_key!r} needs ops outside the TFLite "
        "built-in op set: "
        f"{', '.join(ops)}. The stock LiteRT runtime cannot run Flex (Select TF) or custom ops. "
        "Give every input a static shape (batch size 1, fixed number of steps) so that recurrent "
        "layers lower to built-in ops, or export a one-step model (shared.streaming)."
    )


# TensorFlow's start-up log lines (absl "I0000 ..." and its preamble) carry no error.
_STARTUP_LOG_LINE = re.compile(r"^([IW]\d{4} |WARNING: All log messages before absl)")


def _tail(path: Path, lines: int = 20) -> str:
    """Return the last ``lines`` lines of a converter log, without TensorFlow start-up noise."""
    text = path.read_text(encoding="utf-8", errors="replace")
    kept = [line for line in text.splitlines() if not _STARTUP_LOG_LINE.match(line)]
    return "\n".join(kept[-lines:]) or "(no output)"


# ---------------------------------------------------------------------------
# The converter child process.


def _build_converter(
    saved_model_dir: str, signature_key: str, variant: str, representative_path: str | None
):
    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model_dir, signature_keys=[signature_key]
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant in QUANTIZED_VARIANTS:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if variant == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = _representative_dataset(representative_path)
    return converter


def _representative_dataset(path: str) -> Callable:
    with np.load(path) as data:
        inputs = {name: data[name] for name in data.files}
    count = min(len(values) for values in inputs.values())

    def generate():
        for index in range(count):
            yield {name: values[index : index + 1] for name, values in inputs.items()}

    return generate


def _convert_in_child(args: argparse.Namespace) -> int:
    """Convert each variant in turn, writing ``{variant}.tflite`` and ``{variant}.json``."""
    work_dir = Path(args.work_dir)
    for variant in args.variant:
        if os.environ.get(FAULT_INJECTION_ENV) == f"abort:{variant}":
            os.abort()
        try:
            converter = _build_converter(
                args.saved_model_dir, args.signature_key, variant, args.representative
            )
            (work_dir / f"{variant}.tflite").write_bytes(converter.convert())
            result = {"status": "ok"}
        except Exception as error:  # The parent turns any converter failure into ExportError.
            result = {"status": "error", "error": f"{type(error).__name__}: {error}"}
        # The result file marks the variant as finished, so it is written last.
        (work_dir / f"{variant}.json").write_text(json.dumps(result), encoding="utf-8")
    return 0


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.export", description="Internal TFLite converter entry point."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert", help="convert one SavedModel signature to .tflite variants"
    )
    convert.add_argument("--saved-model-dir", required=True)
    convert.add_argument("--signature-key", required=True)
    convert.add_argument("--variant", required=True, action="append", choices=TFLITE_VARIANTS)
    convert.add_argument(
        "--work-dir", required=True, help="receives {variant}.tflite and {variant}.json"
    )
    convert.add_argument("--representative", help=".npz of calibration inputs for int8")
    return _convert_in_child(parser.parse_args(argv))


# ---------------------------------------------------------------------------
# Parity, latency and the report.


def run_tflite(
    tflite_path: str | Path, signature_key: str, inputs: ArrayDict
) -> dict[str, np.ndarray]:
    """Run a `.tflite` signature on each example (batch 1), binding inputs and outputs by name.

    Args:
        tflite_path: the model file.
        signature_key: the signature to run.
        inputs: input name to examples (first axis indexes examples).

    Returns:
        Output name to the stacked outputs, shape ``(n,) + signature output shape``.

    Raises:
        ExportError: the input names differ from the signature's.
    """
    runner = _signature_runner(tflite_path, signature_key)
    feeds = _example_feeds(runner, inputs, tflite_path)
    results = [_invoke(runner, feed, tflite_path) for feed in feeds]
    return {name: np.stack([result[name] for result in results]) for name in results[0]}


def _invoke(runner, feed: dict[str, np.ndarray], tflite_path: str | Path) -> dict[str, np.ndarray]:
    """Run one call of a signature runner; a runtime failure becomes an ExportError."""
    try:
        return runner(**feed)
    except RuntimeError as error:
        # The runtime can repeat one message many times in a single error; keep one copy.
        message = re.sub(r"(.{10,}?)\1+", r"\1 ", str(error)).rstrip(". ")[:500]
        hint = ""
        if "XNNPACK" in message:
            hint = (
                " XNNPACK (the runtime's default CPU delegate) rejects quantized operators whose "
                "scales fall outside its range. With full int8 that happens when calibration "
                "never reached a tensor, so its calibrated range is near zero: calibrate with "
                "inputs that use every time step."
            )
        raise ExportError(
            f"{tflite_path}: the stock LiteRT runtime failed to run the model: {message}.{hint}"
        ) from error


def _signature_runner(tflite_path: str | Path, signature_key: str):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite_path), num_threads=1)
    signatures = interpreter.get_signature_list()
    if signature_key not in signatures:
        raise ExportError(
            f"{tflite_path} has no signature {signature_key!r}; it has {sorted(signatures)}."
        )
    return interpreter.get_signature_runner(signature_key)


def _example_feeds(
    runner, inputs: ArrayDict, tflite_path: str | Path
) -> list[dict[str, np.ndarray]]:
    details = runner.get_input_details()
    if set(details) != set(inputs):
        raise ExportError(
            f"{tflite_path} expects inputs {sorted(details)}, got {sorted(inputs)}; "
            "pass one array per input name."
        )
    for name, detail in details.items():
        example_shape = tuple(np.shape(inputs[name])[1:])
        if (1,) + example_shape != tuple(detail["shape"]):
            raise ExportError(
                f"input {name!r}: got examples of shape {example_shape}, but {tflite_path} expects "
                f"{tuple(detail['shape'])}; pass an array of shape "
                f"(n,) + {tuple(detail['shape'][1:])}."
            )
    count = min(len(values) for values in inputs.values())
    return [
        {
            name: np.asarray(inputs[name][index : index + 1]).astype(detail["dtype"])
            for name, detail in details.items()
        }
        for index in range(count)
    ]


def compute_max_abs_diff(outputs: ArrayDict, reference: ArrayDict) -> dict[str, float | None]:
    """Return the max absolute difference per output name; None when a value is NaN or inf.

    Raises:
        ExportError: the output names or sizes differ.
    """
    if set(outputs) != set(reference):
        raise ExportError(
            f"TFLite outputs {sorted(outputs)} differ from Keras outputs {sorted(reference)}."
        )
    diffs = {}
    for name, values in outputs.items():
        expected = np.asarray(reference[name])[: len(values)]
        if expected.size != values.size:
            raise ExportError(
                f"output {name!r}: TFLite gave shape {values.shape}, Keras gave {expected.shape}; "
                "pass Keras outputs for the same examples."
            )
        diff = float(
            np.max(np.abs(values.astype(np.float64).ravel() - expected.astype(np.float64).ravel()))
        )
        diffs[name] = diff if math.isfinite(diff) else None
    return diffs


def measure_latency_ms(
    tflite_path: str | Path, signature_key: str, inputs: ArrayDict, runs: int
) -> float:
    """Return the median milliseconds per call on the first example, after warm-up calls.

    Runs on one thread with the default XNNPACK delegate of the stock runtime.
    """
    runner = _signature_runner(tflite_path, signature_key)
    feed = _example_feeds(
        runner, {name: values[:1] for name, values in inputs.items()}, tflite_path
    )[0]
    for _ in range(LATENCY_WARMUP_RUNS):
        _invoke(runner, feed, tflite_path)
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        runner(**feed)
        timings.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(timings))


def load_export_report(export_dir: str | Path) -> dict[str, Any]:
    """Read ``export_report.json`` from ``export_dir``; an empty dict when there is none.

    Raises:
        ExportError: the file exists but is not valid JSON.
    """
    path = Path(export_dir) / REPORT_FILENAME
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ExportError(
            f"{path} line {error.lineno}: invalid JSON ({error.msg}); "
            "fix or delete it, then export again."
        ) from error


def write_export_report(export_dir: str | Path, model_name: str, entry: Mapping[str, Any]) -> Path:
    """Set ``model_name``'s entry in ``export_report.json``, keeping other models' entries."""
    report = load_export_report(export_dir)
    report[model_name] = entry
    path = Path(export_dir) / REPORT_FILENAME
    staged = path.with_name(f".{REPORT_FILENAME}.tmp")
    staged.write_text(
        json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8"
    )
    os.replace(staged, path)
    return path


def _take(arrays: ArrayDict | None, count: int) -> dict[str, np.ndarray] | None:
    if arrays is None:
        return None
    return {name: np.asarray(values)[:count] for name, values in arrays.items()}


def _check_tolerance(
    variant: str, diffs: Mapping[str, float | None], tolerance: float | None
) -> str | None:
    """Return why ``diffs`` fail ``tolerance``, or None when they pass or no tolerance applies."""
    for name, diff in diffs.items():
        if diff is None:
            return f"variant {variant!r} output {name!r} contains NaN or inf where Keras does not."
        if tolerance is not None and diff > tolerance:
            return (
                f"variant {variant!r} output {name!r} differs from Keras by up to {diff:.3g}, "
                f"above the tolerance {tolerance:g}."
            )
    return None


def check_variant(
    tflite_path: Path,
    signature_key: str,
    variant: str,
    parity_inputs: ArrayDict,
    keras_outputs: ArrayDict,
    *,
    tolerance: float | None,
    latency_runs: int,
    metric_fn: Callable[[ArrayDict], float] | None = None,
    keras_metric: float | None = None,
) -> dict[str, Any]:
    """Measure one converted variant: ops, size, latency, parity and the optional metric.

    Returns:
        The report entry; ``status`` is ``passed`` (within ``tolerance``), ``unchecked``
        (no tolerance given) or ``failed`` (with ``error``).
    """
    ops = list_tflite_ops(tflite_path)
    outputs = run_tflite(tflite_path, signature_key, parity_inputs)
    diffs = compute_max_abs_diff(outputs, keras_outputs)
    entry: dict[str, Any] = {
        "file": tflite_path.name,
        "size_bytes": tflite_path.stat().st_size,
        "ops": ops,
        "latency_ms": measure_latency_ms(tflite_path, signature_key, parity_inputs, latency_runs),
        "max_abs_diff": diffs,
        "parity_examples": len(next(iter(outputs.values()))),
        "tolerance": tolerance,
    }
    if metric_fn is not None:
        entry["metric"] = float(metric_fn(outputs))
        entry["metric_delta"] = entry["metric"] - keras_metric if keras_metric is not None else None
    error = _check_tolerance(variant, diffs, tolerance)
    if error:
        entry["status"] = "failed"
        entry["error"] = error
    elif tolerance is None:
        entry["status"] = "unchecked"
    else:
        entry["status"] = "passed"
    return entry


def export_tflite_variants(
    saved_model_dir: str | Path,
    signature_key: str,
    out_dir: str | Path,
    model_name: str,
    *,
    parity_inputs: ArrayDict,
    keras_outputs: ArrayDict,
    export_config: ExportConfig,
    variants: Sequence[str] | None = None,
    representative_inputs: ArrayDict | None = None,
    quantized_tolerances: Mapping[str, float] | None = None,
    metric_fn: Callable[[ArrayDict], float] | None = None,
    timeout_s: float = DEFAULT_CONVERTER_TIMEOUT_S,
) -> dict[str, Any]:
    """Convert a SavedModel signature to each TFLite variant, check parity and write the report.

    Every variant is attempted; its files land in ``out_dir`` as
    ``{model_name}_{variant}.tflite`` and its entry in ``export_report.json`` under
    ``model_name``. Afterwards, any failed variant raises.

    Args:
        saved_model_dir: SavedModel from `export_saved_model`.
        signature_key: the signature to convert.
        out_dir: directory for the `.tflite` files and the report.
        model_name: report key, e.g. ``"window"`` or ``"streaming"``.
        parity_inputs: input name to held-out examples (first axis indexes examples);
            the first ``export_config.parity_samples`` are used.
        keras_outputs: output name to the Keras outputs for the same examples.
        export_config: variants, float32 tolerance, sample counts and latency runs.
        variants: overrides ``export_config.tflite_variants``.
        representative_inputs: training-split inputs, as for ``parity_inputs``; needed
            for ``int8``. The first ``export_config.representative_samples`` are used.
        quantized_tolerances: variant to max abs difference. A quantized variant without
            an entry is reported, and fails only when an output is NaN or inf.
        metric_fn: maps output name to stacked outputs to a score; the report gives the
            score of each variant and its difference from the Keras score.
        timeout_s: seconds allowed per conversion.

    Returns:
        The report entry for ``model_name``.

    Raises:
        ExportError: a variant failed to convert or float32 parity exceeds the tolerance
            (or a quantized variant exceeds its given tolerance); the report is written first.
    """
    variants = tuple(variants or export_config.tflite_variants)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parity_inputs = _take(parity_inputs, export_config.parity_samples)
    keras_outputs = _take(keras_outputs, export_config.parity_samples)
    keras_metric = float(metric_fn(keras_outputs)) if metric_fn is not None else None
    entry: dict[str, Any] = {
        "saved_model": str(saved_model_dir),
        "signature_key": signature_key,
        "keras_metric": keras_metric,
        "variants": {},
    }
    converted = convert_saved_model_variants(
        saved_model_dir,
        signature_key,
        {variant: out_dir / f"{model_name}_{variant}.tflite" for variant in variants},
        representative_inputs=_take(representative_inputs, export_config.representative_samples),
        timeout_s=timeout_s,
    )
    for variant, tflite_path in converted.items():
        entry["variants"][variant] = _check_converted_variant(
            variant,
            tflite_path,
            signature_key,
            parity_inputs,
            keras_outputs,
            tolerance=_tolerance_for(variant, export_config, quantized_tolerances),
            latency_runs=export_config.latency_runs,
            metric_fn=metric_fn,
            keras_metric=keras_metric,
        )
    report_path = write_export_report(out_dir, model_name, entry)
    failures = {v: e["error"] for v, e in entry["variants"].items() if e["status"] == "failed"}
    if failures:
        details = "\n".join(f"- {variant}: {error}" for variant, error in failures.items())
        raise ExportError(
            f"TFLite export of {model_name!r} failed for {sorted(failures)} "
            f"(see {report_path}):\n{details}"
        )
    return entry


def _tolerance_for(
    variant: str, export_config: ExportConfig, quantized_tolerances: Mapping[str, float] | None
):
    if variant == "float32":
        return export_config.float32_tolerance
    return (quantized_tolerances or {}).get(variant)


def _check_converted_variant(
    variant: str,
    tflite_path: Path | ExportError,
    signature_key: str,
    parity_inputs: ArrayDict,
    keras_outputs: ArrayDict,
    **check_options: Any,
) -> dict[str, Any]:
    """Return the report entry of one variant, or a failed entry when it did not convert."""
    try:
        if isinstance(tflite_path, ExportError):
            raise tflite_path
        entry = check_variant(
            tflite_path, signature_key, variant, parity_inputs, keras_outputs, **check_options
        )
    except ExportError as error:
        logger.error("TFLite variant %s failed: %s", variant, error)
        file_name = tflite_path.name if isinstance(tflite_path, Path) else None
        return {"file": file_name, "status": "failed", "error": str(error)}
    logger.info(
        "TFLite %s: %d bytes, %.3f ms per call, max abs diff %s, status %s",
        tflite_path.name,
        entry["size_bytes"],
        entry["latency_ms"],
        entry["max_abs_diff"],
        entry["status"],
    )
    return entry


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
