"""ONNX export through tf2onnx, checked with onnx.checker and verified against onnxruntime.

`to_onnx` folds BatchNorms (keras_bn.fold_bn), traces the model as a `tf.function` with a
dynamic batch dimension (tf2onnx.convert.from_keras fails on Keras 3 models; from_function
works), checks the graph, runs it in onnxruntime with graph optimizations disabled and enabled,
and only then writes the file, atomically.

Conversion speed: tf2onnx deep-copies the whole graph before each of its optimizers, in every
optimization round, so that an optimizer that raises can be skipped ("catch errors"). For ResNet50
those copies were a quarter to a half of the conversion time here and about 2.7 GB of peak
memory. `to_onnx` converts with them off (tf2onnx's own TF2ONNX_CATCH_ERRORS switch) and, if one
of tf2onnx's optimizers raises, converts again with them on: when no optimizer fails the graph is
the same either way, and the exported graph is verified against Keras in both cases.

Convolutions: Keras runs grouped ones on CPU through a nested `tf.function(jit_compile=True)`,
which tf2onnx leaves as a `StatefulPartitionedCall` that onnxruntime rejects; `tf.nn.convolution`
wraps dilated ones in SpaceToBatch/BatchToSpace; a Conv1D's bias lands after its Squeeze. The
export trace lowers all of them to the plain Conv2D/Conv3D op (which takes `dilations` and infers
groups from the kernel shape), which tf2onnx turns into one ONNX `Conv` with `group`, `dilations`
and the bias inside.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import threading
import time
import traceback
import warnings

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx

import keras_bn
from keras_bn import _keras_internals as internals
from keras_bn.errors import KerasBNError, VerificationError, expected
from keras_bn.verification import (
    check_samples,
    compare,
    compute_dtype,
    fixed_batch,
    in_background,
    input_shapes,
    output_names,
    run_inference,
    run_original,
    synthetic_inputs,
    tolerance_for,
)

from .files import atomic_output, check_output_path

NCHW_KEY = "keras_bn.nchw_inputs"


# ------------------------------------------------------------------------------------------------
# Reports


@dataclasses.dataclass
class VerifyRow:
    """One output of one input set at one onnxruntime optimization level."""

    output: str
    input_set: str  # "synthetic" or "samples"
    batch: int
    first_sample_only: bool  # the dynamic-batch check: the set's first sample at batch 1
    optimization: str  # "disabled" or "enabled"
    max_abs_error: float
    max_rel_error: float
    passed: bool

    @property
    def inputs(self) -> str:
        return f"{self.input_set}, batch {self.batch}"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "inputs": self.inputs}


@dataclasses.dataclass
class VerifyReport:
    """Keras (inference mode) vs onnxruntime, per output, input set and optimization level."""

    rows: list[VerifyRow] = dataclasses.field(default_factory=list)
    atol: float | None = None
    rtol: float | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def max_abs_error(self) -> float:
        return max((r.max_abs_error for r in self.rows), default=0.0)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "atol": self.atol,
            "rtol": self.rtol,
            "max_abs_error": self.max_abs_error,
            "rows": [r.to_dict() for r in self.rows],
        }

    def __str__(self):
        lines = [
            f"{'output':<20} {'inputs':<26} {'ort optimizations':<18} {'max abs err':>12} "
            f"{'max rel err':>12}  ok"
        ]
        for r in self.rows:
            lines.append(
                f"{r.output:<20} {r.inputs:<26} {r.optimization:<18} "
                f"{r.max_abs_error:>12.3g} {r.max_rel_error:>12.3g}  "
                f"{'yes' if r.passed else 'NO'}"
            )
        lines.append(
            f"verification {'passed' if self.passed else 'FAILED'} "
            f"(atol={self.atol:g}, rtol={self.rtol:g} x max|that keras output|)"
        )
        return "\n".join(lines)


@dataclasses.dataclass
class QuantizationReport:
    """A float16 or int8 export: judged by agreement with the float32 Keras model per output
    (`keras_bn.verification.agreement`), on the samples, else the calibration data, else
    synthetic inputs."""

    precision: str
    input_set: str
    min_agreement: float
    min_cosine: float
    agreement: dict  # output name -> keras_bn.verification.Agreement
    float32_bytes: int
    bytes: int
    qdq_ops: dict[str, int]
    quantized_ops: dict[str, int]
    float_ops: dict[str, int]
    latency_ms: dict  # {"float32" | precision: {batch: median ms}}
    # int8: what onnxruntime runs after fusing Q/DQ (quantize.runtime_split): its integer kernels,
    # and the ops it runs in float on dequantized tensors. Empty for float16.
    runtime_int8_ops: dict[str, int] = dataclasses.field(default_factory=dict)
    runtime_float_ops: dict[str, int] = dataclasses.field(default_factory=dict)
    kept_float: list = dataclasses.field(default_factory=list)  # the keep_float layers
    # int8: 7-bit weights (onnxruntime's reduce_range), and why (this CPU, or the caller's word)
    reduce_range: bool = False
    reduce_range_reason: str = ""
    # float16: the float32 graph's tensors checked against float16's range before converting
    # (quantize.float16_range): how many, on how many inputs. onnxruntime's CPU provider runs
    # many float16 ops in float32, so agreement there cannot show an overflow.
    float16_range: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            **{k: v for k, v in dataclasses.asdict(self).items() if k != "agreement"},
            "agreement": {k: v.to_dict() for k, v in self.agreement.items()},
        }

    def __str__(self):
        size = f"{self.bytes / 1024:.1f} KiB (float32 {self.float32_bytes / 1024:.1f} KiB)"
        lines = [
            f"{self.precision}: {size}; ops quantized {sum(self.quantized_ops.values())}, float "
            f"{sum(self.float_ops.values())}, Q/DQ {sum(self.qdq_ops.values())}"
            if self.precision == "int8"
            else f"{self.precision}: {size}"
        ]
        if self.precision == "int8":
            left = ", ".join(f"{op} {n}" for op, n in sorted(self.runtime_float_ops.items()))
            lines.append(
                f"  onnxruntime runs {sum(self.runtime_int8_ops.values())} int8 kernels and "
                f"{sum(self.runtime_float_ops.values())} float ops on dequantized tensors"
                + (f" ({left})" if left else "")
                + (f"; kept float32: {', '.join(self.kept_float)}" if self.kept_float else "")
            )
            bits = "7-bit (reduce_range)" if self.reduce_range else "8-bit"
            lines.append(f"  weights {bits}: {self.reduce_range_reason}")
        if self.float16_range:
            r = self.float16_range
            lines.append(
                f"  range: {r['checked_tensors']} float32 tensors within float16's "
                f"+-{r['limit']:g} on {r['check_inputs']} inputs"
                + (f"; kept float32: {', '.join(self.kept_float)}" if self.kept_float else "")
            )
        for name, a in self.agreement.items():
            top1 = "-" if a.top1 is None else f"{a.top1:.4f}"
            accuracy = (
                ""
                if a.accuracy is None
                else f", accuracy {a.reference_accuracy:.4f} -> {a.accuracy:.4f}"
            )
            lines.append(
                f"  '{name}' on {self.input_set}: top-1 agreement {top1}, cosine {a.cosine:.6f}, "
                f"mean/max error {a.mean_abs_rel:.2e}/{a.max_abs_rel:.2e} of scale{accuracy}"
            )
        for batch in sorted(self.latency_ms.get("float32", {})):
            ms = {k: v[batch] for k, v in self.latency_ms.items()}
            lines.append(
                f"  onnxruntime latency, batch {batch}: float32 {ms['float32']:.3f} ms, "
                f"{self.precision} {ms[self.precision]:.3f} ms "
                f"({ms[self.precision] / ms['float32']:.2f}x)"
            )
        return "\n".join(lines)


@dataclasses.dataclass
class ExportReport:
    path: str
    op_counts: dict[str, int]
    fold: keras_bn.FoldReport | None
    verification: VerifyReport
    timings: dict[str, float]
    opset: int
    quantization: QuantizationReport | None = None  # precision="float16" or "int8"

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "opset": self.opset,
            "op_counts": self.op_counts,
            "batchnorms_folded": len(self.fold.folded) if self.fold else 0,
            "fold": self.fold.to_dict() if self.fold else None,
            "verification": self.verification.to_dict(),
            "timings_s": self.timings,
            "quantization": self.quantization.to_dict() if self.quantization else None,
        }

    def __str__(self):
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items()))
        lines = [f"wrote {self.path} (opset {self.opset})", f"ONNX ops: {ops}"]
        if self.fold is not None:
            c = self.fold.counts
            lines.append(
                f"BatchNorms: {c['batchnorms']} in the model, {len(self.fold.folded)} folded, "
                f"{c['replaced by affine']} replaced by affine, {c['left unfolded']} kept"
            )
        lines.append(str(self.verification))
        if self.quantization is not None:
            lines.append(str(self.quantization))
        lines.append("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Tracing


def _lower_conv(layer):
    """A callable equivalent to a Conv1D/2D/3D, made of the one TF op tf2onnx turns into one
    ONNX `Conv`: `tf.nn.conv2d`/`conv3d`, which take `dilations` and infer `groups` from the
    kernel shape. Conv1D is viewed as a 2-D conv of height 1 and its bias added before the view
    is undone, so that tf2onnx puts the bias inside the `Conv`."""
    rank = layer.rank
    channels_last = layer.data_format == "channels_last"
    spatial = max(rank, 2)

    def full(values):  # per-spatial values -> the op's per-axis list
        values = [1] * (spatial - rank) + list(values)
        return [1, *values, 1] if channels_last else [1, 1, *values]

    def call(x, *args, **kwargs):
        kernel = tf.convert_to_tensor(layer.kernel)
        padding = layer.padding.upper()
        if layer.padding == "causal":
            pad = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            x = tf.pad(
                x, [[0, 0], [pad, 0], [0, 0]] if channels_last else [[0, 0], [0, 0], [pad, 0]]
            )
            padding = "VALID"
        if padding == "SAME" and any(d > 1 for d in layer.dilation_rate):
            # onnxruntime's Conv refuses dilations with auto_pad SAME: explicit pads instead, as
            # TF's SAME places them (the smaller half first). Keras allows dilation only with
            # stride 1, where they do not depend on the input's length.
            totals = [d * (k - 1) for d, k in zip(layer.dilation_rate, layer.kernel_size)]
            pads = [[0, 0]] * (spatial - rank) + [[t // 2, t - t // 2] for t in totals]
            padding = [[0, 0], *pads, [0, 0]] if channels_last else [[0, 0], [0, 0], *pads]
        if rank == 1:  # TF's kernels are 2-D/3-D: view 1-D as height 1
            x = tf.expand_dims(x, 1 if channels_last else 2)
            kernel = tf.expand_dims(kernel, 0)
        if spatial == 2:
            op, data_format = tf.nn.conv2d, "NHWC" if channels_last else "NCHW"
        else:
            op, data_format = tf.nn.conv3d, "NDHWC" if channels_last else "NCDHW"
        y = op(
            x,
            kernel,
            strides=full(layer.strides),
            padding=padding,
            data_format=data_format,
            dilations=full(layer.dilation_rate),
        )
        if layer.use_bias:
            y = tf.nn.bias_add(y, layer.bias, data_format="N...C" if channels_last else "NC...")
        if rank == 1:
            y = tf.squeeze(y, 1 if channels_last else 2)
        return layer.activation(y)

    return call


def _needs_lowering(layer):
    """Convolutions that Keras's TF backend traces into something else than one conv op: grouped
    ones (a nested jit-compiled function onnxruntime rejects), dilated ones (`tf.nn.convolution`
    wraps them in SpaceToBatch/BatchToSpace, about 45 ONNX nodes each), and every Conv1D (its bias
    would be an Add after the Squeeze, outside the ONNX Conv). Not a subclass that overrides
    call(): that computes something else."""
    kind, _ = keras_bn.fold.layer_kind(layer)  # "conv": Conv1D/2D/3D, not transposed
    if kind != "conv":
        return False
    return layer.rank == 1 or layer.groups > 1 or any(d > 1 for d in layer.dilation_rate)


def _inference_fn(model):
    """A function of the model inputs (a list) computing the model in inference mode, with the
    convolutions `_needs_lowering` names lowered where there are any."""
    if not any(_needs_lowering(layer) for layer in internals.all_layers(model)):
        return lambda inputs: run_inference(model, inputs)

    def operation_fn(op):
        if _needs_lowering(op):
            return _lower_conv(op)
        if isinstance(op, keras.Model) and internals.graph_model(op) is not None:
            inner = internals.graph_model(op)
            return lambda *args, **kwargs: internals.run_through_graph(inner, args[0], operation_fn)
        if isinstance(op, keras.layers.Layer) and internals.call_has_training_arg(op):
            return lambda *args, **kwargs: op(*args, **{**kwargs, "training": False})
        return op

    graph = internals.graph_model(model)
    if graph is None or not internals.is_functional(graph):
        grouped = [
            layer for layer in internals.all_layers(model) if getattr(layer, "groups", 1) > 1
        ]
        if not grouped:  # dilated and 1-D convs export as they are, only with more nodes
            return lambda inputs: run_inference(model, inputs)
        raise KerasBNError(
            expected(
                "Grouped convolutions are exported from graph models",
                "a Functional or Sequential model",
                type(model).__name__,
            )
        )
    return lambda inputs: internals.run_through_graph(
        graph, keras.tree.pack_sequence_as(internals.inputs_struct(graph), inputs), operation_fn
    )


_CATCH_ERRORS = tf2onnx.constants.ENV_TF2ONNX_CATCH_ERRORS  # "TF2ONNX_CATCH_ERRORS"
# tf2onnx 1.17 (convert.py) reads its switch as
#     if ENV_TF2ONNX_CATCH_ERRORS in os.environ:
#         catch_errors = ENV_TF2ONNX_CATCH_ERRORS.upper() == "TRUE"
# which upper-cases the variable's NAME: whatever the value, a set variable turns the per-optimizer
# copies off, and only an unset one leaves tf2onnx's default (copies on).
_COPIES_OFF = "FALSE"
# os.environ is process-wide: two conversions on two threads must not see each other's setting.
# Re-entrant: `_run_tf2onnx` holds it for a whole conversion, `_catch_errors_variable` within it.
_environ_lock = threading.RLock()


@contextlib.contextmanager
def _catch_errors_variable(value):
    """Sets (value is a string) or unsets (value is None) TF2ONNX_CATCH_ERRORS for the block,
    under a lock, and restores what was there."""
    with _environ_lock:
        previous = os.environ.get(_CATCH_ERRORS)
        if value is None:
            os.environ.pop(_CATCH_ERRORS, None)
        else:
            os.environ[_CATCH_ERRORS] = value
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(_CATCH_ERRORS, None)
            else:
                os.environ[_CATCH_ERRORS] = previous


def _raised_in_tf2onnx_optimizer(error):
    return any(
        os.path.join("tf2onnx", "optimizer") in frame.filename
        for frame in traceback.extract_tb(error.__traceback__)
    )


def _run_tf2onnx(convert):
    """Calls `convert()` (a tf2onnx conversion) with tf2onnx's per-optimizer graph copies off. If
    one of tf2onnx's optimizers raises, warns and calls it again with the variable unset, which
    is tf2onnx's default: copies on, and an optimizer that raises is skipped. Any other error is
    raised at once, since it would come back the same. A TF2ONNX_CATCH_ERRORS the user set is left
    alone (tf2onnx then turns the copies off, whatever its value).

    The whole conversion holds the environment lock: a second conversion on another thread
    would otherwise read the first one's setting as the user's, and convert while the first
    unsets it."""
    with _environ_lock:
        if _CATCH_ERRORS in os.environ:
            return convert()
        try:
            with _catch_errors_variable(_COPIES_OFF):
                return convert()
        except Exception as error:
            if not _raised_in_tf2onnx_optimizer(error):
                raise
            warnings.warn(
                f"a tf2onnx optimizer raised {type(error).__name__}: {str(error)[:200]}; "
                "converting again with tf2onnx's optimizer error handling on (slower)",
                RuntimeWarning,
                stacklevel=3,
            )
        with _catch_errors_variable(None):
            return convert()


# onnxruntime runs opset 7 and newer; tf2onnx converts up to the newest opset it knows (tested by
# tf2onnx from 14; 7 to 13 "should work"), 15 by default.
MIN_OPSET = 7
MAX_OPSET = max(tf2onnx.constants.OPSET_TO_IR_VERSION)


def check_opset(opset) -> int | None:
    """Returns `opset` (None: tf2onnx's default) or raises KerasBNError naming the range."""
    if opset is None:
        return None
    if (
        isinstance(opset, bool)
        or not isinstance(opset, (int, np.integer))
        or not MIN_OPSET <= opset <= MAX_OPSET
    ):
        raise KerasBNError(
            expected(
                "Unsupported ONNX opset",
                f"an integer from {MIN_OPSET} (onnxruntime's oldest) to "
                f"{MAX_OPSET} (tf2onnx {tf2onnx.__version__}'s newest), or None for tf2onnx's default "
                f"{tf2onnx.constants.PREFERRED_OPSET}",
                repr(opset),
            )
        )
    return int(opset)


def _convert(model, opset, nchw_inputs, tf2onnx_default=False):
    """The ONNX proto of `model` in inference mode. `tf2onnx_default=True` converts with
    tf2onnx's own default (per-optimizer copies on) instead of `_run_tf2onnx`'s fast path."""
    inputs = keras.tree.flatten(model.inputs)
    names = [x.name for x in inputs]
    # A dynamic batch dimension, unless the model fixes it (keras.Input(batch_size=...)).
    signature = [tf.TensorSpec(x.shape, x.dtype, name=name) for x, name in zip(inputs, names)]
    names_out = output_names(model)
    forward = _inference_fn(model)

    @tf.function(input_signature=signature, autograph=False)
    def serve(*args):
        outputs = keras.tree.flatten(forward(list(args)))
        return {name: tf.identity(y) for name, y in zip(names_out, outputs)}

    def convert():
        return tf2onnx.convert.from_function(
            serve,
            input_signature=signature,
            opset=opset,
            inputs_as_nchw=names if nchw_inputs else None,
        )

    if tf2onnx_default:
        with _catch_errors_variable(None):
            proto, _ = convert()
    else:
        proto, _ = _run_tf2onnx(convert)
    # Output order as in the Keras model (tf2onnx orders dict outputs by key).
    by_name = {o.name: o for o in proto.graph.output}
    if set(by_name) == set(names_out):
        ordered = [by_name[n] for n in names_out]
        del proto.graph.output[:]
        proto.graph.output.extend(ordered)
    entry = proto.metadata_props.add()
    entry.key, entry.value = NCHW_KEY, "1" if nchw_inputs else "0"
    return proto


def _layer_of(node_name, layer_names):
    """The Keras layer a tf2onnx node comes from: the deepest part of its TF name scope that is a
    layer name, once TF's uniquifying suffix (`_1`) is taken off ('model_1/grouped_1/Op' ->
    'grouped'). None when no part is."""
    for part in reversed(node_name.split("/")[:-1]):
        for name in (part, re.sub(r"_\d+$", "", part)):
            if name in layer_names:
                return name
    return None


def _check_graph(proto, layer_names=()):
    """Refuses nodes onnxruntime cannot run (naming the Keras layer they come from), then runs
    onnx.checker.check_model(full_check=True)."""
    unconverted = [
        n
        for n in proto.graph.node
        if n.domain not in ("", "ai.onnx") or not onnx.defs.has(n.op_type)
    ]
    if unconverted:
        node = unconverted[0]
        layer = _layer_of(node.name, set(layer_names))
        source = f"layer '{layer}'" if layer else f"node '{node.name}'"
        raise KerasBNError(
            expected(
                f"tf2onnx left a {node.op_type} node from {source} that onnxruntime cannot run",
                "only standard ONNX ops",
                f"{len(unconverted)} such node(s) ({', '.join(sorted({n.op_type for n in unconverted}))}); "
                f"the first is '{node.name}'",
                "Nothing was written. Report the layer type: keras-bn lowers grouped convolutions, "
                "not this.",
            )
        )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as error:
        raise KerasBNError(
            expected(
                "tf2onnx produced an invalid ONNX graph",
                "a graph that passes onnx.checker.check_model(full_check=True)",
                str(error).splitlines()[0][:300],
            )
        ) from error


def op_counts(proto):
    return dict(collections.Counter(n.op_type for n in proto.graph.node))


# ------------------------------------------------------------------------------------------------
# Verification


def _session(model_bytes, optimized):
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _feed(names, arrays, nchw):
    return {
        name: np.moveaxis(a, -1, 1) if nchw and a.ndim > 2 else a for name, a in zip(names, arrays)
    }


def _input_sets(model, samples, shapes=None):
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


def _keras_outputs(model, arrays):
    return [np.asarray(y) for y in keras.tree.flatten(run_inference(model, arrays, as_numpy=True))]


def _references(model, input_sets):
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
    """A runner for `_verify_proto` over a graph keras_bn made itself: onnxruntime sessions in
    this process, at both optimization levels."""
    sessions = {"disabled": _session(model_bytes, False), "enabled": _session(model_bytes, True)}

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


def _verify_proto(model, proto, model_bytes, nchw, references, tolerance, runner=None):
    """`proto` and its `model_bytes`; `references` from `_references`. onnxruntime runs each input set at its batch size and,
    for the synthetic one, on its first sample alone at batch 1 (the dynamic batch dimension),
    at both optimization levels, through `runner` (`_in_process` by default; `verify` runs a
    file from outside in a bounded process of its own). Outputs are fetched by name, and each
    is judged against its own scale."""
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
            feed = _feed(names, [a[rows] for a in arrays], nchw)
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


def _first_divergence(model, exported, arrays, optimized, opset, nchw, tolerance):
    """After a failed verification: says where the outputs first leave the original model's, or
    None. The fold first (folded Keras vs original Keras), then the conversion layer by layer: the
    folded model with every layer's output made a model output is converted the same way and
    compared in topological order."""
    from keras_bn.fold import _Graph

    if exported is not model:
        for name, ref, out in zip(
            output_names(model), _keras_outputs(model, arrays), _keras_outputs(exported, arrays)
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
    nodes = _Graph(graph)
    layers, outputs = [], []
    for node in nodes.nodes:
        op = node.operation
        if nodes.calls[id(op)] == 1 and len(node.output_tensors) == 1:
            layers.append(op)
            outputs.append(node.output_tensors[0])
    probe = keras.Model(internals.inputs_struct(graph), outputs)
    proto = _convert(probe, opset, nchw)
    session = _session(proto.SerializeToString(), optimized)
    names = [i.name for i in session.get_inputs()]
    got = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, _feed(names, arrays, nchw)))
    )
    worst = None
    for layer, name, ref in zip(layers, output_names(probe), _keras_outputs(probe, arrays)):
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
    """Runs `model` (inference mode) and onnxruntime, with graph optimizations disabled and
    enabled, on deterministic synthetic inputs (batch 4, and its first sample as batch 1) and on
    `samples`. Returns a `VerifyReport`; `report.passed` says whether every output is within
    `atol + rtol * max|that keras output|` (None: the defaults of the model's compute dtype,
    `keras_bn.verification.TOLERANCES`). `input_shapes` as in `to_onnx`.

    The ONNX file is untrusted input (`keras_bn.export.onnx_file`): it is checked before it is
    read further, its inputs and outputs must be the model's by name, and onnxruntime runs it in
    a process of its own within `limits` (an `onnx_file.OnnxLimits`; None: the defaults)."""
    from . import onnx_file

    limits = limits or onnx_file.DEFAULT_LIMITS
    tolerance = tolerance_for(model, rtol, atol)
    input_sets = _input_sets(model, samples, input_shapes)
    proto = onnx_file.load(onnx_path, limits)
    nchw = any(p.key == NCHW_KEY and p.value == "1" for p in proto.metadata_props)
    match_io(model, proto, nchw)  # before the Keras runs: a graph of another model stops here
    references = _references(model, input_sets)
    model_bytes = proto.SerializeToString()

    def bounded(feeds, outputs, runs):
        return onnx_file.run(model_bytes, feeds, outputs, runs, limits)

    return _verify_proto(model, proto, model_bytes, nchw, references, tolerance, runner=bounded)


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
    progress=None,
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
) -> ExportReport:
    """Exports `model` to ONNX at `path` and returns an `ExportReport`.

    Folds BatchNorms first (unless `fold=False`), converts with tf2onnx (dynamic batch
    dimension, the Keras input and output names kept; `nchw_inputs=True` makes rank >= 3 inputs
    channels-first), checks the graph with `onnx.checker.check_model(full_check=True)`, verifies it
    against the Keras model in onnxruntime, and only then writes `path` atomically. Raises
    `KerasBNError` and writes nothing when any step fails. `samples` is checked against
    `model.inputs` before any work. The synthetic inputs take the shape `input_shapes` gives
    (one shape per input without the batch axis, as in `keras_bn.fold_bn`), else the samples',
    else the model's, with open dimensions set to a length the model accepts. `atol`/`rtol` None take the defaults of the model's compute
    dtype (`keras_bn.verification.TOLERANCES`). `progress`, if given, is called with the name of
    each step as it starts ("folding", "converting with tf2onnx", "checking the graph",
    "verifying with onnxruntime", "writing"). `on_bad_statistics="raise"` refuses a model with
    unusable BatchNorm statistics, folded or not (see `keras_bn.fold_bn`).

    `precision="float16"` or `"int8"` writes a reduced-precision graph made from the verified
    float32 one (`keras_bn.export.quantize`): float16 with onnxruntime's own converter, int8 by
    static QDQ quantization (per-channel symmetric int8 weights) calibrated on `calibration`
    (required; the same forms as `samples`) with `calibrate_method` "minmax" (default),
    "entropy" or "percentile". It is accepted by agreement with the float32 Keras model, per
    output, on `samples`, else the calibration data, else synthetic inputs: top-1 agreement
    >= `min_agreement` for classification-shaped outputs and cosine similarity >= `min_cosine`
    (defaults in `keras_bn.verification.AGREEMENT`); `labels` adds the accuracy of both. Below
    either bound `VerificationError` names the output and the value, and nothing is written.
    `keep_float` (int8 only) names layers whose ops stay float32 (onnxruntime's
    `nodes_to_exclude`), for a layer that int8 makes slower or less accurate, such as a first
    Conv with one input channel. `reduce_range` (int8 only) quantizes weights to 7 bits, as
    onnxruntime advises for x86-64 CPUs without VNNI, whose uint8 x int8 kernels can saturate;
    None (default) decides by the machine that quantizes and verifies (`quantize.int8_may_saturate`:
    7 bits there, 8 elsewhere), and the report says which and why. Pass True for a graph that
    will run on such a CPU, whatever this one is.
    """
    step = progress or (lambda name: None)
    if not isinstance(model, keras.Model):
        raise KerasBNError(
            expected("to_onnx exports Keras models", "a keras.Model", type(model).__name__)
        )
    path = check_output_path(path, suffix=".onnx")
    opset = check_opset(opset)
    if on_bad_statistics not in ("keep", "raise"):
        raise KerasBNError(
            expected("Invalid `on_bad_statistics`", "'keep' or 'raise'", repr(on_bad_statistics))
        )
    if on_bad_statistics == "raise":
        keras_bn.fold.refuse_bad_statistics(model)
    tolerance = tolerance_for(model, rtol, atol)
    _check_exportable(model)
    # Bad samples or shapes fail here, before any conversion.
    input_sets = _input_sets(model, samples, input_shapes)
    reduced = _check_precision(
        model, precision, calibration, calibrate_method, labels, min_agreement, min_cosine,
        keep_float, reduce_range,
    )  # fmt: skip
    timings = {}
    # Keras's reference outputs depend only on the original model: they are computed on a second
    # thread while this one folds and converts (ResNet50: 7.8 s instead of 8.6 s).
    with in_background(lambda: _references(model, input_sets)) as pending:
        start = time.perf_counter()
        fold_report = None
        exported = model
        if fold:
            step("folding")
            # No separate fold verification: the ONNX graph is checked against the original
            # model below, which covers the fold and the conversion at once.
            exported, fold_report = keras_bn.fold_bn(model, verify=False)
        timings["fold"] = time.perf_counter() - start
        if reduced is not None and reduced.precision == "float16" and fold_report is not None:
            _check_float16_weights(fold_report, reduced.keep_float)
        start = time.perf_counter()
        step("converting with tf2onnx")
        proto = _convert(exported, opset, nchw_inputs)
        timings["convert"] = time.perf_counter() - start
        step("checking the graph")
        _check_graph(proto, {layer.name for layer in internals.all_layers(exported)})
        start = time.perf_counter()
        step("verifying with onnxruntime")
        references = pending.result()
    model_bytes = proto.SerializeToString()
    verification = _verify_proto(model, proto, model_bytes, nchw_inputs, references, tolerance)
    timings["verify"] = time.perf_counter() - start
    if not verification.passed:
        worst = max((r for r in verification.rows if not r.passed), key=lambda r: r.max_abs_error)
        arrays = dict(input_sets)[worst.input_set]
        if worst.first_sample_only:
            arrays = [a[:1] for a in arrays]
        where = _first_divergence(
            model,
            exported,
            arrays,
            worst.optimization == "enabled",
            opset,
            nchw_inputs,
            tolerance,
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
    quantization = None
    if reduced is not None:
        start = time.perf_counter()
        model_bytes, quantization = _reduce_precision(
            model, model_bytes, nchw_inputs, input_sets, reduced, step
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
        op_counts=op_counts(proto),
        fold=fold_report,
        verification=verification,
        timings=timings,
        opset=opset_used,
        quantization=quantization,
    )


# ------------------------------------------------------------------------------------------------
# Reduced precision


@dataclasses.dataclass(frozen=True)
class _Reduced:
    precision: str
    calibration: list | None  # arrays per input
    calibrate_method: str
    labels: np.ndarray | None
    min_agreement: float
    min_cosine: float
    keep_float: tuple = ()  # layer names whose ops stay float32 in int8
    reduce_range: bool = False  # int8: 7-bit weights
    reduce_range_reason: str = ""


def _check_precision(
    model,
    precision,
    calibration,
    calibrate_method,
    labels,
    min_agreement,
    min_cosine,
    keep_float,
    reduce_range=None,
):
    """Checks the reduced-precision arguments before any work; None for a float32 export."""
    from . import quantize

    if precision not in quantize.PRECISIONS:
        raise KerasBNError(
            expected("Unknown `precision`", "'float32', 'float16' or 'int8'", repr(precision))
        )
    keep_float = (keep_float,) if isinstance(keep_float, str) else tuple(keep_float or ())
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
    bounds = {}
    for name, value in (("min_agreement", min_agreement), ("min_cosine", min_cosine)):
        if value is None:
            value = keras_bn.verification.AGREEMENT[precision][name]
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
            expected(
                "`keep_float` names layers of the model",
                f"some of {sorted(known)}",
                f"{unknown}",
            )
        )
    if precision != "int8":
        reduce_range, reason = False, ""
    elif reduce_range is None:
        reduce_range = quantize.int8_may_saturate()
        reason = (
            "this CPU is x86-64 without VNNI (or its flags are unreadable), where onnxruntime's "
            "uint8 x int8 kernels can saturate"
            if reduce_range
            else "this CPU does not saturate uint8 x int8 sums"
        )
    else:
        reason = f"reduce_range={reduce_range} was asked for"
    return _Reduced(
        precision, arrays, calibrate_method, labels, **bounds, keep_float=keep_float,
        reduce_range=reduce_range, reduce_range_reason=reason,
    )  # fmt: skip


