"""BatchNorm on TensorFlow: FusedBatchNormV3 and its epsilon rule, tf.distribute's synchronized
moments, run-time checks for unknown shapes, and recalibration's float64 sums.

`keras_bn.BatchNorm` calls `train` and `infer` on the TensorFlow backend; what they share with the
other backends (the moving-statistics update, inference normalization) is in `_stats`. Imported
only where TensorFlow is the backend or is used directly.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from keras_bn import _stats
from keras_bn.errors import KerasBNError

# tf.nn.fused_batch_norm raises any epsilon below this to this value without a word, for cuDNN's
# old minimum (CUDNN_BN_MIN_EPSILON). The layer calls the op itself, FusedBatchNormV3, whose CPU
# kernel honours any epsilon (measured, with and without XLA, at epsilon 1e-7 to 1e-5: outputs
# within 6e-7 of NumPy's, where the raised epsilon would be off by 5e-4 to 2.7). On a GPU that
# is not verified here, so there the fast path is only taken at this epsilon or above.
FUSED_MIN_EPSILON = 1.001e-5


@functools.cache
def _accelerators_visible():
    """Whether this TensorFlow process has a GPU or TPU, where FusedBatchNormV3 may run elsewhere
    than on the CPU. Logical devices are fixed once TF's runtime starts, so one look serves."""
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def fused_honours_epsilon(epsilon, accelerators=None):
    """True where FusedBatchNormV3 computes with `epsilon` as given: any epsilon in a CPU-only
    process (PyTorch's 1e-5 included), `epsilon >= 1.001e-5` where a GPU or TPU is visible.
    `accelerators` defaults to this process's devices."""
    if accelerators is None:
        accelerators = _accelerators_visible()
    return epsilon >= FUSED_MIN_EPSILON or not accelerators


def use_fused(layer, inputs, mask):
    """Channels-last inputs of any rank, no mask, no cross-replica statistics, and an epsilon
    the kernel will not change (`fused_honours_epsilon`)."""
    rank = len(inputs.shape)
    return (
        layer.axis % rank == rank - 1
        and mask is None
        and not layer.synchronized
        and fused_honours_epsilon(layer.epsilon)
        and inputs.dtype in (tf.float32, tf.float16, tf.bfloat16)
    )


def _axes(inputs, axis):
    rank = len(inputs.shape)
    return axis % rank, [i for i in range(rank) if i != axis % rank]


def values_per_channel(inputs, axis):
    """Static count if every reduced dimension is known, else a scalar tensor."""
    _, axes = _axes(inputs, axis)
    static = [inputs.shape[i] for i in axes]
    if all(d is not None for d in static):
        count = 1
        for d in static:
            count *= d
        return count
    return tf.reduce_prod(tf.gather(tf.shape(inputs), axes))


def _check_one_value(inputs, count):
    """Refuses one value per channel: at once when the shape is known, else with a run-time check
    (which XLA drops; the NaN scale in `train` covers that case)."""
    message = _stats.batch_of_one_message(tuple(inputs.shape))
    if isinstance(count, int):
        if count == 1:
            raise KerasBNError(message)
        return inputs
    # != 1, not > 1: an empty batch (a replica's share of a partial last batch) is allowed.
    check = tf.debugging.assert_none_equal(count, tf.constant(1, count.dtype), message=message)
    with tf.control_dependencies([check]):
        return tf.identity(inputs)


def _pivot(x, axis):
    """One sample of each channel, shape broadcastable to `x`, without gradient (the shift of
    `_stats.moments`). An empty batch has no sample: the pivot is 0 then."""
    axis, axes = _axes(x, axis)
    first = tuple(slice(None) if i == axis else slice(0, 1) for i in range(len(x.shape)))
    return tf.stop_gradient(tf.reduce_sum(x[first], axis=axes, keepdims=True))


def synchronized_now(layer):
    """True when the batch statistics are taken over several replicas' batches."""
    ctx = tf.distribute.get_replica_context()
    return layer.synchronized and ctx is not None and ctx.num_replicas_in_sync > 1


