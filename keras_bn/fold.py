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

from keras_bn import fold_math
from keras_bn.affine import ChannelAffine
from keras_bn.errors import KerasBNError, VerificationError, expected
from keras_bn.layer import BatchNorm
from keras_bn.verification import (check_samples, compare, in_background, output_names,
                                   run_inference, synthetic_inputs, tolerance_for)

BATCHNORM_TYPES = (keras.layers.BatchNormalization, BatchNorm)

BACKWARD, FORWARD, AFFINE, KEPT = (
    "folded backward", "folded forward", "replaced by affine", "left unfolded")


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
    """One row per BatchNorm, the counts and the verification errors."""

    rows: list = dataclasses.field(default_factory=list)
    verification: list = dataclasses.field(default_factory=list)

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
                "verification": self.verification}

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
            lines.append(f"verified '{v['output']}' on {v['inputs']}: max abs error {v['max_abs_error']:.3g}, "
                         f"max rel error {v['max_rel_error']:.3g} (tolerance rtol={v['rtol']:g}, "
                         f"atol={v['atol']:g})")
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


def _activation_name(layer):
    """A readable name for `layer.activation`: a function's name, or the class of a callable
    object (which has no `__name__`)."""
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None) or type(activation).__name__


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
        return None, f"'{layer.name}' has a non-linear activation ({_activation_name(layer)})"
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


@dataclasses.dataclass
class _Fold:
    """One planned fold: BatchNorm `bn` (its report row `row`) into `layer`, of kind `kind`."""

    bn: object
    row: FoldRow
    layer: object
    kind: str
    s: np.ndarray
    t: np.ndarray


def _apply(forward_plan, backward_plan):
    """Runs the fold math: {id(layer): {weight name: float64 value}} for every edited layer.
    Input side first, then output side: f(x) = s_out * (W (s_in x + t_in) + b) + t_out."""
    edits = {}

    def edit(layer):
        if id(layer) not in edits:
            edits[id(layer)] = {w.name: np.asarray(w, np.float64) for w in layer.weights}
        return edits[id(layer)]

    for f in forward_plan:
        w = edit(f.layer)
        if f.kind == "separable":
            w["depthwise_kernel"], w["bias"] = fold_math.fold_forward_separable(
                w["depthwise_kernel"], w["pointwise_kernel"], w.get("bias"), f.s, f.t)
        elif f.kind == "depthwise":
            w["kernel"], w["bias"] = fold_math.fold_forward_depthwise(w["kernel"], w.get("bias"),
                                                                      f.s, f.t)
        else:
            w["kernel"], w["bias"] = fold_math.fold_forward(
                w["kernel"], w.get("bias"), f.s, f.t, groups=getattr(f.layer, "groups", 1))
    for f in backward_plan:
        w = edit(f.layer)
        if f.kind == "separable":
            w["pointwise_kernel"], w["bias"] = fold_math.fold_backward(
                w["pointwise_kernel"], w.get("bias"), f.s, f.t)
        elif f.kind == "depthwise":
            w["kernel"], w["bias"] = fold_math.fold_backward_depthwise(w["kernel"], w.get("bias"),
                                                                       f.s, f.t)
        else:
            w["kernel"], w["bias"] = fold_math.fold_backward(
                w["kernel"], w.get("bias"), f.s, f.t, out_axis=-2 if f.kind == "transpose" else -1)
    return edits


def _unrepresentable(layer, weights):
    """Why the folded `weights` of `layer` cannot be stored in its variables' dtype, or None."""
    dtype = layer.variable_dtype
    for name, value in weights.items():
        reason = fold_math.overflow_reason(value, dtype)
        if reason:
            return f"its folded {name} {reason}"
    return None


def _fold_functional(model, report, prefix, replace_leftovers):
    graph = _Graph(model)
    passthrough, affines = set(), {}
    rename = {}
    forward_plan, backward_plan = [], []

    def leave(bn, row, s, t, reason):
        """A BatchNorm that is not folded: a ChannelAffine when its s and t fit, else kept."""
        passthrough.discard(id(bn))
        unfit = fold_math.overflow_reason(s, bn.variable_dtype) or \
            fold_math.overflow_reason(t, bn.variable_dtype)
        if replace_leftovers and not unfit:
            affines[id(bn)] = (s, t)
            row.action, row.reason = AFFINE, reason
        else:
            row.action = KEPT
            row.reason = reason + (f"; its scale or shift {unfit}" if unfit else "")

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
            row = FoldRow(name, BACKWARD, into=prefix + match[0].name)
            backward_plan.append(_Fold(bn, row, *match, s, t))
            passthrough.add(id(bn))
            if id(node.output_tensors[0]) in graph.outputs:
                rename[id(match[0])] = bn.name  # the model output keeps its name
                row.reason = f"'{match[0].name}' takes the name '{bn.name}' to keep the output name"
            report.rows.append(row)
            continue
        match, reason_fwd = _match_forward(graph, node, rank, bn_axis)
        if match:
            row = FoldRow(name, FORWARD, into=prefix + match[0].name)
            forward_plan.append(_Fold(bn, row, *match, s, t))
            passthrough.add(id(bn))
            report.rows.append(row)
            continue
        row = FoldRow(name, KEPT)
        report.rows.append(row)
        leave(bn, row, s, t, f"backward: {reason_back}; forward: {reason_fwd}")

    # Apply may still decline: folded weights that overflow the layer's dtype (float32 max
    # 3.4e38) would be written as inf. Every fold into such a layer is declined, then the math
    # runs again without them.
    while True:
        edits = _apply(forward_plan, backward_plan)
        declined = {}
        for plan in (forward_plan, backward_plan):
            for f in plan:
                reason = _unrepresentable(f.layer, edits[id(f.layer)])
                if reason:
                    declined[id(f.bn)] = (f, reason)
        if not declined:
            break
        forward_plan = [f for f in forward_plan if id(f.bn) not in declined]
        backward_plan = [f for f in backward_plan if id(f.bn) not in declined]
        for f, reason in declined.values():
            rename.pop(id(f.layer), None)
            f.row.into = None
            leave(f.bn, f.row, f.s, f.t, f"folding into '{f.layer.name}' is declined: {reason}")
    edited_layers = {id(f.layer) for f in forward_plan + backward_plan}
    edits = {k: v for k, v in edits.items() if k in edited_layers}

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
                config["use_bias"] = True  # a fold gives every edited layer a bias
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
            values = edits[id(op)]
        else:
            new.set_weights(op.get_weights())
            continue
        for variable in new.weights:
            # Checked representable in the plan above: a failure here is a bug of ours.
            value = np.asarray(values[variable.name])
            if fold_math.overflow_reason(value, variable.dtype):
                raise RuntimeError(f"internal error: {prefix}{new.name}/{variable.name} does not "
                                   f"fit {variable.dtype} after the overflow check")
            variable.assign(fold_math.as_dtype(value, variable.dtype))
    return folded


