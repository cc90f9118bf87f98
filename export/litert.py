"""Keras model -> LiteRT (`.tflite`), verified in the LiteRT interpreter before anything is written.

The steps: fold the BatchNorms (`keras_bn.fold_bn`), convert with Keras's own exporter
(`model.export(format="litert")`: a SavedModel, then TensorFlow's LiteRT converter) restricted to
LiteRT's builtin ops, run the file in `ai_edge_litert`'s interpreter (TensorFlow's
`tf.lite.Interpreter` is deprecated) on synthetic inputs and `samples`, and write it atomically
only when it matches the Keras model: elementwise for float32, by top-1 agreement and cosine for
float16, dynamic-range and int8, with the bounds of the ONNX path.

The report lists the file's ops, read from its flatbuffer (`ai_edge_litert.schema_py_generated`),
and the BatchNorm residue: ops whose output tensors carry a BatchNorm's name. A folded BatchNorm
leaves none; a BatchNorm with nothing to fold into stays as the multiply-add of a ChannelAffine.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import tempfile
import time

import keras
import numpy as np

import keras_bn
from keras_bn import _environment
from keras_bn import _keras_internals as internals
from keras_bn._graph import BATCHNORM_TYPES, walk
from keras_bn.errors import KerasBNError, VerificationError, expected, one_line
from keras_bn.verification import (
    AGREEMENT,
    agreement,
    check_samples,
    compare,
    output_names,
    tolerance_for,
)

from . import onnx_verify
from .files import atomic_output, check_output_path

PRECISIONS = ("float32", "float16", "dynamic", "int8")
# Reduced files are judged as the ONNX path judges them: float16 by float16's bounds, the two
# integer schemes by int8's.
BOUNDS = {"float16": AGREEMENT["float16"], "dynamic": AGREEMENT["int8"], "int8": AGREEMENT["int8"]}
CALIBRATION_SAMPLES = 256  # representative samples for int8, at most


@dataclasses.dataclass
class LiteRTRow:
    """One output of the float32 file on one input set, against Keras (inference mode)."""

    output: str
    input_set: str
    batch: int
    max_abs_error: float
    max_rel_error: float
    passed: bool


@dataclasses.dataclass
class LiteRTReport:
    """What `to_litert` wrote and how it was checked. `to_dict()` for JSON, `str()` for people."""

    path: str
    precision: str
    size_bytes: int
    ops: dict  # LiteRT op type -> count
    residue: dict  # BatchNorm name -> {op type: count} it left in the file
    delegate_partitions: int  # pieces XNNPACK runs the graph in (1: all of it)
    fold: keras_bn.FoldReport | None
    rows: list = dataclasses.field(default_factory=list)  # LiteRTRow, float32
    agreement: dict = dataclasses.field(default_factory=dict)  # output -> Agreement, reduced
    atol: float | None = None
    rtol: float | None = None
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "precision": self.precision,
            "size_bytes": self.size_bytes,
            "ops": self.ops,
            "batchnorm_residue": self.residue,
            "delegate_partitions": self.delegate_partitions,
            "fold": self.fold.to_dict() if self.fold else None,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "agreement": {k: v.to_dict() for k, v in self.agreement.items()},
            "atol": self.atol,
            "rtol": self.rtol,
            "timings": self.timings,
        }

    def __str__(self):
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items()))
        lines = [
            f"wrote {self.path} ({self.precision}, {self.size_bytes / 1024:.1f} KiB)",
            f"LiteRT ops: {ops}; XNNPACK partitions: {self.delegate_partitions}",
            "BatchNorm residue: "
            + (
                "; ".join(
                    f"{bn}: " + ", ".join(f"{k} {v}" for k, v in sorted(left.items()))
                    for bn, left in self.residue.items()
                )
                or "none"
            ),
        ]
        for r in self.rows:
            lines.append(
                f"{r.output:<20} {r.input_set}, batch {r.batch:<6} max abs err "
                f"{r.max_abs_error:.3g}  max rel err {r.max_rel_error:.3g}  "
                f"{'ok' if r.passed else 'FAILED'}"
            )
        for name, a in self.agreement.items():
            top1 = "-" if a.top1 is None else f"{a.top1:.4f}"
            accuracy = (
                ""
                if a.accuracy is None
                else f"  accuracy {a.reference_accuracy:.4f} (Keras) -> {a.accuracy:.4f}"
            )
            lines.append(f"{name:<20} top-1 agreement {top1}  cosine {a.cosine:.6f}{accuracy}")
        return "\n".join(lines)


def op_details(content: bytes) -> list[tuple[str, list[str]]]:
    """`[(op type, output tensor names)]` of the file's main subgraph, read from its flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(content, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    graph = model.Subgraphs(0)
    details = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        # Codes past 127 live in BuiltinCode; the deprecated byte keeps the small ones.
        kind = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        outputs = [graph.Tensors(op.Outputs(j)).Name().decode() for j in range(op.OutputsLength())]
        details.append((kind, outputs))
    return details