def _batch_moments(layer, x, mask):
    """`_stats.moments` with TF's ops and tf.distribute's all-reduce. Returns `(centered, mean,
    variance, count)`, the mean and biased variance as vectors."""
    axis, axes = _axes(x, layer.axis)
    shape = _stats.channel_shape(len(x.shape), axis)
    weights = None
    if mask is not None:  # Keras's mask lacks the last axis: broadcast over it
        weights = tf.broadcast_to(tf.expand_dims(tf.cast(mask, x.dtype), -1), tf.shape(x))
    ctx = tf.distribute.get_replica_context()
    synchronized = synchronized_now(layer)
    # A masked-out first sample may hold padding far from the data: no shift then.
    pivot = _pivot(x, axis)
    if weights is not None:
        pivot = tf.zeros_like(pivot)
    if synchronized:
        pivot = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, pivot)
    shifted = x - pivot
    if synchronized:
        # Global-batch moments: two all-reduces (sums, then squared deviations).
        w = tf.ones_like(shifted) if weights is None else weights
        local = tf.stack([tf.reduce_sum(shifted * w, axes), tf.reduce_sum(w, axes)])
        total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local)
        count = total[1]
        shifted_mean = tf.math.divide_no_nan(total[0], count)
        centered = shifted - tf.reshape(shifted_mean, shape)
        local_sq = tf.reduce_sum(tf.square(centered) * w, axes)
        variance = tf.math.divide_no_nan(
            ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_sq), count
        )
    elif weights is None:
        shifted_mean, variance = tf.nn.moments(shifted, axes)
        count = tf.cast(values_per_channel(x, axis), x.dtype)
        centered = shifted - tf.reshape(shifted_mean, shape)
    else:
        shifted_mean, variance = tf.nn.weighted_moments(shifted, axes, weights)
        count = tf.reduce_sum(weights, axes)
        centered = shifted - tf.reshape(shifted_mean, shape)
    mean = shifted_mean + tf.reshape(pivot, [-1])
    return centered, mean, variance, count


def as_4d(inputs):
    """Rank 2 and 3 channels-last inputs viewed as (N, L, 1, C): a free reshape."""
    if len(inputs.shape) >= 4:
        return inputs
    shape = tf.shape(inputs)
    return tf.reshape(inputs, tf.concat([shape[:1], [-1, 1], shape[-1:]], 0))


def fused(x, gamma, beta, mean, variance, epsilon, training):
    """The FusedBatchNormV3 op itself (tf.nn.fused_batch_norm would raise a small epsilon):
    `(outputs, mean, variance)`, the variance Bessel-corrected in training."""
    outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x,
        scale=gamma,
        offset=beta,
        mean=mean,
        variance=variance,
        epsilon=epsilon,
        data_format="NDHWC" if len(x.shape) == 5 else "NHWC",
        is_training=training,
    )
    return outputs, mean, variance


def _fused_train(layer, inputs, gamma, beta):
    """FusedBatchNormV3 in training mode on the input shifted by one of its samples; returns
    output (in the compute dtype), batch mean, BIASED batch variance and the number of values
    per channel.

    The kernel's plain two-pass variance loses digits once |mean| / std exceeds ~1e3 in float32
    (0.6% at 1e6), and XLA, which expands the kernel into E[x^2] - E[x]^2, loses them sooner. On
    `x - pivot` the mean is that sample's distance from the mean (a few standard deviations for a
    typical sample), and the kernel's outputs `(x' - mean(x')) * s + beta` are those of `x`, as is
    its gradient (the shift has none).

    Why the shift on every batch and not a `tf.cond` to a fallback for ill-conditioned batches:
    the cond and its gradient made tracing a training step several times slower than Keras's
    (a network's first `fit`, benchmarks/bench_layer.py), and its XLA gradient was NaN at mean
    1e4, std 0.01; the shifted step itself costs no more than the cond's. Inputs are cast to float32
    first, as Keras's layer does: `x - pivot` can overflow float16.

    The kernel reduces over every axis but the last, so rank 2 and 3 inputs are viewed as
    (N, L, 1, C) -- a free reshape -- and rank 5 runs as NDHWC."""
    x = tf.cast(inputs, tf.float32)
    pivot = _pivot(x, layer.axis)
    empty = tf.constant([], tf.float32)
    outputs, shifted_mean, unbiased = fused(
        as_4d(x - pivot), gamma, beta, empty, empty, layer.epsilon, training=True
    )
    outputs = tf.cast(tf.reshape(outputs, tf.shape(inputs)), layer.compute_dtype)
    # The kernel returns the Bessel-corrected variance; undo it to keep one convention here.
    n = tf.cast(values_per_channel(inputs, layer.axis), tf.float32)
    variance = unbiased * tf.math.divide_no_nan(n - 1.0, n)
    return outputs, shifted_mean + tf.reshape(pivot, [-1]), variance, n


