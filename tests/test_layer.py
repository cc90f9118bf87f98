"""keras_bn.BatchNorm: layer contract, golden values, parity sweeps, bad input.

The file runs on every Keras backend: in-process on TensorFlow (the suite's backend), and whole,
in a subprocess with KERAS_BACKEND=jax and =torch, from tests/test_backends.py. Tests of
TensorFlow machinery (FusedBatchNormV3, tf.function with unknown shapes, tf.distribute,
SavedModel) are marked `tf_only`, and their counterparts on the other backends say what differs.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import BatchNorm, KerasBNError
from tests.tolerances import LAYER_ATOL, LAYER_RTOL

BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":
    import tensorflow as tf

    from keras_bn import _tf_kernels
tf_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow machinery")


def to_np(x, dtype=None):
    """A backend tensor as NumPy (a torch tensor that requires grad included); low-precision
    floats through float32, which NumPy lacks for bfloat16."""
    if keras.backend.standardize_dtype(x.dtype) == "bfloat16":
        x = keras.ops.cast(x, "float32")
    return np.asarray(keras.ops.convert_to_numpy(x), dtype)


def dtype_of(x):
    return keras.backend.standardize_dtype(x.dtype)


def train_with_input_gradient(layer, x):
    """(training-mode output, d/dx sum(output * sin(x))) with one update of the statistics, on
    the backend's own autodiff."""
    if BACKEND == "tensorflow":
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
            loss = tf.reduce_sum(y * tf.sin(xt))
        return y, tape.gradient(loss, xt)
    if BACKEND == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt, training=True)
        (grad,) = torch.autograd.grad((y * torch.sin(xt)).sum(), xt)
        return y, grad
    import jax
    import jax.numpy as jnp

    y = layer(x, training=True)

    def loss(xt):
        with keras.StatelessScope():  # the update above is the one that counts
            return jnp.sum(layer(xt, training=True) * jnp.sin(xt))

    return y, jax.grad(loss)(jnp.asarray(x))


# ----------------------------------------------------------------------------------------------
# Layer contract helper, in the spirit of keras' own `run_layer_test`.


def run_layer_contract(make_layer, input_shape, rng, jit_compile=True):
    layer = make_layer()
    # 1. config round trip, including through the serialization registry.
    config = layer.get_config()
    clone = BatchNorm.from_config(config)
    assert clone.get_config() == config
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(revived, BatchNorm) and revived.get_config() == config
    json.dumps(config)  # JSON-able

    # 2. symbolic call.
    inputs = keras.Input(input_shape[1:])
    outputs = layer(inputs)
    assert tuple(outputs.shape) == (None, *input_shape[1:])

    # 3. eager call in both modes.
    x = rng.normal(2.0, 3.0, size=input_shape).astype("float32")
    y_infer = to_np(layer(x, training=False))
    assert y_infer.shape == x.shape and np.all(np.isfinite(y_infer))

    # 4. a training step through model.fit: trainable weights and moving statistics move.
    #    With jit_compile=True, as Keras does by default on every GPU: XLA (on CPU here too)
    #    rejects host ops such as PrintV2 in the step.
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit_compile)
    before = [w.numpy().copy() for w in layer.weights]
    model.fit(
        x,
        rng.normal(size=input_shape).astype("float32"),
        batch_size=input_shape[0],
        epochs=1,
        verbose=0,
    )
    after = [w.numpy().copy() for w in layer.weights]
    for w, b, a in zip(layer.weights, before, after):
        if w.name == "num_batches_tracked":
            assert a == b + 1
        else:
            assert not np.allclose(a, b), f"{w.name} did not change in a training step"
    assert layer.skipped_updates == 0

    # 5. mixed precision: float16 compute, float32 statistics.
    mp_layer = make_layer()
    mp_layer.dtype_policy = keras.dtype_policies.DTypePolicy("mixed_float16")
    y16 = mp_layer(x.astype("float16"), training=True)
    assert dtype_of(y16) == "float16"
    assert mp_layer.moving_mean.dtype == "float32"
    assert np.all(np.isfinite(to_np(y16, np.float32)))


@pytest.mark.parametrize(
    "kwargs,input_shape",
    [
        ({}, (8, 5)),
        ({"axis": 1}, (8, 3, 4)),
        ({}, (6, 4, 4, 3)),  # fused path
        ({"epsilon": 1e-6}, (6, 4, 4, 3)),  # epsilon below the fused minimum: generic path
        ({"axis": 1}, (4, 3, 2, 2, 2)),
        ({"momentum": None, "unbiased_variance": True}, (8, 5)),
    ],
)
def test_layer_contract(kwargs, input_shape, rng):
    # torch.compile costs 5 to 30 s a shape on CPU: on torch the contract trains eagerly, and
    # test_fit_with_xla_matches_keras and the NaN and batch-of-one fits compile.
    jit_compile = BACKEND != "torch"
    run_layer_contract(lambda: BatchNorm(**kwargs), input_shape, rng, jit_compile)


# ----------------------------------------------------------------------------------------------
# Golden values from the seed post's PyTorch example (torch.nn.BatchNorm1d(1, momentum=0.1)).


def test_seed_post_golden_values():
    bn = BatchNorm.from_torch(momentum=0.1)
    batch = np.array([[7.0], [7.0], [7.0]], np.float32)
    expected_means = [0.7, 1.33, 1.897]  # 0.9*m + 0.1*7, by hand
    expected_vars = [0.9, 0.81, 0.729]  # 0.9*v + 0.1*0 (unbiased var of a constant batch is 0)
    for mean, var in zip(expected_means, expected_vars):
        bn(batch, training=True)
        np.testing.assert_allclose(bn.moving_mean.numpy(), [mean], rtol=1e-6)
        np.testing.assert_allclose(bn.moving_variance.numpy(), [var], rtol=1e-6)
    # (3 - 1.897) / sqrt(0.729 + 1e-5) = 1.2918403 (PyTorch prints this)
    out = bn(np.array([[3.0]], np.float32), training=False)
    np.testing.assert_allclose(to_np(out), [[1.2918403]], rtol=1e-6)
    with pytest.raises(
        ValueError,
        match=r"Expected more than 1 value per channel when training, "
        r"got input shape \(1, 1\)",
    ):
        bn(np.array([[3.0]], np.float32), training=True)


def test_unbiased_variance_golden():
    # Keras convention: momentum 0 takes the batch value. Batch [1, 3]: biased var 1, unbiased 2.
    bn = BatchNorm(momentum=0.0, unbiased_variance=True)
    y = bn(np.array([[1.0], [3.0]], np.float32), training=True)
    np.testing.assert_allclose(bn.moving_variance.numpy(), [2.0], rtol=1e-7)
    np.testing.assert_allclose(bn.moving_mean.numpy(), [2.0], rtol=1e-7)
    # Normalization uses the biased variance 1: (1-2)/sqrt(1+1e-3), (3-2)/sqrt(1+1e-3).
    np.testing.assert_allclose(to_np(y), [[-1 / np.sqrt(1.001)], [1 / np.sqrt(1.001)]], rtol=1e-6)
    biased = BatchNorm(momentum=0.0)
    biased(np.array([[1.0], [3.0]], np.float32), training=True)
    np.testing.assert_allclose(biased.moving_variance.numpy(), [1.0], rtol=1e-7)


def torch_reference(batches, momentum, eps, axis):
    """NumPy transcription of torch.nn.BatchNorm's documented update rule (float64).

    running = (1 - momentum) * running + momentum * batch_stat, with the unbiased batch variance;
    momentum=None: momentum = 1 / num_batches_tracked. Returns running mean/var and the
    training-mode output of the last batch (normalized with the biased variance).
    """
    running_mean, running_var, tracked = None, None, 0
    for x in batches:
        x = np.moveaxis(x.astype(np.float64), axis, -1)
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        mean, var = flat.mean(0), flat.var(0)
        if running_mean is None:
            running_mean, running_var = np.zeros_like(mean), np.ones_like(var)
        tracked += 1
        factor = 1.0 / tracked if momentum is None else momentum
        running_mean = (1 - factor) * running_mean + factor * mean
        running_var = (1 - factor) * running_var + factor * var * n / (n - 1)
        out = np.moveaxis((x - mean) / np.sqrt(var + eps), -1, axis)
    return running_mean, running_var, out


