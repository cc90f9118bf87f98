"""Verification of an ONNX graph against its Keras model in onnxruntime: sessions at both
optimization levels, inputs and outputs matched by name, every output judged against its own
scale, and, after a failure, the first layer whose output leaves the model's."""

from __future__ import annotations

import keras
import numpy as np
import onnx
import onnxruntime as ort

from keras_bn import _graph
from keras_bn import _keras_internals as internals
from keras_bn.errors import KerasBNError, expected
from keras_bn.verification import (
    check_samples,
    compare,
    fixed_batch,
    input_shapes,
    output_names,
    run_inference,
    run_original,
    synthetic_inputs,
    tolerance_for,
)

from . import convert
from .convert import NCHW_KEY
from .reports import VerifyReport, VerifyRow


def make_session(model_bytes, optimized):
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def feed_dict(names, arrays, nchw):
    return {
        name: np.moveaxis(a, -1, 1) if nchw and a.ndim > 2 else a for name, a in zip(names, arrays)
    }


def build_input_sets(model, samples, shapes=None):
    """[(label, arrays)]: synthetic inputs (batch 4, seed 1) of `shapes`, else of the samples'
    shape, else of the model's (`keras_bn.verification.input_shapes`), and the samples."""
    real = None if samples is None else check_samples(model, samples)
    if shapes is not None or real is None:
        shapes = input_shapes(model, shapes)
    else:
        shapes = [a.shape[1:] for a in real]
    sets = [("synthetic", synthetic_inputs(model, batch_size=4, seed=1, shapes=shapes))]
    if real is not None:
        sets.append(("samples", real))
    return sets


def keras_outputs(model, arrays):
    return [np.asarray(y) for y in keras.tree.flatten(run_inference(model, arrays, as_numpy=True))]


def keras_references(model, input_sets):
    """Keras (inference mode) outputs for each input set: [(label, arrays, outputs)]. The model
    failing on an input set is a `KerasBNError` (`run_original`)."""
    labels = {"synthetic": "synthetic inputs (seed 1)", "samples": "samples"}
    return [
        (
            label,
            arrays,
            [np.asarray(y) for y in keras.tree.flatten(run_original(model, arrays, labels[label]))],
        )
        for label, arrays in input_sets
    ]


def _in_process(model_bytes):
    """A runner for `verify_proto` over a graph keras_bn made itself: onnxruntime sessions in
    this process, at both optimization levels."""
    sessions = {
        "disabled": make_session(model_bytes, False),
        "enabled": make_session(model_bytes, True),
    }

    def run(feeds, outputs, runs):
        return [sessions[level].run(outputs, feeds[i]) for i, level in runs]

    return run


def match_io(model, proto, nchw):
    """The ONNX graph's inputs `[(name, numpy dtype, shape)]` in the Keras model's input order,
    after checking that the graph's inputs and outputs are the model's, by name: an output
    missing, extra or renamed is refused (a graph of another model, or one cut short), as is an
    input of another rank. Shapes are the graph's (channels-first where `nchw`)."""
    initializers = {t.name for t in proto.graph.initializer}
    graph_inputs = {i.name: i for i in proto.graph.input if i.name not in initializers}
    model_inputs = [x.name for x in keras.tree.flatten(model.inputs)]
    graph_outputs = [o.name for o in proto.graph.output]
    for kind, ours, theirs in (
        ("inputs", model_inputs, list(graph_inputs)),
        ("outputs", output_names(model), graph_outputs),
    ):
        if sorted(ours) != sorted(theirs):
            missing = [n for n in ours if n not in theirs]
            extra = [n for n in theirs if n not in ours]
            raise KerasBNError(
                expected(
                    f"The ONNX graph's {kind} are not the model's",
                    f"{kind} named {ours} (model '{model.name}')",
                    f"{theirs}"
                    + (f"; missing {missing}" if missing else "")
                    + (f"; not in the model {extra}" if extra else ""),
                    "Verify the ONNX file against the model it was exported from.",
                )
            )
    matched = []
    for x, name in zip(keras.tree.flatten(model.inputs), model_inputs):
        tensor_type = graph_inputs[name].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if len(dims) != len(x.shape):
            raise KerasBNError(
                expected(
                    f"The ONNX graph's input '{name}' has another rank than the model's",
                    f"rank {len(x.shape)} (shape {tuple(x.shape)}"
                    + (", channels-first" if nchw else "")
                    + ")",
                    f"rank {len(dims)} (shape {tuple(dims)})",
                )
            )
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        except (KeyError, TypeError, ValueError):
            dtype = None
        if dtype is None or dtype.kind not in "fiub":
            raise KerasBNError(
                expected(
                    f"The ONNX graph's input '{name}' is not numeric",
                    "a numeric input, as the Keras model's",
                    f"ONNX element type {tensor_type.elem_type}",
                )
            )
        matched.append((name, dtype, dims))
    return matched


