"""float16 and int8 graphs made from the verified float32 one: the arguments checked before any
work, float16's range, int8 calibration, and acceptance by agreement with the float32 Keras
model. The conversions themselves are onnxruntime's (`quantize`)."""

from __future__ import annotations

import dataclasses
import time

import keras
import numpy as np
import onnx

from keras_bn import _keras_internals as internals
from keras_bn.errors import KerasBNError, VerificationError, expected
from keras_bn.verification import AGREEMENT, agreement, check_samples, compute_dtype, output_names

from . import convert, onnx_verify, quantize
from .reports import QuantizationReport


@dataclasses.dataclass(frozen=True)
class Reduced:
    precision: str
    calibration: list | None  # arrays per input
    calibrate_method: str
    labels: np.ndarray | None
    min_agreement: float
    min_cosine: float
    keep_float: tuple = ()  # layer names whose ops stay float32 in int8
    reduce_range: bool = False  # int8: 7-bit weights
    reduce_range_reason: str = ""


def check_arguments(
    model,
    precision,
    *,
    calibration=None,
    calibrate_method="minmax",
    labels=None,
    min_agreement=None,
    min_cosine=None,
    keep_float=(),
    reduce_range=None,
):
    """Checks the reduced-precision arguments of `to_onnx` before any work: a `Reduced`, or None
    for a float32 export."""
    if precision not in quantize.PRECISIONS:
        raise KerasBNError(
            expected("Unknown `precision`", "'float32', 'float16' or 'int8'", repr(precision))
        )
    keep_float = (keep_float,) if isinstance(keep_float, str) else tuple(keep_float or ())
    _check_options(precision, keep_float, reduce_range)
    if precision == "float32":
        return None
    if compute_dtype(model) != "float32":
        raise KerasBNError(
            expected(
                f"precision='{precision}' converts a float32 graph",
                "a float32 model",
                f"a model computing in {compute_dtype(model)}",
                "Export it with the default precision; its graph is already reduced.",
            )
        )
    arrays = _check_calibration(model, precision, calibration, calibrate_method)
    bounds = {}
    for name, value in (("min_agreement", min_agreement), ("min_cosine", min_cosine)):
        if value is None:
            value = AGREEMENT[precision][name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise KerasBNError(expected(f"Invalid `{name}`", "a number in [0, 1]", repr(value)))
        bounds[name] = float(value)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if not np.issubdtype(labels.dtype, np.integer):
            raise KerasBNError(
                expected("`labels` are class indices", "integers", f"dtype {labels.dtype}")
            )
    known = {layer.name for layer in internals.all_layers(model)}
    unknown = [name for name in keep_float if name not in known]
    if unknown:
        raise KerasBNError(
            expected("`keep_float` names layers of the model", f"some of {sorted(known)}",
                     f"{unknown}")
        )  # fmt: skip
    reduce_range, reason = _reduce_range(precision, reduce_range)
    return Reduced(
        precision, arrays, calibrate_method, labels, **bounds, keep_float=keep_float,
        reduce_range=reduce_range, reduce_range_reason=reason,
    )  # fmt: skip


def _check_options(precision, keep_float, reduce_range):
    """keep_float and reduce_range: their types, and the precisions they apply to."""
    if keep_float and precision == "float32":
        raise KerasBNError(
            expected(
                "`keep_float` names layers to leave in float32 in a float16 or int8 graph",
                "precision='float16' or 'int8'",
                f"precision={precision!r} with keep_float={list(keep_float)}",
            )
        )
    if reduce_range is not None and not isinstance(reduce_range, bool):
        raise KerasBNError(
            expected("Invalid `reduce_range`", "True, False or None (decide by this CPU)",
                     repr(reduce_range))
        )  # fmt: skip
    if reduce_range is not None and precision != "int8":
        raise KerasBNError(
            expected(
                "`reduce_range` chooses 7-bit weights for int8 quantization",
                "precision='int8'",
                f"precision={precision!r} with reduce_range={reduce_range}",
            )
        )


def _check_calibration(model, precision, calibration, calibrate_method):
    """The calibration arrays (None when none are given), finite; int8 needs them."""
    if precision == "int8" and calibration is None:
        raise KerasBNError(
            expected(
                "int8 export needs calibration data: static quantization measures each "
                "activation's range on it",
                "calibration= a few hundred representative inputs (the same forms as samples: "
                "an array, a list or a dict by input name; CLI: --calibration calib.npy|.npz)",
                "calibration=None",
            )
        )
    if calibrate_method not in quantize.CALIBRATE_METHODS:
        raise KerasBNError(
            expected(
                "Unknown `calibrate_method`",
                "'minmax', 'entropy' or 'percentile'",
                repr(calibrate_method),
            )
        )
    arrays = None if calibration is None else check_samples(model, calibration)
    for name, a in zip([x.name for x in keras.tree.flatten(model.inputs)], arrays or []):
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise KerasBNError(
                expected(
                    f"Calibration data for input '{name}' holds NaN or Inf",
                    "finite calibration inputs (int8 scales are measured on them)",
                    f"{int(np.sum(~np.isfinite(a)))} non-finite values",
                )
            )
    return arrays


def _reduce_range(precision, asked):
    """(7-bit weights?, why): the caller's word, else this CPU's (`quantize.int8_may_saturate`)."""
    if precision != "int8":
        return False, ""
    if asked is not None:
        return asked, f"reduce_range={asked} was asked for"
    if quantize.int8_may_saturate():
        return True, (
            "this CPU is x86-64 without VNNI (or its flags are unreadable), where onnxruntime's "
            "uint8 x int8 kernels can saturate"
        )
    return False, "this CPU does not saturate uint8 x int8 sums"


def check_float16_weights(fold_report, keep_float):
    """Refuses a float16 export whose folded weights float16 cannot hold (overflow, or many
    below its smallest normal number: `keras_bn.fold_math.float16_problem`), unless the layer
    holding them stays float32 (`keep_float`)."""
    problems = [
        (row.into.rsplit("/", 1)[-1], row.float16)
        for row in fold_report.rows
        if row.float16 and row.into and row.into.rsplit("/", 1)[-1] not in keep_float
    ]
    if problems:
        layers = [name for name, _ in problems]
        raise KerasBNError(
            expected(
                "Folded weights that float16 cannot hold; nothing was written",
                "weights within float16's normal range",
                "; ".join(problem for _, problem in problems),
                f"Keep those layers in float32 (keep_float={layers}; keras-bn: "
                + " ".join(f"--keep-float {name}" for name in layers)
                + "), or export float32.",
            )
        )


# The latency comparison in a reduced-precision report is a rough guide, not a benchmark
# (benchmarks/bench_quantize.py is one): it gets about this many seconds per batch size, and a
# batch size whose single run would take longer than that is left out.
LATENCY_BUDGET_S = 1.0


def latency(sessions, names, arrays, nchw, budget_s=LATENCY_BUDGET_S):
    """{session key: {batch: median ms}} at batch 1 and 32, the sessions interleaved, within about
    `budget_s` per batch size (at most 21 runs each): a model that takes seconds a run (long
    sequences) is timed once, at batch 1 only, instead of holding the export up for minutes."""
    latency = {key: {} for key in sessions}
    for batch in (1, 32):
        feed = onnx_verify.feed_dict(
            names, [np.resize(a, (batch, *a.shape[1:])) for a in arrays], nchw
        )
        times = {key: [] for key in sessions}

        def run_all(feed=feed, times=times):
            for key, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feed)
                times[key].append(time.perf_counter() - start)

        run_all()  # the first run of each also says what one costs
        one_round = sum(t[0] for t in times.values())
        if batch > 1 and one_round > budget_s:
            break
        for _ in range(min(int(budget_s / max(one_round, 1e-6)) - 1, 20)):
            run_all()
        for key in sessions:
            latency[key][batch] = 1e3 * float(np.median(times[key]))
    return latency


