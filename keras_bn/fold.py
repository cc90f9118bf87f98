"""`fold_bn`: a graph pass that merges inference-mode BatchNorms into neighbouring layers.

The pass reads plan -> apply -> rebuild, one Functional graph at a time (nested models recurse):

1. plan (`_plan`): one `Decision` per BatchNorm, each made by guard clauses that name their
   reason. Backward: the producer is an exact Dense/Conv*/DepthwiseConv*/SeparableConv*/
   Conv*Transpose with a linear activation, called once, feeding only this BatchNorm, not a model
   output, on the BatchNorm's axis. Forward: otherwise, the single consumer is a Dense or a conv
   that sees every input value without padding ('valid', or 1x1 kernels). Through: otherwise,
   when a positively homogeneous activation (ReLU, LeakyReLU, PReLU) stands between such a
   producer and the BatchNorm, `relu(s * z) = s * relu(z)` for s > 0 moves each positive scale
   into the producer, and the shift goes on through poolings and inference identities into the
   next Dense or 'valid' conv, or stays as one add. Otherwise the BatchNorm becomes a
   `ChannelAffine` (or stays with `replace_leftovers=False`).
2. apply (`_apply`): the `keras_bn.fold_math` calls, in float64. A fold whose weights would not
   fit the target's dtype is declined here, with the reason, and the math runs again without it.
3. rebuild (`_rebuild`): a new model, every layer cloned from its config; the caller's model is
   never changed.

The math lives in `keras_bn.fold_math`, the checks of the result in `keras_bn.verification`,
and every private Keras API in `keras_bn._keras_internals`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import math

import keras
import numpy as np

from keras_bn import _keras_internals as internals
from keras_bn import fold_math
from keras_bn._graph import BATCHNORM_TYPES, Graph, require_graph
from keras_bn.affine import ChannelAffine
from keras_bn.errors import KerasBNError, VerificationError, expected, one_line
from keras_bn.verification import (
    check_samples,
    compare,
    in_background,
    output_names,
    run_inference,
    run_original,
    synthetic_inputs,
    tolerance_for,
)
from keras_bn.verification import input_shapes as shapes_to_verify


class DisplayEnum(str, enum.Enum):
    """An Enum of report values whose value is the text the report shows."""

    def __str__(self):
        return self.value


class Action(DisplayEnum):
    """What happened to a BatchNorm."""

    BACKWARD = "folded backward"
    FORWARD = "folded forward"
    # Its scale folded into the producer through a ReLU-like activation; its shift pushed on
    # into the next Dense/conv, or left as one Add (and a multiply for channels with scale <= 0).
    THROUGH = "folded through activation"
    AFFINE = "replaced by affine"
    KEPT = "left unfolded"


BACKWARD, FORWARD, THROUGH = Action.BACKWARD, Action.FORWARD, Action.THROUGH
AFFINE, KEPT = Action.AFFINE, Action.KEPT


@dataclasses.dataclass
class FoldRow:
    """What happened to one BatchNorm (`name` includes nested models' names, `model/bn`)."""

    name: str
    action: Action
    into: str | None = None
    reason: str | None = None
    # Why the folded weights of `into` do not survive float16 (overflow, or too many below its
    # smallest normal number), or None.
    float16: str | None = None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "action": self.action.value}


