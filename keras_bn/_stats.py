"""BatchNorm's arithmetic in keras.ops, once, for every backend: batch moments, the
moving-statistics update with its skip rules, and normalization.

Pure functions of tensors and numbers, with no layer and no variable: `keras_bn.BatchNorm`,
its TensorFlow and PyTorch fast paths (`_tf_kernels`, `_torch_kernels`) and `recalibrate` call
them, and `tests/test_stats.py` checks them against float64 NumPy and PyTorch alone.

Statistics are kept with their reduced axes (size 1), so that they broadcast against the input.
"""

from __future__ import annotations

import dataclasses
import math

from keras import ops


def batch_of_one_message(shape):
    """The refusal of a training batch with one value per channel (PyTorch's rule)."""
    return (
        "Expected more than 1 value per channel when training, got input shape "
        f"{shape}. Train with a batch of at least 2 samples (or inputs with spatial dimensions), "
        "drop a last partial batch of one (`drop_remainder=True`), or call the layer with "
        "training=False for inference."
    )


def channel_shape(rank, axis):
    """The shape that broadcasts a per-channel vector along `axis` of a rank-`rank` input."""
    shape = [1] * rank
    shape[axis] = -1
    return shape


def gamma_beta(layer, channels, dtype):
    """gamma and beta of a BatchNorm (keras_bn's or Keras's) in the math dtype, ones and zeros
    for a layer without them."""
    gamma = ops.cast(layer.gamma, dtype) if layer.scale else ops.ones((channels,), dtype)
    beta = ops.cast(layer.beta, dtype) if layer.center else ops.zeros((channels,), dtype)
    return gamma, beta


def _ratio(a, b):
    # a / b, 0 where b is 0 (then a is 0 too: an empty or all-masked channel). Neither
    # ops.divide_no_nan nor ops.maximum: Keras 3.15's torch versions return float32 for float64.
    return a / ops.where(b > 0.0, b, 1.0)


def moments(x, axes, mask=None, sum_over_processes=None, shift=False):
    """Batch mean and biased variance per channel: shifted by one sample, two passes.

    With `pivot` the first sample of each channel, `mean = pivot + sum(x - pivot) / n` and
    `variance = sum((x - mean)**2) / n`. The shift keeps float32 statistics exact when the mean
    is far above the spread (mean 1e4, std 0.01), where E[x^2] - E[x]^2 gives 0.

    Returns `(centered, mean, variance, count)`, `centered = x - mean`. With `mask` (Keras's,
    one axis less than `x`, broadcast over the last) masked-out values are left out, and there is
    no shift (a masked-out first sample may hold padding far from the data). With
    `sum_over_processes` every sum is over all processes' batches (synchronized statistics).
    `shift=True` (unmasked only) returns `(pivot, shifted_mean, variance, count)` instead, the
    mean in two parts, for a caller that centres `x` itself."""

    def total(t):
        # Sums over n, not ops.mean: Keras 3.15's torch `mean` computes float64 in float32
        # (measured: 1e-7 error on float64 data).
        t = ops.sum(t, axis=axes, keepdims=True)
        return t if sum_over_processes is None else sum_over_processes(t)

    n = math.prod(int(x.shape[i]) for i in axes)
    if mask is None:
        first = tuple(slice(0, 1) if i in axes else slice(None) for i in range(len(x.shape)))
        # A sum over at most one value: the sample itself, or 0 for an empty batch.
        pivot = ops.sum(x[first], axis=axes, keepdims=True)
        count = ops.full_like(pivot, n)
        if sum_over_processes is not None:
            # Every process shifts by the same value: the mean of their first samples.
            nonempty = sum_over_processes(ops.full_like(pivot, float(n > 0)))
            pivot = _ratio(sum_over_processes(pivot), nonempty)
            count = sum_over_processes(count)
        pivot = ops.stop_gradient(pivot)
        shifted = x - pivot
        shifted_mean = _ratio(total(shifted), count)
        centered = shifted - shifted_mean
        variance = _ratio(total(ops.square(centered)), count)
        if shift:
            return pivot, shifted_mean, variance, count
        return centered, shifted_mean + pivot, variance, count
    weights = ops.broadcast_to(ops.expand_dims(ops.cast(mask, x.dtype), -1), ops.shape(x))
    count = total(weights)
    # An all-masked channel: mean 0, and no update (count 0).
    mean = _ratio(total(x * weights), count)
    centered = x - mean
    variance = _ratio(total(ops.square(centered) * weights), count)
    return centered, mean, variance, count


