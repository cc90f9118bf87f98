"""`to_onnx`: fold, convert, check, verify, reduce precision, write. Each step is a module of
its own (`convert`, `onnx_verify`, `precision`, `reports`); this one is the order they run in,
and nothing is written unless every step passed."""

from __future__ import annotations

import contextlib
import time

import keras
import onnx

import keras_bn
from keras_bn import _keras_internals as internals
from keras_bn.errors import KerasBNError, VerificationError, expected
from keras_bn.verification import compute_dtype, in_background, tolerance_for

from . import convert, onnx_verify
from . import precision as precision_module  # `precision` is an argument of to_onnx
from .files import atomic_output, check_output_path
from .onnx_verify import verify
from .reports import ExportReport, QuantizationReport, VerifyReport, VerifyRow
from .steps import Steps

__all__ = ["ExportReport", "QuantizationReport", "VerifyReport", "VerifyRow", "to_onnx", "verify"]


def _check_exportable(model):
    """Refuses, before any work, what onnxruntime cannot run, and another Keras backend: tf2onnx
    converts TensorFlow graphs."""
    internals.require_tensorflow(
        "ONNX export (tf2onnx converts TensorFlow graphs)",
        "keras-bn export model.keras -o model.onnx",
    )
    if compute_dtype(model) == "bfloat16":
        raise KerasBNError(
            expected(
                "The model computes in bfloat16, and ONNX's Conv, Gemm and MatMul have no bfloat16 "
                "kernels in onnxruntime's CPU provider",
                "a float32 or mixed_float16 model",
                f"model '{model.name}' with bfloat16 layers",
                "bfloat16 is a training dtype: build the same model under "
                "keras.config.set_dtype_policy('float32'), copy the weights with "
                "set_weights(model.get_weights()), and export that.",
            )
        )


