"""`fold_bn`: a graph pass that merges inference-mode BatchNorms into neighbouring layers.

For every BatchNorm of a Functional or Sequential model (nested models included) the pass reads
match -> check -> rewrite -> report:

1. backward: the producer (Dense, Conv*, DepthwiseConv*, SeparableConv*, Conv*Transpose) has a
   linear activation, is called once, feeds only this BatchNorm, is not a model output, and its
   channel axis is the BatchNorm's axis -> the BatchNorm goes into its kernel and bias.
2. forward: otherwise, the single consumer is a Dense or a Conv that sees every input value
   without padding ('valid', or 1x1 kernels) on the BatchNorm's axis -> into its kernel and bias.
3. otherwise the BatchNorm becomes a `ChannelAffine` (one multiply-add), or stays as it is with
   `replace_leftovers=False`. A BatchNorm with non-finite or non-positive statistics is never
   folded, and the report says why.

The math lives in `keras_bn.fold_math`; this module only walks graphs and moves weights.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras.src.layers.convolutional.base_conv import BaseConv
from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose
from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv
from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv
from keras.src.models.functional import Functional
from keras.src import tree
from tensorflow.python.eager import context as tf_context

from keras_bn import fold_math
from keras_bn.affine import ChannelAffine
from keras_bn.errors import KerasBNError, VerificationError, expected
from keras_bn.layer import BatchNorm

BATCHNORM_TYPES = (keras.layers.BatchNormalization, BatchNorm)

BACKWARD, FORWARD, AFFINE, KEPT = (
    "folded backward", "folded forward", "replaced by affine", "left unfolded")

DEFAULT_RTOL = 1e-5  # relative to the largest output magnitude
DEFAULT_ATOL = 1e-6


@dataclasses.dataclass
class FoldRow:
    """What happened to one BatchNorm."""

    name: str
    action: str
    into: str = None
    reason: str = None

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FoldReport:
    """One row per BatchNorm, the counts, the verification errors and any warnings."""

    rows: list = dataclasses.field(default_factory=list)
    verification: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)

    @property
    def counts(self):
        counter = collections.Counter(row.action for row in self.rows)
        return {"batchnorms": len(self.rows), **{a: counter.get(a, 0)
                                                  for a in (BACKWARD, FORWARD, AFFINE, KEPT)}}

    @property
    def folded(self):
        return [r for r in self.rows if r.action in (BACKWARD, FORWARD)]

    @property
    def not_folded(self):
        return [r for r in self.rows if r.action in (AFFINE, KEPT)]

    def to_dict(self):
        return {"counts": self.counts, "rows": [r.to_dict() for r in self.rows],
                "verification": self.verification, "warnings": list(self.warnings)}

    def __str__(self):
        width = max([len(r.name) for r in self.rows] + [9])
        lines = [f"{'BatchNorm':<{width}}  {'action':<18}  {'into':<24}  reason",
                 "-" * (width + 70)]
        for r in self.rows:
            lines.append(f"{r.name:<{width}}  {r.action:<18}  {r.into or '-':<24}  {r.reason or ''}")
        c = self.counts
        lines.append(f"{c['batchnorms']} BatchNorm(s): {c[BACKWARD]} folded backward, "
                     f"{c[FORWARD]} folded forward, {c[AFFINE]} replaced by affine, "
                     f"{c[KEPT]} left unfolded")
        for v in self.verification:
            lines.append(f"verified on {v['inputs']}: max abs error {v['max_abs_error']:.3g}, "
                         f"max rel error {v['max_rel_error']:.3g} (tolerance rtol={v['rtol']:g}, "
                         f"atol={v['atol']:g})")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Matching helpers


def _producer_kind(layer):
    for cls, kind in ((BaseSeparableConv, "separable"), (BaseDepthwiseConv, "depthwise"),
                      (BaseConvTranspose, "transpose"), (BaseConv, "conv"),
                      (keras.layers.Dense, "dense")):
        if isinstance(layer, cls):
            return kind
    return None


def _channel_axis(layer, rank):
    if isinstance(layer, keras.layers.Dense):
        return rank - 1
    return rank - 1 if layer.data_format == "channels_last" else 1


def _is_linear(layer):
    activation = getattr(layer, "activation", None)
    return activation is None or getattr(activation, "__name__", "") == "linear"


def _not_plain(layer):
    if getattr(layer, "lora_enabled", False):
        return "it has LoRA enabled"
    if getattr(layer, "quantization_mode", None):
        return f"it is quantized ({layer.quantization_mode})"
    return None


def _kernel_layout_check(layer, kind, rank, bn_axis):
    if kind is None:
        return f"{type(layer).__name__} is not a foldable layer"
    channel = _channel_axis(layer, rank)
    if channel != bn_axis:
        return (f"the BatchNorm normalizes axis {bn_axis} but {layer.name}'s channel axis is "
                f"{channel}")
    return _not_plain(layer)


class _Graph:
    """Nodes, consumers and call counts of one Functional model's graph."""

    def __init__(self, model):
        by_depth = model._nodes_by_depth
        self.nodes = [n for depth in sorted(by_depth, reverse=True) for n in by_depth[depth]
                      if n.operation is not None and not n.is_input]
        self.consumers = collections.defaultdict(list)
        for node in self.nodes:
            for tensor in node.input_tensors:
                self.consumers[id(tensor)].append(node)
        self.calls = collections.Counter(id(n.operation) for n in self.nodes)
        self.outputs = {id(t) for t in tree.flatten(model.outputs)}

    def producer(self, tensor):
        history = tensor._keras_history
        op = history.operation
        if isinstance(op, keras.layers.InputLayer):
            return None
        node = op._inbound_nodes[history.node_index]
        return node if node in self.nodes else None