@pytest.mark.parametrize("momentum", [0.1, 0.5, 0.01, 1.0, 0.0, None])
@pytest.mark.parametrize("shape,axis", [((5, 3), -1), ((4, 3, 6), 1), ((4, 5, 5, 3), -1)])
def test_torch_convention_sweep(momentum, shape, axis, rng):
    bn = BatchNorm.from_torch(momentum=momentum, eps=1e-5, axis=axis)
    batches = [
        rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 4), size=shape).astype("float32")
        for _ in range(4)
    ]
    for x in batches:
        y = bn(x, training=True)
    mean, var, out = torch_reference(batches, momentum, 1e-5, axis)
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_np(y), out, rtol=1e-4, atol=1e-5)
    if momentum is None:
        assert int(bn.num_batches_tracked.numpy()) == 4


def test_cumulative_average_is_independent_of_batch_split(rng):
    # fvcore precise_bn's check: equal-size batches, same mean whatever the split.
    data = rng.normal(1.0, 2.0, size=(24, 3)).astype("float32")
    means = []
    for batch_size in (4, 6, 12):
        bn = BatchNorm(momentum=None)
        for start in range(0, 24, batch_size):
            bn(data[start : start + batch_size], training=True)
        means.append(bn.moving_mean.numpy())
    for m in means:
        np.testing.assert_allclose(m, data.astype(np.float64).mean(0), rtol=1e-5)


def test_conventions_convert():
    assert keras_bn.torch_momentum_to_keras(0.1) == pytest.approx(0.9)
    assert keras_bn.keras_momentum_to_torch(0.99) == pytest.approx(0.01)
    assert keras_bn.torch_momentum_to_keras(None) is None
    bn = BatchNorm.from_torch(momentum=0.1, eps=1e-5, affine=False)
    assert bn.momentum == pytest.approx(0.9) and bn.epsilon == 1e-5 and bn.unbiased_variance
    bn.build((None, 4))
    # PyTorch counts training batches whatever its momentum; a layer built from_torch does too.
    assert bn.count_batches
    assert [w.name for w in bn.weights] == ["moving_mean", "moving_variance", "num_batches_tracked"]
    bn(np.ones((3, 4), "float32"), training=True)
    assert int(bn.num_batches_tracked.numpy()) == 1
    plain = BatchNorm(momentum=0.9)
    plain.build((None, 4))
    assert [w.name for w in plain.weights][-1] == "moving_variance"  # Keras's four weights
    with pytest.raises(ValueError, match=r"Expected: a number in \[0, 1\].*Received: momentum=1.5"):
        keras_bn.torch_momentum_to_keras(1.5)


# ----------------------------------------------------------------------------------------------
# Parity with keras.layers.BatchNormalization.


# (rank, axis): axis 1 of a rank-2 input is its last axis, already covered. Rank 5 takes
# TensorFlow's 5-D fused kernel; on the other backends it is rank 4's code, so it runs once.
PARITY_CASES = [
    (rank, axis)
    for rank in ([2, 3, 4, 5] if BACKEND == "tensorflow" else [2, 3, 4])
    for axis in (-1, 1)
    if (rank, axis) != (2, 1)
]


@pytest.mark.parametrize("rank,axis", PARITY_CASES)
# (0.9, 1e-5) is there for FusedBatchNormV3's epsilon bound (1.001e-5), TensorFlow's alone: the
# other backends run the sweep once, at Keras's defaults (JAX compiles each eager op per shape).
@pytest.mark.parametrize(
    "momentum,epsilon", [(0.99, 1e-3), (0.9, 1e-5)] if BACKEND == "tensorflow" else [(0.99, 1e-3)]
)
def test_keras_parity(rank, axis, momentum, epsilon, rng):
    shape = (6, 3, 4, 5, 2)[:rank]
    ours = BatchNorm(
        axis=axis,
        momentum=momentum,
        epsilon=epsilon,
        gamma_initializer="random_uniform",
        beta_initializer="random_normal",
    )
    theirs = keras.layers.BatchNormalization(axis=axis, momentum=momentum, epsilon=epsilon)
    ours.build(shape)
    theirs.build(shape)
    theirs.set_weights(ours.get_weights())
    for step in range(4):
        x = rng.normal(1.5, 2.5, size=shape).astype("float32")
        if step < 3:  # training steps; the input gradient is compared on the last one
            y_ours, y_theirs = ours(x, training=True), theirs(x, training=True)
        else:
            y_ours, g_ours = train_with_input_gradient(ours, x)
            y_theirs, g_theirs = train_with_input_gradient(theirs, x)
            np.testing.assert_allclose(to_np(g_ours), to_np(g_theirs), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(to_np(y_ours), to_np(y_theirs), rtol=LAYER_RTOL, atol=LAYER_ATOL)
        if BACKEND == "tensorflow":  # and the weights' gradients
            with tf.GradientTape(persistent=True) as tape:
                xt = tf.constant(x)
                loss_ours = tf.reduce_sum(ours(xt, training=True) * tf.sin(xt))
                loss_theirs = tf.reduce_sum(theirs(xt, training=True) * tf.sin(xt))
            for a, b in zip(
                tape.gradient(loss_ours, ours.trainable_weights),
                tape.gradient(loss_theirs, theirs.trainable_weights),
            ):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        ours.moving_mean.numpy(), theirs.moving_mean.numpy(), rtol=LAYER_RTOL, atol=1e-6
    )
    np.testing.assert_allclose(
        ours.moving_variance.numpy(), theirs.moving_variance.numpy(), rtol=LAYER_RTOL, atol=1e-6
    )
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(
        to_np(ours(x, training=False)),
        to_np(theirs(x, training=False)),
        rtol=LAYER_RTOL,
        atol=LAYER_ATOL,
    )


def test_masked_statistics_match_keras(rng):
    x = rng.normal(2.0, 1.5, size=(4, 7, 3)).astype("float32")
    mask = rng.random((4, 7)) > 0.4
    ours, theirs = BatchNorm(momentum=0.5), keras.layers.BatchNormalization(momentum=0.5)
    y_ours = ours(x, training=True, mask=mask)
    y_theirs = theirs(x, training=True, mask=mask)
    np.testing.assert_allclose(to_np(y_ours), to_np(y_theirs), rtol=1e-4, atol=1e-4)
    # The statistics come from unmasked entries only (NumPy reference).
    kept = x[mask]
    np.testing.assert_allclose(ours.moving_mean.numpy(), 0.5 * kept.mean(0), rtol=1e-5)
    np.testing.assert_allclose(ours.moving_variance.numpy(), 0.5 + 0.5 * kept.var(0), rtol=1e-5)
    with pytest.raises(ValueError, match=r"Expected: mask rank 2\. Received: mask\.shape=\(4,\)"):
        ours(x, training=True, mask=mask[:, 0])


def test_trainable_false_runs_in_inference_mode(rng):
    bn = BatchNorm(
        moving_mean_initializer="ones", moving_variance_initializer=keras.initializers.Constant(4.0)
    )
    bn.trainable = False
    x = rng.normal(size=(8, 3)).astype("float32")
    y = bn(x, training=True)
    np.testing.assert_allclose(to_np(y), (x - 1.0) / np.sqrt(4.0 + 1e-3), rtol=1e-6)
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.ones(3))


# ----------------------------------------------------------------------------------------------
# Numerics: precision, mixed precision, epsilon, NaN/Inf.


