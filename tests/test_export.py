"""export.to_onnx / export.verify: real tf2onnx, onnx.checker and onnxruntime."""

import os
import re

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import keras_bn
from keras_bn import export
from keras_bn.export import convert
from tests.test_fold import randomize_bn
from tests.tolerances import FOLD_RTOL, ORT_ATOL

L = keras.layers


def single(shape, make_layer, bn=lambda: L.BatchNormalization(), tail=True):
    inputs = keras.Input(shape, name="features")
    x = bn()(make_layer()(inputs))
    out = L.Activation("tanh", name="score")(x) if tail else x
    return randomize_bn(keras.Model(inputs, out))


def residual():
    inputs = keras.Input((12, 12, 3), name="image")
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(inputs)))
    y = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(x)))
    y = L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(y))
    x = L.ReLU()(L.Add()([x, y]))
    x = L.GlobalAveragePooling2D()(x)
    return randomize_bn(keras.Model(inputs, L.Dense(4, name="logits")(x)))


def bn_then(make_layer):
    def build():
        inputs = keras.Input((8, 8, 3), name="features")
        return randomize_bn(keras.Model(inputs, make_layer()(L.BatchNormalization()(inputs))))

    return build


PATTERNS = {
    "dense": lambda: single((6,), lambda: L.Dense(5)),
    "depthwise2d": lambda: single((8, 8, 3), lambda: L.DepthwiseConv2D(3, depth_multiplier=2)),
    "conv2d_transpose": lambda: single((5, 5, 3), lambda: L.Conv2DTranspose(4, 3, strides=2)),
    "conv1d": lambda: single((10, 3), lambda: L.Conv1D(4, 3)),
    "conv3d": lambda: single((5, 5, 5, 2), lambda: L.Conv3D(3, 2)),
    "separable2d": lambda: single((8, 8, 3), lambda: L.SeparableConv2D(4, 3)),
    "grouped_conv2d": lambda: single((8, 8, 4), lambda: L.Conv2D(6, 3, groups=2, padding="same")),
    "grouped_conv1d_causal": lambda: single(
        (9, 4), lambda: L.Conv1D(4, 3, groups=2, padding="causal")
    ),
    "keras_bn_layer": lambda: single(
        (6,), lambda: L.Dense(5), bn=lambda: keras_bn.BatchNorm(epsilon=1e-5)
    ),
    "bn_then_valid_conv": bn_then(lambda: L.Conv2D(4, 3, padding="valid", name="c")),
    "bn_then_valid_depthwise": bn_then(lambda: L.DepthwiseConv2D(3, depth_multiplier=2)),
    "bn_then_valid_separable": bn_then(lambda: L.SeparableConv2D(4, 3, use_bias=False)),
    "residual": residual,
}


def ort_run(path, x, optimized=True):
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_suite(name, tmp_path, rng):
    model = PATTERNS[name]()
    path = tmp_path / f"{name}.onnx"
    report = export.to_onnx(model, path, rtol=1e-5)
    assert report.verification.passed and len(report.verification.rows) == 4
    graph = onnx.load(path)
    ops = [n.op_type for n in graph.graph.node]
    assert "BatchNormalization" not in ops
    assert "Mul" not in ops  # every BatchNorm here folds: no Mul/Add left behind from one
    assert not any(op in ("StatefulPartitionedCall", "PartitionedCall") for op in ops)
    assert report.op_counts == {op: ops.count(op) for op in set(ops)}
    assert ops.count("Add") <= (2 if name == "residual" else 1)
    # Independent check: our own onnxruntime run against Keras, batch 3, both optimization levels.
    x = rng.normal(size=(3, *model.inputs[0].shape[1:])).astype("float32")
    ref = np.asarray(model(x, training=False))
    for optimized in (False, True):
        np.testing.assert_allclose(
            ort_run(str(path), x, optimized), ref, atol=ORT_ATOL + FOLD_RTOL * np.abs(ref).max()
        )
    # Names: Keras input/output names, dynamic batch dimension.
    assert [i.name for i in graph.graph.input] == [model.inputs[0].name]
    assert [o.name for o in graph.graph.output] == list(model.output_names)
    assert not graph.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")