def normalize(x, mean, variance, gamma, beta, epsilon):
    """`(x - mean) * gamma / sqrt(variance + epsilon) + beta`, all broadcastable to `x`.

    Centred first, not `x * s + (beta - mean * s)`: with a large mean and a small variance the
    latter cancels two large numbers (error 0.06 on outputs of 2.4 at mean 1e4, variance 1e-4,
    epsilon 1e-6)."""
    return (x - mean) * (gamma * ops.rsqrt(variance + epsilon)) + beta


@dataclasses.dataclass
class MovingUpdate:
    """What one training batch does to the moving statistics: the new values (the old ones where
    the batch is skipped), per-row flags, and whether the batch counts as a skip."""

    mean: object
    variance: object
    updated: object  # bool per row: the row's statistics entered the moving ones
    skipped: object  # bool scalar, or False when it is known in Python that nothing was skipped
    all_finite: bool | None  # known in Python (eager) or None (traced)


def moving_update(
    old_mean,
    old_variance,
    mean,
    variance,
    count,
    *,
    momentum,
    unbiased,
    batches_tracked=None,
    concrete=lambda t: None,
):
    """The moving-statistics rule, the one place it is written.

    `mean`, `variance` (biased) and `count` have a row per slice of the batch whose statistics
    were taken separately (one per JAX device without synchronization, else one row), shape
    (rows, channels); `count` may also be (rows, 1), or a Python int where every row saw the same
    static number of values. For each row, with `w = 1 - momentum` (Keras's momentum: the weight
    of the old value), or `w = 1 / (batches_tracked + 1)` for `momentum=None`, the cumulative
    average:

        v = variance * n / (n - 1)  if unbiased (PyTorch's running_var), else variance
        new_mean = old_mean * (1 - w) + mean * w
        new_variance = old_variance * (1 - w) + v * w

    `old * (1 - w) + new * w`, not `old + (new - old) * w`: with a tiny batch variance and
    momentum 0 the latter rounds the result to the old value's ulp. A row is skipped (keeps the
    old values) when its statistics hold NaN or Inf or a channel saw fewer than 2 values; the
    rows are then averaged, as tf.distribute averages per-replica updates of a variable whose
    aggregation is "mean". A skip is a batch where some row with values was skipped: an empty
    batch is none. `concrete(tensor)` gives a bool tensor's Python value when it has one, else
    None (`_keras_internals.concrete_bool`), for the Python shortcuts of the static case (in eager
    PyTorch every keras.ops call has a fixed cost that a small step feels)."""
    dtype = mean.dtype
    rows = mean.shape[0]
    mean, variance = ops.stop_gradient(mean), ops.stop_gradient(variance)
    static = isinstance(count, int)
    if static:
        # count >= 1 here (an empty batch returns before), and 1 only inside jax.jit. Not a
        # tensor of `count > 1`: under torch.compile with dynamic shapes `count` is symbolic.
        enough, seen = count > 1, True
        if unbiased:
            variance = variance * (count / (count - 1) if enough else 0.0)
    else:
        count = ops.cast(count, dtype)
        if unbiased:
            variance = variance * ops.where(
                count > 1.0, count / ops.where(count > 1.0, count - 1.0, 1.0), 0.0
            )
        enough, seen = ops.all(count > 1.0, axis=1), ops.any(count > 0.0, axis=1)
    finite = ops.logical_and(
        ops.all(ops.isfinite(mean), axis=1), ops.all(ops.isfinite(variance), axis=1)
    )
    if static:
        update = finite if enough else ops.zeros_like(finite)
    else:
        update = ops.logical_and(finite, enough)
    if momentum is None:
        weight_new = 1.0 / (ops.cast(batches_tracked, dtype) + 1.0)
    else:
        weight_new = 1.0 - momentum
    old_mean, old_variance = ops.cast(old_mean, dtype), ops.cast(old_variance, dtype)
    keep = ops.expand_dims(update, 1)
    new_mean = ops.where(keep, old_mean * (1.0 - weight_new) + mean * weight_new, old_mean)
    new_variance = ops.where(
        keep, old_variance * (1.0 - weight_new) + variance * weight_new, old_variance
    )
    if rows > 1:
        # A sum over the rows divided by their number, not ops.mean (see `moments`).
        new_mean = ops.sum(new_mean, axis=0) / rows
        new_variance = ops.sum(new_variance, axis=0) / rows
    all_finite = concrete(ops.all(finite))
    if static and enough and all_finite is True:
        skipped = False
    else:
        skipped = ops.any(ops.logical_and(ops.logical_not(update), seen))
    return MovingUpdate(
        ops.reshape(new_mean, (-1,)), ops.reshape(new_variance, (-1,)), update, skipped, all_finite
    )