@pytest.mark.parametrize(
    "shape,kwargs,rtol",
    [
        ((256, 4), {}, 1e-4),  # fused kernel on the pivot-shifted input
        ((16, 8, 8, 4), {}, 1e-4),
        ((256, 4), {"epsilon": 1e-6}, 1e-4),  # generic path: pivot-shifted statistics
        ((16, 4, 8, 8), {"axis": 1}, 1e-4),
    ],
)
def test_variance_large_mean_small_spread(shape, kwargs, rtol, rng):
    x = (1e4 + 0.01 * rng.standard_normal(shape)).astype("float32")
    axis = kwargs.get("axis", -1)
    flat = np.moveaxis(x, axis, -1).astype(np.float64).reshape(-1, 4)
    reference = flat.var(0)
    # E[x^2] - E[x]^2 in float32 has no correct digit here.
    x32 = np.moveaxis(x, axis, -1).reshape(-1, 4)
    naive = (x32**2).mean(0) - x32.mean(0) ** 2
    assert np.all(np.abs(naive - reference) > 0.5 * reference)
    bn = BatchNorm(momentum=0.0, **kwargs)
    y = np.moveaxis(to_np(bn(x, training=True)), axis, -1).reshape(-1, 4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), reference, rtol=rtol)
    eps = kwargs.get("epsilon", 1e-3)
    expected = (flat - flat.mean(0)) / np.sqrt(reference + eps)
    np.testing.assert_allclose(y, expected, atol=1e-3)


def test_statistics_keep_their_digits_where_keras_torch_moments_lose_them():
    # Mean 1e4, std 0.01 in float32 (256 x 4, seed 0), keras_bn against Keras's own layer on the
    # same backend. Keras 3.15's torch `moments` computes E[x^2] - E[x]^2: at 1e8 a float32 step
    # is 8, so the variance 1e-4 is lost. Measured on torch: Keras's moving variance is off by a
    # relative 1.6e5 and its training outputs are NaN (a negative variance under the square
    # root); keras_bn's variance within 3.0e-7 and its outputs within 9.8e-8 of NumPy's float64.
    # On TensorFlow and JAX keras_bn: 4.3e-6 and 4.5e-7, outputs 1.4e-7 and 8e-8; Keras's own
    # layer there: 4.2e-3, outputs off by 0.039.
    x = (1e4 + 0.01 * np.random.default_rng(0).standard_normal((256, 4))).astype("float32")
    reference = x.astype(np.float64).var(0)
    expected = (x - x.astype(np.float64).mean(0)) / np.sqrt(reference + 1e-3)
    errors = {}
    for name, layer in (
        ("keras_bn", BatchNorm(momentum=0.0)),
        ("keras", keras.layers.BatchNormalization(momentum=0.0)),
    ):
        y = to_np(layer(x, training=True)).astype(np.float64)
        variance = to_np(layer.moving_variance).astype(np.float64)
        errors[name] = (np.abs(variance / reference - 1).max(), np.abs(y - expected).max())
    assert errors["keras_bn"][0] < 1e-4 and errors["keras_bn"][1] < 1e-5, errors
    if BACKEND == "torch":  # the negative case: Keras's own layer on the same data and backend
        assert errors["keras"][0] > 0.5 and not np.isfinite(errors["keras"][1]), errors


@pytest.mark.parametrize(
    "center,spread,tol",
    [
        (2.0, 3.0, 1e-5),  # JAX: the fast form of the custom gradient
        (1e4, 0.01, 1e-3),  # past 100 standard deviations: the centred form
    ],
)
@pytest.mark.parametrize("shape", [(64, 4), (8, 5, 5, 4)])
def test_input_gradient_is_the_textbook_one(center, spread, tol, shape, rng):
    # d/dx sum(y * sin(x)) in float64 NumPy, with Ioffe & Szegedy's BatchNorm gradient for y
    # (gamma = 1, beta = 0, so y = xhat): r * (dy - (sum(dy) + xhat * sum(dy * xhat)) / n) with
    # r = 1 / sqrt(var + eps) and dy = sin(x), plus y * cos(x) from sin(x) itself. Errors
    # relative to the largest |dx|.
    x = (center + spread * rng.standard_normal(shape)).astype("float32")
    _, grad = train_with_input_gradient(BatchNorm(momentum=0.0), x)
    flat = x.astype(np.float64).reshape(-1, 4)
    n = flat.shape[0]
    r = 1.0 / np.sqrt(flat.var(0) + 1e-3)
    xhat = (flat - flat.mean(0)) * r
    dy = np.sin(x).astype(np.float64).reshape(-1, 4)
    expected = r * (dy - (dy.sum(0) + xhat * (dy * xhat).sum(0)) / n)
    expected += xhat * np.cos(x).astype(np.float64).reshape(-1, 4)

    def error(g):
        return np.abs(to_np(g, np.float64).reshape(-1, 4) - expected).max() / np.abs(expected).max()

    # Measured (relative): 1e-7 to 2e-7 well conditioned, 1.1e-6 to 1.8e-6 at mean 1e4, std 0.01
    # on the three backends, where Keras's own layer is off by 0.65 (TF), 0.69 (JAX) or NaN.
    assert error(grad) <= tol, error(grad)
    if center > 100:  # the negative case
        _, theirs = train_with_input_gradient(keras.layers.BatchNormalization(momentum=0.0), x)
        assert not error(theirs) <= 0.1, error(theirs)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("shape", [(8, 6), (4, 3, 3, 6)])
def test_mixed_precision_near_float16_limit(policy, shape, mixed_policy, rng):
    mixed_policy(policy)
    bn = BatchNorm(momentum=0.0)
    x = rng.uniform(-60000, 60000, size=shape).astype("float32")
    import ml_dtypes

    x16 = x.astype("float16" if policy == "mixed_float16" else ml_dtypes.bfloat16)
    # float32 values that the layer's autocast turns into x16 exactly.
    y = bn(x16.astype("float32"), training=True)
    assert dtype_of(y) == policy.removeprefix("mixed_")
    assert bn.moving_variance.dtype == "float32" and bn.gamma.dtype == "float32"
    xr = x16.astype(np.float64).reshape(-1, shape[-1])
    assert np.all(np.isfinite(bn.moving_variance.numpy()))
    np.testing.assert_allclose(bn.moving_variance.numpy(), xr.var(0), rtol=1e-3)
    expected = ((xr - xr.mean(0)) / np.sqrt(xr.var(0) + 1e-3)).reshape(shape)
    np.testing.assert_allclose(to_np(y, np.float32), expected, atol=0.05)


@pytest.mark.parametrize("shape", [(16, 4, 4, 3), (64, 3)])
def test_epsilon_below_fused_minimum_is_honoured(shape, rng):
    x = (rng.standard_normal(shape) * np.sqrt(1e-5)).astype("float32")
    flat = x.astype(np.float64).reshape(-1, 3)
    for eps in (1e-6, 2e-5):
        bn = BatchNorm(epsilon=eps, momentum=0.0)
        y = to_np(bn(x, training=True)).reshape(-1, 3)
        expected = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + eps)
        np.testing.assert_allclose(y, expected, rtol=1e-3, atol=1e-3)
        y_inf = to_np(bn(x, training=False)).reshape(-1, 3)
        np.testing.assert_allclose(y_inf, expected, rtol=1e-3, atol=1e-3)
        if BACKEND == "tensorflow":
            # On a CPU-only TensorFlow this is FusedBatchNormV3, compiled by XLA too.
            assert _tf_kernels.use_fused(
                bn, tf.constant(x), None
            ) is _tf_kernels.fused_honours_epsilon(eps)
            xla = tf.function(lambda t, bn=bn: bn(t, training=True), jit_compile=True)
            y_xla = to_np(xla(tf.constant(x))).reshape(-1, 3)
            np.testing.assert_allclose(y_xla, expected, rtol=1e-3, atol=1e-3)
    # Had epsilon been raised to 1.001e-5, as tf.nn.fused_batch_norm does: outputs ~30% off.
    assert not np.allclose(
        (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-6),
        (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1.001e-5),
        rtol=0.1,
    )