def verify_proto(model, proto, model_bytes, nchw, references, tolerance, runner=None):
    """A `VerifyReport` of `proto` (and its `model_bytes`) against `references`, from
    `keras_references`. onnxruntime runs each input set at its batch size and, for the synthetic
    one, on its first sample alone at batch 1 (the dynamic batch dimension), at both
    optimization levels, through `runner` (`_in_process` by default; `verify` runs a file from
    outside in a bounded process of its own). Outputs are fetched by name, and each is judged
    against its own scale."""
    report = VerifyReport(atol=tolerance.atol, rtol=tolerance.rtol)
    inputs = match_io(model, proto, nchw)
    names = [name for name, _, _ in inputs]
    names_out = output_names(model)
    feeds, runs, labels = [], [], []
    for label, arrays, reference in references:
        batches = [(False, slice(None))]
        if label == "synthetic" and not fixed_batch(model):
            batches.insert(0, (True, slice(0, 1)))
        for first_only, rows in batches:
            feed = feed_dict(names, [a[rows] for a in arrays], nchw)
            # A graph taking float16 or float64 gets the same values in its own dtype.
            feeds.append({name: feed[name].astype(dtype, copy=False) for name, dtype, _ in inputs})
            for level in ("disabled", "enabled"):
                runs.append((len(feeds) - 1, level))
                labels.append((label, arrays, reference, first_only, rows, level))
    results = (runner or _in_process(model_bytes))(feeds, names_out, runs)
    for (label, arrays, reference, first_only, rows, level), outputs in zip(labels, results):
        for name, ref, out in zip(names_out, reference, outputs, strict=True):
            result = compare(ref[rows], out)
            report.rows.append(
                VerifyRow(
                    output=name,
                    input_set=label,
                    batch=1 if first_only else len(arrays[0]),
                    first_sample_only=first_only,
                    optimization=level,
                    max_abs_error=result.max_abs,
                    max_rel_error=result.max_rel,
                    passed=tolerance.accepts(result.max_abs, result.scale),
                )
            )
    return report


def first_divergence(model, exported, arrays, optimized, opset, nchw, tolerance):
    """After a failed verification: says where the outputs first leave the original model's, or
    None. The fold first (folded Keras vs original Keras), then the conversion layer by layer: the
    folded model with every layer's output made a model output is converted the same way and
    compared in topological order."""
    if exported is not model:
        for name, ref, out in zip(
            output_names(model), keras_outputs(model, arrays), keras_outputs(exported, arrays)
        ):
            result = compare(ref, out)
            if not tolerance.accepts(result.max_abs, result.scale):
                return (
                    f"Folding already changes output '{name}' (max abs error "
                    f"{result.max_abs:.3g}); see the fold report, or export with fold=False."
                )
    graph = internals.graph_model(exported)
    if graph is None or not internals.is_functional(graph):
        return None
    nodes = _graph.Graph(graph)
    layers, outputs = [], []
    for node in nodes.nodes:
        op = node.operation
        if nodes.calls[id(op)] == 1 and len(node.output_tensors) == 1:
            layers.append(op)
            outputs.append(node.output_tensors[0])
    probe = keras.Model(internals.inputs_struct(graph), outputs)
    proto = convert.convert(probe, opset, nchw)
    session = make_session(proto.SerializeToString(), optimized)
    names = [i.name for i in session.get_inputs()]
    got = dict(
        zip(
            [o.name for o in session.get_outputs()],
            session.run(None, feed_dict(names, arrays, nchw)),
        )
    )
    worst = None
    for layer, name, ref in zip(layers, output_names(probe), keras_outputs(probe, arrays)):
        if name not in got:
            continue
        result = compare(ref, got[name])
        if not tolerance.accepts(result.max_abs, result.scale):
            return (
                f"The first layer whose output differs is '{layer.name}' "
                f"({type(layer).__name__}): max abs error {result.max_abs:.3g}."
            )
        if worst is None or result.max_rel > worst[1]:
            worst = (layer, result.max_rel)
    if worst is not None:
        return (
            f"No single layer output is off by more than the tolerance: the error adds up; "
            f"the largest relative error is at '{worst[0].name}' ({worst[1]:.3g})."
        )
    return None


def verify(
    model: keras.Model,
    onnx_path,
    *,
    samples=None,
    atol: float | None = None,
    rtol: float | None = None,
    input_shapes=None,
    limits=None,
) -> VerifyReport:
    """Compares a Keras model with an ONNX file in onnxruntime, output by output.

    Both run (Keras in inference mode; onnxruntime with graph optimizations disabled and
    enabled) on deterministic synthetic inputs (batch 4, and its first sample as batch 1) and on
    `samples`. The ONNX file is untrusted input (`keras_bn.export.onnx_file`): it is checked
    before it is read further, its inputs and outputs must be the model's by name, and
    onnxruntime runs it in a process of its own within `limits`.

    Args:
        model: The Keras model the file should reproduce.
        onnx_path: The `.onnx` file.
        samples: Real inputs, as in `to_onnx`.
        atol: Absolute part of the tolerance `atol + rtol * max|that Keras output|`; None takes
            the default of the model's compute dtype (`keras_bn.verification.TOLERANCES`).
        rtol: Relative part of that tolerance; None likewise.
        input_shapes: The shape of the synthetic inputs, as in `to_onnx`.
        limits: An `onnx_file.OnnxLimits` (memory and time for onnxruntime); None: the defaults.

    Returns:
        A `VerifyReport`; `report.passed` says whether every output is within tolerance.

    Raises:
        KerasBNError: The file is not an ONNX graph this model's inputs and outputs fit, or it
            exceeds `limits`.

    Example:
        ```python
        report = export.verify(model, "model.onnx", samples=x_test)
        assert report.passed, report
        ```
    """
    from . import onnx_file

    limits = limits or onnx_file.DEFAULT_LIMITS
    tolerance = tolerance_for(model, rtol, atol)
    input_sets = build_input_sets(model, samples, input_shapes)
    proto = onnx_file.load(onnx_path, limits)
    nchw = any(p.key == NCHW_KEY and p.value == "1" for p in proto.metadata_props)
    match_io(model, proto, nchw)  # before the Keras runs: a graph of another model stops here
    references = keras_references(model, input_sets)
    model_bytes = proto.SerializeToString()

    def bounded(feeds, outputs, runs):
        return onnx_file.run(model_bytes, feeds, outputs, runs, limits)

    return verify_proto(model, proto, model_bytes, nchw, references, tolerance, runner=bounded)