@dataclasses.dataclass
class FoldReport:
    """One row per BatchNorm, the counts and the verification results (one per output and
    input set)."""

    rows: list[FoldRow] = dataclasses.field(default_factory=list)
    verification: list[dict] = dataclasses.field(default_factory=list)
    # (layer name, reason): layers the folded model uses as they are, not copies, because they
    # cannot be rebuilt from their config; the two models share those layers' weights.
    shared: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def batchnorms(self) -> int:
        return len(self.rows)

    @property
    def counts(self) -> dict[Action, int]:
        """BatchNorms per `Action`, every action present (0 where none)."""
        counter = collections.Counter(row.action for row in self.rows)
        return {a: counter.get(a, 0) for a in Action}

    @property
    def folded(self) -> list[FoldRow]:
        return [r for r in self.rows if r.action in (BACKWARD, FORWARD, THROUGH)]

    @property
    def not_folded(self) -> list[FoldRow]:
        return [r for r in self.rows if r.action in (AFFINE, KEPT)]

    def to_dict(self) -> dict:
        return {
            "counts": {
                "batchnorms": self.batchnorms,
                **{a.value: n for a, n in self.counts.items()},
            },
            "rows": [r.to_dict() for r in self.rows],
            "verification": self.verification,
            "shared": [{"layer": name, "reason": reason} for name, reason in self.shared],
        }

    def __str__(self):
        width = max([len(r.name) for r in self.rows] + [9])
        lines = [
            f"{'BatchNorm':<{width}}  {'action':<25}  {'into':<24}  reason",
            "-" * (width + 77),
        ]
        for r in self.rows:
            lines.append(
                f"{r.name:<{width}}  {r.action.value:<25}  {r.into or '-':<24}  {r.reason or ''}"
            )
        c = self.counts
        lines.append(
            f"{self.batchnorms} BatchNorm(s): {c[BACKWARD]} folded backward, "
            f"{c[FORWARD]} folded forward, {c[THROUGH]} folded through an "
            f"activation, {c[AFFINE]} replaced by affine, {c[KEPT]} left unfolded"
        )
        for r in self.rows:
            if r.float16:
                lines.append(f"{r.name}: for float16, folded {r.float16}")
        for name, reason in self.shared:
            lines.append(f"layer '{name}' is shared with the original model, not copied: {reason}")
        for v in self.verification:
            lines.append(
                f"verified '{v['output']}' on {v['inputs']}: max abs error "
                f"{v['max_abs_error']:.3g}, max rel error {v['max_rel_error']:.3g} "
                f"(tolerance rtol={v['rtol']:g}, atol={v['atol']:g})"
            )
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Matching: exact layer types, guard clauses


# Public classes only, most specific first. A subclass that overrides call() computes something
# else (a weight-standardized conv, say): folding into its kernel would be wrong.
_KINDS = (
    ((keras.layers.SeparableConv1D, keras.layers.SeparableConv2D), "separable"),
    ((keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D), "depthwise"),
    (
        (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose),
        "transpose",
    ),
    ((keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D), "conv"),
    ((keras.layers.Dense,), "dense"),
)


def layer_kind(layer) -> tuple[str | None, str | None]:
    """`(kind, None)` for a layer the fold math knows, else `(None, reason)`."""
    for classes, kind in _KINDS:
        for cls in classes:
            if isinstance(layer, cls):
                if type(layer).call is not cls.call:
                    return None, f"custom layer type {type(layer).__name__} overrides call()"
                return kind, None
    return None, f"{type(layer).__name__} has no kernel to fold into"


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


def _layout_reason(graph, layer, rank, bn_axis):
    channel = _channel_axis(layer, rank)
    if channel != bn_axis:
        return (
            f"the BatchNorm normalizes axis {bn_axis} but {layer.name}'s channel axis is {channel}"
        )
    return _not_plain(layer) or _unclonable(graph, layer)


def _clone(layer, **changes):
    """A new layer from `layer`'s config with `changes`, or `(None, reason)` when the config
    cannot be written or read back (an activation that is a callable object Keras cannot
    serialize, say)."""
    try:
        config = {**layer.get_config(), **changes}
        return type(layer).from_config(config), None
    except Exception as error:
        text = one_line(error, 200)
        return (
            None,
            f"'{layer.name}' cannot be rebuilt from its config ({type(error).__name__}: {text})",
        )


def _unclonable(graph, layer):
    """Why a fold target cannot be rebuilt, or None. The clone made to find out is the one the
    rebuild uses (a fold gives its target a bias), kept in `graph.clones`: made once, not twice."""
    if id(layer) not in graph.clones:
        graph.clones[id(layer)] = _clone(layer, use_bias=True)
    return graph.clones[id(layer)][1]


def _match_backward(graph, node, rank, bn_axis):
    """`((layer, kind), None)` when the BatchNorm folds into its producer, else `(None, reason)`."""
    source = node.input_tensors[0]
    producer_node = graph.producer(source)
    if producer_node is None:
        return None, "it follows the model input"
    layer = producer_node.operation
    kind, reason = layer_kind(layer)
    if kind is None:
        return None, f"it follows '{layer.name}': {reason}"
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
    reason = _layout_reason(graph, layer, rank, bn_axis)
    if reason:
        return None, reason
    return (layer, kind), None


