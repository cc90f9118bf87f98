"""fold_bn: the NumPy math against PyTorch's formulas, every foldable pattern, the negative cases,
bad statistics, keras.applications models and random architectures (hypothesis)."""

import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_bn
from keras_bn import fold_math
from keras_bn.fold import AFFINE, BACKWARD, BATCHNORM_TYPES, FORWARD, KEPT, THROUGH
from tests.tolerances import FOLD_RTOL, THROUGH_RTOL


def randomize_bn(model, seed=0):
    """BatchNorm statistics as in the acceptance criteria: gamma U[0.5,1.5], beta N(0,0.1),
    mean N(0,0.1), var U[0.5,2]."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, BATCHNORM_TYPES):
            n = layer.moving_mean.shape[0]
            values = {
                "gamma": rng.uniform(0.5, 1.5, n),
                "beta": rng.normal(0, 0.1, n),
                "moving_mean": rng.normal(0, 0.1, n),
                "moving_variance": rng.uniform(0.5, 2, n),
            }
            for w in layer.weights:
                if w.name in values:
                    w.assign(values[w.name].astype(w.dtype))
    return model


def batchnorms(model):
    return [l for l in model._flatten_layers() if isinstance(l, BATCHNORM_TYPES)]


def assert_close_to_original(model, folded, x):
    ref = np.asarray(model(x, training=False), np.float64)
    out = np.asarray(folded(x, training=False), np.float64)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=FOLD_RTOL * np.abs(ref).max())


# ------------------------------------------------------------------------------------------------
# Math: independent references.


def torch_fuse_conv_bn_weights(conv_w, conv_b, bn_rm, bn_rv, bn_eps, bn_w, bn_b):
    """NumPy transcription of torch.nn.utils.fusion.fuse_conv_bn_weights (PyTorch layout:
    conv_w is (out, in, k...))."""
    bn_var_rsqrt = 1.0 / np.sqrt(bn_rv + bn_eps)
    fused_w = conv_w * (bn_w * bn_var_rsqrt).reshape([-1] + [1] * (conv_w.ndim - 1))
    fused_b = (conv_b - bn_rm) * bn_var_rsqrt * bn_w + bn_b
    return fused_w, fused_b


def test_fold_backward_equals_pytorch_formula(rng):
    kernel = rng.normal(size=(3, 3, 4, 5))  # Keras (kh, kw, in, out)
    bias, gamma, beta = rng.normal(size=5), rng.uniform(0.5, 1.5, 5), rng.normal(size=5)
    mean, var, eps = rng.normal(size=5), rng.uniform(0.5, 2, 5), 1e-3
    s, t = fold_math.bn_scale_shift(mean, var, eps, gamma, beta)
    w, b = fold_math.fold_backward(kernel, bias, s, t)
    tw, tb = torch_fuse_conv_bn_weights(
        kernel.transpose(3, 2, 0, 1), bias, mean, var, eps, gamma, beta
    )
    np.testing.assert_allclose(w.transpose(3, 2, 0, 1), tw, rtol=1e-12)
    np.testing.assert_allclose(b, tb, rtol=1e-12)
    # Hand-computed one-channel case: gamma 2, beta 1, mean 3, var 3, eps 1 -> s = 1, t = -2.
    s1, t1 = fold_math.bn_scale_shift([3.0], [3.0], 1.0, [2.0], [1.0])
    assert s1[0] == pytest.approx(1.0) and t1[0] == pytest.approx(-2.0)
    w1, b1 = fold_math.fold_backward(np.array([[4.0]]), None, s1, t1)
    assert w1[0, 0] == pytest.approx(4.0) and b1[0] == pytest.approx(-2.0)


def test_fold_forward_matches_direct_evaluation(rng):
    # Dense: (x * s + t) @ W + b == x @ W' + b'.
    x = rng.normal(size=(7, 4))
    kernel, bias = rng.normal(size=(4, 3)), rng.normal(size=3)
    s, t = rng.uniform(0.5, 2, 4), rng.normal(size=4)
    w, b = fold_math.fold_forward(kernel, bias, s, t)
    np.testing.assert_allclose(x @ w + b, (x * s + t) @ kernel + bias, rtol=1e-12)
    # Grouped 1-D valid conv, by explicit loops over groups.
    groups, length, ksize = 2, 6, 3
    x = rng.normal(size=(length, 4))
    kernel, bias = rng.normal(size=(ksize, 2, 6)), rng.normal(size=6)
    w, b = fold_math.fold_forward(kernel, bias, s, t, groups=groups)

    def conv(inp, k, bb):
        out = np.zeros((length - ksize + 1, 6))
        for o in range(6):
            g = o // 3
            for p in range(length - ksize + 1):
                out[p, o] = np.sum(inp[p : p + ksize, 2 * g : 2 * g + 2] * k[:, :, o]) + bb[o]
        return out

    np.testing.assert_allclose(conv(x, w, b), conv(x * s + t, kernel, bias), rtol=1e-10)


def depthwise_1d_valid(x, kernel, bias):
    """Explicit loops: x (length, C), kernel (k, C, M) -> (length - k + 1, C * M)."""
    ksize, channels, multiplier = kernel.shape
    out = np.zeros((x.shape[0] - ksize + 1, channels * multiplier))
    for p in range(out.shape[0]):
        for c in range(channels):
            for m in range(multiplier):
                out[p, c * multiplier + m] = (
                    x[p : p + ksize, c] @ kernel[:, c, m] + bias[c * multiplier + m]
                )
    return out


def test_fold_forward_depthwise_and_separable_match_direct_evaluation(rng):
    x = rng.normal(size=(9, 3))
    s, t = rng.uniform(0.5, 2, 3), rng.normal(size=3)
    kernel, bias = rng.normal(size=(4, 3, 2)), rng.normal(size=6)
    w, b = fold_math.fold_forward_depthwise(kernel, bias, s, t)
    np.testing.assert_allclose(
        depthwise_1d_valid(x, w, b), depthwise_1d_valid(x * s + t, kernel, bias), rtol=1e-10
    )
    w, b = fold_math.fold_forward_depthwise(kernel, None, s, t)  # no bias: b' is the constant alone
    np.testing.assert_allclose(
        depthwise_1d_valid(x, w, b), depthwise_1d_valid(x * s + t, kernel, np.zeros(6)), rtol=1e-10
    )
    # Separable: depthwise, then the pointwise (1, C * M, out) kernel, then one bias.
    pointwise, bias = rng.normal(size=(1, 6, 5)), rng.normal(size=5)
    w, b = fold_math.fold_forward_separable(kernel, pointwise, bias, s, t)
    zero = np.zeros(6)
    np.testing.assert_allclose(
        depthwise_1d_valid(x, w, zero) @ pointwise[0] + b,
        depthwise_1d_valid(x * s + t, kernel, zero) @ pointwise[0] + bias,
        rtol=1e-10,
    )


@pytest.mark.parametrize(
    "mean,var,eps,match",
    [
        ([np.nan], [1.0], 1e-3, r"moving_mean has 1 non-finite"),
        ([0.0], [np.inf], 1e-3, r"moving_variance has 1 non-finite"),
        (
            [0.0],
            [-1.0],
            1e-3,
            r"moving_variance \+ epsilon must be positive\. Expected: > 0\. Received: min -0\.999",
        ),
    ],
)
def test_bad_statistics_are_refused(mean, var, eps, match):
    with pytest.raises(keras_bn.KerasBNError, match=match):
        fold_math.bn_scale_shift(mean, var, eps)


# ------------------------------------------------------------------------------------------------
# Backward folding for every producer.

L = keras.layers
PRODUCERS = {
    "dense": ((6,), lambda: L.Dense(5)),
    "dense_rank3": ((4, 6), lambda: L.Dense(5, use_bias=False)),
    "conv1d_causal_dilated": ((12, 3), lambda: L.Conv1D(4, 3, padding="causal", dilation_rate=2)),
    "conv2d_same_stride": (
        (9, 9, 3),
        lambda: L.Conv2D(4, 3, strides=2, padding="same", use_bias=False),
    ),
    "conv2d_groups": ((8, 8, 4), lambda: L.Conv2D(6, 3, groups=2)),
    "conv3d": ((5, 5, 5, 2), lambda: L.Conv3D(3, 2)),
    "depthwise1d": ((10, 3), lambda: L.DepthwiseConv1D(3, depth_multiplier=2, use_bias=False)),
    "depthwise2d": ((8, 8, 3), lambda: L.DepthwiseConv2D(3, depth_multiplier=3, padding="same")),
    "separable1d": ((10, 3), lambda: L.SeparableConv1D(4, 3, depth_multiplier=2)),
    "separable2d": ((8, 8, 3), lambda: L.SeparableConv2D(5, 3, use_bias=False)),
    "conv1d_transpose": ((6, 3), lambda: L.Conv1DTranspose(4, 3, strides=2)),
    "conv2d_transpose": (
        (5, 5, 3),
        lambda: L.Conv2DTranspose(4, 3, strides=2, padding="same", use_bias=False),
    ),
    "conv3d_transpose": ((3, 3, 3, 2), lambda: L.Conv3DTranspose(3, 2)),
}
BN_VARIANTS = {
    "keras": lambda: L.BatchNormalization(),
    "keras_bn": lambda: keras_bn.BatchNorm(epsilon=1e-5),
    "no_center": lambda: L.BatchNormalization(center=False),
    "no_scale": lambda: keras_bn.BatchNorm(scale=False),
}


@pytest.mark.parametrize("bn_kind", list(BN_VARIANTS))
@pytest.mark.parametrize("producer", list(PRODUCERS))
def test_backward_fold_every_producer(producer, bn_kind, rng):
    shape, make = PRODUCERS[producer]
    inputs = keras.Input(shape)
    layer = make()
    x = BN_VARIANTS[bn_kind]()(layer(inputs))
    model = randomize_bn(keras.Model(inputs, L.Activation("tanh")(x)))
    folded, report = keras_bn.fold_bn(model)
    assert_close_to_original(model, folded, rng.normal(size=(3, *shape)).astype("float32"))
    assert batchnorms(folded) == []
    assert [(r.action, r.into) for r in report.rows] == [(BACKWARD, layer.name)]
    assert folded.get_layer(layer.name).use_bias


def test_channels_first_folds_on_the_weights(rng):
    # TF on CPU cannot run channels_first convs: check the folded weights against NumPy.
    inputs = keras.Input((3, 8, 8))
    conv = L.Conv2D(4, 3, data_format="channels_first")
    bn = L.BatchNormalization(axis=1)
    model = randomize_bn(keras.Model(inputs, bn(conv(inputs))))
    folded, report = keras_bn.fold_bn(model, verify=False)
    assert [(r.action, r.into) for r in report.rows] == [(BACKWARD, conv.name)]
    gamma, beta, mean, var = (np.asarray(w, np.float64) for w in bn.weights)
    s = gamma / np.sqrt(var + bn.epsilon)
    kernel, bias = (np.asarray(w, np.float64) for w in conv.weights)
    assert (
        report.rows[0].reason == f"'{conv.name}' takes the name '{bn.name}' to keep the output name"
    )
    new_kernel, new_bias = folded.get_layer(bn.name).get_weights()
    np.testing.assert_allclose(new_kernel, kernel * s, rtol=1e-6)
    np.testing.assert_allclose(new_bias, (bias - mean) * s + beta, rtol=1e-6, atol=1e-7)
    # Negative: a channels_first conv followed by a BatchNorm on the last axis is not folded.
    odd = keras.Model(
        inputs, L.BatchNormalization(axis=-1)(L.Conv2D(4, 3, data_format="channels_first")(inputs))
    )
    _, report = keras_bn.fold_bn(odd, verify=False)
    assert report.rows[0].action == AFFINE and "channel axis is 1" in report.rows[0].reason


# ------------------------------------------------------------------------------------------------
# Forward folding, leftovers, negative cases.


def test_forward_fold_into_dense_and_valid_or_pointwise_conv(rng):
    inputs = keras.Input((8, 8, 3))
    x = L.ReLU()(inputs)
    x = L.BatchNormalization(name="bn_valid")(x)
    x = L.Conv2D(4, 3, padding="valid", name="valid_conv", activation="relu")(x)
    x = L.BatchNormalization(name="bn_pointwise")(x)
    x = L.Conv2D(5, 1, padding="same", name="pointwise")(x)
    x = L.ReLU()(x)
    x = L.BatchNormalization(name="bn_same")(x)
    x = L.Conv2D(3, 3, padding="same", name="same_conv")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.BatchNormalization(name="bn_dense")(L.ReLU()(x))
    model = randomize_bn(keras.Model(inputs, L.Dense(2, name="head")(x)))
    folded, report = keras_bn.fold_bn(model)
    assert_close_to_original(model, folded, rng.normal(size=(4, 8, 8, 3)).astype("float32"))
    rows = {r.name: r for r in report.rows}
    assert (rows["bn_valid"].action, rows["bn_valid"].into) == (FORWARD, "valid_conv")
    assert (rows["bn_pointwise"].action, rows["bn_pointwise"].into) == (FORWARD, "pointwise")
    assert (rows["bn_dense"].action, rows["bn_dense"].into) == (FORWARD, "head")
    # After pointwise -> ReLU, through the ReLU: its shift stays, the next conv pads.
    assert (rows["bn_same"].action, rows["bn_same"].into) == (THROUGH, "pointwise")
    assert "pads with zeros ('same'): forward folding is not exact" in rows["bn_same"].reason
    assert [type(l).__name__ for l in folded.layers].count("ChannelAffine") == 1
    assert batchnorms(folded) == []


def test_forward_fold_into_depthwise_and_separable(rng):
    inputs = keras.Input((10, 10, 3))
    x = L.BatchNormalization(name="bn_dw")(L.ReLU()(inputs))
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="valid", name="dw")(x)
    x = L.BatchNormalization(name="bn_sep")(L.ReLU()(x))
    x = L.SeparableConv2D(4, 3, depth_multiplier=2, padding="valid", use_bias=False, name="sep")(x)
    x = L.BatchNormalization(name="bn_dw1x1")(L.ReLU()(x))
    x = L.DepthwiseConv2D(1, padding="same", name="dw1x1")(x)  # 1x1: no border, 'same' is exact
    x = L.BatchNormalization(name="bn_dw_same")(L.ReLU()(x))
    x = L.DepthwiseConv2D(3, padding="same", name="dw_same")(x)
    x = L.BatchNormalization(name="bn_sep_same")(L.ReLU()(x))
    x = L.SeparableConv2D(2, 3, padding="same", name="sep_same")(x)
    x = L.BatchNormalization(name="bn_transpose")(L.ReLU()(x))
    x = L.Conv2DTranspose(2, 3, name="transpose", activation="relu")(x)
    model = randomize_bn(keras.Model(inputs, x))
    folded, report = keras_bn.fold_bn(model)
    assert_close_to_original(model, folded, rng.normal(size=(3, 10, 10, 3)).astype("float32"))
    rows = {r.name: r for r in report.rows}
    for bn, layer in (("bn_dw", "dw"), ("bn_sep", "sep"), ("bn_dw1x1", "dw1x1")):
        assert (rows[bn].action, rows[bn].into) == (FORWARD, layer)
    # Each of these follows a conv and a ReLU: its scale folds through the ReLU into that conv,
    # and its shift stays, as the next layer pads (or is a transposed conv).
    for bn, previous, layer in (
        ("bn_dw_same", "dw1x1", "dw_same"),
        ("bn_sep_same", "dw_same", "sep_same"),
    ):
        assert (rows[bn].action, rows[bn].into) == (THROUGH, previous)
        assert f"the next layer '{layer}' pads with zeros ('same')" in rows[bn].reason
    assert (rows["bn_transpose"].action, rows["bn_transpose"].into) == (THROUGH, "sep_same")
    assert "unevenly" in rows["bn_transpose"].reason
    assert folded.get_layer("sep").use_bias  # the folded constant needs a bias
    assert len(batchnorms(folded)) == 0
    assert [type(l).__name__ for l in folded.layers].count("ChannelAffine") == 3


def test_forward_fold_into_channels_first_depthwise_on_the_weights(rng):
    # TF on CPU cannot run channels_first convs: the folded weights must equal those of the
    # same network in channels_last, which runs.
    def build(data_format):
        shape, axis = ((3, 7, 7), 1) if data_format == "channels_first" else ((7, 7, 3), -1)
        inputs = keras.Input(shape)
        x = L.BatchNormalization(axis=axis, name="bn")(L.ReLU()(inputs))
        x = L.DepthwiseConv2D(3, depth_multiplier=2, data_format=data_format, name="dw")(x)
        return keras.Model(inputs, x)

    last, first = randomize_bn(build("channels_last")), build("channels_first")
    first.set_weights(last.get_weights())
    folded_last, _ = keras_bn.fold_bn(last)  # verified by running
    folded_first, report = keras_bn.fold_bn(first, verify=False)
    assert [(r.action, r.into) for r in report.rows] == [(FORWARD, "dw")]
    for a, b in zip(
        folded_first.get_layer("dw").get_weights(), folded_last.get_layer("dw").get_weights()
    ):
        np.testing.assert_array_equal(a, b)


def test_negative_cases_are_left_exact_with_reasons(rng):
    inputs = keras.Input((8, 8, 3))
    two_consumers = L.Conv2D(4, 3, padding="same", name="two_consumers")(inputs)
    a = L.BatchNormalization(name="bn_after_branch")(two_consumers)
    relu_conv = L.Conv2D(4, 3, padding="same", activation="relu", name="relu_conv")(
        a + two_consumers
    )
    b = L.BatchNormalization(name="bn_after_relu")(relu_conv)
    shared = L.Conv2D(4, 1, name="shared")
    c = L.BatchNormalization(name="bn_after_shared")(shared(b))
    d = shared(c)
    model = randomize_bn(keras.Model(inputs, d))
    for replace in (True, False):
        folded, report = keras_bn.fold_bn(model, replace_leftovers=replace)
        assert_close_to_original(model, folded, rng.normal(size=(2, 8, 8, 3)).astype("float32"))
        rows = {r.name: r for r in report.rows}
        assert "the output of 'two_consumers' has 2 consumers" in rows["bn_after_branch"].reason
        # Not backward (relu), not forward (the next conv is shared): its positive scales fold
        # through the relu into the conv, and its shift stays as one add.
        assert rows["bn_after_relu"].action == THROUGH
        assert "'relu_conv' has a non-linear activation (relu)" not in rows["bn_after_relu"].reason
        assert "shift left as one add" in rows["bn_after_relu"].reason
        assert "'shared' is shared (called 2 times)" in rows["bn_after_shared"].reason
        expected = AFFINE if replace else KEPT
        assert all(r.action == expected for r in report.rows if r.name != "bn_after_relu")
        assert len(batchnorms(folded)) == (0 if replace else 2)
        assert len(report.not_folded) == 2 and report.counts[expected] == 2


@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_bad_statistics_leave_the_batchnorm_with_a_reason(bad):
    inputs = keras.Input((4,))
    bn = L.BatchNormalization(name="bad_bn")
    model = keras.Model(inputs, bn(L.Dense(3, name="producer")(inputs)))
    var = np.array([1.0, -5.0 if bad == "negative" else np.nan, 1.0], np.float32)
    bn.moving_variance.assign(var)
    folded, report = keras_bn.fold_bn(model, verify=False)
    assert report.rows[0].action == KEPT and report.rows[0].reason.startswith("bad statistics")
    assert len(batchnorms(folded)) == 1
    for w in folded.get_layer("producer").weights:
        assert np.all(np.isfinite(np.asarray(w)))
    np.testing.assert_array_equal(np.asarray(folded.get_layer("bad_bn").moving_variance), var)


def test_callers_model_is_not_modified(rng):
    inputs = keras.Input((6,))
    model = randomize_bn(
        keras.Model(inputs, L.BatchNormalization()(L.Dense(4, use_bias=False)(inputs)))
    )
    before = [w.numpy().copy() for w in model.weights]
    layers_before = [l.name for l in model.layers]
    nodes_before = [len(l._inbound_nodes) for l in model.layers]
    keras_bn.fold_bn(model)
    assert [l.name for l in model.layers] == layers_before
    assert [len(l._inbound_nodes) for l in model.layers] == nodes_before
    assert not model.layers[1].use_bias
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_verification_error_names_the_problem(rng):
    inputs = keras.Input((8, 8, 3))
    x = L.BatchNormalization()(L.Conv2D(8, 3)(inputs))
    model = randomize_bn(keras.Model(inputs, L.Conv2D(4, 3)(x)))
    _, report = keras_bn.fold_bn(model)
    assert report.verification[0]["max_abs_error"] > 0  # float rounding makes it non-zero
    with pytest.raises(
        keras_bn.KerasBNError,
        match=r"The folded model's output 'conv2d(_\d+)?' differs from the original on synthetic inputs.*"
        r"Expected: max abs error <= 0 \+ 0 \* .*Received: ",
    ):
        keras_bn.fold_bn(model, rtol=0.0, atol=0.0)
    with pytest.raises(keras_bn.KerasBNError, match=r"Expected: a keras.Model\. Received: str"):
        keras_bn.fold_bn("model.keras")


def test_float16_overflow_declines_the_fold():
    inputs = keras.Input((4,), dtype="float16")
    bn = L.BatchNormalization(dtype="float16", epsilon=1e-7)
    dense = L.Dense(3, dtype="float16")
    model = keras.Model(inputs, bn(dense(inputs)))
    dense.kernel.assign(np.full((4, 3), 1000.0, np.float16))
    bn.moving_variance.assign(np.zeros(3, np.float16))
    folded, report = keras_bn.fold_bn(model, verify=False)
    # s = 1 / sqrt(1e-7) = 3162: kernel 1000 * 3162 = 3.2e6 > 65504. s and t themselves fit
    # float16, so the BatchNorm becomes a ChannelAffine.
    assert report.rows[0].action == AFFINE and report.rows[0].into is None
    assert re.search(
        r"folding into 'dense(_\d+)?' is declined: its folded kernel reaches 3\.162e\+06, "
        r"beyond float16's largest value 6\.55e\+04",
        report.rows[0].reason,
    )
    assert all(np.all(np.isfinite(np.asarray(w, np.float32))) for w in folded.weights)
    assert len(batchnorms(folded)) == 0
    assert [type(l).__name__ for l in folded.layers][-1] == "ChannelAffine"


def test_folded_value_beyond_float32_is_declined_not_written_as_inf(rng):
    # gamma 1e38, mean 10, var 1 (all finite): bias' = beta - mean * s = -1e39, past float32.
    inputs = keras.Input((3,))
    dense = L.Dense(2, name="dense")
    x = L.BatchNormalization(name="bn", epsilon=1e-3)(dense(inputs))
    model = keras.Model(inputs, L.ReLU(name="relu")(x))
    bn = model.get_layer("bn")
    bn.set_weights(
        [
            np.full(2, 1e38, np.float32),
            np.zeros(2, np.float32),
            np.full(2, 10.0, np.float32),
            np.ones(2, np.float32),
        ]
    )
    folded, report = keras_bn.fold_bn(model, verify=False)
    row = report.rows[0]
    assert row.action == KEPT  # s = 1e38 / sqrt(1.001) fits, t = -1e39 does not: no affine either
    assert (
        "folding into 'dense' is declined: its folded bias reaches 9.995e+38, beyond float32's "
        "largest value 3.403e+38"
        in row.reason
        and "its scale or shift" in row.reason
    )
    assert all(np.all(np.isfinite(np.asarray(w))) for w in folded.weights)
    # gamma 1e30, epsilon 1e-44 (a float32 subnormal) with variance 0: var + eps > 0 in float32
    # too, but s = 1e30 / sqrt(9.8e-45) = 1e52 is no float32.
    model2 = keras.Model(
        inputs, L.BatchNormalization(epsilon=1e-44, name="bn2")(L.Dense(2, name="dense2")(inputs))
    )
    model2.get_layer("bn2").moving_variance.assign(np.zeros(2, np.float32))
    model2.get_layer("bn2").gamma.assign(np.full(2, 1e30, np.float32))
    folded2, report2 = keras_bn.fold_bn(model2, verify=False)
    assert report2.rows[0].action == KEPT and "folded kernel" in report2.rows[0].reason
    assert all(np.all(np.isfinite(np.asarray(w))) for w in folded2.weights)
    # Negative case: the same model with ordinary statistics folds.
    bn.set_weights(
        [
            np.ones(2, np.float32),
            np.zeros(2, np.float32),
            np.full(2, 10.0, np.float32),
            np.ones(2, np.float32),
        ]
    )
    assert keras_bn.fold_bn(model)[1].rows[0].action == BACKWARD


def test_affine_is_declined_when_its_scale_overflows():
    inputs = keras.Input((3,))
    x = L.BatchNormalization(epsilon=1e-44, name="bn")(L.ReLU()(inputs))
    model = keras.Model(inputs, x)
    model.get_layer("bn").moving_variance.assign(np.zeros(3, np.float32))
    model.get_layer("bn").gamma.assign(np.full(3, 1e30, np.float32))
    _, report = keras_bn.fold_bn(model, verify=False)
    assert report.rows[0].action == KEPT
    assert re.search(
        r"its scale or shift reaches 1(\.0\d*)?e\+52, beyond float32's", report.rows[0].reason
    )
    # epsilon 1e-300 is 0 in float32, where the layer adds it: a bad statistic, not a fold.
    model.get_layer("bn").epsilon = 1e-300
    _, report = keras_bn.fold_bn(model, verify=False)
    assert "must be positive (computed in float32)" in report.rows[0].reason


def test_verification_never_counts_new_infinities_as_agreement():
    from keras_bn.verification import compare

    inf = np.float32(np.inf)
    assert compare([1.0, inf], [1.0, inf]).max_abs == 0.0  # the original made that inf too
    assert compare([1.0, 2.0], [1.0, inf]).max_abs == np.inf
    assert compare([1.0, 2.0], [1.0, np.nan]).max_abs == np.inf
    assert compare([np.nan, 2.0], [np.nan, 2.0]).max_abs == 0.0
    assert compare([np.nan, 2.0], [1.0, 2.0]).max_abs == np.inf


@keras.saving.register_keras_serializable(package="tests")
class Swish:
    """A callable activation object (no __name__), serializable as Keras asks."""

    def __call__(self, x):
        return x * keras.ops.sigmoid(x)

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls()


def test_callable_activation_object_is_declined_with_its_class_name():
    inputs = keras.Input((4,))
    x = L.BatchNormalization(name="bn")(L.Dense(3, activation=Swish(), name="dense")(inputs))
    _, report = keras_bn.fold_bn(keras.Model(inputs, x))
    assert report.rows[0].action == AFFINE
    assert "'dense' has a non-linear activation (Swish)" in report.rows[0].reason


@pytest.mark.parametrize("verify", [True, False])
def test_subclassed_and_unbuilt_models_get_their_message(verify, subclassed_model):
    sub = subclassed_model
    with pytest.raises(
        keras_bn.KerasBNError,
        match=r"fold_bn needs a graph it can read\. "
        r"Expected: a Sequential or Functional keras\.Model\. "
        r"Received: SubclassedWithBatchNorm \(a subclassed model\)",
    ):
        keras_bn.fold_bn(sub, verify=verify)
    unbuilt = keras.Sequential([L.Dense(3), L.BatchNormalization()])
    with pytest.raises(
        keras_bn.KerasBNError,
        match=r"The Sequential model must be built.*Received: "
        r"unbuilt model",
    ):
        keras_bn.fold_bn(unbuilt, verify=verify)


@pytest.mark.parametrize(
    "samples,match",
    [
        (lambda x: x.astype(np.float64) * 1e300, r"Samples for input 'image' overflow float32"),
        (
            lambda x: x[:, :4],
            r"Samples for input 'image' have the wrong shape\. Expected: shape "
            r"\(batch, 8, 8, 3\)\. Received: shape \(5, 4, 8, 3\), dtype float32",
        ),
        (
            lambda x: {"other": x},
            r"The samples' keys do not match the model inputs\. Expected: keys "
            r"\['image'\]\. Received: keys \['other'\]",
        ),
        (
            lambda x: np.full(x.shape, "a"),
            r"Samples for input 'image' have an unusable dtype\. "
            r"Expected: numbers castable to float32\. Received: .*<U1",
        ),
        (lambda x: [x, x], r"Expected: 1 array\(s\), one per input \['image'\]\. Received: 2"),
        (lambda x: x[:0], r"Expected: one batch size >= 1"),
    ],
)
def test_bad_samples_are_refused_before_any_work(samples, match, rng):
    inputs = keras.Input((8, 8, 3), name="image")
    model = keras.Model(inputs, L.BatchNormalization()(L.Conv2D(4, 3)(inputs)))
    x = rng.normal(size=(5, 8, 8, 3)).astype("float32")
    with pytest.raises(keras_bn.KerasBNError, match=match) as info:
        keras_bn.fold_bn(model, samples=samples(x))
    assert "\x1b[" not in str(info.value)


def test_float64_samples_are_cast(rng):
    inputs = keras.Input((8, 8, 3), name="image")
    model = randomize_bn(keras.Model(inputs, L.BatchNormalization()(L.Conv2D(4, 3)(inputs))))
    x = rng.normal(size=(5, 8, 8, 3))  # what np.save(np.random.rand(...)) writes: float64
    _, report = keras_bn.fold_bn(model, samples=x)
    assert [v["inputs"] for v in report.verification][-1] == "samples"


# ------------------------------------------------------------------------------------------------
# Files, names, nesting, masks.


def test_folded_model_saves_and_loads_without_keras_bn(tmp_path, rng):
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras_bn.BatchNorm(name="bn1")(L.Conv2D(4, 3, name="conv1")(inputs))
    x = L.GlobalAveragePooling2D(name="pool")(L.ReLU(name="relu")(x))
    out = keras_bn.BatchNorm(name="logits")(L.Dense(3, name="dense")(x))
    model = randomize_bn(keras.Model(inputs, out))
    folded, report = keras_bn.fold_bn(model)
    assert report.counts[BACKWARD] == 2
    assert [x.name for x in folded.inputs] == ["image"]
    assert folded.output_names == model.output_names == ["logits"]
    assert {"pool", "relu", "conv1"} <= {l.name for l in folded.layers}
    path = tmp_path / "folded.keras"
    folded.save(path)
    data = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", data)
    script = textwrap.dedent(f"""
        import numpy as np, keras  # no keras_bn import
        m = keras.saving.load_model({str(path)!r})
        np.save({str(tmp_path / "y.npy")!r}, m.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0))
    """)
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), model.predict(data, verbose=0), rtol=1e-5, atol=1e-6
    )


def test_sequential_and_masked_inputs(rng):
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            L.Embedding(10, 4, mask_zero=True),
            L.Conv1D(6, 1),
            keras_bn.BatchNorm(),
            L.GlobalAveragePooling1D(),
            L.Dense(3, use_bias=False),
            L.BatchNormalization(),
        ]
    )
    randomize_bn(model)
    folded, report = keras_bn.fold_bn(model)
    tokens = np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]], np.int32)
    assert_close_to_original(model, folded, tokens)
    assert report.counts[BACKWARD] == 2 and batchnorms(folded) == []


APPLICATIONS = [
    ("ResNet50", (64, 64, 3)),
    ("MobileNetV2", (64, 64, 3)),
    ("EfficientNetB0", (64, 64, 3)),
    ("DenseNet121", (64, 64, 3)),
    ("Xception", (71, 71, 3)),
]


# Independent counts, from the architectures (not from the pass): (BatchNorms, folded backward).
# ResNet50: 53, each after a linear conv. MobileNetV2: 52, each after a conv. EfficientNetB0: stem
# 1 + 15 expand + 16 depthwise + 16 project + top 1 = 49. Xception: 2 + 3 * 3 + 8 * 3 + 3 + 2 = 40.
# DenseNet121: 1 + 2 * 58 (blocks 6+12+24+16) + 3 transitions + 1 final = 121 BatchNorms, of which
# conv1/bn and the second BatchNorm of each of the 58 blocks follow a conv (59); the rest follow a
# concatenation and then a ReLU, so they become affine.
APPLICATION_COUNTS = {
    "ResNet50": (53, 53),
    "MobileNetV2": (52, 52),
    "EfficientNetB0": (49, 49),
    "DenseNet121": (121, 59),
    "Xception": (40, 40),
}


@pytest.mark.parametrize("name,shape", APPLICATIONS)
def test_keras_applications(name, shape, rng):
    model = getattr(keras.applications, name)(
        weights=None, input_shape=shape, classes=10, classifier_activation=None
    )
    randomize_bn(model, seed=1)
    folded, report = keras_bn.fold_bn(model)
    x = rng.normal(size=(2, *shape)).astype("float32")
    assert_close_to_original(model, folded, x)
    total, backward = APPLICATION_COUNTS[name]
    assert report.batchnorms == len(batchnorms(model)) == total
    assert report.counts[BACKWARD] == backward
    assert report.counts[AFFINE] == total - backward - report.counts[FORWARD]
    assert len(batchnorms(folded)) == report.counts[KEPT] == 0


def test_nested_backbone_inside_classifier(rng):
    backbone = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35
    )
    inputs = keras.Input((32, 32, 3))
    x = L.GlobalAveragePooling2D()(backbone(inputs))
    x = L.BatchNormalization(name="head_bn")(L.Dense(8, name="head_dense")(x))
    model = randomize_bn(keras.Model(inputs, L.Dense(3)(x)))
    folded, report = keras_bn.fold_bn(model)
    assert_close_to_original(model, folded, rng.normal(size=(2, 32, 32, 3)).astype("float32"))
    assert report.counts[BACKWARD] == report.batchnorms == len(batchnorms(model))
    assert any(r.name.startswith(backbone.name + "/") for r in report.rows)
    assert batchnorms(folded) == []


# ------------------------------------------------------------------------------------------------
# Property-based: random small architectures.

BLOCKS = [
    "conv",
    "dense_conv1x1",
    "depthwise",
    "separable",
    "transpose",
    "relu_bn",
    "bn_valid_conv",
    "branch",
    "conv_relu_bn",
]


def build_random_model(blocks, channels, kernel, use_bias, seed):
    rng = np.random.default_rng(seed)
    inputs = keras.Input((9, 9, 3))
    x = inputs
    for block in blocks:
        if block == "conv":
            x = L.BatchNormalization()(
                L.Conv2D(channels, kernel, padding="same", use_bias=use_bias, groups=1)(x)
            )
        elif block == "dense_conv1x1":
            x = L.BatchNormalization()(L.Dense(channels, use_bias=use_bias)(x))
        elif block == "depthwise":
            x = keras_bn.BatchNorm()(
                L.DepthwiseConv2D(kernel, padding="same", depth_multiplier=2)(x)
            )
        elif block == "separable":
            x = L.BatchNormalization()(L.SeparableConv2D(channels, kernel, padding="same")(x))
        elif block == "transpose":
            x = L.BatchNormalization()(L.Conv2DTranspose(channels, kernel, padding="same")(x))
        elif block == "relu_bn":
            x = L.BatchNormalization()(L.ReLU()(x))
        elif block == "bn_valid_conv":
            x = L.ReLU()(x)
            x = L.ZeroPadding2D(kernel // 2)(
                L.Conv2D(channels, kernel, padding="valid")(L.BatchNormalization()(x))
            )
        elif block == "branch":
            y = L.Conv2D(channels, 1)(x)
            x = L.Concatenate()([L.BatchNormalization()(y), y])
        elif block == "conv_relu_bn":
            x = L.BatchNormalization()(
                L.Conv2D(channels, kernel, padding="same", activation="relu")(x)
            )
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))
    return randomize_bn(model, seed=int(rng.integers(1 << 30)))


# Blocks whose BatchNorm directly follows a linear, single-consumer conv/dense: must fold backward.
LINEAR_PRODUCER_BLOCKS = {"conv", "dense_conv1x1", "depthwise", "separable", "transpose"}


# derandomize: the same 12 architectures on every run, so that a failure is reproducible and the
# suite never fails one run in a few on a draw it has not seen before.
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4),
    channels=st.integers(2, 5),
    kernel=st.sampled_from([1, 3]),
    use_bias=st.booleans(),
    seed=st.integers(0, 1000),
    replace=st.booleans(),
)
def test_random_architectures(blocks, channels, kernel, use_bias, seed, replace):
    model = build_random_model(blocks, channels, kernel, use_bias, seed)
    folded, report = keras_bn.fold_bn(model, replace_leftovers=replace)
    x = np.random.default_rng(seed).normal(size=(2, 9, 9, 3)).astype("float32")
    assert_close_to_original(model, folded, x)
    # Independent of the pass: known from the blocks drawn. A pass that left every BatchNorm as
    # a ChannelAffine would match the outputs and fail here.
    assert report.counts[BACKWARD] == sum(b in LINEAR_PRODUCER_BLOCKS for b in blocks)
    assert report.counts[FORWARD] >= blocks.count("bn_valid_conv")
    assert len(batchnorms(folded)) == report.counts[KEPT]
    assert len(report.rows) == len(batchnorms(model))
    # Conv(relu) -> BN folds through the relu, unless the next block starts with a layer that
    # takes it forward: a Dense, or a 1x1 conv (the branch's always, the others' when kernel 1).
    forward_takers = {"dense_conv1x1", "branch"} | (
        {"conv", "depthwise", "separable", "conv_relu_bn"} if kernel == 1 else set()
    )
    through = [
        b == "conv_relu_bn" and not set(blocks[i + 1 : i + 2]) & forward_takers
        for i, b in enumerate(blocks)
    ]
    assert report.counts[THROUGH] == sum(through)
    affines = [l for l in folded.layers if isinstance(l, keras_bn.ChannelAffine)]
    # Gammas are positive here: what a fold through a relu leaves is an add, never a multiply.
    assert sum(a.use_scale for a in affines) == report.counts[AFFINE]
    assert sum(not a.use_scale for a in affines) <= report.counts[THROUGH]


# ------------------------------------------------------------------------------------------------
# Exact layer types, the bad-statistics option, reports as data, threads.


class StandardizedConv2D(L.Conv2D):
    """Weight standardization: call() differs from Conv2D's, so its kernel is not the map."""

    def call(self, inputs):
        kernel = self.kernel
        mean = keras.ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
        std = keras.ops.std(kernel, axis=(0, 1, 2), keepdims=True) + 1e-5
        return keras.ops.conv(inputs, (kernel - mean) / std, padding="valid") + self.bias