# ------------------------------------------------------------------------------------------------
# The pass


def _match_backward(graph, node, rank, bn_axis):
    source = node.input_tensors[0]
    producer_node = graph.producer(source)
    if producer_node is None:
        return None, "it follows the model input"
    layer = producer_node.operation
    kind = _producer_kind(layer)
    if kind is None:
        return None, f"it follows {type(layer).__name__} '{layer.name}', which has no kernel to fold into"
    if not _is_linear(layer):
        return None, f"'{layer.name}' has a non-linear activation ({layer.activation.__name__})"
    if graph.calls[id(layer)] > 1:
        return None, f"'{layer.name}' is shared (called {graph.calls[id(layer)]} times)"
    if len(producer_node.output_tensors) != 1:
        return None, f"'{layer.name}' has several outputs"
    n_consumers = len(graph.consumers[id(source)])
    if n_consumers > 1:
        return None, f"the output of '{layer.name}' has {n_consumers} consumers"
    if id(source) in graph.outputs:
        return None, f"the output of '{layer.name}' is also a model output"
    reason = _kernel_layout_check(layer, kind, rank, bn_axis)
    if reason:
        return None, reason
    return (layer, kind), None


def _match_forward(graph, node, rank, bn_axis):
    out = node.output_tensors[0]
    consumers = graph.consumers[id(out)]
    if id(out) in graph.outputs:
        return None, "its output is a model output"
    if len(consumers) != 1:
        return None, f"its output has {len(consumers)} consumers"
    consumer_node = consumers[0]
    layer = consumer_node.operation
    kind = _producer_kind(layer)
    if kind not in ("dense", "conv", "depthwise", "separable"):
        return None, (f"the next layer '{layer.name}' is {type(layer).__name__}, not a Dense, Conv, "
                      "DepthwiseConv or SeparableConv"
                      + (" (a transposed conv spreads a constant unevenly over its output)"
                         if kind == "transpose" else ""))
    if graph.calls[id(layer)] > 1:
        return None, f"the next layer '{layer.name}' is shared"
    if len(consumer_node.input_tensors) != 1:
        return None, f"the next layer '{layer.name}' has several inputs"
    if kind != "dense" and layer.padding != "valid" and any(k != 1 for k in layer.kernel_size):
        return None, (f"the next layer '{layer.name}' pads with zeros ('{layer.padding}'): "
                      "forward folding is not exact at the borders")
    reason = _kernel_layout_check(layer, kind, rank, bn_axis)
    if reason:
        return None, reason
    return (layer, kind), None