def _match_forward(graph, node, rank, bn_axis):
    """`((layer, kind), None)` when the BatchNorm folds into its consumer, else `(None, reason)`."""
    out = node.output_tensors[0]
    consumers = graph.consumers[id(out)]
    if id(out) in graph.outputs:
        return None, "its output is a model output"
    if len(consumers) != 1:
        return None, f"its output has {len(consumers)} consumers"
    consumer_node = consumers[0]
    layer = consumer_node.operation
    kind, reason = layer_kind(layer)
    if kind == "transpose":
        return None, (
            f"the next layer '{layer.name}' is {type(layer).__name__}: a transposed "
            "conv spreads a constant unevenly over its output"
        )
    if kind is None:
        return None, f"the next layer '{layer.name}': {reason}"
    if graph.calls[id(layer)] > 1:
        return None, f"the next layer '{layer.name}' is shared"
    if len(consumer_node.input_tensors) != 1:
        return None, f"the next layer '{layer.name}' has several inputs"
    if kind != "dense" and layer.padding != "valid" and any(k != 1 for k in layer.kernel_size):
        return None, (
            f"the next layer '{layer.name}' pads with zeros ('{layer.padding}'): "
            "forward folding is not exact at the borders"
        )
    reason = _layout_reason(graph, layer, rank, bn_axis)
    if reason:
        return None, reason
    return (layer, kind), None


# Positively homogeneous activations, f(s * z) = s * f(z) for every s > 0: a BatchNorm's positive
# scale passes through them into the layer before. Not ReLU6 or a capped ReLU (the cap would have
# to scale per channel), not ELU, GELU, swish, sigmoid.
_HOMOGENEOUS = {keras.activations.relu: "relu", keras.activations.leaky_relu: "leaky_relu"}


def homogeneous_activation(layer) -> str | None:
    """The name of a layer's positively homogeneous activation: a Dense/conv's own `activation`,
    or an activation layer (ReLU without cap or threshold, LeakyReLU, PReLU, Activation('relu'));
    None for anything else. Exact classes only: a subclass may compute something else."""
    kind, _ = layer_kind(layer)
    if kind is not None:
        return _homogeneous_function(getattr(layer, "activation", None))
    if type(layer) is keras.layers.ReLU:
        uncapped = layer.max_value is None and float(layer.threshold) == 0.0
        return "relu" if uncapped else None
    if type(layer) is keras.layers.LeakyReLU:
        return "leaky_relu"
    if type(layer) is keras.layers.PReLU:
        return "prelu"
    if type(layer) is keras.layers.Activation:
        return _homogeneous_function(layer.activation)
    return None


def _homogeneous_function(activation):
    # By identity: an activation may be any callable object, hashable or not.
    return next((name for fn, name in _HOMOGENEOUS.items() if activation is fn), None)


def _match_through(graph, node, rank, bn_axis):
    """`((layer, kind, activation), None)` when the BatchNorm's scale can fold into a producer
    through a positively homogeneous activation: `Conv(activation=relu) -> BN`, or
    `Conv -> ReLU layer -> BN` with the conv linear; else `(None, reason)` (`reason` None when
    there is no activation before the BatchNorm to speak of)."""
    source = node.input_tensors[0]
    first = graph.producer(source)
    if first is None:
        return None, None
    activation = homogeneous_activation(first.operation)
    if activation is None:
        return None, None
    target_node, outputs = first, [source]
    if layer_kind(first.operation)[0] is None:  # an activation layer: the producer before it
        layer = first.operation
        if graph.calls[id(layer)] > 1:
            return None, f"'{layer.name}' is shared"
        target_node = graph.producer(first.input_tensors[0])
        if target_node is None:
            return None, f"'{layer.name}' follows the model input"
        outputs.append(first.input_tensors[0])
    target = target_node.operation
    kind, reason = layer_kind(target)
    if kind is None:
        return None, f"the {activation} follows '{target.name}': {reason}"
    if target_node is not first and not _is_linear(target):
        return (
            None,
            f"'{target.name}' has an activation ({_activation_name(target)}) "
            f"before the {activation}",
        )
    if graph.calls[id(target)] > 1:
        return None, f"'{target.name}' is shared (called {graph.calls[id(target)]} times)"
    if len(target_node.output_tensors) != 1:
        return None, f"'{target.name}' has several outputs"
    for tensor in outputs:
        if len(graph.consumers[id(tensor)]) > 1 or id(tensor) in graph.outputs:
            return None, f"the output of '{target.name}' or its activation is used elsewhere"
    reason = _layout_reason(graph, target, rank, bn_axis)
    if reason:
        return None, reason
    return (target, kind, activation), None