def batchnorm_residue(details, batchnorm_names) -> dict:
    """{BatchNorm name: {op type: count}} for the ops whose outputs carry a BatchNorm's name (the
    converter names tensors after the Keras layer that made them: `.../bn_1/...`)."""
    left = {}
    for name in batchnorm_names:
        # Keras's name scopes add "_1", "_2", ... to a layer's name while tracing.
        mark = re.compile(rf"(^|/){re.escape(name.rsplit('/', 1)[-1])}(_\d+)?/")
        found = collections.Counter(
            kind for kind, outputs in details if any(mark.search(o) for o in outputs)
        )
        if found:
            left[name] = dict(found)
    return left


def _check_arguments(model, path, precision, calibration, int8_io):
    if not isinstance(model, keras.Model):
        raise KerasBNError(
            expected("to_litert exports Keras models", "a keras.Model", type(model).__name__)
        )
    if precision not in PRECISIONS:
        raise KerasBNError(expected("Unknown `precision`", ", ".join(PRECISIONS), repr(precision)))
    if precision == "int8" and calibration is None:
        raise KerasBNError(
            expected(
                "int8 needs calibration data (the representative dataset)",
                "calibration=<inputs like the training data>",
                "calibration=None",
            )
        )
    if int8_io and precision != "int8":
        raise KerasBNError(expected("`int8_io` is for int8 files", 'precision="int8"', precision))
    return check_output_path(path, suffix=".tflite")


def _representative(model, calibration):
    arrays = check_samples(model, calibration)
    count = min(len(arrays[0]), CALIBRATION_SAMPLES)

    def dataset():
        for i in range(count):
            yield [a[i : i + 1] for a in arrays]

    return dataset