@tf_only
def test_fused_path_is_taken_only_where_exact():
    bn = BatchNorm()
    bn.build((None, 4, 4, 3))
    x = tf.zeros((2, 4, 4, 3))
    assert _tf_kernels.use_fused(bn, x, None)
    # PyTorch's epsilon: the kernel honours it on the CPU (this process has no GPU; the numbers
    # are held in test_epsilon_below_fused_minimum_is_honoured); where a GPU or TPU is visible
    # only from 1.001e-5 up, as tf.nn.fused_batch_norm clamps for cuDNN.
    small = BatchNorm(epsilon=1e-5)
    small.build((None, 4, 4, 3))
    assert _tf_kernels.use_fused(small, x, None) is _tf_kernels.fused_honours_epsilon(1e-5)
    assert _tf_kernels.fused_honours_epsilon(1e-5, accelerators=False)
    assert _tf_kernels.fused_honours_epsilon(1.001e-5, accelerators=True)
    assert not _tf_kernels.fused_honours_epsilon(1e-5, accelerators=True)
    synced = BatchNorm(synchronized=True)
    synced.build((None, 4, 4, 3))
    assert not _tf_kernels.use_fused(synced, x, None)
    assert not _tf_kernels.use_fused(bn, x, tf.ones((2, 4, 4), tf.bool))
    cf = BatchNorm(axis=1)
    cf.build((None, 3, 4, 4))
    assert not _tf_kernels.use_fused(cf, tf.zeros((2, 3, 4, 4)), None)


def unshifted_fused_variance(x, jit_compile):
    """The biased batch variance of FusedBatchNormV3 on `x` as given (channels last), compiled
    with or without XLA: the kernel the layer feeds shifted data, without the shift."""
    channels = x.shape[-1]
    kernel = tf.function(
        lambda t: tf.raw_ops.FusedBatchNormV3(
            x=t, scale=tf.ones(channels), offset=tf.zeros(channels),
            mean=tf.constant([], tf.float32), variance=tf.constant([], tf.float32),
            epsilon=1e-3, is_training=True,
        )[2],
        jit_compile=jit_compile,
    )  # fmt: skip
    n = x.size // channels
    return kernel(tf.constant(x)).numpy().astype(np.float64) * (n - 1) / n


@tf_only
@pytest.mark.parametrize("jit_compile", [False, True])
def test_fused_training_step_is_sound_compiled_and_has_no_cond(jit_compile, rng):
    # The fused kernel's plain two-pass variance loses digits at |mean| / std = 1e6; it is given
    # the input shifted by its first sample, here an outlier 60 standard deviations out (a
    # pivot far from the data, the shift's hard case). float64 NumPy references: the biased
    # variance, the outputs, and Ioffe & Szegedy's input gradient of sum(y * sin(x)).
    x = (1e4 + 0.01 * rng.standard_normal((16, 4, 4, 4))).astype("float32")
    x[0, 0, 0] = 1e4 + 0.6
    bn = BatchNorm(momentum=0.0)
    bn.build(x.shape)

    @tf.function(jit_compile=jit_compile)
    def step(xt):
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = bn(xt, training=True)
            loss = tf.reduce_sum(y * tf.sin(xt))
        return y, tape.gradient(loss, xt)

    y, grad = step(tf.constant(x))
    flat = x.astype(np.float64).reshape(-1, 4)
    var = flat.var(0)
    r = 1.0 / np.sqrt(var + 1e-3)
    xhat = (flat - flat.mean(0)) * r
    dy = np.sin(flat)
    expected_grad = r * (dy - (dy.sum(0) + xhat * (dy * xhat).sum(0)) / flat.shape[0])
    expected_grad += xhat * np.cos(flat)
    grad_error = np.abs(grad.numpy().reshape(-1, 4) - expected_grad).max()
    # Measured: variance 1.2e-6 relative, outputs (up to 60) 4.8e-6, gradient 9e-8 of its largest
    # value; under XLA 6.5e-5, 2.3e-4 and 1.3e-6 (XLA expands the kernel into E[x^2] - E[x]^2,
    # on a shifted mean of 60 std here; below 1e-6 with a typical first sample). Before the shift the
    # layer's XLA gradient was NaN on this data without the outlier.
    var_rtol = 5e-4 if jit_compile else 2e-5
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=var_rtol)
    np.testing.assert_allclose(bn.moving_mean.numpy(), flat.mean(0), rtol=1e-7)
    np.testing.assert_allclose(y.numpy().reshape(-1, 4), xhat, atol=2e-3)
    assert grad_error <= 1e-4 * np.abs(expected_grad).max(), grad_error
    # Negative: the kernel on the unshifted input, compiled the same way (measured: variance off
    # by 9.4e-4 relative, under XLA by 2.6e4).
    unshifted_error = np.abs(unshifted_fused_variance(x, jit_compile) / var - 1).max()
    assert unshifted_error > (1.0 if jit_compile else 5 * var_rtol), unshifted_error
    # Structure: one FusedBatchNormV3 and no If/StatelessIf, whose gradient made tracing a
    # training step 2.6x slower than Keras's (see BatchNorm._fused_train).
    ops = {op.type for op in step.get_concrete_function(tf.constant(x)).graph.get_operations()}
    assert "FusedBatchNormV3" in ops and not ops & {"If", "StatelessIf"}, sorted(ops)
    # Negative: channels first takes the generic path, no fused kernel.
    generic = BatchNorm(momentum=0.0, axis=1)
    graph = (
        tf.function(lambda xt: generic(xt, training=True))
        .get_concrete_function(tf.constant(x))
        .graph
    )
    assert "FusedBatchNormV3" not in {op.type for op in graph.get_operations()}


@tf_only
@pytest.mark.parametrize("ratio", [100, 300, 900])
def test_xla_statistics_below_the_old_fallback_bound(ratio, rng):
    # XLA expands FusedBatchNormV3 into E[x^2] - E[x]^2. The layer's old guard sent only batches
    # with |mean| / std > 1e3 to a shifted path, so between ~1e2 and 1e3 its XLA statistics
    # came straight from the one-pass formula. Measured (32 x 8 x 8 x 4, std 0.01): the unshifted
    # kernel's variance is off by 8.6e-3, 0.30 and 0.92 at 100, 300 and 900; the layer's, shifted,
    # by 4.7e-7, 3.0e-6 and 5.4e-6.
    x = (ratio * 0.01 + 0.01 * rng.standard_normal((32, 8, 8, 4))).astype("float32")
    flat = x.astype(np.float64).reshape(-1, 4)
    bn = BatchNorm(momentum=0.0)
    bn.build(x.shape)
    tf.function(lambda t: bn(t, training=True), jit_compile=True)(tf.constant(x))
    np.testing.assert_allclose(bn.moving_variance.numpy(), flat.var(0), rtol=1e-4)
    error = np.abs(unshifted_fused_variance(x, jit_compile=True) / flat.var(0) - 1).max()
    assert error > 1e-3, error  # the negative case