# Layers a per-channel shift passes through unchanged, `f(x + t) = f(x) + t` at inference: the
# inference identities, and poolings that take a max or a mean over positions of one channel.
_IDENTITIES = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.Identity,
)
_MAX_POOLS = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D)
_AVERAGE_POOLS = (
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
)
_GLOBAL_POOLS = (
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
)


def _shift_step(layer, node, rank, axis):
    """How a per-channel shift on axis `axis` of a rank-`rank` tensor passes `layer`: the
    `(rank, axis, repeats)` after it (`repeats`: how many times Flatten tiles each channel), or
    None where it does not pass exactly."""
    cls = type(layer)
    if cls in _IDENTITIES or (cls is keras.layers.Activation and _is_linear(layer)):
        return rank, axis, 1
    if cls in _MAX_POOLS + _GLOBAL_POOLS or (cls in _AVERAGE_POOLS and layer.padding == "valid"):
        channel = rank - 1 if layer.data_format == "channels_last" else 1
        if channel != axis:
            return None  # the pooling would mix channels
        if cls in _GLOBAL_POOLS and not layer.keepdims:
            return 2, 1, 1
        return rank, axis, 1
    if cls is keras.layers.Flatten and axis == rank - 1 and layer.data_format == "channels_last":
        positions = node.input_tensors[0].shape[1:-1]
        if all(d is not None for d in positions):
            return 2, 1, math.prod(positions)
    return None


def _match_push(graph, node, rank, bn_axis):
    """Where a per-channel shift left after a BatchNorm can go exactly: through `_shift_step`
    layers into the input side of the next Dense or 'valid'/1x1 conv. Returns
    `((layer, kind, repeats, passed), None)` or `(None, reason)`."""
    passed = []
    current, axis, repeats = node, bn_axis, 1
    while True:
        out = current.output_tensors[0]
        consumers = graph.consumers[id(out)]
        if id(out) in graph.outputs or len(consumers) != 1:
            return None, "the shift reaches a model output or a branch"
        following = consumers[0]
        step = _shift_step(following.operation, following, rank, axis)
        if step is None or graph.calls[id(following.operation)] > 1:
            break
        rank, axis, factor = step
        repeats *= factor
        passed.append(following.operation.name)
        current = following
    match, reason = _match_forward(graph, current, rank, axis)
    if match is None:
        return None, reason
    return (*match, repeats, passed), None


def _bn_gamma_beta(bn):
    weights = {w.name: np.asarray(w, np.float64) for w in bn.weights}
    return (
        weights.get("gamma"),
        weights.get("beta"),
        weights["moving_mean"],
        weights["moving_variance"],
    )


def statistics_problem(bn) -> str | None:
    """Why a BatchNorm's statistics cannot give a finite inference map, or None: non-finite
    values, `var + eps <= 0`, or a scale `gamma / sqrt(var + eps)` or shift `beta - mean * scale`
    beyond the range of the layer's dtype."""
    gamma, beta, mean, var = _bn_gamma_beta(bn)
    try:
        s, t = fold_math.bn_scale_shift(mean, var, bn.epsilon, gamma, beta, bn.variable_dtype)
    except KerasBNError as error:
        return str(error)
    for name, formula, value in (
        ("scale", "gamma / sqrt(var + eps)", s),
        ("shift", "beta - mean * scale", t),
    ):
        reason = fold_math.overflow_reason(value, bn.variable_dtype)
        if reason:
            return f"its inference {name} {formula} {reason}."
    return None


def refuse_bad_statistics(model) -> None:
    """Raises KerasBNError naming the first BatchNorm of `model` (nested models included) whose
    statistics `statistics_problem` refuses."""
    for layer in internals.all_layers(model):
        if isinstance(layer, BATCHNORM_TYPES):
            problem = statistics_problem(layer)
            if problem:
                raise KerasBNError(
                    f"BatchNorm '{layer.name}' has corrupt statistics: {problem} "
                    "Recompute them (train, or keras_bn.recalibrate when it "
                    "exists) before folding or exporting."
                )