def _check_float16_weights(fold_report, keep_float):
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


def _latency(sessions, names, arrays, nchw, budget_s=LATENCY_BUDGET_S):
    """{session key: {batch: median ms}} at batch 1 and 32, the sessions interleaved, within about
    `budget_s` per batch size (at most 21 runs each): a model that takes seconds a run (long
    sequences) is timed once, at batch 1 only, instead of holding the export up for minutes."""
    latency = {key: {} for key in sessions}
    for batch in (1, 32):
        feed = _feed(names, [np.resize(a, (batch, *a.shape[1:])) for a in arrays], nchw)
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


def _reduce_precision(model, model_bytes, nchw, input_sets, reduced, step):
    """(reduced graph bytes, QuantizationReport), or VerificationError below the bounds."""
    from . import quantize

    float_session = _session(model_bytes, True)  # for the input names, then the latency
    names = [i.name for i in float_session.get_inputs()]
    float16_range = {}
    if reduced.precision == "float16":
        step("checking float16's range")
        proto = onnx.load_from_string(model_bytes)
        kept = quantize.layer_nodes(proto, reduced.keep_float) if reduced.keep_float else []
        checks = [arrays for _, arrays in input_sets]
        if reduced.calibration is not None:
            checks.append(reduced.calibration)
        checked, overflows = quantize.float16_range(
            model_bytes, [_feed(names, arrays, nchw) for arrays in checks]
        )
        layer_names = {layer.name for layer in internals.all_layers(model)}
        if overflows:
            where = [
                (tensor, sorted({_layer_of(n, layer_names) or n for n in nodes}), top)
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
        float16_range = {
            "checked_tensors": checked,
            "check_inputs": sum(len(a[0]) for a in checks),
            "limit": quantize.FLOAT16_MAX,
        }
        step("converting to float16")
        reduced_bytes = quantize.to_float16(model_bytes, kept)
    else:
        step("calibrating and quantizing to int8")
        rows = len(reduced.calibration[0])
        feeds = [
            _feed(names, [a[start : start + 32] for a in reduced.calibration], nchw)
            for start in range(0, rows, 32)
        ]
        reduced_bytes = quantize.to_int8(
            model_bytes, feeds, reduced.calibrate_method, reduced.keep_float, reduced.reduce_range
        )
    proto = onnx.load_from_string(reduced_bytes)
    step(f"verifying the {reduced.precision} graph by agreement")
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
    references = _keras_outputs(model, arrays)
    session = _session(reduced_bytes, True)
    outputs = session.run(None, _feed(names, arrays, nchw))
    int8_remedies = ""
    if reduced.precision == "int8":
        int8_remedies = "keep a layer float (keep_float=), " + (
            "" if reduced.reduce_range else "try 7-bit weights (reduce_range=True), "
        )
    agreement = {}
    for name, ref, out in zip(output_names(model), references, outputs):
        result = keras_bn.verification.agreement(ref, out, labels)
        agreement[name] = result
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
    latency = _latency({"float32": float_session, reduced.precision: session}, names, arrays, nchw)
    qdq, quantized, floating = quantize.op_split(proto)
    runtime_int8, runtime_float = (
        quantize.runtime_split(reduced_bytes) if reduced.precision == "int8" else ({}, {})
    )
    report = QuantizationReport(
        precision=reduced.precision,
        input_set=label,
        min_agreement=reduced.min_agreement,
        min_cosine=reduced.min_cosine,
        agreement=agreement,
        float32_bytes=len(model_bytes),
        bytes=len(reduced_bytes),
        qdq_ops=qdq,
        quantized_ops=quantized,
        float_ops=floating,
        latency_ms=latency,
        runtime_int8_ops=runtime_int8,
        runtime_float_ops=runtime_float,
        kept_float=list(reduced.keep_float),
        reduce_range=reduced.reduce_range,
        reduce_range_reason=reduced.reduce_range_reason,
        float16_range=float16_range,
    )
    return reduced_bytes, report