def train(layer, inputs, mask):
    """Training mode: `(outputs, statistics)`, `statistics = (mean, variance, count)` as rows of
    shape (1, channels) for `_stats.moving_update`, or None for a statically empty batch."""
    inputs = tf.convert_to_tensor(inputs)
    math_dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
    axis, _ = _axes(inputs, layer.axis)
    gamma, beta = _stats.gamma_beta(layer, inputs.shape[axis], math_dtype)
    count = values_per_channel(inputs, axis)
    if isinstance(count, int) and count == 0:  # statically empty: nothing to learn from
        return tf.cast(inputs, layer.compute_dtype), None
    # Across replicas the global count is what matters: no local one-value check.
    if not synchronized_now(layer):
        inputs = _check_one_value(inputs, count)
        if not isinstance(count, int):
            # Under XLA the run-time check above is dropped: a NaN scale makes the outputs (and
            # the loss) NaN instead of a silently wrong beta.
            gamma = tf.where(tf.equal(count, 1), tf.constant(float("nan"), math_dtype), gamma)
    if use_fused(layer, inputs, mask):
        outputs, mean, variance, count = _fused_train(layer, inputs, gamma, beta)
    else:
        x = tf.cast(inputs, math_dtype)
        centered, mean, variance, count = _batch_moments(layer, x, mask)
        inv = gamma * tf.math.rsqrt(variance + tf.cast(layer.epsilon, math_dtype))
        shape = _stats.channel_shape(len(x.shape), axis)
        outputs = centered * tf.reshape(inv, shape) + tf.reshape(beta, shape)
        outputs = tf.cast(outputs, layer.compute_dtype)
    rows = (tf.reshape(mean, (1, -1)), tf.reshape(variance, (1, -1)), tf.reshape(count, (1, -1)))
    return outputs, rows


def infer(layer, inputs, mask):
    """Inference mode with the moving statistics: one fused pass where `use_fused` allows, else
    `_stats.normalize`."""
    inputs = tf.convert_to_tensor(inputs)
    math_dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
    axis, _ = _axes(inputs, layer.axis)
    gamma, beta = _stats.gamma_beta(layer, inputs.shape[axis], math_dtype)
    mean = tf.cast(layer.moving_mean, math_dtype)
    variance = tf.cast(layer.moving_variance, math_dtype)
    if use_fused(layer, inputs, mask) and len(inputs.shape) >= 4:
        # One pass over the data instead of a subtract, a multiply and an add. Ranks 2 and 3
        # would need a reshape around it, which converters cannot fold into a neighbour.
        outputs = fused(inputs, gamma, beta, mean, variance, layer.epsilon, False)[0]
        return tf.cast(outputs, layer.compute_dtype)
    shape = _stats.channel_shape(len(inputs.shape), axis)
    epsilon = tf.cast(layer.epsilon, math_dtype)
    outputs = _stats.normalize(
        tf.cast(inputs, math_dtype),
        *(tf.reshape(v, shape) for v in (mean, variance, gamma, beta)),
        epsilon,
    )
    return tf.cast(outputs, layer.compute_dtype)


# ------------------------------------------------------------------------------------------------
# recalibrate


def in_rows(x, axis):
    """Whether `x` is channels-last (`axis` its last) of rank >= 3 with a known, non-empty
    second-to-last axis, so that it can be viewed as rows `(-1, W, C)`: the fast paths of
    `_shift_sums` and `_normalize`."""
    rank = len(x.shape)
    return axis == rank - 1 and rank >= 3 and (x.shape[-2] or 0) > 0


def _shift_sums(bn, x, mask):
    """Per-channel `(count, S1, S2, pivot)` of one BatchNorm's batch input `x`, on this device:
    `S1 = sum(x - p)`, `S2 = sum((x - p)**2)` in float64, with `p` one sample of `x`.

    The shift keeps `S1` small, so `M2 = S2 - S1**2 / n` cancels little. Two ways to sum:

    - Channels-last input of rank >= 3 without a mask (images, sequences): `x - p` in float32,
      summed in float32 along the second-to-last axis only (one image row, at most a few hundred
      values, relative error about 1e-7), and those row sums in float64. This is one float32 pass
      over the activation where a float64 copy of it costs three; the row sums keep agreement with
      NumPy's float64 statistics to about 1e-7 relative, where plain float32 sums over a batch
      (FusedBatchNormV3's among them) miss by about 1e-5.
    - Anything else (a mask, channels-first, rank 2, float64): float64 throughout; masked values
      get weight 0, and are not shifted (padding may be anything).
    """
    rank = len(x.shape)
    axis = bn.axis % rank
    axes = [i for i in range(rank) if i != axis]
    first = tuple(slice(None) if i == axis else slice(0, 1) for i in range(rank))
    if mask is None and x.dtype != tf.float64 and in_rows(x, axis):
        x32 = tf.cast(x, tf.float32)
        pivot = tf.reduce_sum(x32[first], axis=axes, keepdims=True)  # empty batch: 0
        rows = tf.reshape(x32 - pivot, [-1, x.shape[-2], x.shape[-1]])
        s1 = tf.reduce_sum(tf.cast(tf.reduce_sum(rows, 1), tf.float64), 0)
        s2 = tf.reduce_sum(tf.cast(tf.reduce_sum(tf.square(rows), 1), tf.float64), 0)
        count = tf.cast(tf.shape(rows)[0] * tf.shape(rows)[1], tf.float64)
        return tf.fill(tf.shape(s1), count), s1, s2, tf.cast(tf.reshape(pivot, [-1]), tf.float64)
    x64 = tf.cast(x, tf.float64)
    if mask is None:
        pivot = tf.reduce_sum(x64[first], axis=axes, keepdims=True)
        shifted = x64 - pivot
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x64), axes)), tf.float64)
        count = tf.fill(tf.shape(pivot)[axis : axis + 1], count)
        s1 = tf.reduce_sum(shifted, axes)
        s2 = tf.reduce_sum(tf.square(shifted), axes)
        return count, s1, s2, tf.reshape(pivot, [-1])
    # Keras's mask lacks the last axis: broadcast it over the channels.
    weights = tf.broadcast_to(tf.expand_dims(tf.cast(mask, tf.float64), -1), tf.shape(x64))
    count = tf.reduce_sum(weights, axes)
    s1 = tf.reduce_sum(x64 * weights, axes)
    s2 = tf.reduce_sum(tf.square(x64) * weights, axes)
    return count, s1, s2, tf.zeros_like(s1)