# ------------------------------------------------------------------------------------------------
# 1. plan


@dataclasses.dataclass
class Decision:
    """The plan for one BatchNorm: its report `row`, the `target` layer and `kind` of a fold,
    and its inference map `s`, `t` (None when its statistics are unusable)."""

    bn: object
    row: FoldRow
    target: object = None
    kind: str | None = None
    s: np.ndarray | None = None
    t: np.ndarray | None = None
    keeps_output_name: bool = False
    # THROUGH: the activation, and where the shift goes (None: it stays, as one Add).
    activation: str | None = None
    push_target: object = None
    push_kind: str | None = None
    push_repeats: int = 1

    def edits(self):
        """The weight edits of this decision: `(layer, kind, side, s, t)`, side "backward"
        (the layer's output is scaled and shifted) or "forward" (its input is)."""
        if self.row.action == BACKWARD:
            return [(self.target, self.kind, "backward", self.s, self.t)]
        if self.row.action == FORWARD:
            return [(self.target, self.kind, "forward", self.s, self.t)]
        if self.row.action != THROUGH:
            return []
        # relu(s z) = s relu(z) for s > 0: those channels' scales move into the producer.
        edits = [(self.target, self.kind, "backward", self.through_scale, np.zeros_like(self.t))]
        if self.push_target is not None:
            t = np.tile(self.t, self.push_repeats)  # Flatten: channel fastest
            edits.append((self.push_target, self.push_kind, "forward", np.ones_like(t), t))
        return edits

    @property
    def through_scale(self):
        """Per channel, the scale that moves into the producer: s where s > 0, else 1."""
        return np.where(self.s > 0, self.s, 1.0)

    @property
    def residual_scale(self):
        """What stays after the producer for THROUGH: 1 where s > 0, else s; None when all 1."""
        return None if np.all(self.s > 0) else np.where(self.s > 0, 1.0, self.s)


def _plan(graph, prefix):
    decisions = []
    for node in graph.nodes:
        bn = node.operation
        if not isinstance(bn, BATCHNORM_TYPES):
            continue
        row = FoldRow(prefix + bn.name, KEPT)
        decision = Decision(bn, row)
        decisions.append(decision)
        if graph.calls[id(bn)] > 1:
            row.reason = f"it is shared (called {graph.calls[id(bn)]} times)"
            continue
        if node.arguments.kwargs.get("training") is True:
            row.reason = "it is called with training=True"
            continue
        gamma, beta, mean, var = _bn_gamma_beta(bn)
        try:
            decision.s, decision.t = fold_math.bn_scale_shift(
                mean, var, bn.epsilon, gamma, beta, bn.variable_dtype
            )
        except KerasBNError as error:
            row.reason = f"bad statistics: {error}"
            continue
        rank = len(node.output_tensors[0].shape)
        bn_axis = bn.axis % rank
        match, reason_back = _match_backward(graph, node, rank, bn_axis)
        if match:
            decision.target, decision.kind = match
            row.action, row.into = BACKWARD, prefix + match[0].name
            if id(node.output_tensors[0]) in graph.outputs:
                decision.keeps_output_name = True
                row.reason = f"'{match[0].name}' takes the name '{bn.name}' to keep the output name"
            continue
        match, reason_fwd = _match_forward(graph, node, rank, bn_axis)
        if match:
            decision.target, decision.kind = match
            row.action, row.into = FORWARD, prefix + match[0].name
            continue
        through, reason_through = _match_through(graph, node, rank, bn_axis)
        if through and np.any(decision.s > 0):
            _plan_through(graph, node, rank, bn_axis, decision, through, prefix)
            continue
        row.action = AFFINE  # settled in _apply: affine if s and t fit, else kept
        row.reason = f"backward: {reason_back}; forward: {reason_fwd}"
        if reason_through:
            row.reason += f"; through the activation: {reason_through}"
        elif through:
            row.reason += "; through the activation: no channel has a positive scale"
    return decisions