class NamedConv2D(L.Conv2D):
    """A subclass that keeps Conv2D.call: folds like a Conv2D."""


def test_subclass_overriding_call_is_declined_with_its_reason(rng):
    inputs = keras.Input((8, 8, 3))
    x = L.BatchNormalization(name="bn_custom")(StandardizedConv2D(4, 3, name="ws")(inputs))
    x = L.BatchNormalization(name="bn_named")(NamedConv2D(4, 3, padding="same", name="named")(x))
    model = randomize_bn(keras.Model(inputs, L.Flatten()(x)))
    folded, report = keras_bn.fold_bn(model, replace_leftovers=True)
    rows = {r.name: r for r in report.rows}
    assert rows["bn_custom"].action == AFFINE
    assert (
        "it follows 'ws': custom layer type StandardizedConv2D overrides call()"
        in rows["bn_custom"].reason
    )
    assert rows["bn_named"].action == BACKWARD and rows["bn_named"].into == "named"
    assert_close_to_original(model, folded, rng.normal(size=(2, 8, 8, 3)).astype("float32"))


def test_bad_statistics_keep_or_raise():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(L.Dense(3)(inputs)))
    model.get_layer("bn").moving_variance.assign(np.array([1.0, np.nan, 1.0], np.float32))
    _, report = keras_bn.fold_bn(model, verify=False)
    assert (
        report.rows[0].action == KEPT
        and "moving_variance has 1 non-finite" in report.rows[0].reason
    )
    with pytest.raises(
        keras_bn.KerasBNError,
        match=r"BatchNorm 'bn' has corrupt statistics: "
        r"moving_variance has 1 non-finite",
    ):
        keras_bn.fold_bn(model, on_bad_statistics="raise")
    with pytest.raises(
        keras_bn.KerasBNError,
        match=r"Invalid `on_bad_statistics`\. Expected: "
        r"'keep' or 'raise'\. Received: 'ignore'",
    ):
        keras_bn.fold_bn(model, on_bad_statistics="ignore")