def compiled_training_step(layer):
    """`layer(x, training=True)` compiled as the backend compiles a training step: tf.function
    on TensorFlow, jax.jit over the layer's stateless call on JAX (its variables in and out, as
    Keras's JAX trainer does), torch.compile on PyTorch."""
    if BACKEND == "tensorflow":
        step = tf.function(lambda x: layer(x, training=True))
        return lambda x: step(tf.constant(x))
    if BACKEND == "jax":
        import jax

        @jax.jit
        def stateless(trainable, non_trainable, x):
            y, updated = layer.stateless_call(trainable, non_trainable, x, training=True)
            return y, updated

        def step(x):
            trainable = [v.value for v in layer.trainable_variables]
            non_trainable = [v.value for v in layer.non_trainable_variables]
            y, updated = stateless(trainable, non_trainable, x)
            for variable, value in zip(layer.non_trainable_variables, updated):
                variable.assign(value)
            return y

        return step
    import torch

    step = torch.compile(lambda x: layer(x, training=True), fullgraph=False)
    return lambda x: step(torch.tensor(x))


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 3, 3)])
@pytest.mark.parametrize("momentum", [0.9, None])
def test_nan_batch_skips_update_with_warning(shape, momentum, rng):
    bn = BatchNorm(momentum=momentum)
    good = rng.normal(size=shape).astype("float32")
    bn(good, training=True)
    mean, var = bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()
    bad = good.copy()
    bad[0, 0] = np.nan
    bad.reshape(-1)[-1] = np.inf
    assert issubclass(keras_bn.SkippedUpdateWarning, RuntimeWarning)  # existing filters apply
    with pytest.warns(keras_bn.SkippedUpdateWarning, match="NaN or Inf.*not updated"):
        bn(bad, training=True)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), mean)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), var)
    assert bn.skipped_updates == 1
    # Inside the backend's compiled step (model.fit's path) the update is skipped too.
    step = compiled_training_step(bn)
    step(bad)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), mean)
    if momentum is None:
        assert int(bn.num_batches_tracked.numpy()) == 1
    step(good + 1.0)
    assert not np.array_equal(bn.moving_mean.numpy(), mean)


# ----------------------------------------------------------------------------------------------
# Batch of one.


def test_batch_of_one_raises_static_and_at_run_time():
    bn = BatchNorm()
    one = np.ones((1, 3), np.float32)
    with pytest.raises(
        KerasBNError,
        match=r"Expected more than 1 value per channel when training, "
        r"got input shape \(1, 3\)",
    ):
        bn(one, training=True)
    # Spatial dimensions give more than one value per channel: fine.
    bn4 = BatchNorm()
    bn4(np.random.rand(1, 2, 2, 3).astype("float32"), training=True)
    if BACKEND == "tensorflow":
        # Unknown batch size while tracing: the same message at run time. (jax.jit and
        # torch trace with the batch's own shape: the static error above is raised there.)
        step = tf.function(
            lambda x: bn(x, training=True), input_signature=[tf.TensorSpec((None, 3), tf.float32)]
        )
        with pytest.raises(
            tf.errors.InvalidArgumentError,
            match=r"Expected more than 1 value per channel when training, "
            r"got input shape \(None, 3\)",
        ):
            step(tf.constant(one))
        step(tf.ones((2, 3)))
    # Through model.fit.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, BatchNorm()(inputs))
    model.compile("sgd", "mse")
    if BACKEND == "jax":  # compiled by default: NaN, see test_partial_batch_of_one_...
        trained = keras.models.clone_model(model)
        trained.compile("sgd", "mse")
        assert np.isnan(trained.fit(one, one, batch_size=1, verbose=0).history["loss"][-1])
        np.testing.assert_array_equal(trained.layers[1].moving_mean.numpy(), np.zeros(3))
    else:
        with pytest.raises(Exception, match="Expected more than 1 value per channel"):
            model.fit(one, one, batch_size=1, verbose=0)
    # Inference on one sample works.
    np.testing.assert_allclose(model.predict(one, verbose=0), one / np.sqrt(1 + 1e-3), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"momentum": 1.5},
            r"Invalid `momentum`\. Expected: a number in \[0, 1\], or None for a "
            r"cumulative average\. Received: momentum=1\.5\.",
        ),
        ({"momentum": -0.1}, r"Received: momentum=-0\.1\."),
        ({"momentum": float("nan")}, r"Received: momentum=nan\."),
        ({"momentum": "0.9"}, r"Received: momentum='0\.9'\."),
        (
            {"epsilon": 0.0},
            r"Invalid `epsilon`\. Expected: a finite number > 0\. Received: epsilon=0\.0\.",
        ),
        ({"epsilon": -1e-3}, r"Received: epsilon=-0\.001\."),
        ({"epsilon": float("inf")}, r"Received: epsilon=inf\."),
        ({"axis": 1.0}, r"Invalid `axis`\. Expected: an integer .*Received: axis=1\.0\."),
        ({"axis": [1, 2]}, r"Received: axis=\[1, 2\]\."),
        (
            {"center": "yes"},
            r"Invalid `center`\. Expected: True or False\. Received: center='yes'\.",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchNorm(**kwargs)
    # Configs read from model files go through __init__ too; Keras wraps the error in a TypeError
    # that carries our message.
    config = {**BatchNorm().get_config(), **kwargs}
    with pytest.raises((KerasBNError, TypeError), match=message):
        BatchNorm.from_config(config)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"Expected: an axis in \[-2, 1\]\. Received: axis=3"):
        BatchNorm(axis=3).build((None, 4))
    with pytest.raises(ValueError, match=r"channel axis must have a known size.*Received: None"):
        BatchNorm().build((None, None))


# ----------------------------------------------------------------------------------------------
# Serialization.