def test_lone_batchnorm_becomes_one_mul_add(tmp_path, rng):
    inputs = keras.Input((5,), name="features")
    model = randomize_bn(keras.Model(inputs, L.BatchNormalization(name="bn")(inputs)))
    report = export.to_onnx(model, tmp_path / "lone.onnx")
    assert report.op_counts == {"Mul": 1, "Add": 1}
    assert report.fold.counts[keras_bn.fold.Action.AFFINE] == 1


def test_no_fold_keeps_the_batchnorm_and_still_verifies(tmp_path):
    model = PATTERNS["dense"]()
    report = export.to_onnx(model, tmp_path / "raw.onnx", fold=False)
    assert report.fold is None and report.verification.passed
    assert any(op in report.op_counts for op in ("BatchNormalization", "Mul"))


def test_nchw_inputs(tmp_path, rng):
    model = PATTERNS["depthwise2d"]()
    path = tmp_path / "nchw.onnx"
    export.to_onnx(model, path, nchw_inputs=True)
    graph = onnx.load(path)
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [3, 8, 8]
    x = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(
        ort_run(str(path), np.moveaxis(x, -1, 1)), np.asarray(model(x, training=False)), atol=1e-5
    )
    assert export.verify(model, path).passed


def test_graph_check_names_the_layer_tf2onnx_could_not_convert():
    # Raw tf2onnx leaves Keras's grouped conv (a nested XLA function) as StatefulPartitionedCall:
    # a real graph that onnxruntime rejects. The check must refuse it and name the layer.
    import tensorflow as tf
    import tf2onnx

    model = PATTERNS["grouped_conv2d"]()
    grouped = next(l for l in model.layers if getattr(l, "groups", 1) > 1)
    spec = [tf.TensorSpec((None, 8, 8, 4), tf.float32, name="features")]
    proto, _ = tf2onnx.convert.from_function(
        tf.function(lambda x: model(x, training=False), input_signature=spec), input_signature=spec
    )
    assert "StatefulPartitionedCall" in [n.op_type for n in proto.graph.node]
    names = {l.name for l in model._flatten_layers()}
    with pytest.raises(
        keras_bn.KerasBNError,
        match=rf"tf2onnx left a StatefulPartitionedCall node from layer '{grouped.name}' that onnxruntime cannot run\. Expected: only standard ONNX ops\. Received: 1 such node",
    ):
        convert.check_graph(proto, names)
    assert (
        convert.layer_of("functional_1/conv2d_3_1/StatefulPartitionedCall", {"conv2d_3"})
        == "conv2d_3"
    )
    assert convert.layer_of("functional_1/dense/MatMul", {"dense"}) == "dense"
    assert convert.layer_of("Identity", {"dense"}) is None


def test_reference_thread_runs_under_the_callers_device_scope():
    import concurrent.futures

    import tensorflow as tf
    from tensorflow.python.eager import context

    def device_seen():
        return context.context().device_name

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with tf.device("/CPU:0"):
            wrapped = keras_bn.verification.on_callers_device(device_seen)
            plain = pool.submit(device_seen).result()  # a thread does not inherit the scope...
            passed = pool.submit(wrapped).result()  # ...unless it is passed on
        assert plain == "" and passed.endswith("device:CPU:0")
        assert pool.submit(keras_bn.verification.on_callers_device(device_seen)).result() == ""


def _graph_structure(proto):
    """Nodes (type, name, inputs, outputs, attributes) and initializers (name, bytes) with
    tf2onnx's process-wide name counters (`__123`) taken out."""

    def strip(name):
        return re.sub(r"__\d+", "__N", name)

    nodes = [
        (
            n.op_type,
            strip(n.name),
            [strip(i) for i in n.input],
            [strip(o) for o in n.output],
            [a.SerializeToString() for a in n.attribute],
        )
        for n in proto.graph.node
    ]
    inits = sorted(
        (strip(i.name), i.SerializeToString().replace(i.name.encode(), b""))
        for i in proto.graph.initializer
    )
    return nodes, inits