def _bn_gamma_beta(bn):
    weights = {w.name: np.asarray(w, np.float64) for w in bn.weights}
    return (weights.get("gamma"), weights.get("beta"), weights["moving_mean"],
            weights["moving_variance"])


def _fold_functional(model, report, prefix, replace_leftovers):
    graph = _Graph(model)
    passthrough, affines = set(), {}
    edits = {}  # id(layer) -> {"layer", "weights": {name: float64}, "add_bias"}
    rename = {}
    forward_plan, backward_plan = [], []
    for node in graph.nodes:
        bn = node.operation
        if not isinstance(bn, BATCHNORM_TYPES):
            continue
        name = prefix + bn.name
        if graph.calls[id(bn)] > 1:
            report.rows.append(FoldRow(name, KEPT, reason=f"it is shared (called {graph.calls[id(bn)]} times)"))
            continue
        if node.arguments.kwargs.get("training") is True:
            report.rows.append(FoldRow(name, KEPT, reason="it is called with training=True"))
            continue
        gamma, beta, mean, var = _bn_gamma_beta(bn)
        try:
            s, t = fold_math.bn_scale_shift(mean, var, bn.epsilon, gamma, beta)
        except KerasBNError as error:
            report.rows.append(FoldRow(name, KEPT, reason=f"bad statistics: {error}"))
            continue
        rank = len(node.output_tensors[0].shape)
        bn_axis = bn.axis % rank
        match, reason_back = _match_backward(graph, node, rank, bn_axis)
        if match:
            backward_plan.append((match, s, t))
            passthrough.add(id(bn))
            note = None
            if id(node.output_tensors[0]) in graph.outputs:
                rename[id(match[0])] = bn.name  # the model output keeps its name
                note = f"'{match[0].name}' takes the name '{bn.name}' to keep the output name"
            report.rows.append(FoldRow(name, BACKWARD, into=prefix + match[0].name, reason=note))
            continue
        match, reason_fwd = _match_forward(graph, node, rank, bn_axis)
        if match:
            forward_plan.append((match, s, t))
            passthrough.add(id(bn))
            report.rows.append(FoldRow(name, FORWARD, into=prefix + match[0].name))
            continue
        reason = f"backward: {reason_back}; forward: {reason_fwd}"
        if replace_leftovers:
            affines[id(bn)] = (s, t)
            report.rows.append(FoldRow(name, AFFINE, reason=reason))
        else:
            report.rows.append(FoldRow(name, KEPT, reason=reason))

    def edit(layer):
        if id(layer) not in edits:
            edits[id(layer)] = {"layer": layer, "add_bias": not layer.use_bias, "weights": {
                w.name: np.asarray(w, np.float64) for w in layer.weights}}
        return edits[id(layer)]["weights"]

    # Input side first, then output side: f(x) = s_out * (W (s_in x + t_in) + b) + t_out.
    for (layer, kind), s, t in forward_plan:
        w = edit(layer)
        if kind == "separable":
            w["depthwise_kernel"], w["bias"] = fold_math.fold_forward_separable(
                w["depthwise_kernel"], w["pointwise_kernel"], w.get("bias"), s, t)
        elif kind == "depthwise":
            w["kernel"], w["bias"] = fold_math.fold_forward_depthwise(w["kernel"], w.get("bias"), s, t)
        else:
            w["kernel"], w["bias"] = fold_math.fold_forward(
                w["kernel"], w.get("bias"), s, t, groups=getattr(layer, "groups", 1))
    for (layer, kind), s, t in backward_plan:
        w = edit(layer)
        if kind == "separable":
            w["pointwise_kernel"], w["bias"] = fold_math.fold_backward(
                w["pointwise_kernel"], w.get("bias"), s, t)
        elif kind == "depthwise":
            w["kernel"], w["bias"] = fold_math.fold_backward_depthwise(w["kernel"], w.get("bias"), s, t)
        else:
            w["kernel"], w["bias"] = fold_math.fold_backward(
                w["kernel"], w.get("bias"), s, t, out_axis=-2 if kind == "transpose" else -1)

    clones = {}

    def operation_fn(op):
        if id(op) in clones:
            return clones[id(op)]
        if id(op) in passthrough:
            new = _passthrough
        elif id(op) in affines:
            new = ChannelAffine(axis=op.axis, name=op.name, dtype=op.dtype_policy)
        elif isinstance(op, keras.Model):
            new = _fold_model(op, report, prefix + op.name + "/", replace_leftovers)
        elif isinstance(op, keras.layers.Layer):
            config = op.get_config()
            if id(op) in edits:
                config["use_bias"] = True
            if id(op) in rename:
                config["name"] = rename[id(op)]
            new = type(op).from_config(config)
        else:
            new = op
        clones[id(op)] = new
        return new

    inputs = [keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x.name)
              for x in tree.flatten(model.inputs)]
    outputs = model._run_through_graph(inputs, operation_fn=operation_fn)
    folded = keras.Model(tree.pack_sequence_as(model._inputs_struct, inputs), outputs,
                         name=model.name)

    # Weights: copies for untouched layers, folded values for edited ones.
    for node in graph.nodes:
        op = node.operation
        new = clones.get(id(op))
        if new is None or new is _passthrough or isinstance(op, keras.Model) or new is op:
            continue
        if id(op) in affines:
            s, t = affines[id(op)]
            values = {"scale": s, "offset": t}
        elif id(op) in edits:
            values = edits[id(op)]["weights"]
        else:
            new.set_weights(op.get_weights())
            continue
        for variable in new.weights:
            value, warning = fold_math.cast_checked(
                np.asarray(values[variable.name]), variable.dtype, f"{prefix}{new.name}/{variable.name}")
            if warning:
                report.warnings.append(warning)
            variable.assign(value)
    return folded