def test_keras_file_round_trip_and_saved_model(tmp_path, rng):
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(5, 3, use_bias=False)(inputs)
    x = BatchNorm(momentum=None, unbiased_variance=True, epsilon=1e-5)(x)
    model = keras.Model(inputs, keras.layers.Flatten()(x))
    data = rng.normal(size=(8, 4, 4, 3)).astype("float32")
    model(data, training=True)
    path = tmp_path / "m.keras"
    model.save(path)
    # A fresh interpreter: only `import keras_bn` registers the class, no custom_objects.
    script = textwrap.dedent(f"""
        import numpy as np, keras, keras_bn
        m = keras.saving.load_model({str(path)!r})
        bn = [l for l in m.layers if isinstance(l, keras_bn.BatchNorm)][0]
        print(bn.momentum, bn.unbiased_variance, bn.epsilon, int(bn.num_batches_tracked.numpy()))
        np.save({str(tmp_path / "y.npy")!r}, m.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0))
    """)
    np.save(tmp_path / "x.npy", data)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=os.getcwd(),
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-4:] == ["None", "True", "1e-05", "1"]
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), model.predict(data, verbose=0), rtol=1e-6
    )
    if BACKEND != "tensorflow":
        return  # SavedModel is TensorFlow's format
    # SavedModel export serves the inference path.
    model.export(str(tmp_path / "saved"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_allclose(
        served.serve(data), model.predict(data, verbose=0), rtol=1e-5, atol=1e-6
    )


# ----------------------------------------------------------------------------------------------
# Synchronized statistics under tf.distribute, two logical CPUs in a subprocess.

SYNC_SCRIPT = textwrap.dedent("""
    import json, numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import keras_bn
    data = np.random.default_rng(0).normal(3.0, 2.0, size=(8, 5)).astype("float32")
    data[4:] += 10.0  # the replicas' halves differ, so local statistics would be wrong
    result = {}
    for synchronized in (True, False):
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            bn = keras_bn.BatchNorm(momentum=0.0, synchronized=synchronized)
            bn.build((None, 5))
        dist = strategy.experimental_distribute_values_from_function(
            lambda ctx: data[4 * ctx.replica_id_in_sync_group: 4 * ctx.replica_id_in_sync_group + 4])
        out = strategy.run(tf.function(lambda x: bn(x, training=True)), args=(dist,))
        result[str(synchronized)] = {
            "replicas": strategy.num_replicas_in_sync,
            "mean": bn.moving_mean.numpy().tolist(),
            "var": bn.moving_variance.numpy().tolist(),
            "out": np.concatenate([o.numpy() for o in strategy.experimental_local_results(out)]).tolist(),
        }
    # One sample per replica: the global batch has two, so it trains (no batch-of-one error).
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        one = keras_bn.BatchNorm(momentum=0.0, synchronized=True)
        one.build((None, 5))
    pair = strategy.experimental_distribute_values_from_function(
        lambda ctx: data[ctx.replica_id_in_sync_group: ctx.replica_id_in_sync_group + 1])
    strategy.run(tf.function(lambda x: one(x, training=True)), args=(pair,))
    result["one_each"] = {"mean": one.moving_mean.numpy().tolist(),
                          "var": one.moving_variance.numpy().tolist()}
    plain = keras_bn.BatchNorm(momentum=0.0)
    result["plain"] = {"out": plain(data, training=True).numpy().tolist(),
                       "mean": plain.moving_mean.numpy().tolist(),
                       "var": plain.moving_variance.numpy().tolist()}
    print(json.dumps(result))
""")


@tf_only
def test_synchronized_matches_single_global_batch():
    out = subprocess.run(
        [sys.executable, "-c", SYNC_SCRIPT],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        cwd=os.getcwd(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    sync, local, plain = result["True"], result["False"], result["plain"]
    assert sync["replicas"] == 2
    np.testing.assert_allclose(sync["mean"], plain["mean"], rtol=1e-5)
    np.testing.assert_allclose(sync["var"], plain["var"], rtol=1e-5)
    np.testing.assert_allclose(sync["out"], plain["out"], rtol=1e-4, atol=1e-5)
    first_two = np.random.default_rng(0).normal(3.0, 2.0, size=(8, 5)).astype("float32")[:2]
    np.testing.assert_allclose(result["one_each"]["mean"], first_two.mean(0), rtol=1e-5)
    np.testing.assert_allclose(result["one_each"]["var"], first_two.var(0), rtol=1e-4)
    # Negative case: without synchronization each replica normalizes with its own half.
    assert not np.allclose(local["out"], plain["out"], atol=1e-2)


# ----------------------------------------------------------------------------------------------
# Where users run it: XLA-compiled fit, every dtype, masks on any axis, empty batches.


def _fit_twin(make_norm, x, y, jit_compile):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(x.shape[1:])
    h = keras.layers.Conv2D(4, 3)(inputs)
    h = make_norm()(h)
    outputs = keras.layers.Dense(5)(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    return model, history.history["loss"]


def test_fit_with_xla_matches_keras(rng):
    x = rng.normal(2.0, 3.0, size=(64, 6, 6, 3)).astype("float32")
    y = rng.normal(size=(64, 5)).astype("float32")
    ours, loss_ours = _fit_twin(lambda: BatchNorm(momentum=0.9), x, y, jit_compile=True)
    # Keras's own layer compiled too, but on torch eagerly: torch.compile of a second model
    # costs 15 s here, and the arithmetic compared is the same.
    theirs, loss_theirs = _fit_twin(
        lambda: keras.layers.BatchNormalization(momentum=0.9), x, y, jit_compile=BACKEND != "torch"
    )
    np.testing.assert_allclose(loss_ours, loss_theirs, rtol=1e-5)
    for a, b in zip(ours.layers[2].weights, theirs.layers[2].weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.name)
    # The moving statistics really moved: 8 updates at momentum 0.9 from (0, 1).
    assert np.all(np.abs(ours.layers[2].moving_mean.numpy()) > 0.05)


# ----------------------------------------------------------------------------------------------
# Batch renormalization and ghost batches: the features tf-keras and Keras users come for.


RENORM_CLIPPING = [None, {"rmin": 0.7, "rmax": 1.5, "dmax": 0.5}]


@pytest.mark.parametrize("clipping", RENORM_CLIPPING)
def test_renorm_matches_keras(clipping, rng):
    kwargs = dict(renorm=True, renorm_clipping=clipping, renorm_momentum=0.9, momentum=0.8)
    ours = BatchNorm(**kwargs, gamma_initializer="random_uniform", beta_initializer="random_normal")
    theirs = keras.layers.BatchNormalization(**kwargs)
    ours.build((None, 5, 3))
    theirs.build((None, 5, 3))
    # Keras's names and order: the weights interchange.
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]
    theirs.set_weights(ours.get_weights())
    for step in range(5):  # batches whose statistics drift, so that r and d are clipped
        x = rng.normal(1.0 + step, 2.0 + step, size=(8, 5, 3)).astype("float32")
        if step < 4:
            y_ours, y_theirs = ours(x, training=True), theirs(x, training=True)
        else:
            y_ours, g_ours = train_with_input_gradient(ours, x)
            y_theirs, g_theirs = train_with_input_gradient(theirs, x)
            np.testing.assert_allclose(to_np(g_ours), to_np(g_theirs), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(to_np(y_ours), to_np(y_theirs), rtol=1e-6, atol=1e-6)
    for a, b in zip(ours.weights, theirs.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6, err_msg=a.name)
    # Inference: the plain layer, from the moving statistics.
    x = rng.normal(size=(4, 5, 3)).astype("float32")
    s = ours.gamma.numpy() / np.sqrt(ours.moving_variance.numpy() + 1e-3)
    expected = (x - ours.moving_mean.numpy()) * s + ours.beta.numpy()
    np.testing.assert_allclose(to_np(ours(x, training=False)), expected, rtol=1e-5, atol=1e-5)


def ghost_reference(x, virtual_batch_size, epsilon=1e-3):
    """NumPy: ghost batch g of G holds rows g, g + G, ... (tf-keras's reshape), normalized with
    its own biased statistics; returns (outputs, mean of the ghost means, mean of the ghost
    variances)."""
    x = x.astype(np.float64)
    groups = len(x) // virtual_batch_size
    out, means, variances = np.empty_like(x), [], []
    axes = tuple(range(x.ndim - 1))
    for g in range(groups):
        rows = x[g::groups]
        mean, var = rows.mean(axes), rows.var(axes)
        out[g::groups] = (rows - mean) / np.sqrt(var + epsilon)
        means.append(mean)
        variances.append(var)
    return out, np.mean(means, 0), np.mean(variances, 0)


def test_ghost_batches_match_numpy(rng):
    layer = BatchNorm(virtual_batch_size=4, momentum=0.9)
    moving_mean, moving_var = np.zeros(3), np.ones(3)
    for step in range(3):
        x = rng.normal(step, 1.0 + step, size=(12, 5, 3)).astype("float32")
        expected, mean, var = ghost_reference(x, 4)
        np.testing.assert_allclose(to_np(layer(x, training=True)), expected, rtol=1e-5, atol=1e-5)
        moving_mean = 0.9 * moving_mean + 0.1 * mean
        moving_var = 0.9 * moving_var + 0.1 * var
    np.testing.assert_allclose(layer.moving_mean.numpy(), moving_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.moving_variance.numpy(), moving_var, rtol=1e-6)
    # Negative case: a whole-batch BatchNorm normalizes differently.
    whole = BatchNorm(momentum=0.9)
    x = rng.normal(size=(12, 5, 3)).astype("float32")
    assert not np.allclose(to_np(whole(x, training=True)), ghost_reference(x, 4)[0], atol=1e-2)


@tf_only
def test_ghost_batches_match_tf_keras(rng):
    tf_keras = pytest.importorskip("tf_keras")
    ours = BatchNorm(virtual_batch_size=4, momentum=0.9, gamma_initializer="random_uniform")
    theirs = tf_keras.layers.BatchNormalization(virtual_batch_size=4, momentum=0.9)
    ours.build((None, 6, 3))
    theirs.build((None, 6, 3))
    theirs.set_weights([w.numpy().reshape(t.shape) for w, t in zip(ours.weights, theirs.weights)])
    for step in range(3):
        x = rng.normal(step, 2.0, size=(16, 6, 3)).astype("float32")
        np.testing.assert_allclose(
            to_np(ours(x, training=True)), theirs(x, training=True).numpy(), rtol=1e-5, atol=1e-5
        )
    for a, b in zip(ours.weights, theirs.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy().reshape(a.shape), rtol=1e-6, atol=1e-7)


def test_renorm_and_ghost_batches_in_fit_with_xla(rng):
    # One model with both: ghost batches straight after the input (so their moving statistics
    # are NumPy's over the data's batches), then a convolution and batch renormalization, whose
    # twin is Keras's renorm layer. Compiled with XLA on TensorFlow and JAX; on torch eagerly
    # (torch.compile of the layer is test_fit_with_xla_matches_keras's, and costs 12-25 s).
    x = rng.normal(2.0, 3.0, size=(64, 6, 6, 3)).astype("float32")
    y = rng.normal(size=(64, 5)).astype("float32")
    renorm = dict(renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0}, momentum=0.9)

    def fit(make_renorm, jit_compile):
        keras.utils.set_random_seed(0)
        inputs = keras.Input(x.shape[1:])
        h = BatchNorm(virtual_batch_size=4, momentum=0.9, name="ghost")(inputs)
        h = make_renorm()(keras.layers.Conv2D(4, 3, name="conv")(h))
        model = keras.Model(inputs, keras.layers.Dense(5)(keras.layers.Flatten()(h)))
        model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=jit_compile)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        return model, history.history["loss"]

    ours, loss_ours = fit(lambda: BatchNorm(**renorm, name="renorm"), BACKEND != "torch")
    theirs, loss_theirs = fit(
        lambda: keras.layers.BatchNormalization(**renorm, name="renorm"), BACKEND != "torch"
    )
    np.testing.assert_allclose(loss_ours, loss_theirs, rtol=1e-5)
    for a, b in zip(ours.get_layer("renorm").weights, theirs.get_layer("renorm").weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.name)
    mean, var = np.zeros(3), np.ones(3)
    for _ in range(2):
        for start in range(0, 64, 16):
            _, m, v = ghost_reference(x[start : start + 16], 4)
            mean, var = 0.9 * mean + 0.1 * m, 0.9 * var + 0.1 * v
    ghost = ours.get_layer("ghost")
    np.testing.assert_allclose(ghost.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ghost.moving_variance.numpy(), var, rtol=1e-5)


def test_renorm_and_ghost_batches_are_ordinary_batchnorms_at_inference(tmp_path, rng):
    inputs = keras.Input((6, 6, 2))
    h = BatchNorm(renorm=True, name="renorm")(keras.layers.Conv2D(4, 3, name="c1")(inputs))
    h = BatchNorm(virtual_batch_size=2, name="ghost")(keras.layers.Conv2D(3, 1, name="c2")(h))
    model = keras.Model(inputs, h)
    x = rng.normal(size=(8, 6, 6, 2)).astype("float32")
    model(x, training=True)
    path = tmp_path / "variants.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("renorm").renorm and loaded.get_layer("ghost").virtual_batch_size == 2
    np.testing.assert_allclose(to_np(loaded(x)), to_np(model(x)), rtol=1e-6, atol=1e-6)
    folded, report = keras_bn.fold_bn(model)
    assert [r.action.value for r in report.rows] == ["folded backward"] * 2
    np.testing.assert_allclose(to_np(folded(x)), to_np(model(x)), rtol=1e-5, atol=1e-5)
    # Recalibration writes the moving standard deviation renorm trains from, consistently.
    new, _ = keras_bn.recalibrate(model, x, verbose=0)
    layer = new.get_layer("renorm")
    np.testing.assert_allclose(
        layer.moving_stddev.numpy() ** 2 - 1e-3, layer.moving_variance.numpy(), rtol=1e-5
    )


def test_renorm_and_ghost_batches_under_mixed_float16(mixed_policy, rng):
    # float16 outputs, float32 statistics: renorm's against Keras's own renorm layer under the
    # same policy, the ghost batches' against NumPy's float64 reference.
    mixed_policy("mixed_float16")
    clipping = {"rmax": 2.0, "dmax": 1.0}
    ours = BatchNorm(momentum=0.9, renorm=True, renorm_clipping=clipping)
    theirs = keras.layers.BatchNormalization(momentum=0.9, renorm=True, renorm_clipping=clipping)
    ghost = BatchNorm(momentum=0.9, virtual_batch_size=4)
    for layer in (ours, theirs, ghost):
        layer.build((None, 6, 6, 3))
    mean = np.zeros(3)
    for _ in range(3):
        x = rng.normal(2.0, 3.0, size=(8, 6, 6, 3)).astype("float32")
        y_ours, y_theirs = ours(x, training=True), theirs(x, training=True)
        assert keras.backend.standardize_dtype(y_ours.dtype) == "float16"
        np.testing.assert_allclose(to_np(y_ours), to_np(y_theirs), rtol=2e-3, atol=2e-3)
        y_ghost = ghost(x, training=True)
        assert keras.backend.standardize_dtype(y_ghost.dtype) == "float16"
        mean = 0.9 * mean + 0.1 * ghost_reference(x, 4)[1]
    for a, b in zip(ours.weights, theirs.weights):
        assert a.dtype == "float32"
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.name)
    assert ghost.moving_mean.dtype == "float32"
    np.testing.assert_allclose(ghost.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"renorm": True, "renorm_clipping": {"rmax": 1.0, "r": 2}}, r"renorm_clipping"),
        ({"renorm": True, "renorm_clipping": {"rmax": 1.0, "rmin": 2.0}}, r"rmax >= rmin"),
        ({"renorm": True, "momentum": None}, r"renorm=True with momentum=None"),
        ({"renorm": True, "virtual_batch_size": 4}, r"one of them"),
        ({"virtual_batch_size": 0}, r"a positive integer"),
        ({"virtual_batch_size": 2, "synchronized": True}, r"with synchronized=True"),
    ],
)
def test_bad_renorm_and_ghost_arguments_are_refused(kwargs, message):
    with pytest.raises(KerasBNError, match=message):
        BatchNorm(**kwargs)