def convert(model, precision="float32", calibration=None, int8_io=False) -> bytes:
    """The LiteRT flatbuffer of `model` (inference mode), through Keras's own exporter with
    LiteRT's builtin ops only (no TensorFlow ops: the interpreter from `ai_edge_litert` has no
    Flex delegate)."""
    import tensorflow as tf

    ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS_INT8
        if precision == "int8"
        else tf.lite.OpsSet.TFLITE_BUILTINS
    ]
    options = {"target_spec": {"supported_ops": ops}}
    if precision != "float32":
        options["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if precision == "float16":
        options["target_spec"]["supported_types"] = [tf.float16]
    if precision == "int8":
        options["representative_dataset"] = _representative(model, calibration)
        if int8_io:
            options.update(inference_input_type=tf.int8, inference_output_type=tf.int8)
    # TensorFlow's SavedModel writer logs "Assets written to: <a temporary folder>" at INFO.
    tf_logger, level = logging.getLogger("tensorflow"), logging.getLogger("tensorflow").level
    with tempfile.TemporaryDirectory(prefix="keras-bn-litert-") as folder:
        path = os.path.join(folder, "model.tflite")
        tf_logger.setLevel(logging.WARNING)
        try:
            model.export(path, format="litert", verbose=False, **options)
        except Exception as error:  # the converter's refusal: an op LiteRT's builtins lack
            raise KerasBNError(
                expected(
                    "TensorFlow's LiteRT converter cannot convert this model with LiteRT's "
                    "builtin ops",
                    "a model of ops LiteRT has",
                    one_line(f"{type(error).__name__}: {error}", 600),
                    "Nothing was written.",
                )
            ) from None
        finally:
            tf_logger.setLevel(level)
        with open(path, "rb") as f:
            return f.read()


def interpreter_for(content: bytes, num_threads: int = 1):
    """An `ai_edge_litert` interpreter of `content`. A file the interpreter cannot load, usually
    one written by a newer converter than the interpreter knows, is refused naming both versions."""
    import importlib.metadata

    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    try:
        return Interpreter(model_content=content, num_threads=num_threads)
    except (RuntimeError, ValueError) as error:
        litert = importlib.metadata.version("ai-edge-litert")
        raise KerasBNError(
            expected(
                "The LiteRT interpreter cannot load the file TensorFlow's converter wrote",
                "an ai-edge-litert release that matches the TensorFlow that converts",
                f"TensorFlow {tf.__version__}, ai-edge-litert {litert}: {one_line(error, 300)}",
                'Install the pair keras-bn is tested with: pip install "keras-bn[litert]".',
            )
        ) from None


def run(interpreter, model, arrays):
    """The outputs of the file `interpreter` holds on `arrays` (one per input of `model`, the
    Keras model it came from), in the model's output order, quantizing inputs and dequantizing
    outputs of an int8-I/O file."""
    runner = interpreter.get_signature_runner()
    details = runner.get_input_details()
    names = [t.name for t in model.inputs]
    keys = names if set(names) == set(details) else list(details)
    feeds = {}
    for key, array in zip(keys, arrays):
        feeds[key] = _quantize(array, details[key])
    outputs = runner(**feeds)
    out_details = runner.get_output_details()
    ordered = sorted(outputs, key=lambda k: int(k.rsplit("_", 1)[-1]) if k[-1].isdigit() else 0)
    return [_dequantize(outputs[k], out_details[k]) for k in ordered]


def _quantize(array, detail):
    array = np.asarray(array)
    if detail["dtype"] != np.int8:
        return array.astype(detail["dtype"])
    scale, zero = detail["quantization"]
    return np.clip(np.round(array / scale + zero), -128, 127).astype(np.int8)


def _dequantize(array, detail):
    if detail["dtype"] != np.int8:
        return np.asarray(array, np.float32)
    scale, zero = detail["quantization"]
    return (np.asarray(array, np.float32) - zero) * scale


def _verify_float32(interpreter, model, references, tolerance):
    rows = []
    names = output_names(model)
    for label, arrays, expected_outputs in references:
        batches = [(len(arrays[0]), arrays, expected_outputs)]
        if label == "synthetic":  # the dynamic batch dimension: the first sample alone
            batches.append((1, [a[:1] for a in arrays], [y[:1] for y in expected_outputs]))
        for batch, inputs, wanted in batches:
            for name, want, got in zip(names, wanted, run(interpreter, model, inputs)):
                c = compare(want, got)
                rows.append(
                    LiteRTRow(
                        name,
                        label,
                        batch,
                        c.max_abs,
                        c.max_rel,
                        tolerance.accepts(c.max_abs, c.scale),
                    )
                )
    return rows


def _verify_reduced(interpreter, model, references, precision, labels, min_agreement, min_cosine):
    label, arrays, wanted = references[-1]  # the samples, else the calibration data
    bounds = {**BOUNDS[precision]}
    if min_agreement is not None:
        bounds["min_agreement"] = min_agreement
    if min_cosine is not None:
        bounds["min_cosine"] = min_cosine
    found = {}
    for name, want, got in zip(output_names(model), wanted, run(interpreter, model, arrays)):
        a = agreement(want, got, labels if label == "samples" else None)
        found[name] = a
        for measured, bound, what in (
            (a.top1, bounds["min_agreement"], "top-1 agreement"),
            (a.cosine, bounds["min_cosine"], "cosine similarity"),
        ):
            if measured is not None and measured < bound:
                raise VerificationError(
                    expected(
                        f"The {precision} LiteRT file disagrees with the float32 Keras model on "
                        f"output '{name}' ({label}); nothing was written",
                        f"{what} >= {bound}",
                        f"{measured:.6f}",
                        "Export float32 or float16, calibrate on more representative data, or "
                        "lower the bound if the use allows it.",
                    )
                )
    return found


def to_litert(
    model: keras.Model,
    path,
    *,
    precision: str = "float32",
    calibration=None,
    samples=None,
    labels=None,
    fold: bool = True,
    int8_io: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    min_agreement: float | None = None,
    min_cosine: float | None = None,
    input_shapes=None,
    on_bad_statistics: str = "keep",
) -> LiteRTReport:
    """Exports `model` to LiteRT (`.tflite`): folds, converts, verifies in the LiteRT
    interpreter, then writes.

    Args:
        model: A Sequential or Functional Keras model, on the TensorFlow backend.
        path: The `.tflite` file to write.
        precision: "float32"; "float16" (float16 weights); "dynamic" (int8 weights, float
            activations); or "int8" (full-integer, with `calibration` as the representative
            dataset; inputs and outputs stay float32 unless `int8_io=True`).
        calibration: int8's representative data (up to 256 samples are used), in the forms
            `samples` takes.
        samples: Real inputs for verification: an array, a list per input, or a dict by input
            name.
        labels: Labels of `samples`, to report the accuracy of both models.
        fold: Fold BatchNorms into their neighbours first (`keras_bn.fold_bn`).
        int8_io: int8 only: int8 inputs and outputs, with the file's scale and zero point.
        atol: float32's absolute tolerance; None takes the model's compute dtype's default.
        rtol: float32's relative tolerance (times max|that Keras output|); None likewise.
        min_agreement: The top-1 agreement a reduced file must reach on classification-shaped
            outputs; None takes the ONNX path's bound (0.99 float16, 0.98 dynamic and int8).
        min_cosine: The cosine similarity it must reach on every output; None likewise (0.999
            float16, 0.99 dynamic and int8).
        input_shapes: The shape of the synthetic inputs without the batch axis, as in
            `keras_bn.fold_bn`.
        on_bad_statistics: "keep" or "raise", as in `keras_bn.fold_bn`.

    Returns:
        A `LiteRTReport`: the file's ops and size, the BatchNorm residue, the fold report, and
        the verification rows (float32) or agreement per output (reduced).

    Raises:
        KerasBNError: Bad input, another Keras backend, or a model LiteRT's builtin ops cannot
            express; nothing is written.
        VerificationError: The file does not reproduce the Keras model within tolerance, or a
            reduced file misses its agreement bounds; nothing is written.
        MissingExtraError: The `[litert]` extra is not installed.

    Example:
        ```python
        from keras_bn.export import to_litert

        report = to_litert(model, "model.tflite", samples=x_test)
        to_litert(model, "model.int8.tflite", precision="int8", calibration=x_train, samples=x_test)
        ```
    """
    _environment.require_extra("litert", "keras_bn.export.to_litert")
    internals.require_tensorflow("LiteRT export", "keras-bn export model.keras -o model.tflite")
    path = _check_arguments(model, path, precision, calibration, int8_io)
    tolerance = tolerance_for(model, rtol, atol)
    input_sets = onnx_verify.build_input_sets(model, samples, input_shapes)
    if precision != "float32" and samples is None and calibration is not None:
        input_sets.append(("calibration", check_samples(model, calibration)))
    timings, start = {}, time.perf_counter()
    exported, fold_report = model, None
    if fold:
        exported, fold_report = keras_bn.fold_bn(
            model, samples=samples, input_shapes=input_shapes, on_bad_statistics=on_bad_statistics
        )
    timings["fold"], start = time.perf_counter() - start, time.perf_counter()
    content = convert(exported, precision, calibration, int8_io)
    timings["convert"], start = time.perf_counter() - start, time.perf_counter()
    references = onnx_verify.keras_references(model, input_sets)
    interpreter = interpreter_for(content)
    rows, agreements = [], {}
    if precision == "float32":
        rows = _verify_float32(interpreter, model, references, tolerance)
        failed = [r for r in rows if not r.passed]
        if failed:
            worst = max(failed, key=lambda r: r.max_rel_error)
            raise VerificationError(
                expected(
                    "The LiteRT file does not reproduce the Keras model; nothing was written",
                    f"|error| <= {tolerance.atol:g} + {tolerance.rtol:g} x max|output|",
                    f"output '{worst.output}' on {worst.input_set} (batch {worst.batch}): max "
                    f"abs error {worst.max_abs_error:.3g}",
                )
            )
    else:
        agreements = _verify_reduced(
            interpreter, model, references, precision, labels, min_agreement, min_cosine
        )
    timings["verify"] = time.perf_counter() - start
    with atomic_output(path, ".tflite") as handle:
        handle.write(content)
    names = [bn.path for bn in walk(model) if isinstance(bn.layer, BATCHNORM_TYPES)]
    details = op_details(content)
    return LiteRTReport(
        path=str(path),
        precision=precision,
        size_bytes=len(content),
        ops=dict(collections.Counter(kind for kind, _ in details)),
        residue=batchnorm_residue(details, names),
        delegate_partitions=internals.litert_delegate_partitions(interpreter),
        fold=fold_report,
        rows=rows,
        agreement=agreements,
        atol=tolerance.atol,
        rtol=tolerance.rtol,
        timings=timings,
    )
