"""Keras model -> ONNX proto, through tf2onnx: the convolution lowering, the trace, tf2onnx's
error-handling switch, the opset range, and the check that onnxruntime can run what came out.

Conversion speed: tf2onnx deep-copies the whole graph before each of its optimizers, in every
optimization round, so that an optimizer that raises can be skipped ("catch errors"). On a large
model those copies are a large share of the conversion's time and peak memory
(benchmarks/bench_export.py).
`convert` converts with them off (tf2onnx's own TF2ONNX_CATCH_ERRORS switch) and, if one of
tf2onnx's optimizers raises, converts again with them on: when no optimizer fails the graph is
the same either way, and the exported graph is verified against Keras in both cases.

Convolutions: Keras runs grouped ones on CPU through a nested `tf.function(jit_compile=True)`,
which tf2onnx leaves as a `StatefulPartitionedCall` that onnxruntime rejects; `tf.nn.convolution`
wraps dilated ones in SpaceToBatch/BatchToSpace; a Conv1D's bias lands after its Squeeze. The
trace lowers all of them to the plain Conv2D/Conv3D op (which takes `dilations` and infers
groups from the kernel shape), which tf2onnx turns into one ONNX `Conv` with `group`,
`dilations` and the bias inside.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import threading
import traceback
import warnings

import keras
import numpy as np
import onnx
import tensorflow as tf
import tf2onnx

import keras_bn
from keras_bn import _graph
from keras_bn import _keras_internals as internals
from keras_bn.errors import KerasBNError, expected
from keras_bn.verification import output_names, run_inference

NCHW_KEY = "keras_bn.nchw_inputs"  # metadata: the graph takes channels-first inputs


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
    convolutions `_needs_lowering` names lowered where there are any (`_graph.run_inference`)."""
    if not any(_needs_lowering(layer) for layer in internals.all_layers(model)):
        return lambda inputs: run_inference(model, inputs)
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

    def replace(op):
        return _lower_conv(op) if _needs_lowering(op) else None

    return lambda inputs: _graph.run_inference(model, inputs, replace)


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


def convert(model, opset, nchw_inputs, tf2onnx_default=False):
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


def layer_of(node_name, layer_names):
    """The Keras layer a tf2onnx node comes from: the deepest part of its TF name scope that is a
    layer name, once TF's uniquifying suffix (`_1`) is taken off ('model_1/grouped_1/Op' ->
    'grouped'). None when no part is."""
    for part in reversed(node_name.split("/")[:-1]):
        for name in (part, re.sub(r"_\d+$", "", part)):
            if name in layer_names:
                return name
    return None


def check_graph(proto, layer_names=()):
    """Refuses nodes onnxruntime cannot run (naming the Keras layer they come from), then runs
    onnx.checker.check_model(full_check=True)."""
    unconverted = [
        n
        for n in proto.graph.node
        if n.domain not in ("", "ai.onnx") or not onnx.defs.has(n.op_type)
    ]
    if unconverted:
        node = unconverted[0]
        layer = layer_of(node.name, set(layer_names))
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