@pytest.fixture
def optimizer_calls(monkeypatch):
    """Records the `catch_errors` that tf2onnx really passes to its optimizer loop (a spy: the
    real `optimize_graph` runs)."""
    import tf2onnx.optimizer

    calls = []
    real = tf2onnx.optimizer.optimize_graph

    def spy(graph, catch_errors=True, optimizers=None):
        calls.append(catch_errors)
        return real(graph, catch_errors=catch_errors, optimizers=optimizers)

    monkeypatch.setattr(tf2onnx.optimizer, "optimize_graph", spy)
    monkeypatch.delenv(convert._CATCH_ERRORS, raising=False)
    return calls


@pytest.mark.parametrize("name", ["residual", "dense"])
def test_fast_conversion_gives_tf2onnx_default_graph(name, optimizer_calls, rng):
    # to_onnx turns off tf2onnx's per-optimizer graph copies; the graph must be the one tf2onnx
    # makes with them on (its default, the variable unset). fold=False for "dense" leaves a
    # BatchNorm for tf2onnx's optimizers to work on.
    model = PATTERNS[name]()
    if name == "residual":
        model, _ = keras_bn.fold_bn(model)
    fast = convert.convert(model, None, False)
    assert optimizer_calls and not any(optimizer_calls)  # really without the copies
    assert convert._CATCH_ERRORS not in os.environ  # restored
    optimizer_calls.clear()
    default = convert.convert(model, None, False, tf2onnx_default=True)
    assert optimizer_calls and all(optimizer_calls)  # really tf2onnx's default
    assert _graph_structure(fast) == _graph_structure(default)
    assert len(fast.graph.node) > 3
    x = rng.normal(size=(2, *model.inputs[0].shape[1:])).astype("float32")
    runs = [
        ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {p.graph.input[0].name: x}
        )[0]
        for p in (fast, default)
    ]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_a_value_of_the_switch_never_means_copies_on(optimizer_calls):
    # tf2onnx 1.17 upper-cases the variable's NAME: "TRUE" set by a user still turns copies off.
    # That is why the retry unsets it instead of setting "TRUE".
    model = PATTERNS["dense"]()
    os.environ[convert._CATCH_ERRORS] = "TRUE"
    try:
        convert.convert(model, None, False)
    finally:
        del os.environ[convert._CATCH_ERRORS]
    assert optimizer_calls and not any(optimizer_calls)


def test_failed_fast_conversion_is_retried_with_tf2onnx_error_handling(
    optimizer_calls, monkeypatch, tmp_path
):
    # A real tf2onnx optimizer made to raise, inside a real conversion.
    import tf2onnx.optimizer

    class Broken(tf2onnx.optimizer.IdentityOptimizer):
        def _optimize(self, graph):
            raise ArithmeticError("broken on purpose")

    monkeypatch.setitem(tf2onnx.optimizer._optimizers, "remove_identity", Broken)
    model = PATTERNS["residual"]()
    with pytest.warns(
        RuntimeWarning,
        match=r"a tf2onnx optimizer raised ArithmeticError: broken "
        r"on purpose; converting again",
    ):
        report = export.to_onnx(model, tmp_path / "m.onnx")
    # First the fast path (no copies, the error escapes), then tf2onnx's default, which skips
    # the broken optimizer; the graph is verified like any other.
    assert optimizer_calls == [False, True]
    assert report.verification.passed and convert._CATCH_ERRORS not in os.environ
    # An error from anywhere else would come back the same: no retry.
    seen = []

    def broken():
        seen.append(os.environ.get(convert._CATCH_ERRORS))
        raise IndexError("not an optimizer")

    with pytest.raises(IndexError):
        convert._run_tf2onnx(broken)
    assert seen == ["FALSE"] and convert._CATCH_ERRORS not in os.environ
    # A setting the user made is used as it is, and a failure under it is not retried.
    monkeypatch.setenv(convert._CATCH_ERRORS, "FALSE")
    optimizer_calls.clear()
    with pytest.raises(ArithmeticError):
        convert.convert(model, None, False)
    assert optimizer_calls == [False] and os.environ[convert._CATCH_ERRORS] == "FALSE"