def _plan_through(graph, node, rank, bn_axis, decision, through, prefix):
    """THROUGH: the positive scales into the producer, the shift on to the next kernel when it
    can go there exactly; the report row says what is left."""
    target, kind, activation = through
    decision.target, decision.kind, decision.activation = target, kind, activation
    row = decision.row
    row.action, row.into = THROUGH, prefix + target.name
    channels = len(decision.s)
    negative = int(np.sum(decision.s <= 0))
    notes = [f"scale of {channels - negative} of {channels} channels folded through {activation}"]
    push, reason = _match_push(graph, node, rank, bn_axis)
    if push and not negative:
        decision.push_target, decision.push_kind, decision.push_repeats, passed = push
        via = f" through {', '.join(passed)}" if passed else ""
        notes.append(f"shift folded forward{via} into '{push[0].name}'")
    else:
        notes.append(f"shift left as one add ({reason or 'a multiply stays'})")
    if negative:
        notes.append(f"{negative} channel(s) with gamma <= 0 keep a multiply")
    row.reason = "; ".join(notes)


# ------------------------------------------------------------------------------------------------
# 2. apply


def _fold_weights(folds):
    """The fold math: {id(layer): {weight name: float64 value}} for every layer a decision in
    `folds` edits. Input side first, then output side: f(x) = s_out * (W (s_in x + t_in) + b) +
    t_out."""
    edits = {}

    def edit(layer):
        if id(layer) not in edits:
            edits[id(layer)] = {w.name: np.asarray(w, np.float64) for w in layer.weights}
        return edits[id(layer)]

    operations = [op for d in folds for op in d.edits()]
    for layer, kind, side, s, t in sorted(operations, key=lambda op: op[2] != "forward"):
        w = edit(layer)
        if side == "forward":
            if kind == "separable":
                w["depthwise_kernel"], w["bias"] = fold_math.fold_forward_separable(
                    w["depthwise_kernel"], w["pointwise_kernel"], w.get("bias"), s, t
                )
            elif kind == "depthwise":
                w["kernel"], w["bias"] = fold_math.fold_forward_depthwise(
                    w["kernel"], w.get("bias"), s, t
                )
            else:
                w["kernel"], w["bias"] = fold_math.fold_forward(
                    w["kernel"], w.get("bias"), s, t, groups=getattr(layer, "groups", 1)
                )
        elif kind == "separable":
            w["pointwise_kernel"], w["bias"] = fold_math.fold_backward(
                w["pointwise_kernel"], w.get("bias"), s, t
            )
        elif kind == "depthwise":
            w["kernel"], w["bias"] = fold_math.fold_backward_depthwise(
                w["kernel"], w.get("bias"), s, t
            )
        else:
            w["kernel"], w["bias"] = fold_math.fold_backward(
                w["kernel"], w.get("bias"), s, t, out_axis=-2 if kind == "transpose" else -1
            )
    return edits


def _unrepresentable(layer, weights):
    """Why the folded `weights` of `layer` cannot be stored in its variables' dtype, or None."""
    for name, value in weights.items():
        reason = fold_math.overflow_reason(value, layer.variable_dtype)
        if reason:
            return f"its folded {name} {reason}"
    return None


def _leave(decision, replace_leftovers):
    """A BatchNorm that is not folded: a ChannelAffine when asked for and its s and t fit the
    dtype, else kept. Returns whether it becomes an affine."""
    row, bn = decision.row, decision.bn
    unfit = fold_math.overflow_reason(decision.s, bn.variable_dtype) or fold_math.overflow_reason(
        decision.t, bn.variable_dtype
    )
    if replace_leftovers and not unfit:
        row.action = AFFINE
        return True
    row.action = KEPT
    if unfit:
        row.reason += f"; its scale or shift {unfit}"
    return False