def _passthrough(x, *args, **kwargs):
    return x


def _fold_model(model, report, prefix, replace_leftovers):
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise KerasBNError(expected("The Sequential model must be built", "a model with a "
                                        "known input shape", f"unbuilt model '{model.name}'",
                                        "Call it on data or give it a keras.Input first."))
        folded = _fold_functional(functional, report, prefix, replace_leftovers)
        folded.name = model.name
        return folded
    if isinstance(model, Functional):
        return _fold_functional(model, report, prefix, replace_leftovers)
    raise KerasBNError(expected("fold_bn needs a graph it can read", "a Sequential or Functional "
                                "keras.Model", f"{type(model).__name__} (a subclassed model)",
                                "Rebuild the model with the Functional API."))


def synthetic_inputs(model, batch_size=4, seed=0):
    """Deterministic inputs for a model: N(0, 1) floats, None dimensions set to 16."""
    rng = np.random.default_rng(seed)
    arrays = []
    for x in tree.flatten(model.inputs):
        shape = [batch_size] + [16 if d is None else d for d in x.shape[1:]]
        if "int" in str(x.dtype):
            arrays.append(np.zeros(shape, x.dtype))
        else:
            arrays.append(rng.standard_normal(shape).astype(x.dtype))
    return arrays


def _as_input_list(model, samples):
    if isinstance(samples, dict):
        return [np.asarray(samples[x.name]) for x in tree.flatten(model.inputs)]
    if isinstance(samples, (list, tuple)):
        return [np.asarray(s) for s in samples]
    return [np.asarray(samples)]


def compare_outputs(reference, candidate):
    """(max abs error, max abs error / scale, scale) over all outputs, where scale is the
    largest finite |reference| value."""
    reference = [np.asarray(r, np.float64) for r in tree.flatten(reference)]
    candidate = [np.asarray(c, np.float64) for c in tree.flatten(candidate)]
    def error(r, c):
        # NaN where the reference is NaN too (corrupt statistics) and equal infinities agree.
        with np.errstate(invalid="ignore"):
            diff = np.where((r == c) | (np.isnan(r) & np.isnan(c)), 0.0, np.abs(r - c))
        return float(np.max(diff)) if diff.size else 0.0

    max_abs = max(error(r, c) for r, c in zip(reference, candidate))
    finite = [np.abs(r[np.isfinite(r)]) for r in reference]
    scale = max(float(np.max(f)) if f.size else 0.0 for f in finite)
    return max_abs, max_abs / scale if scale > 0 else max_abs, scale