def test_the_switch_is_changed_under_a_lock():
    # Two conversions on two threads: the second waits until the first has restored the variable.
    import threading

    inside = threading.Event()
    release = threading.Event()
    order = []

    def first():
        with convert._catch_errors_variable("FALSE"):
            inside.set()
            release.wait(30)
            order.append(("first", os.environ.get(convert._CATCH_ERRORS)))

    def second():
        inside.wait(30)
        with convert._catch_errors_variable(None):
            order.append(("second", os.environ.get(convert._CATCH_ERRORS)))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    inside.wait(30)
    release.set()
    for t in threads:
        t.join(60)
    assert order == [("first", "FALSE"), ("second", None)]
    assert convert._CATCH_ERRORS not in os.environ


@pytest.mark.parametrize("opset", [13, 18])
def test_opset(opset, tmp_path):
    model = residual()
    report = export.to_onnx(model, tmp_path / "m.onnx", opset=opset)
    graph = onnx.load(tmp_path / "m.onnx")
    assert report.opset == opset and report.verification.passed
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [opset]


@pytest.mark.parametrize("opset", [6, 19, 15.0, True, "15"])
def test_bad_opset_is_refused_before_any_work(opset, tmp_path):
    with pytest.raises(
        keras_bn.KerasBNError,
        match=r"Unsupported ONNX opset\. Expected: an integer from 7 .* to 18 .*, or None for tf2onnx's default 15\. Received: ",
    ):
        export.to_onnx(residual(), tmp_path / "m.onnx", opset=opset)
    assert os.listdir(tmp_path) == []


def test_verify_reports_a_mismatch(tmp_path, rng):
    model = PATTERNS["dense"]()
    other = PATTERNS["dense"]()  # same architecture, different weights
    path = tmp_path / "m.onnx"
    export.to_onnx(model, path)
    good = export.verify(model, path, samples=rng.normal(size=(7, 6)).astype("float32"))
    assert good.passed and {r.inputs for r in good.rows} == {
        "synthetic, batch 1",
        "synthetic, batch 4",
        "samples, batch 7",
    }
    assert {r.optimization for r in good.rows} == {"disabled", "enabled"}
    bad = export.verify(other, path)
    assert not bad.passed and bad.max_abs_error > 1e-3
    assert "verification FAILED" in str(bad)
    with pytest.raises(
        keras_bn.KerasBNError, match=r"The ONNX file does not exist.*Received: '.*nope\.onnx'"
    ):
        export.verify(model, tmp_path / "nope.onnx")


class TraceDependent(L.Layer):
    """Doubles its input when run eagerly (as Keras runs it in verification) and triples it in a
    traced graph (as tf2onnx sees it): a real layer that exports wrongly."""

    def call(self, x):
        import tensorflow as tf

        return x * (2.0 if tf.executing_eagerly() else 3.0)


@pytest.mark.parametrize("fold", [True, False])
def test_failed_verification_names_the_first_layer_that_differs(fold, tmp_path):
    inputs = keras.Input((6,), name="features")
    x = L.BatchNormalization(name="bn")(L.Dense(5, name="first")(inputs))
    x = TraceDependent(name="odd")(L.ReLU(name="relu")(x))
    model = randomize_bn(keras.Model(inputs, L.Dense(3, name="logits")(x)))
    with pytest.raises(
        keras_bn.VerificationError,
        match=(
            r"onnxruntime output 'logits' differs from Keras on synthetic, batch \d \(optimizations "
            r"(en|dis)abled\); nothing was written\. .* The first layer whose output differs is "
            r"'odd' \(TraceDependent\): max abs error"
        ),
    ):
        export.to_onnx(model, tmp_path / "m.onnx", fold=fold)
    assert os.listdir(tmp_path) == []