def _apply(decisions, replace_leftovers):
    """Runs the math. Returns (edits, affines): the folded weights by id(target layer), and
    {id(bn): (s, t)} for the BatchNorms that become a ChannelAffine. May decline a planned fold:
    weights past the target dtype's range (float32 3.4e38, float16 65504) would be written as
    inf, so every fold into such a layer is declined, with the reason, and the math runs again."""
    folds = [d for d in decisions if d.row.action in (BACKWARD, FORWARD, THROUGH)]
    while True:
        edits = _fold_weights(folds)
        declined = []
        for d in folds:
            for layer, *_ in d.edits():
                reason = _unrepresentable(layer, edits[id(layer)])
                if reason:
                    declined.append((d, layer, reason))
                    break
        if not declined:
            break
        for d, layer, reason in declined:
            d.row.into, d.keeps_output_name = None, False
            d.row.reason = f"folding into '{layer.name}' is declined: {reason}"
            d.row.action = AFFINE
            d.push_target = None
            folds.remove(d)
    for d in folds:  # what float16 would lose of the folded kernels
        layer = d.target
        before = {w.name: np.asarray(w) for w in layer.weights}
        problems = [
            f"'{layer.name}' {name} {problem}"
            for name, value in edits[id(layer)].items()
            if "kernel" in name and (problem := fold_math.float16_problem(value, before[name]))
        ]
        d.row.float16 = "; ".join(problems) or None
    affines = {}
    for d in decisions:
        if d.row.action == AFFINE and _leave(d, replace_leftovers):
            affines[id(d.bn)] = (d.s, d.t)
        elif d.row.action == THROUGH and d.push_target is None:
            # What stays of it: one Add, and a multiply where a channel's scale is <= 0.
            affines[id(d.bn)] = (d.residual_scale, d.t)
    return edits, affines


# ------------------------------------------------------------------------------------------------
# 3. rebuild


def _rebuild(model, graph, decisions, edits, affines, report, prefix, replace_leftovers):
    folded_bns = {
        id(d.bn)
        for d in decisions
        if d.row.action in (BACKWARD, FORWARD)
        or (d.row.action == THROUGH and id(d.bn) not in affines)
    }
    rename = {id(d.target): d.bn.name for d in decisions if d.keeps_output_name}
    clones = {}

    def clone_function(op):
        if id(op) in clones:
            return clones[id(op)]
        if id(op) in folded_bns:
            new = op  # never called: `call_function` passes its input on
        elif id(op) in affines:
            new = ChannelAffine(
                axis=op.axis,
                use_scale=affines[id(op)][0] is not None,
                name=op.name,
                dtype=op.dtype_policy,
            )
        elif isinstance(op, keras.Model):
            new = _fold_model(op, report, prefix + op.name + "/", replace_leftovers)
        elif isinstance(op, keras.layers.Layer):
            changes = {}
            if id(op) in edits:
                changes["use_bias"] = True  # a fold gives every edited layer a bias
            if id(op) in rename:
                changes["name"] = rename[id(op)]
            planned = graph.clones.pop(id(op), (None, None))[0] if id(op) in edits else None
            if planned is not None and id(op) not in rename:
                new, reason = planned, None  # made while planning, with its bias
            else:
                new, reason = _clone(op, **changes)
            if new is None:  # never a fold target: the plan declined those
                # The layer itself, untouched: the folded model shares its weights.
                report.shared.append((prefix + op.name, reason))
                new = op
        else:
            new = op
        clones[id(op)] = new
        return new

    def call_function(layer, *args, **kwargs):
        if id(layer) in folded_bns:  # a folded BatchNorm is the identity
            return args[0]
        return layer(*args, **kwargs)

    # Keras's public rebuild: each layer replaced by `clone_function`, called by `call_function`
    # (nested models are folded by `_fold_model`, recursively, with their own report prefix).
    folded = keras.models.clone_model(
        model, clone_function=clone_function, call_function=call_function
    )
    folded.name = model.name

    # Weights: copies for untouched layers, folded values for edited ones.
    for node in graph.nodes:
        op = node.operation
        new = clones.get(id(op))
        if new is None or id(op) in folded_bns or isinstance(op, keras.Model) or new is op:
            continue
        if id(op) in affines:
            s, t = affines[id(op)]
            values = {"scale": s, "offset": t}
        elif id(op) in edits:
            values = edits[id(op)]
        else:
            new.set_weights(op.get_weights())
            continue
        for variable in new.weights:  # every value fits: _apply declined those that do not
            variable.assign(fold_math.as_dtype(values[variable.name], variable.dtype))
    return folded


def _fold_model(model, report, prefix, replace_leftovers):
    require_graph(model, "fold_bn")
    graph_model = internals.graph_model(model)
    graph = Graph(graph_model)
    decisions = _plan(graph, prefix)
    edits, affines = _apply(decisions, replace_leftovers)
    report.rows.extend(d.row for d in decisions)
    folded = _rebuild(
        graph_model, graph, decisions, edits, affines, report, prefix, replace_leftovers
    )
    folded.name = model.name
    return folded


_ON_BAD_STATISTICS = ("keep", "raise")