def within_tolerance(max_abs, scale, atol, rtol):
    """The one acceptance rule of fold and export verification: max_abs <= atol + rtol * scale."""
    return bool(np.isfinite(max_abs) and max_abs <= atol + rtol * scale)


def run_inference(model, inputs):
    """`model` in inference mode on `inputs`, a list of arrays (one per model input)."""
    return model(inputs[0] if len(inputs) == 1 else inputs, training=False)


@contextlib.contextmanager
def in_background(fn):
    """Starts `fn` on a second thread, under the caller's TF device scope, and yields its future;
    leaving the block waits for it. For Keras reference outputs computed while the calling
    thread folds or converts (TF runs its kernels without the GIL)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="keras-bn-reference") as pool:
        yield pool.submit(on_callers_device(fn))


def on_callers_device(fn):
    """`fn` wrapped to run under the calling thread's TF device scope (`with tf.device(...)`),
    which TF keeps per thread, when it runs on another thread."""
    device = tf_context.context().device_name or None

    def run():
        with tf.device(device):
            return fn()

    return run


def fold_bn(model, *, verify=True, samples=None, rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL,
            replace_leftovers=True):
    """Returns `(folded_model, report)`: a new inference model with every exactly-foldable
    BatchNorm merged into its neighbour. The caller's model is not changed.

    Args:
        model: A Sequential or Functional Keras model (nested models are folded too). Both
            `keras_bn.BatchNorm` and `keras.layers.BatchNormalization` are folded.
        verify: Run both models in inference mode on deterministic synthetic inputs (and on
            `samples`) and raise `KerasBNError` if an output differs by more than
            `atol + rtol * max|original output|`.
        samples: Optional real inputs for verification: an array, a list of arrays (one per
            model input) or a dict keyed by input name.
        rtol, atol: Verification tolerances.
        replace_leftovers: BatchNorms with nothing to fold into become a `keras_bn.ChannelAffine`
            (one multiply-add); False keeps them as they are.

    Returns:
        `(folded, report)`; `print(report)` shows a table, `report.to_dict()` JSON-able data.
    """
    if not isinstance(model, keras.Model):
        raise KerasBNError(expected("fold_bn folds Keras models", "a keras.Model",
                                    type(model).__name__))
    report = FoldReport()
    checks = []
    if verify:  # inputs first: bad samples fail before any work
        checks.append(("synthetic inputs (batch 4, seed 0)", synthetic_inputs(model)))
        if samples is not None:
            checks.append(("samples", _as_input_list(model, samples)))
    # The original model's outputs are computed on a second thread while this one folds (TF runs
    # its kernels without the GIL).
    with in_background(lambda: [run_inference(model, x) for _, x in checks]) as pending:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Keras' "layer not built" chatter
            folded = _fold_model(model, report, "", replace_leftovers)
    for warning in report.warnings:
        warnings.warn(f"fold_bn: {warning}", RuntimeWarning, stacklevel=2)
    if verify:
        for (label, inputs), reference in zip(checks, pending.result()):
            candidate = run_inference(folded, inputs)
            max_abs, max_rel, scale = compare_outputs(reference, candidate)
            report.verification.append({"inputs": label, "max_abs_error": max_abs,
                                        "max_rel_error": max_rel, "rtol": rtol, "atol": atol})
            if not within_tolerance(max_abs, scale, atol, rtol):
                raise VerificationError(expected(
                    f"The folded model differs from the original on {label}",
                    f"max abs error <= {atol:g} + {rtol:g} * {scale:.4g}",
                    f"{max_abs:.4g} (relative {max_rel:.3g})",
                    "Report this with the model; fold_bn(..., verify=False) skips the check."))
    return folded, report