def test_failed_verification_writes_nothing(tmp_path):
    model = residual()
    path = tmp_path / "out.onnx"
    with pytest.raises(keras_bn.VerificationError, match=r"nothing was written"):
        export.to_onnx(model, path, atol=0.0, rtol=0.0)
    assert os.listdir(tmp_path) == []
    with pytest.raises(keras_bn.KerasBNError, match=r"The output directory does not exist"):
        export.to_onnx(model, tmp_path / "missing" / "out.onnx")


# ------------------------------------------------------------------------------------------------
# Where users run it: Sequential models, mixed precision, per-output scales.


def test_sequential_model_exports_and_verifies(tmp_path, rng):
    model = randomize_bn(
        keras.Sequential(
            [
                keras.Input((6,), name="features"),
                L.Dense(5, name="dense"),
                L.BatchNormalization(name="bn"),
                L.Dense(3, name="out"),
            ]
        )
    )
    path = tmp_path / "seq.onnx"
    report = export.to_onnx(model, path)
    assert report.verification.passed and report.fold.counts[keras_bn.fold.Action.BACKWARD] == 1
    assert [o.name for o in onnx.load(path).graph.output] == ["out"]
    x = rng.normal(size=(7, 6)).astype("float32")
    np.testing.assert_allclose(
        ort_run(str(path), x), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )
    assert export.verify(model, path, samples=x).passed