def recalibration_moments(bn, x, mask):
    """`(count, pivot, shifted_mean, M2)` per channel of one BatchNorm's batch input, and its
    training-mode output normalized with them, for `recalibrate`: in float64 sums
    (`_shift_sums`), the mean whole (`shifted_mean` 0).

    Under a `tf.distribute` strategy with several replicas the statistics are those of the global
    batch, as a synchronized BatchNorm computes them: the replicas' (n_r, mean_r, M2_r) are
    all-reduced as `n = sum n_r`, `mean = sum n_r * mean_r / n`,
    `M2 = sum (M2_r + n_r * (mean_r - mean)**2)` (Chan's merge, exact), and every replica
    normalizes with them, so the layers after see what one device would show them."""
    count, s1, s2, pivot = _shift_sums(bn, x, mask)
    shifted_mean = tf.math.divide_no_nan(s1, count)
    m2 = tf.maximum(s2 - s1 * shifted_mean, 0.0)
    mean = shifted_mean + pivot
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        local_count, local_mean = count, mean
        count = context.all_reduce(tf.distribute.ReduceOp.SUM, local_count)
        mean = tf.math.divide_no_nan(
            context.all_reduce(tf.distribute.ReduceOp.SUM, local_count * local_mean), count
        )
        m2 = context.all_reduce(
            tf.distribute.ReduceOp.SUM, m2 + local_count * tf.square(local_mean - mean)
        )
    variance = tf.math.divide_no_nan(m2, count)
    return (count, mean, tf.zeros_like(mean), m2), _normalize(bn, x, mean, variance)


def _normalize(bn, x, mean, variance):
    """`(x - mean) * gamma / sqrt(variance + eps) + beta` along the BatchNorm's axis, in `x`'s
    dtype (float32 arithmetic for float16/bfloat16, as Keras's BatchNorm).

    Channels-last float32/float16 inputs of rank >= 3 go through one fused pass,
    FusedBatchNormV3 in inference mode (viewed as 4-D), the kernel Keras's own inference uses; it
    centers before it scales, so a large mean does not cancel. Where it might not keep the
    layer's epsilon (below 1.001e-5 with a GPU visible, `fused_honours_epsilon`), the plain
    ops, as in `BatchNorm` itself. Anything else: the same formula in plain ops."""
    rank = len(x.shape)
    axis = bn.axis % rank
    gamma, beta = _stats.gamma_beta(bn, x.shape[axis], tf.float32)
    if (
        in_rows(x, axis)
        and x.dtype in (tf.float32, tf.float16)
        and fused_honours_epsilon(bn.epsilon)
    ):
        view = x if rank == 4 else tf.reshape(x, [-1, 1, x.shape[-2], x.shape[-1]])
        # The op itself: tf.nn.fused_batch_norm would raise an epsilon below 1.001e-5.
        moving = (tf.cast(mean, tf.float32), tf.cast(variance, tf.float32))
        outputs = fused(view, gamma, beta, *moving, bn.epsilon, training=False)[0]
        return outputs if rank == 4 else tf.reshape(outputs, tf.shape(x))
    compute = tf.float64 if x.dtype == tf.float64 else tf.float32
    shape = [1] * rank
    shape[axis] = -1
    inv = tf.cast(tf.math.rsqrt(variance + bn.epsilon), compute) * tf.cast(gamma, compute)
    centered = tf.cast(x, compute) - tf.reshape(tf.cast(mean, compute), shape)
    outputs = centered * tf.reshape(inv, shape) + tf.reshape(tf.cast(beta, compute), shape)
    return tf.cast(outputs, x.dtype)