def test_a_batch_that_ghost_batches_do_not_divide_is_refused(rng):
    layer = BatchNorm(virtual_batch_size=4)
    with pytest.raises(KerasBNError, match=r"multiple of virtual_batch_size=4.*a batch of 6"):
        layer(rng.normal(size=(6, 3)).astype("float32"), training=True)
    assert layer.moving_mean.numpy().tolist() == [0.0, 0.0, 0.0]


def test_nan_batch_under_xla_is_counted_and_reported_by_the_callback(rng):
    inputs = keras.Input((3,))
    bn = BatchNorm(momentum=0.5)
    model = keras.Model(inputs, bn(inputs))
    model.compile("sgd", "mse", jit_compile=True)
    x = rng.normal(size=(8, 3)).astype("float32")
    model.fit(x[:4], x[:4], batch_size=4, epochs=1, verbose=0)
    mean = bn.moving_mean.numpy().copy()
    bad = x.copy()
    bad[0, 0] = np.nan  # first batch of 4 has a NaN, the second is clean
    fit_bad = dict(
        x=bad,
        y=bad,
        batch_size=4,
        epochs=1,
        verbose=0,
        shuffle=False,
        callbacks=[keras_bn.SkippedUpdatesCallback()],
    )
    if BACKEND == "jax":
        # Keras's JAX step carries only the model's variables through jax.jit, and the skip
        # counter is kept out of them (get_weights and .keras files stay Keras's four): under
        # jax.jit the skip is made but not counted. Counted in eager calls (the NaN test above).
        model.fit(**fit_bad)
        assert bn.skipped_updates == 0
    else:
        with pytest.warns(
            keras_bn.SkippedUpdateWarning,
            match=r"epoch 1: keras_bn\.BatchNorm skipped .*\('batch_norm(_\d+)?' 1\)",
        ):
            model.fit(**fit_bad)
        assert bn.skipped_updates == 1
    # Only the clean batch updated: momentum 0.5 from `mean` toward its batch mean.
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.5 * mean + 0.5 * x[4:].mean(0), rtol=1e-5)
    # Negative case: a clean epoch warns nothing.
    import warnings as _warnings

    with _warnings.catch_warnings():
        _warnings.simplefilter("error", RuntimeWarning)  # ours; not Keras's own DeprecationWarnings
        model.fit(
            x, x, batch_size=4, epochs=1, verbose=0, callbacks=[keras_bn.SkippedUpdatesCallback()]
        )
    assert bn.skipped_updates == (0 if BACKEND == "jax" else 1)