def to_onnx(
    model: keras.Model,
    path,
    *,
    fold: bool = True,
    opset: int | None = None,
    samples=None,
    atol: float | None = None,
    rtol: float | None = None,
    nchw_inputs: bool = False,
    verbose: int = 0,
    on_bad_statistics: str = "keep",
    precision: str = "float32",
    calibration=None,
    calibrate_method: str = "minmax",
    labels=None,
    min_agreement: float | None = None,
    min_cosine: float | None = None,
    keep_float=(),
    reduce_range: bool | None = None,
    input_shapes=None,
    measure_latency: bool = False,
) -> ExportReport:
    """Exports `model` to ONNX at `path`: folds, converts, checks, verifies, then writes.

    The BatchNorms are folded first (unless `fold=False`), the model is converted with tf2onnx
    (dynamic batch dimension, the Keras input and output names kept), the graph is checked with
    `onnx.checker.check_model(full_check=True)` and run in onnxruntime, with graph optimizations
    disabled and enabled, against the Keras model. Only then is `path` written, atomically.
    `precision="float16"` or `"int8"` then makes a reduced graph from the verified float32 one
    (`keras_bn.export.quantize`), accepted by agreement with the float32 Keras model.

    Args:
        model: A Sequential or Functional Keras model, on the TensorFlow backend.
        path: The `.onnx` file to write.
        fold: Fold BatchNorms into their neighbours first (`keras_bn.fold_bn`).
        opset: ONNX opset, 7 to 18; None takes tf2onnx's default.
        samples: Real inputs for verification (an array, a list per input, or a dict by input
            name), checked against `model.inputs` before any work.
        atol: Absolute part of the elementwise tolerance `atol + rtol * max|that Keras
            output|`; None takes the default of the model's compute dtype
            (`keras_bn.verification.TOLERANCES`).
        rtol: Relative part of that tolerance; None likewise.
        nchw_inputs: Make inputs of rank 3 or more channels-first in the ONNX graph.
        verbose: 1 prints each step and its duration on stderr; 0 is silent.
        on_bad_statistics: "keep" or "raise", as in `keras_bn.fold_bn`; "raise" refuses a model
            whose BatchNorm statistics are unusable, folded or not.
        precision: "float32", "float16" (onnxruntime's converter, float32 inputs and outputs)
            or "int8" (static QDQ: per-channel symmetric int8 weights, uint8 activations).
        calibration: int8's calibration data (required for int8), in the forms of `samples`.
        calibrate_method: "minmax" (default), "entropy" or "percentile".
        labels: Labels of `samples`, to report the accuracy of both models.
        min_agreement: The top-1 agreement a reduced graph must reach on classification-shaped
            outputs; None takes `keras_bn.verification.AGREEMENT` (0.99 float16, 0.98 int8).
        min_cosine: The cosine similarity it must reach on every output; None likewise (0.999
            float16, 0.99 int8).
        keep_float: Names of layers left in float32 in a reduced graph, for a layer that int8
            makes slower or less accurate (such as a first Conv with one input channel).
        reduce_range: int8 only: 7-bit weights, as onnxruntime advises for x86-64 CPUs without
            VNNI, whose uint8 x int8 kernels can saturate. None decides by the machine that
            quantizes and verifies, and the report says which and why; pass True for a graph
            that will run on such a CPU.
        input_shapes: The shape of the synthetic inputs without the batch axis, as in
            `keras_bn.fold_bn`; None takes the samples', else one the model accepts.
        measure_latency: Add onnxruntime's latency of the float32 and the reduced graph at
            batch 1 and 32 to the report (a rough guide; `benchmarks/bench_quantize.py` is the
            benchmark).

    Returns:
        An `ExportReport`: op counts, what was folded, the verification table, timings, and
        for float16 and int8 the `QuantizationReport` (sizes, op counts, agreement).

    Raises:
        KerasBNError: Bad input (a model or samples of the wrong form, an opset out of range,
            unusable statistics with `on_bad_statistics="raise"`, another backend); nothing
            is written.
        VerificationError: The ONNX graph does not match the Keras model, or a reduced graph
            misses its agreement bounds; the message names the output and the value, and
            nothing is written.
        MissingExtraError: The `[onnx]` extra is not installed.

    Example:
        ```python
        from keras_bn import export

        report = export.to_onnx(model, "model.onnx", samples=x_test)
        print(report)  # op counts, BatchNorms folded, errors, timings
        export.to_onnx(
            model, "model.int8.onnx", precision="int8", calibration=x_train[:512], samples=x_test
        )
        ```
    """
    if verbose not in (0, 1):  # True and False too
        raise KerasBNError(expected("Invalid `verbose`", "0 (silent) or 1 (steps)", repr(verbose)))
    with contextlib.ExitStack() as stack:
        step = stack.enter_context(Steps()) if verbose else (lambda name: None)
        if not isinstance(model, keras.Model):
            raise KerasBNError(
                expected("to_onnx exports Keras models", "a keras.Model", type(model).__name__)
            )
        path = check_output_path(path, suffix=".onnx")
        opset = convert.check_opset(opset)
        if on_bad_statistics not in ("keep", "raise"):
            raise KerasBNError(
                expected(
                    "Invalid `on_bad_statistics`", "'keep' or 'raise'", repr(on_bad_statistics)
                )
            )
        if on_bad_statistics == "raise":
            keras_bn.fold.refuse_bad_statistics(model)
        tolerance = tolerance_for(model, rtol, atol)
        _check_exportable(model)
        # Bad samples or shapes fail here, before any conversion.
        input_sets = onnx_verify.build_input_sets(model, samples, input_shapes)
        reduced = precision_module.check_arguments(
            model, precision, calibration=calibration, calibrate_method=calibrate_method,
            labels=labels, min_agreement=min_agreement, min_cosine=min_cosine,
            keep_float=keep_float, reduce_range=reduce_range,
        )  # fmt: skip
        timings = {}
        exported, fold_report, proto, references = _fold_and_convert(
            model, fold, opset, nchw_inputs, input_sets, reduced, step, timings
        )
        start = time.perf_counter()
        model_bytes = proto.SerializeToString()
        verification = onnx_verify.verify_proto(
            model, proto, model_bytes, nchw_inputs, references, tolerance
        )
        timings["verify"] = time.perf_counter() - start
        if not verification.passed:
            _refuse(model, exported, verification, input_sets, opset, nchw_inputs, tolerance)
        quantization = None
        if reduced is not None:
            start = time.perf_counter()
            model_bytes, quantization = precision_module.reduce(
                model, model_bytes, nchw_inputs, input_sets, reduced, step, measure_latency
            )
            proto = onnx.load_from_string(model_bytes)
            timings[precision] = time.perf_counter() - start
        step("writing")
        with atomic_output(path, ".onnx") as handle:
            handle.write(model_bytes)
        opset_used = max(
            (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0
        )
        return ExportReport(
            path=path,
            op_counts=convert.op_counts(proto),
            fold=fold_report,
            verification=verification,
            timings=timings,
            opset=opset_used,
            quantization=quantization,
        )


def _fold_and_convert(model, fold, opset, nchw_inputs, input_sets, reduced, step, timings):
    """(exported Keras model, FoldReport or None, ONNX proto, Keras references). Keras's
    reference outputs depend only on the original model: they are computed on a second thread
    while this one folds and converts, which hides their cost (benchmarks/bench_export.py)."""
    with in_background(lambda: onnx_verify.keras_references(model, input_sets)) as pending:
        start = time.perf_counter()
        fold_report = None
        exported = model
        if fold:
            step("folding")
            # No separate fold verification: the ONNX graph is checked against the original
            # model afterwards, which covers the fold and the conversion at once.
            exported, fold_report = keras_bn.fold_bn(model, verify=False)
        timings["fold"] = time.perf_counter() - start
        if reduced is not None and reduced.precision == "float16" and fold_report is not None:
            precision_module.check_float16_weights(fold_report, reduced.keep_float)
        start = time.perf_counter()
        step("converting with tf2onnx")
        proto = convert.convert(exported, opset, nchw_inputs)
        timings["convert"] = time.perf_counter() - start
        step("checking the graph")
        convert.check_graph(proto, {layer.name for layer in internals.all_layers(exported)})
        step("verifying with onnxruntime")
        references = pending.result()
    return exported, fold_report, proto, references


def _refuse(model, exported, verification, input_sets, opset, nchw_inputs, tolerance):
    """Raises the VerificationError of a failed verification, saying where the outputs first
    leave the model's (`onnx_verify.first_divergence`)."""
    worst = max((r for r in verification.rows if not r.passed), key=lambda r: r.max_abs_error)
    arrays = dict(input_sets)[worst.input_set]
    if worst.first_sample_only:
        arrays = [a[:1] for a in arrays]
    where = onnx_verify.first_divergence(
        model, exported, arrays, worst.optimization == "enabled", opset, nchw_inputs, tolerance
    )
    raise VerificationError(
        expected(
            f"onnxruntime output '{worst.output}' differs from Keras on {worst.inputs} "
            f"(optimizations {worst.optimization}); nothing was written",
            f"max abs error <= {tolerance.atol:g} + {tolerance.rtol:g} x max|that output|",
            f"{worst.max_abs_error:.4g}",
            where,
        )
    )