def _mixed_model():
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, use_bias=False)(inputs)))
    x = L.BatchNormalization()(L.Conv2D(8, 3)(x))
    return randomize_bn(keras.Model(inputs, L.Dense(4, name="logits")(L.Flatten()(x))))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_fold_uses_the_compute_dtype_tolerance(policy, mixed_policy):
    mixed_policy(policy)
    model = _mixed_model()
    folded, report = keras_bn.fold_bn(model)
    assert report.counts[keras_bn.fold.Action.BACKWARD] == 2
    expected = keras_bn.verification.TOLERANCES[policy.split("_")[1]]
    assert report.verification[0]["rtol"] == expected.rtol
    # A float16 step, not a float32 one: the float32 tolerance would refuse this fold.
    assert report.verification[0]["max_rel_error"] > 1e-5
    with pytest.raises(keras_bn.VerificationError, match=r"output 'logits' differs"):
        keras_bn.fold_bn(model, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fold", [True, False])
def test_mixed_float16_exports(fold, mixed_policy, tmp_path):
    mixed_policy("mixed_float16")
    model = _mixed_model()
    report = export.to_onnx(model, tmp_path / "m.onnx", fold=fold)
    assert report.verification.passed and report.verification.rtol == 1e-2
    ops = report.op_counts
    assert ("BatchNormalization" not in ops) and (("Mul" in ops) != fold)


def test_mixed_bfloat16_export_is_refused_before_any_work(mixed_policy, tmp_path):
    mixed_policy("mixed_bfloat16")
    with pytest.raises(
        keras_bn.KerasBNError,
        match=r"computes in bfloat16.*Expected: a float32 or "
        r"mixed_float16 model.*set_dtype_policy",
    ):
        export.to_onnx(_mixed_model(), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_each_output_is_judged_against_its_own_scale(tmp_path, rng):
    def build(shift):
        inputs = keras.Input((4,), name="features")
        big = L.Dense(3, name="big", kernel_initializer=keras.initializers.Constant(1e3))(inputs)
        small = L.Dense(
            2,
            name="small",
            kernel_initializer="ones",
            bias_initializer=keras.initializers.Constant(shift),
        )(inputs)
        return keras.Model(inputs, [big, small])

    path = tmp_path / "two.onnx"
    export.to_onnx(build(0.0), path)
    # 1e-3 off on an output of magnitude ~4 while the other output is ~4e3: a shared scale
    # (atol + rtol * 4e3 = 0.04) would accept it.
    report = export.verify(build(1e-3), path)
    failed = {r.output for r in report.rows if not r.passed}
    assert failed == {"small"}


# ------------------------------------------------------------------------------------------------
# Convolutions as one ONNX Conv each; shapes from the model and the data.


def conv_attributes(path):
    proto = onnx.load(str(path))
    return [
        {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for n in proto.graph.node
        if n.op_type == "Conv"
    ]


@pytest.mark.parametrize(
    "make_layer, shape",
    [
        (lambda: L.Conv1D(4, 3, dilation_rate=2, padding="same"), (20, 3)),
        (lambda: L.Conv1D(4, 3, dilation_rate=4, padding="causal"), (20, 3)),
        (lambda: L.Conv1D(4, 3, padding="valid"), (20, 3)),
        (lambda: L.Conv2D(4, 3, dilation_rate=(2, 3), padding="same"), (12, 12, 3)),
    ],
)
def test_conv1d_and_dilated_convs_are_one_onnx_conv_with_the_bias_inside(
    make_layer, shape, tmp_path
):
    # Keras's trace wraps a dilated conv in SpaceToBatch/BatchToSpace (dozens of nodes) and adds
    # a Conv1D's bias after its Squeeze; the export gives each one Conv with dilations and bias.
    model = single(shape, make_layer, tail=False)
    report = export.to_onnx(model, tmp_path / "m.onnx")
    assert report.verification.passed and report.op_counts["Conv"] == 1
    assert "Add" not in report.op_counts and "BatchNormalization" not in report.op_counts
    assert sum(report.op_counts.values()) <= 6, report.op_counts  # Conv, (Un)Squeeze, Transposes
    layer = model.layers[1]
    (attributes,) = conv_attributes(tmp_path / "m.onnx")
    assert list(attributes["dilations"])[-len(layer.dilation_rate) :] == list(layer.dilation_rate)
    assert len(onnx.load(str(tmp_path / "m.onnx")).graph.node[0].input) <= 3


def cropping_model():
    """A variable-length sequence model that crops 40 positions from each side (SpliceAI's
    shape in miniature): lengths up to 80 fail inside Keras."""
    inputs = keras.Input((None, 4), name="sequence")
    x = L.Conv1D(8, 3, dilation_rate=2, padding="same", name="conv")(inputs)
    x = L.Cropping1D((40, 40), name="crop")(L.ReLU()(L.BatchNormalization(name="bn")(x)))
    return randomize_bn(keras.Model(inputs, L.Conv1D(3, 1, name="head")(x)))


def test_open_lengths_take_one_the_model_accepts_and_samples_give_theirs(tmp_path, rng):
    model = cropping_model()
    assert keras_bn.verification.input_shapes(model) == [(128, 4)]  # 16, 32, 64 refused
    folded, report = keras_bn.fold_bn(model)
    assert report.counts[keras_bn.fold.Action.BACKWARD] == 1 and report.verification
    samples = rng.normal(size=(2, 100, 4)).astype("float32")
    _, report = keras_bn.fold_bn(model, samples=samples)
    export_report = export.to_onnx(model, tmp_path / "m.onnx", samples=samples)
    assert export_report.verification.passed
    assert {r.input_set for r in export_report.verification.rows} == {"synthetic", "samples"}
    # The synthetic inputs took the samples' length: the Keras outputs have 100 - 80 positions.
    proto = onnx.load(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"sequence": samples})[0].shape == (2, 20, 3)
    # A length the model refuses, asked for: a KerasBNError naming it, the model's own words.
    with pytest.raises(
        keras_bn.KerasBNError, match=r"fails on the synthetic inputs .*\(4, 50, 4\).*cropping"
    ):
        keras_bn.fold_bn(model, input_shapes=(50, 4))
    with pytest.raises(
        keras_bn.KerasBNError, match=r"input shape for input 'sequence' does not fit"
    ):
        export.to_onnx(model, tmp_path / "x.onnx", input_shapes=(50, 5))
    assert not (tmp_path / "x.onnx").exists()


def test_no_length_that_works_asks_for_samples():
    inputs = keras.Input((None, 2))
    x = L.Cropping1D((70000, 0))(L.BatchNormalization()(L.Dense(2)(inputs)))
    model = keras.Model(inputs, x)
    with pytest.raises(keras_bn.KerasBNError, match=r"No input length is known to work.*--samples"):
        keras_bn.fold_bn(model)


def test_model_with_a_fixed_batch_size_verifies_at_that_batch(tmp_path):
    inputs = keras.Input((6,), batch_size=3, name="x")
    x = L.BatchNormalization()(L.Dense(4)(inputs))
    model = randomize_bn(keras.Model(inputs, L.Reshape((2, 2))(x)))
    _, report = keras_bn.fold_bn(model)
    assert report.verification[0]["inputs"] == "synthetic inputs (batch 3, seed 0)"
    export_report = export.to_onnx(model, tmp_path / "m.onnx")
    assert export_report.verification.passed
    assert {r.batch for r in export_report.verification.rows} == {3}  # no batch-1 check


def test_two_conversions_on_two_threads_never_see_each_others_switch():
    # The second conversion starts while the first one converts: it must neither take the
    # first one's TF2ONNX_CATCH_ERRORS for the user's setting nor convert while it is unset.
    import threading

    first_inside, second_started, first_done = (threading.Event() for _ in range(3))
    seen = {}

    def convert_first():
        first_inside.set()
        second_started.wait(1.0)  # times out when the second conversion waits for the lock
        return "first"

    def convert_second():
        seen["start"] = os.environ.get(convert._CATCH_ERRORS)
        second_started.set()
        first_done.wait(5.0)
        seen["end"] = os.environ.get(convert._CATCH_ERRORS)
        return "second"

    def first():
        convert._run_tf2onnx(convert_first)
        first_done.set()

    thread = threading.Thread(target=first)
    thread.start()
    first_inside.wait(5.0)
    assert convert._run_tf2onnx(convert_second) == "second"
    thread.join(10)
    assert seen == {"start": "FALSE", "end": "FALSE"}
    assert convert._CATCH_ERRORS not in os.environ


def test_relu_then_batchnorm_stack_exports_without_a_multiply(tmp_path, rng):
    # Conv(relu, 'same') -> BN -> MaxPool twice (a Keras-2-era tagger), positive scales: each
    # BatchNorm's scale folds through the relu into its conv; the first one's shift stays as one
    # Add (the next conv pads), the last one's goes through the poolings into the Dense.
    inputs = keras.Input((16, 16, 1), name="spectrogram")
    x = inputs
    for i in range(2):
        x = L.Conv2D(4, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = L.MaxPooling2D(name=f"pool{i}")(L.BatchNormalization(name=f"bn{i}")(x))
    x = L.GlobalMaxPooling2D(name="gmp")(x)
    model = randomize_bn(keras.Model(inputs, L.Dense(3, name="tags")(x)))
    unfolded = export.to_onnx(model, tmp_path / "unfolded.onnx", fold=False)
    report = export.to_onnx(model, tmp_path / "m.onnx")
    assert report.verification.passed
    assert unfolded.op_counts.get("Mul", 0) >= 2  # what tf2onnx leaves of the two BatchNorms
    # Adds: bn0's shift, and the Dense's bias (tf2onnx writes it as MatMul + Add).
    assert "Mul" not in report.op_counts and report.op_counts["Add"] == 2
    assert [r.action for r in report.fold.rows] == [keras_bn.fold.THROUGH] * 2