def test_report_actions_are_an_enum_and_data(rng):
    import json

    from keras_bn.fold import Action

    inputs = keras.Input((6,))
    model = randomize_bn(keras.Model(inputs, L.BatchNormalization()(L.Dense(3)(inputs))))
    _, report = keras_bn.fold_bn(model)
    assert report.rows[0].action is Action.BACKWARD
    # Counts are keyed by the Action, every one present; JSON has the display text.
    assert list(report.counts) == list(Action) and report.counts[Action.BACKWARD] == 1
    data = json.loads(json.dumps(report.to_dict()))
    assert data["counts"]["folded backward"] == 1 and data["counts"]["batchnorms"] == 1
    assert data["rows"][0]["action"] == "folded backward"
    assert "folded backward" in str(report)


def test_no_thread_without_verification(monkeypatch):
    import threading

    inputs = keras.Input((6,))
    model = randomize_bn(keras.Model(inputs, L.BatchNormalization()(L.Dense(3)(inputs))))
    started = []
    real_start = threading.Thread.start

    def spy(self, *args, **kwargs):
        started.append(self.name)
        return real_start(self, *args, **kwargs)

    monkeypatch.setattr(threading.Thread, "start", spy)
    keras_bn.fold_bn(model, verify=False)
    assert not [n for n in started if n.startswith("keras-bn-reference")]
    keras_bn.fold_bn(model)
    assert [n for n in started if n.startswith("keras-bn-reference")]