def _passthrough(x, *args, **kwargs):
    return x


def _fold_model(model, report, prefix, replace_leftovers):
    _check_foldable(model)
    graph = model._functional if isinstance(model, keras.Sequential) else model
    folded = _fold_functional(graph, report, prefix, replace_leftovers)
    folded.name = model.name
    return folded


def _check_foldable(model):
    """Raises KerasBNError unless `model` is a graph this pass can read (a built Sequential or a
    Functional model): checked before anything else runs on it."""
    if not isinstance(model, keras.Model):
        raise KerasBNError(expected("fold_bn folds Keras models", "a keras.Model",
                                    type(model).__name__))
    if isinstance(model, keras.Sequential):
        if getattr(model, "_functional", None) is None:
            raise KerasBNError(expected("The Sequential model must be built", "a model with a "
                                        "known input shape", f"unbuilt model '{model.name}'",
                                        "Call it on data or give it a keras.Input first."))
    elif not isinstance(model, Functional):
        raise KerasBNError(expected("fold_bn needs a graph it can read", "a Sequential or "
                                    "Functional keras.Model", f"{type(model).__name__} (a "
                                    "subclassed model)", "Rebuild the model with the Functional "
                                    "API."))


def fold_bn(model, *, verify=True, samples=None, rtol=None, atol=None, replace_leftovers=True):
    """Returns `(folded_model, report)`: a new inference model with every exactly-foldable
    BatchNorm merged into its neighbour. The caller's model is not changed.

    Args:
        model: A Sequential or Functional Keras model (nested models are folded too). Both
            `keras_bn.BatchNorm` and `keras.layers.BatchNormalization` are folded.
        verify: Run both models in inference mode on deterministic synthetic inputs (and on
            `samples`) and raise `VerificationError` if an output differs from the original's
            by more than `atol + rtol * max|that output|`.
        samples: Optional real inputs for verification: an array, a list of arrays (one per
            model input) or a dict keyed by input name; checked against `model.inputs` first.
        rtol, atol: Verification tolerances; None takes `keras_bn.verification.TOLERANCES` for
            the model's lowest-precision compute dtype (float32: 1e-5 / 1e-6; float16: 1e-2 /
            1e-3; bfloat16: 5e-2 / 5e-3).
        replace_leftovers: BatchNorms with nothing to fold into become a `keras_bn.ChannelAffine`
            (one multiply-add); False keeps them as they are.

    Returns:
        `(folded, report)`; `print(report)` shows a table, `report.to_dict()` JSON-able data.
    """
    _check_foldable(model)
    tolerance = tolerance_for(model, rtol, atol)
    report = FoldReport()
    checks = []
    if verify:  # inputs first: bad samples fail before any work
        checks.append(("synthetic inputs (batch 4, seed 0)", synthetic_inputs(model)))
        if samples is not None:
            checks.append(("samples", check_samples(model, samples)))
    # The original model's outputs are computed on a second thread while this one folds (TF runs
    # its kernels without the GIL).
    with in_background(lambda: [run_inference(model, x) for _, x in checks]) as pending:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Keras' "layer not built" chatter
            folded = _fold_model(model, report, "", replace_leftovers)
    if verify:
        names = output_names(model)
        for (label, inputs), reference in zip(checks, pending.result()):
            candidate = tree.flatten(run_inference(folded, inputs))
            for name, ref, out in zip(names, tree.flatten(reference), candidate):
                result = compare(ref, out)
                report.verification.append({
                    "inputs": label, "output": name, "max_abs_error": result.max_abs,
                    "max_rel_error": result.max_rel, "rtol": tolerance.rtol,
                    "atol": tolerance.atol})
                if not tolerance.accepts(result.max_abs, result.scale):
                    raise VerificationError(expected(
                        f"The folded model's output '{name}' differs from the original on {label}",
                        f"max abs error <= {tolerance.atol:g} + {tolerance.rtol:g} * "
                        f"{result.scale:.4g}", f"{result.max_abs:.4g} (relative "
                        f"{result.max_rel:.3g})", "Report this with the model; fold_bn(..., "
                        "verify=False) skips the check."))
    return folded, report