def normalize_with_batch_gradient(x, gamma, beta, pivot, shifted_mean, variance, epsilon, axes, n):
    """`(x - mean) * gamma / sqrt(variance + epsilon) + beta` in training mode, with BatchNorm's
    textbook gradient (Ioffe & Szegedy, section 3) instead of automatic differentiation through
    the moments: with `r = 1 / sqrt(variance + epsilon)`, `xhat = (x - mean) * r` and sums over
    the `n` values of each channel,

        dx = gamma * r * (dy - (sum(dy) + xhat * sum(dy * xhat)) / n)
        dgamma = sum(dy * xhat),  dbeta = sum(dy)

    The batch mean comes in two parts, `pivot + shifted_mean` (`moments(shift=True)`), so that
    `x - mean` is `(x - pivot) - shifted_mean` without the rounding of the mean to the data's
    magnitude. The forward pass is `(x - pivot) * k + (beta - shifted_mean * k)`, `k = gamma * r`:
    one subtraction per value fewer, and as sound, `x - pivot` being exact or nearly so.

    Why: on JAX, XLA on CPU compiles the automatic gradient of the centred formula to a slower
    program than Keras's (see benchmarks/bench_layer.py). This one
    writes `sum(dy * xhat)` as `r * (sum(dy * x) - mean * sum(dy))` and `dx` as
    `x * a + dy * b + c` per channel, which XLA fuses as it fuses Keras's gradient. Both cancel
    when |mean| is far above the standard deviation, so past 100 of them (the same bound as
    PyTorch's kernel path) the centred expressions are used, chosen per batch by `ops.cond`."""

    @ops.custom_gradient
    def forward(x, gamma, beta, pivot, shifted_mean, variance):
        # The statistics come in as arguments (with no gradient: this one covers them), not
        # from the enclosing scope, where JAX would see its tracers escape.
        inv = ops.rsqrt(variance + epsilon)
        mean = pivot + shifted_mean
        scale = inv * gamma
        outputs = (x - pivot) * scale + (beta - shifted_mean * scale)

        def grad(*args, upstream=None):
            dy = args[0] if upstream is None else upstream

            def fast():
                sum_dy = ops.sum(dy, axis=axes, keepdims=True)
                sum_dy_x = ops.sum(dy * x, axis=axes, keepdims=True)
                sum_dy_xhat = inv * (sum_dy_x - mean * sum_dy)
                a = -scale * inv * sum_dy_xhat / n
                return x * a + scale * dy + (-scale * sum_dy / n - mean * a), sum_dy_xhat, sum_dy

            def centred():
                xhat = ((x - pivot) - shifted_mean) * inv
                sum_dy = ops.sum(dy, axis=axes, keepdims=True)
                sum_dy_xhat = ops.sum(dy * xhat, axis=axes, keepdims=True)
                dx = gamma * inv * (dy - (sum_dy + xhat * sum_dy_xhat) / n)
                return dx, sum_dy_xhat, sum_dy

            ill = ops.any(ops.square(mean) > 1e4 * variance)
            dx, dgamma, dbeta = ops.cond(ill, centred, fast)
            # With a slice of the batch per device (a leading axis), gamma and beta are shared.
            shared = [i for i, size in enumerate(gamma.shape) if size == 1 and dgamma.shape[i] > 1]
            if shared:
                dgamma = ops.sum(dgamma, axis=shared, keepdims=True)
                dbeta = ops.sum(dbeta, axis=shared, keepdims=True)
            return (
                dx,
                ops.reshape(dgamma, gamma.shape),
                ops.reshape(dbeta, beta.shape),
                ops.zeros_like(pivot),
                ops.zeros_like(shifted_mean),
                ops.zeros_like(variance),
            )

        return outputs, grad

    stop = ops.stop_gradient
    return forward(x, gamma, beta, stop(pivot), stop(shifted_mean), stop(variance))