# ------------------------------------------------------------------------------------------------
# Folding through positively homogeneous activations: relu(s z) = s relu(z) for s > 0.


def numpy_conv1d(x, kernel, bias, padding):
    """Keras's Conv1D (stride 1, no dilation) in float64: x (N, W, C), kernel (k, C, O)."""
    k = kernel.shape[0]
    if padding == "same":
        x = np.pad(x, ((0, 0), ((k - 1) // 2, k - 1 - (k - 1) // 2), (0, 0)))
    width = x.shape[1] - (k - 1)
    return sum(x[:, i : i + width, :] @ kernel[i] for i in range(k)) + bias


def numpy_batchnorm(x, bn):
    g, b, m, v = (np.asarray(w, np.float64) for w in bn.weights[:4])
    return (x - m) / np.sqrt(v + bn.epsilon) * g + b


def numpy_maxpool1d(x):
    n = x.shape[1] // 2
    return x[:, : 2 * n].reshape(x.shape[0], n, 2, x.shape[2]).max(axis=2)


def relu_stack(rng):
    """Conv1D(relu, 'same') -> BN -> MaxPool -> Conv1D('same') -> ReLU -> BN -> MaxPool ->
    Dropout -> Conv1D(1x1) -> Flatten -> Dense, the first BN with a negative-gamma channel and a
    dead channel (zero variance, its conv output always negative)."""
    inputs = keras.Input((32, 3))
    x = L.Conv1D(8, 3, padding="same", activation="relu", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.MaxPooling1D(2, name="pool1")(x)
    x = L.ReLU(name="relu2")(L.Conv1D(6, 3, padding="same", name="c2")(x))
    x = L.BatchNormalization(name="bn2")(x)
    x = L.Dropout(0.5, name="drop")(L.MaxPooling1D(2, name="pool2")(x))
    x = L.Flatten(name="flat")(L.Conv1D(5, 1, name="c3")(x))
    model = randomize_bn(keras.Model(inputs, L.Dense(4, name="out")(x)), seed=3)
    for layer in model.layers:
        if layer.weights and not isinstance(layer, BATCHNORM_TYPES):
            layer.set_weights([rng.normal(0, 0.5, w.shape) for w in layer.get_weights()])
    c1, bn1 = model.get_layer("c1"), model.get_layer("bn1")
    kernel, bias = c1.get_weights()
    kernel[:, :, 2], bias[2] = -np.abs(kernel[:, :, 2]), -5.0  # channel 2 never fires
    c1.set_weights([kernel, bias])
    gamma, variance = bn1.gamma.numpy(), bn1.moving_variance.numpy()
    gamma[5], variance[2] = -0.8, 0.0
    bn1.gamma.assign(gamma)
    bn1.moving_variance.assign(variance)
    return model


def numpy_relu_stack(model, x):
    def weights(name):
        return [np.asarray(w, np.float64) for w in model.get_layer(name).get_weights()]

    h = np.maximum(numpy_conv1d(x, *weights("c1"), "same"), 0)
    h = numpy_maxpool1d(numpy_batchnorm(h, model.get_layer("bn1")))
    h = np.maximum(numpy_conv1d(h, *weights("c2"), "same"), 0)
    h = numpy_maxpool1d(numpy_batchnorm(h, model.get_layer("bn2")))
    h = numpy_conv1d(h, *weights("c3"), "valid").reshape(len(x), -1)
    kernel, bias = weights("out")
    return h @ kernel + bias


def test_fold_through_relu_and_max_pooling_against_float64_numpy(rng):
    model = relu_stack(rng)
    folded, report = keras_bn.fold_bn(model)
    x = rng.normal(size=(6, 32, 3))
    reference = numpy_relu_stack(model, x)
    out = np.asarray(folded.predict(x.astype("float32"), verbose=0), np.float64)
    np.testing.assert_allclose(out, reference, rtol=0, atol=THROUGH_RTOL * np.abs(reference).max())
    rows = {r.name: r for r in report.rows}
    assert [r.action for r in report.rows] == [THROUGH, THROUGH]
    assert rows["bn1"].into == "c1" and rows["bn2"].into == "c2"
    assert "scale of 7 of 8 channels folded through relu" in rows["bn1"].reason
    assert "1 channel(s) with gamma <= 0 keep a multiply" in rows["bn1"].reason
    assert "the next layer 'c2' pads with zeros" in rows["bn1"].reason
    assert "shift folded forward through pool2, drop into 'c3'" in rows["bn2"].reason
    # What is left: bn1 as one multiply-add (its negative channel), bn2 nothing at all.
    affines = [l for l in folded.layers if isinstance(l, keras_bn.ChannelAffine)]
    assert [a.name for a in affines] == ["bn1"] and affines[0].use_scale
    scale = affines[0].scale.numpy()
    assert np.sum(scale != 1.0) == 1 and scale[5] < 0
    assert not batchnorms(folded) and report.counts[THROUGH] == 2


def test_fold_through_relu_leaves_only_an_add_and_pushes_through_flatten(rng):
    inputs = keras.Input((4, 4, 2))
    x = L.Conv2D(3, 3, padding="same", activation="relu", name="conv")(inputs)
    x = L.BatchNormalization(name="bn_same")(x)  # next conv pads: the shift stays
    x = L.Conv2D(3, 3, padding="same", activation="relu", name="conv2")(x)
    x = L.BatchNormalization(name="bn_flat")(x)
    x = L.Dense(2, name="dense")(L.Flatten(name="flatten")(L.MaxPooling2D(name="pool")(x)))
    model = randomize_bn(keras.Model(inputs, x), seed=5)
    folded, report = keras_bn.fold_bn(model)
    assert_close_to_original(model, folded, rng.normal(size=(3, 4, 4, 2)).astype("float32"))
    rows = {r.name: r for r in report.rows}
    assert "shift folded forward through pool, flatten into 'dense'" in rows["bn_flat"].reason
    affines = [l for l in folded.layers if isinstance(l, keras_bn.ChannelAffine)]
    assert [(a.name, a.use_scale) for a in affines] == [("bn_same", False)]
    assert [w.name for w in affines[0].weights] == ["offset"]


@pytest.mark.parametrize(
    "activation",
    [
        lambda: L.Dense(4, activation="relu6", name="producer"),
        lambda: L.Dense(4, activation="elu", name="producer"),
        lambda: L.ReLU(max_value=6.0, name="capped"),
        lambda: L.ReLU(threshold=0.5, name="thresholded"),
    ],
)
def test_activations_that_are_not_homogeneous_are_not_folded_through(activation, rng):
    inputs = keras.Input((5,))
    layer = activation()
    x = layer(inputs) if isinstance(layer, L.Dense) else layer(L.Dense(4, name="producer")(inputs))
    model = randomize_bn(keras.Model(inputs, L.BatchNormalization(name="bn")(x)))
    folded, report = keras_bn.fold_bn(model)
    assert report.rows[0].action == AFFINE, report.rows[0].reason
    assert_close_to_original(model, folded, rng.normal(size=(3, 5)).astype("float32"))


def test_all_negative_gammas_are_not_folded_through(rng):
    inputs = keras.Input((5,))
    bn = L.BatchNormalization(name="bn", gamma_initializer=keras.initializers.Constant(-1.0))
    model = keras.Model(inputs, bn(L.Dense(4, activation="relu")(inputs)))
    _, report = keras_bn.fold_bn(model)
    assert report.rows[0].action == AFFINE
    assert "no channel has a positive scale" in report.rows[0].reason


class Unregistered:
    """A callable activation object with a config but no registration: Keras cannot serialize
    the layer that holds it."""

    def __call__(self, x):
        return x * keras.ops.sigmoid(x)

    def get_config(self):
        return {}


def test_layer_that_cannot_be_rebuilt_is_shared_not_a_crash(rng):
    inputs = keras.Input((4,))
    x = L.Dense(3, activation=Unregistered(), name="dense")(inputs)
    model = randomize_bn(keras.Model(inputs, L.BatchNormalization(name="bn")(x)))
    with pytest.raises(TypeError):  # what Keras itself does with it
        keras.models.clone_model(model)
    folded, report = keras_bn.fold_bn(model)
    assert report.rows[0].action == AFFINE
    assert [name for name, _ in report.shared] == ["dense"]
    assert "cannot be rebuilt from its config" in report.shared[0][1] and "shared" in str(report)
    assert folded.get_layer("dense") is model.get_layer("dense")
    assert_close_to_original(model, folded, rng.normal(size=(3, 4)).astype("float32"))


def test_variance_of_minus_epsilon_in_float32_is_refused_as_the_layer_computes_it():
    # float32(-1e-5) + float32(1e-5) is 0, where the layer divides by zero; in float64 the sum is
    # 2.5e-14 > 0 (independent check below), which would fold into finite weights.
    assert float(np.float32(-1e-5)) + 1e-5 > 0
    assert np.float32(-1e-5) + np.float32(1e-5) == 0
    inputs = keras.Input((3,))
    bn = keras_bn.BatchNorm.from_torch(name="bn")  # epsilon 1e-5
    model = keras.Model(inputs, bn(L.Dense(2, name="dense")(inputs)))
    bn.moving_variance.assign(np.array([1.0, -1e-5], "float32"))
    x = np.ones((2, 3), "float32")
    assert np.isinf(np.asarray(model(x, training=False))[:, 1]).all()  # the layer's own output
    _, report = keras_bn.fold_bn(model, verify=False)
    assert report.rows[0].action == KEPT
    assert (
        "moving_variance + epsilon must be positive (computed in float32)" in report.rows[0].reason
    )
    with pytest.raises(keras_bn.KerasBNError, match="computed in float32"):
        keras_bn.fold_bn(model, on_bad_statistics="raise")


def test_batchnorm_called_with_training_true_is_left_with_its_reason(rng):
    # Called with training=True in the graph, the layer normalizes with each batch's statistics
    # even at inference: its moving statistics are not what it computes, so it cannot fold.
    inputs = keras.Input((6,))
    x = L.BatchNormalization(name="bn_train")(L.Dense(4)(inputs), training=True)
    model = randomize_bn(keras.Model(inputs, L.Dense(2)(x)))
    xs = rng.normal(size=(16, 6)).astype("float32")
    folded, report = keras_bn.fold_bn(model, samples=xs)
    (row,) = report.rows
    assert row.action == KEPT and row.reason == "it is called with training=True"
    assert len(batchnorms(folded)) == 1
    # Keras passes an outer training=False over the node's training=True (predict runs it on
    # its moving statistics); called without one, it takes each batch's: both behaviours kept.
    for training in (False, None):
        np.testing.assert_allclose(
            np.asarray(folded(xs, training=training)),
            np.asarray(model(xs, training=training)),
            rtol=1e-6,
            atol=1e-6,
        )
    full, half = np.asarray(folded(xs)), np.asarray(folded(xs[:8]))
    assert np.max(np.abs(full[:8] - half)) > 1e-3  # batch statistics indeed


def test_dict_inputs_and_two_outputs_fold_with_names_kept(rng):
    image, meta = keras.Input((8, 8, 3), name="image"), keras.Input((5,), name="meta")
    a = L.BatchNormalization(name="bn_a")(L.Conv2D(4, 3, name="conv")(image))
    b = L.BatchNormalization(name="bn_b")(L.Dense(6, name="dense")(meta))
    pooled = L.GlobalAveragePooling2D()(a)
    outputs = {"logits": L.Dense(3, name="logits")(pooled), "score": L.Dense(1, name="score")(b)}
    model = randomize_bn(keras.Model({"image": image, "meta": meta}, outputs))
    samples = {
        "image": rng.normal(size=(6, 8, 8, 3)).astype("float32"),
        "meta": rng.normal(size=(6, 5)).astype("float32"),
    }
    folded, report = keras_bn.fold_bn(model, samples=samples)
    assert report.counts[BACKWARD] == 2 and batchnorms(folded) == []
    assert sorted(r.into for r in report.rows) == ["conv", "dense"]
    ref, out = model(samples, training=False), folded(samples, training=False)
    assert sorted(out) == ["logits", "score"]
    for name in ("logits", "score"):
        r, o = np.asarray(ref[name], np.float64), np.asarray(out[name], np.float64)
        np.testing.assert_allclose(o, r, atol=FOLD_RTOL * np.abs(r).max())