def fold_bn(
    model: keras.Model,
    *,
    verify: bool = True,
    samples=None,
    rtol: float | None = None,
    atol: float | None = None,
    replace_leftovers: bool = True,
    on_bad_statistics: str = "keep",
    input_shapes=None,
) -> tuple[keras.Model, FoldReport]:
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
        rtol: Relative verification tolerance (times max|that output|); None takes
            `keras_bn.verification.TOLERANCES` for the model's lowest-precision compute dtype
            (float32 1e-5, float16 1e-2, bfloat16 5e-2).
        atol: Absolute verification tolerance; None likewise (float32 1e-6, float16 1e-3,
            bfloat16 5e-3).
        replace_leftovers: BatchNorms with nothing to fold into become a `keras_bn.ChannelAffine`
            (one multiply-add); False keeps them as they are.
        on_bad_statistics: "keep" leaves a BatchNorm with unusable statistics (NaN/Inf,
            `var + eps <= 0`, a scale or shift past its dtype) in place with the reason in the
            report; "raise" refuses the model with `KerasBNError` naming the layer (what the
            command line does: writing a model that outputs NaN helps nobody).
        input_shapes: The shape of the synthetic inputs, without the batch axis: one shape per
            model input (a tuple, a list of tuples or a dict by input name). None: the samples'
            shape, else the model's, its open (None) dimensions set to a length Keras's shape
            inference accepts (`keras_bn.verification.input_shapes`).

    Returns:
        `(folded, report)`; `print(report)` shows a table, `report.to_dict()` JSON-able data.

    Raises:
        KerasBNError: A model without a graph (subclassed), samples or shapes that do not fit
            the model, or, with `on_bad_statistics="raise"`, unusable BatchNorm statistics.
        VerificationError: With `verify=True`, an output of the folded model differs from the
            original's by more than the tolerance.

    Example:
        ```python
        folded, report = keras_bn.fold_bn(model, samples=x_test)
        print(report)  # one row per BatchNorm: folded backward, forward, affine, or why not
        folded.save("folded.keras")
        ```
    """
    require_graph(model, "fold_bn")
    if on_bad_statistics not in _ON_BAD_STATISTICS:
        raise KerasBNError(
            expected("Invalid `on_bad_statistics`", "'keep' or 'raise'", repr(on_bad_statistics))
        )
    if on_bad_statistics == "raise":
        refuse_bad_statistics(model)
    tolerance = tolerance_for(model, rtol, atol)
    report = FoldReport()
    if not verify:
        return _fold_model(model, report, "", replace_leftovers), report
    real = None if samples is None else check_samples(model, samples)  # before any work
    if input_shapes is not None or real is None:
        shapes = shapes_to_verify(model, input_shapes)
    else:
        shapes = [a.shape[1:] for a in real]
    synthetic = synthetic_inputs(model, shapes=shapes)
    checks = [(f"synthetic inputs (batch {len(synthetic[0])}, seed 0)", synthetic)]
    if real is not None:
        checks.append(("samples", real))
    # The original model's outputs are computed on a second thread while this one folds (TF
    # runs its kernels without the GIL; ResNet50: see README "Benchmarks").
    with in_background(lambda: [run_original(model, x, label) for label, x in checks]) as pending:
        folded = _fold_model(model, report, "", replace_leftovers)
    names = output_names(model)
    for (label, inputs), reference in zip(checks, pending.result()):
        candidate = keras.tree.flatten(run_inference(folded, inputs, as_numpy=True))
        for name, ref, out in zip(names, keras.tree.flatten(reference), candidate):
            result = compare(ref, out)
            report.verification.append(
                {
                    "inputs": label,
                    "output": name,
                    "max_abs_error": result.max_abs,
                    "max_rel_error": result.max_rel,
                    "rtol": tolerance.rtol,
                    "atol": tolerance.atol,
                }
            )
            if not tolerance.accepts(result.max_abs, result.scale):
                raise VerificationError(
                    expected(
                        f"The folded model's output '{name}' differs from the original on {label}",
                        f"max abs error <= {tolerance.atol:g} + {tolerance.rtol:g} * "
                        f"{result.scale:.4g}",
                        f"{result.max_abs:.4g} (relative {result.max_rel:.3g})",
                        "Report this with the model; fold_bn(..., verify=False) skips the check.",
                    )
                )
    return folded, report