@tf_only
def test_batch_of_one_under_xla_is_nan_not_a_silent_answer(rng):
    # XLA drops the run-time check (it cannot raise from inside the step): the batch's outputs
    # are NaN instead of a finite beta, and the moving statistics are left alone.
    bn = BatchNorm(momentum=0.5)
    bn.build((None, 3))
    step = tf.function(
        lambda x: bn(x, training=True),
        jit_compile=True,
        input_signature=[tf.TensorSpec((None, 3), tf.float32)],
    )
    y = step(tf.constant([[1.0, 2.0, 3.0]]))
    assert np.all(np.isnan(y.numpy()))
    np.testing.assert_array_equal(bn.moving_mean.numpy(), np.zeros(3))
    np.testing.assert_array_equal(bn.moving_variance.numpy(), np.ones(3))
    assert bn.skipped_updates == 1
    # Two samples: a normal step, finite outputs (x - mean) / sqrt(var + eps) = -+1 / sqrt(1.001).
    y = step(tf.constant([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]))
    np.testing.assert_allclose(
        y.numpy()[:, 0], [-1 / np.sqrt(1.001), 1 / np.sqrt(1.001)], rtol=1e-6
    )
    np.testing.assert_allclose(bn.moving_mean.numpy(), [1.0, 1.5, 2.0], rtol=1e-6)
    # Through model.fit with XLA: a last partial batch of one makes the loss NaN.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(BatchNorm()(inputs)))
    model.compile("sgd", "mse", jit_compile=True)
    history = model.fit(
        np.ones((5, 3), np.float32), np.ones((5, 2), np.float32), batch_size=4, epochs=1, verbose=0
    )
    assert np.isnan(history.history["loss"][-1])


def test_partial_batch_of_one_in_compiled_fit(rng):
    # PyTorch raises at once. XLA on TensorFlow cannot raise inside the step, and JAX cannot
    # either: an exception while Keras's JAX trainer traces leaves the model's variables purged
    # (predict fails afterwards). There the outputs are NaN (so is the loss), the statistics are
    # untouched, and the model is still usable.
    inputs = keras.Input((3,))
    bn = BatchNorm()
    model = keras.Model(inputs, keras.layers.Dense(2)(bn(inputs)))
    model.compile("sgd", "mse", jit_compile=True)
    x, y = np.ones((5, 3), np.float32), np.ones((5, 2), np.float32)
    if BACKEND in ("jax", "tensorflow"):
        history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
        assert np.isnan(history.history["loss"][-1])
        assert np.all(np.isfinite(bn.moving_mean.numpy()))
        assert np.all(np.isfinite(bn.moving_variance.numpy()))
        assert model.predict(x, verbose=0).shape == (5, 2)
    else:
        with pytest.raises(Exception, match="Expected more than 1 value per channel"):
            model.fit(x, y, batch_size=4, verbose=0)


@pytest.mark.parametrize("axis,shape", [(1, (5, 2, 3)), (1, (4, 3, 5, 2)), (-2, (5, 4, 3))])
def test_mask_on_any_axis_matches_keras(axis, shape, rng):
    # Keras's mask lacks the LAST axis whatever the channel axis is.
    x = rng.normal(2.0, 1.5, size=shape).astype("float32")
    mask = rng.random(shape[:-1]) > 0.3
    ours = BatchNorm(axis=axis, momentum=0.5)
    theirs = keras.layers.BatchNormalization(axis=axis, momentum=0.5)
    np.testing.assert_allclose(
        to_np(ours(x, training=True, mask=mask)),
        to_np(theirs(x, training=True, mask=mask)),
        rtol=1e-4,
        atol=1e-4,
    )
    # NumPy: the mask broadcast over the last axis selects the values of each channel.
    weights = np.broadcast_to(mask[..., None], shape)
    channel = axis % len(shape)
    xs, ws = np.moveaxis(x, channel, -1), np.moveaxis(weights, channel, -1)
    expected = [xs[..., c][ws[..., c]].mean() for c in range(shape[channel])]
    np.testing.assert_allclose(ours.moving_mean.numpy(), 0.5 * np.array(expected), rtol=1e-5)
    np.testing.assert_allclose(ours.moving_mean.numpy(), theirs.moving_mean.numpy(), rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("shape", [(8, 3), (6, 4, 4, 3)])
def test_pure_dtype_layers_match_keras_and_numpy(dtype, shape, rng):
    if dtype == "float64" and BACKEND == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("JAX has no float64 without jax_enable_x64")
    x = rng.normal(2.0, 1.5, size=shape).astype(dtype)
    ours = BatchNorm(dtype=dtype, momentum=0.5)
    theirs = keras.layers.BatchNormalization(dtype=dtype, momentum=0.5)
    y = ours(x, training=True)
    assert dtype_of(y) == dtype and ours.moving_mean.dtype == dtype
    flat = x.astype(np.float64).reshape(-1, 3)
    expected = ((flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-3)).reshape(shape)
    tol = 1e-9 if dtype == "float64" else 2e-3
    np.testing.assert_allclose(to_np(y, np.float64), expected, rtol=tol, atol=tol)
    # Keras 3.15's own BatchNorm on torch is float32-precise only in float64 (its torch `mean`
    # computes in float32: measured 5e-7 from NumPy, where ours is within 1e-9).
    keras_tol = 1e-6 if BACKEND == "torch" and dtype == "float64" else max(tol, 1e-9)
    np.testing.assert_allclose(
        to_np(y, np.float64),
        to_np(theirs(x, training=True), np.float64),
        rtol=keras_tol,
        atol=keras_tol,
    )
    np.testing.assert_allclose(
        ours.moving_variance.numpy().astype(np.float64), 0.5 + 0.5 * flat.var(0), rtol=tol
    )
    y_inf = ours(x, training=False)
    assert dtype_of(y_inf) == dtype
    np.testing.assert_allclose(
        to_np(y_inf, np.float64),
        to_np(theirs(x, training=False), np.float64),
        rtol=keras_tol,
        atol=keras_tol,
    )


@pytest.mark.parametrize("shape", [(0, 3), (0, 4, 4, 3)])
def test_empty_batch_returns_empty_and_leaves_statistics(shape):
    bn = BatchNorm(momentum=None)
    bn.build((None, *shape[1:]))
    y = bn(np.zeros(shape, np.float32), training=True)
    assert tuple(y.shape) == shape
    if BACKEND == "tensorflow":  # an empty batch behind an unknown batch size
        step = tf.function(
            lambda x: bn(x, training=True),
            input_signature=[tf.TensorSpec((None, *shape[1:]), tf.float32)],
        )
        assert tuple(step(tf.zeros(shape)).shape) == shape
    np.testing.assert_array_equal(bn.moving_mean.numpy(), np.zeros(3))
    np.testing.assert_array_equal(bn.moving_variance.numpy(), np.ones(3))
    assert int(bn.num_batches_tracked.numpy()) == 0 and bn.skipped_updates == 0


@pytest.mark.parametrize(
    "kwargs,shape",
    [({"epsilon": 1e-6}, (6, 3)), ({"axis": 1, "epsilon": 1e-6}, (6, 3, 2, 2)), ({}, (6, 2, 2, 3))],
)
def test_inference_with_large_mean_small_variance_is_exact(kwargs, shape, rng):
    # mean 1e4, variance 1e-4: x*inv + (beta - mean*inv) cancels two numbers of ~1e6 in float32
    # (error 0.057 on outputs of ~2.4); (x - mean)*inv + beta keeps the digits.
    bn = BatchNorm(
        moving_mean_initializer=keras.initializers.Constant(1e4),
        moving_variance_initializer=keras.initializers.Constant(1e-4),
        **kwargs,
    )
    x = (1e4 + 0.024 * rng.standard_normal(shape)).astype("float32")
    y = to_np(bn(x, training=False), np.float64)
    expected = (x.astype(np.float64) - 1e4) / np.sqrt(1e-4 + bn.epsilon)
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(y, expected, atol=1e-5)