def reduce(model, model_bytes, nchw, input_sets, reduced, step, measure_latency=False):
    """(reduced graph bytes, QuantizationReport), or VerificationError below the bounds.
    `measure_latency` adds onnxruntime's latency of both graphs (`latency`), a rough guide."""
    float_session = onnx_verify.make_session(model_bytes, True)
    names = [i.name for i in float_session.get_inputs()]
    float16_range = {}
    if reduced.precision == "float16":
        float16_range = _check_float16_range(model, model_bytes, nchw, input_sets, reduced, names)
        step("converting to float16")
        proto = onnx.load_from_string(model_bytes)
        kept = quantize.layer_nodes(proto, reduced.keep_float) if reduced.keep_float else []
        reduced_bytes = quantize.to_float16(model_bytes, kept)
    else:
        step("calibrating and quantizing to int8")
        rows = len(reduced.calibration[0])
        feeds = [
            onnx_verify.feed_dict(names, [a[start : start + 32] for a in reduced.calibration], nchw)
            for start in range(0, rows, 32)
        ]
        reduced_bytes = quantize.to_int8(
            model_bytes, feeds, reduced.calibrate_method, reduced.keep_float, reduced.reduce_range
        )
    step(f"verifying the {reduced.precision} graph by agreement")
    label, arrays = _agreement_inputs(input_sets, reduced)
    session = onnx_verify.make_session(reduced_bytes, True)
    outputs = session.run(None, onnx_verify.feed_dict(names, arrays, nchw))
    agreements = _check_agreement(model, arrays, outputs, reduced, label)
    sessions = {"float32": float_session, reduced.precision: session}
    qdq, quantized, floating = quantize.op_split(onnx.load_from_string(reduced_bytes))
    runtime_int8, runtime_float = (
        quantize.runtime_split(reduced_bytes) if reduced.precision == "int8" else ({}, {})
    )
    report = QuantizationReport(
        precision=reduced.precision,
        input_set=label,
        min_agreement=reduced.min_agreement,
        min_cosine=reduced.min_cosine,
        agreement=agreements,
        float32_bytes=len(model_bytes),
        bytes=len(reduced_bytes),
        qdq_ops=qdq,
        quantized_ops=quantized,
        float_ops=floating,
        latency_ms=latency(sessions, names, arrays, nchw) if measure_latency else {},
        runtime_int8_ops=runtime_int8,
        runtime_float_ops=runtime_float,
        kept_float=list(reduced.keep_float),
        reduce_range=reduced.reduce_range,
        reduce_range_reason=reduced.reduce_range_reason,
        float16_range=float16_range,
    )
    return reduced_bytes, report


def _check_float16_range(model, model_bytes, nchw, input_sets, reduced, names):
    """Refuses a float16 graph whose float32 tensors exceed float16's range on the check inputs
    (the input sets and the calibration data): onnxruntime's CPU provider runs many float16 ops
    in float32, so agreement there cannot show an overflow. Returns what was checked."""
    checks = [arrays for _, arrays in input_sets]
    if reduced.calibration is not None:
        checks.append(reduced.calibration)
    checked, overflows = quantize.float16_range(
        model_bytes, [onnx_verify.feed_dict(names, arrays, nchw) for arrays in checks]
    )
    if overflows:
        layer_names = {layer.name for layer in internals.all_layers(model)}
        where = [
            (tensor, sorted({convert.layer_of(n, layer_names) or n for n in nodes}), top)
            for tensor, nodes, top in overflows
        ]
        listed = "; ".join(
            f"'{t}' (in {', '.join(held)}) up to {top:.4g}" for t, held, top in where[:5]
        )
        raise VerificationError(
            expected(
                "The float16 graph would overflow: values the float32 graph computes on "
                "the check inputs exceed float16's largest number; nothing was written",
                f"|values| <= {quantize.FLOAT16_MAX:g} in every tensor (float16 holds "
                "every tensor between ops, keep_float layers' too)",
                f"{len(overflows)} tensor(s): {listed}",
                "Export float32 (or int8), or retrain or rescale the model so that its "
                "activations stay within float16.",
            )
        )
    return {
        "checked_tensors": checked,
        "check_inputs": sum(len(a[0]) for a in checks),
        "limit": quantize.FLOAT16_MAX,
    }


def _agreement_inputs(input_sets, reduced):
    """(label, arrays) agreement is judged on: the samples, else the calibration data, else the
    synthetic inputs; `labels`, if given, must have one class per sample of them."""
    sets = dict(input_sets)
    if "samples" in sets:
        label, arrays = "samples", sets["samples"]
    elif reduced.calibration is not None:
        label, arrays = "calibration data", reduced.calibration
    else:
        label, arrays = "synthetic inputs (batch 4, seed 1)", sets["synthetic"]
    labels = reduced.labels
    if labels is not None and len(labels) != len(arrays[0]):
        raise KerasBNError(
            expected(
                f"`labels` need one class per sample of the {label}",
                f"{len(arrays[0])} labels",
                f"{len(labels)}",
            )
        )
    return label, arrays


def _check_agreement(model, arrays, outputs, reduced, label):
    """{output name: Agreement} of the reduced graph's `outputs` with the float32 Keras model on
    `arrays`, or VerificationError naming the output below a bound."""
    references = onnx_verify.keras_outputs(model, arrays)
    int8_remedies = ""
    if reduced.precision == "int8":
        int8_remedies = "keep a layer float (keep_float=), " + (
            "" if reduced.reduce_range else "try 7-bit weights (reduce_range=True), "
        )
    agreements = {}
    for name, ref, out in zip(output_names(model), references, outputs):
        result = agreement(ref, out, reduced.labels)
        agreements[name] = result
        for measure, value, bound in (
            ("top-1 agreement", result.top1, reduced.min_agreement),
            ("cosine similarity", result.cosine, reduced.min_cosine),
        ):
            if value is not None and not value >= bound:
                raise VerificationError(
                    expected(
                        f"The {reduced.precision} graph's output '{name}' disagrees with the "
                        f"float32 Keras model on the {label}; nothing was written",
                        f"{measure} >= {bound:g}",
                        f"{value:.6f}",
                        "Calibrate on more representative data, try another calibrate_method, "
                        f"{int8_remedies}or lower the bound (min_agreement=, min_cosine=).",
                    )
                )
    return agreements
