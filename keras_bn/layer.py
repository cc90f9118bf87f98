"""`keras_bn.BatchNorm`: a Keras 3 BatchNorm layer with explicit, convertible conventions."""

from __future__ import annotations

import functools
import math
import warnings

import keras
from keras import constraints, initializers, ops, regularizers

from keras_bn import _keras_internals as internals
from keras_bn import _replicas
from keras_bn.conventions import (
    KERAS_EPSILON,
    KERAS_MOMENTUM,
    TORCH_EPSILON,
    TORCH_MOMENTUM,
    _check_momentum,
    torch_momentum_to_keras,
)
from keras_bn.errors import KerasBNError, expected

# The TensorFlow backend keeps its own path (FusedBatchNormV3, tf.distribute, run-time checks
# for unknown shapes); JAX and PyTorch take the backend-neutral keras.ops path below.
BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":
    import tensorflow as tf

# tf.nn.fused_batch_norm raises any epsilon below this to this value without a word, for cuDNN's
# old minimum (CUDNN_BN_MIN_EPSILON). The layer calls the op itself, FusedBatchNormV3, whose CPU
# kernel honours any epsilon (measured, with and without XLA, at epsilon 1e-7 to 1e-5: outputs
# within 6e-7 of NumPy's, where the raised epsilon would be off by 5e-4 to 2.7). On a GPU that
# is not verified here, so there the fast path is only taken at this epsilon or above (see
# `fused_honours_epsilon`).
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


def _batch_of_one_message(shape):
    return (
        "Expected more than 1 value per channel when training, got input shape "
        f"{shape}. Train with a batch of at least 2 samples (or inputs with spatial dimensions), "
        "drop a last partial batch of one (`drop_remainder=True`), or call the layer with "
        "training=False for inference."
    )


def _normalize_with_batch_gradient(x, gamma, beta, pivot, shifted_mean, variance, epsilon, axes, n):
    """`(x - mean) * gamma / sqrt(variance + epsilon) + beta` in training mode, with BatchNorm's
    textbook gradient (Ioffe & Szegedy, section 3) instead of automatic differentiation through
    the moments: with `r = 1 / sqrt(variance + epsilon)`, `xhat = (x - mean) * r` and sums over
    the `n` values of each channel,

        dx = gamma * r * (dy - (sum(dy) + xhat * sum(dy * xhat)) / n)
        dgamma = sum(dy * xhat),  dbeta = sum(dy)

    The batch mean comes in two parts, `pivot + shifted_mean` (`BatchNorm._ops_moments` with
    `shift=True`), so that `x - mean` is computed as `(x - pivot) - shifted_mean` without the
    rounding of the mean to the data's magnitude; all statistics keep their reduced axes. The
    forward pass is `(x - pivot) * k + (beta - shifted_mean * k)` with `k = gamma * r`: one
    subtraction per value fewer than `((x - pivot) - shifted_mean) * k + beta` (measured on JAX,
    CPU, a (32, 56, 56, 64) training step: 0.93 against 1.07 of Keras's time in one A/B run; at
    (256, 1024) both are within noise of 1.0), and as sound, `x - pivot` being exact or nearly
    so for values near the pivot.

    Why: on JAX, XLA on CPU compiles the automatic gradient of the centred formula to 1.5x the
    time of Keras's (measured: 38 against 28 ms on a (32, 56, 56, 64) training step). This one
    writes `sum(dy * xhat)` as
    `r * (sum(dy * x) - mean * sum(dy))` and `dx` as `x * a + dy * b + c` per channel, which XLA
    fuses as it fuses Keras's gradient; both cancel when |mean| is far above the standard
    deviation, so past 100 of them (the same bound as PyTorch's kernel path) the centred
    expressions are used, chosen per batch by `ops.cond` in the backward pass."""

    @ops.custom_gradient
    def normalize(x, gamma, beta, pivot, shifted_mean, variance):
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

    return normalize(
        x,
        gamma,
        beta,
        ops.stop_gradient(pivot),
        ops.stop_gradient(shifted_mean),
        ops.stop_gradient(variance),
    )


def gamma_beta(layer, channels, dtype):
    """gamma and beta of a BatchNorm (keras_bn's or Keras's) in the math dtype, ones and zeros
    for a layer without them (every backend)."""
    gamma = ops.cast(layer.gamma, dtype) if layer.scale else ops.ones((channels,), dtype)
    beta = ops.cast(layer.beta, dtype) if layer.center else ops.zeros((channels,), dtype)
    return gamma, beta


class _Counter:
    """Holds the skipped-update counter out of sight of Keras's variable tracking: it is
    bookkeeping, not a weight, so `get_weights()`/`set_weights()` keep interchanging with
    `keras.layers.BatchNormalization` and `.keras` files keep their four variables."""

    def __init__(self, variable):
        self.variable = variable


@keras.saving.register_keras_serializable(package="keras_bn")
class BatchNorm(keras.layers.Layer):
    """Batch normalization with explicit momentum, epsilon and variance conventions.

    Training (`training=True` and the layer is trainable) normalizes each channel with the
    statistics of the current batch and updates the moving statistics; inference uses the moving
    statistics:

    - training: `y = gamma * (x - mean(batch)) / sqrt(var(batch) + epsilon) + beta`, where
      `var(batch)` is the biased variance (divide by n), as in every framework.
    - inference: `y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta`, an
      affine map `y = x * s + t` per channel with `s = gamma / sqrt(moving_variance + epsilon)`
      and `t = beta - moving_mean * s`. This is what `keras_bn.fold_bn` merges into neighbours.

    Moving statistics, with `momentum` in the Keras convention (weight of the OLD value):

    - `moving_mean = moving_mean * momentum + mean(batch) * (1 - momentum)`
    - `moving_variance = moving_variance * momentum + v * (1 - momentum)`, where `v` is the biased
      batch variance, or the unbiased one `var(batch) * n / (n - 1)` if `unbiased_variance=True`
      (PyTorch's running_var).
    - `momentum=None`: the cumulative, equal-weight average of every batch seen so far (PyTorch's
      `momentum=None`): `moving = moving + (batch - moving) / k` for the k-th batch. The batch
      count lives in the non-trainable weight `num_batches_tracked`.

    Conventions (see also `keras_bn.conventions`):

    | argument          | Keras (default here)  | PyTorch `BatchNorm*d`        | ONNX BatchNormalization  |
    |-------------------|-----------------------|------------------------------|--------------------------|
    | momentum          | 0.99, weight of old   | 0.1, weight of NEW (=0.9 here) | 0.9, weight of old     |
    | epsilon           | 1e-3                  | 1e-5                         | 1e-5                     |
    | moving variance   | biased                | unbiased                     | (inference only)         |
    | cumulative average| momentum=None         | momentum=None                | -                        |

    `BatchNorm.from_torch(momentum=0.1, eps=1e-5, affine=True)` builds a layer with PyTorch's
    semantics.

    A batch whose statistics contain NaN or Inf does not update the moving statistics. The skip is
    counted in `skipped_updates`; in eager mode it also emits a `RuntimeWarning` at once. Inside a
    compiled training step (`tf.function`, `model.fit`, XLA) nothing is printed, since XLA rejects
    host ops: add the `keras_bn.SkippedUpdatesWarning()` callback to be warned after each epoch.

    Training with one value per channel raises an error, as PyTorch does: a `KerasBNError` when
    the shape is known, an `InvalidArgumentError` at run time inside `tf.function`. Under XLA
    (`jit_compile=True`, Keras's default on GPU) TF cannot raise from inside the step, so that
    batch's outputs are NaN (the loss turns NaN) and the moving statistics are not updated; it is
    never a silently wrong finite answer. An empty batch returns an empty output and leaves the
    moving statistics alone, as in Keras and PyTorch.

    Fast path: channels-last inputs (any rank; rank 2/3 are viewed as 4-D), in training and in
    inference, use `FusedBatchNormV3` when no mask is given, `synchronized=False`, and the kernel
    keeps epsilon as given: any epsilon where TF has no GPU or TPU, else `epsilon >= 1.001e-5`
    (`tf.nn.fused_batch_norm` raises smaller ones, for cuDNN; not verified on a GPU here). The
    generic path computes statistics on the input shifted by one of its samples, so
    data with a large mean and a tiny spread (mean 1e4, std 0.01) keeps its variance to ~1e-5
    relative. The fused kernel, whose plain two-pass variance loses digits once |mean| / std >
    ~1e3 (0.6% at 1e6), is given the input shifted the same way. E[x^2] - E[x]^2 would give 0
    there.

    On JAX and PyTorch the same statistics are computed in keras.ops (shifted, two passes). In
    eager PyTorch, unmasked inputs whose channel means are within 100 standard deviations of 0
    use PyTorch's own kernel, `torch.nn.functional.batch_norm`, instead (see `_torch_native`).
    On JAX the unmasked training normalization has BatchNorm's textbook gradient, written for
    XLA (see `_normalize_with_batch_gradient`).

    Args:
        axis: Integer, the channel axis. -1 for channels_last, 1 for channels_first.
        momentum: Weight of the old moving value, in [0, 1]; None for a cumulative average.
        epsilon: Small positive float added to the variance; honoured exactly.
        center: If True, add the learned offset `beta`.
        scale: If True, multiply by the learned scale `gamma`.
        unbiased_variance: If True, the moving variance is updated with the unbiased
            (Bessel-corrected, n / (n - 1)) batch variance, as in PyTorch. Normalization during
            training always uses the biased batch variance.
        synchronized: If True, batch statistics are computed over the global batch of all
            replicas, on each backend's own distributed engine: a `tf.distribute` strategy on
            TensorFlow, a `torch.distributed` process group on PyTorch (a differentiable
            all-reduce), `keras.distribution` on JAX (whose sharded arrays make a reduction over
            the batch global already). If False, each replica uses its own share of the batch,
            on JAX too (each device's slice; the moving statistics average the devices'
            updates, as tf.distribute's do). Without distribution it has no effect.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer, beta_regularizer, gamma_regularizer, beta_constraint,
        gamma_constraint: As in `keras.layers.BatchNormalization`.
        **kwargs: Base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: Tensor of any rank >= 2.
        training: Python boolean. With `trainable=False` the layer always runs in inference mode,
            the Keras fine-tuning convention.
        mask: Optional boolean tensor of rank `rank(inputs) - 1`, Keras's mask, which lacks the
            LAST axis (whatever `axis` is): it is broadcast over the last axis, as in
            `keras.layers.BatchNormalization`. Masked-out entries are left out of the batch
            statistics; the output is computed for all entries.

    Dtypes: statistics are computed in float32 for float16, bfloat16 and float32 inputs, in
    float64 for float64 layers; weights have the policy's variable dtype (float32 under
    `mixed_float16`/`mixed_bfloat16`) and outputs its compute dtype.

    Attributes:
        skipped_updates: Number of training batches that did not update the moving statistics
            (non-finite statistics, or one value per channel under XLA). Not a weight: it is
            not saved.

    Reference:
        Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
        Internal Covariate Shift", ICML 2015, Algorithms 1 and 2.
    """

    def __init__(
        self,
        axis: int = -1,
        momentum: float | None = KERAS_MOMENTUM,
        epsilon: float = KERAS_EPSILON,
        center: bool = True,
        scale: bool = True,
        unbiased_variance: bool = False,
        synchronized: bool = False,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Validated here, not in build(): __init__ also runs for configs read from model files.
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise KerasBNError(
                expected(
                    "Invalid `axis`",
                    "an integer (-1 or 1 for channels last/first)",
                    f"axis={axis!r}",
                )
            )
        self.axis = axis
        self.momentum = _check_momentum(momentum, "momentum")
        if (
            isinstance(epsilon, bool)
            or not isinstance(epsilon, (int, float))
            or not math.isfinite(epsilon)
            or epsilon <= 0
        ):
            raise KerasBNError(
                expected("Invalid `epsilon`", "a finite number > 0", f"epsilon={epsilon!r}")
            )
        self.epsilon = float(epsilon)
        for flag_name, flag in (
            ("center", center),
            ("scale", scale),
            ("unbiased_variance", unbiased_variance),
            ("synchronized", synchronized),
        ):
            if not isinstance(flag, bool):
                raise KerasBNError(
                    expected(f"Invalid `{flag_name}`", "True or False", f"{flag_name}={flag!r}")
                )
        self.center = center
        self.scale = scale
        self.unbiased_variance = unbiased_variance
        self.synchronized = synchronized
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_masking = True
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.num_batches_tracked = None
        self._skipped = None

    @classmethod
    def from_torch(
        cls,
        momentum: float | None = TORCH_MOMENTUM,
        eps: float = TORCH_EPSILON,
        affine: bool = True,
        **kwargs,
    ) -> BatchNorm:
        """Builds a layer with PyTorch's `BatchNorm*d` semantics.

        `momentum` is PyTorch's (weight of the NEW batch value), converted to Keras's
        `1 - momentum`; `None` keeps the cumulative average. The moving variance is unbiased, as
        PyTorch's running_var. `affine=False` gives no gamma and no beta. Other keyword arguments
        (`axis`, `name`, ...) go to the constructor; note that PyTorch's channel axis is 1 while
        Keras data is usually channels-last (axis=-1, the default here).
        """
        if not isinstance(affine, bool):
            raise KerasBNError(expected("Invalid `affine`", "True or False", f"affine={affine!r}"))
        return cls(
            momentum=torch_momentum_to_keras(momentum),
            epsilon=eps,
            center=affine,
            scale=affine,
            unbiased_variance=True,
            **kwargs,
        )

    def build(self, input_shape):
        rank = len(input_shape)
        if rank < 2:
            raise KerasBNError(
                expected(
                    "BatchNorm needs a batch axis and a channel axis",
                    "input rank >= 2",
                    f"input shape {tuple(input_shape)}",
                )
            )
        if not -rank <= self.axis < rank:
            raise KerasBNError(
                expected(
                    "Invalid `axis` for this input",
                    f"an axis in [{-rank}, {rank - 1}]",
                    f"axis={self.axis} for input shape {tuple(input_shape)}",
                )
            )
        self._axis = self.axis % rank
        channels = input_shape[self._axis]
        if channels is None:
            raise KerasBNError(
                expected(
                    "The channel axis must have a known size",
                    "an int",
                    f"None at axis {self.axis} of input shape {tuple(input_shape)}",
                )
            )
        shape = (channels,)
        # Weights are created in Keras's order (gamma, beta, moving_mean, moving_variance) so
        # get_weights()/set_weights() interchange with keras.layers.BatchNormalization.
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        # aggregation="mean": under a tf.distribute strategy each replica assigns the moving
        # statistics from replica context; with synchronized=True they are identical anyway.
        self.moving_mean = self.add_weight(
            shape=shape,
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            autocast=False,
            aggregation="mean",
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            trainable=False,
            autocast=False,
            aggregation="mean",
        )
        if self.momentum is None:
            self.num_batches_tracked = self.add_weight(
                shape=(),
                name="num_batches_tracked",
                initializer="zeros",
                dtype="int64",
                trainable=False,
                autocast=False,
                aggregation="only_first_replica",
            )
        self._skipped = _Counter(
            keras.Variable(
                keras.initializers.Zeros(),
                shape=(),
                dtype="int64",
                trainable=False,
                name="skipped_updates",
                aggregation="only_first_replica",
            )
        )
        self.input_spec = keras.layers.InputSpec(ndim=rank, axes={self._axis: channels})
        self._reduction_axes = [i for i in range(rank) if i != self._axis]

    def compute_output_shape(self, input_shape):
        return input_shape

    # ---------------------------------------------------------------------------------------
    # Statistics

    def _broadcast_shape(self, rank):
        shape = [1] * rank
        shape[self._axis] = -1
        return shape

    @property
    def skipped_updates(self) -> int:
        """Training batches that did not update the moving statistics (see the class docstring)."""
        return 0 if self._skipped is None else int(self._skipped.variable.numpy())

    def _values_per_channel(self, inputs):
        """Static count if every reduced dimension is known, else a scalar tensor."""
        static = [inputs.shape[i] for i in self._reduction_axes]
        if all(d is not None for d in static):
            return math.prod(static)
        shape = tf.shape(inputs)
        return tf.reduce_prod(tf.gather(shape, self._reduction_axes))

    def _check_one_value(self, inputs, count):
        """Refuses one value per channel: at once when the shape is known, else with a run-time
        check (which XLA drops; the NaN scale in `call` covers that case)."""
        message = _batch_of_one_message(tuple(inputs.shape))
        if isinstance(count, int):
            if count == 1:
                raise KerasBNError(message)
            return inputs
        # != 1, not > 1: an empty batch (a replica's share of a partial last batch) is allowed.
        check = tf.debugging.assert_none_equal(count, tf.constant(1, count.dtype), message=message)
        with tf.control_dependencies([check]):
            return tf.identity(inputs)

    def _pivot(self, x):
        """One sample of each channel, shape broadcastable to `x`, without gradient.

        Statistics are computed on `x - pivot`: shifting by a value near the data keeps the mean
        and variance exact in float32 when the mean is large and the spread small (mean 1e4,
        std 0.01). Both E[x^2] - E[x]^2 and a plain two-pass mean lose digits there. An empty
        batch has no sample: the pivot is 0 then.
        """
        first = tuple(slice(None) if i == self._axis else slice(0, 1) for i in range(len(x.shape)))
        # A sum over at most one value: the sample itself, or 0 for an empty batch.
        pivot = tf.reduce_sum(x[first], axis=self._reduction_axes, keepdims=True)
        return tf.stop_gradient(pivot)

    def _mask_weights(self, x, mask):
        """Keras's mask lacks the last axis: broadcast it over that axis, as Keras does."""
        return tf.broadcast_to(tf.expand_dims(tf.cast(mask, x.dtype), -1), tf.shape(x))

    def _synchronized_now(self):
        """True when the batch statistics are taken over several replicas' batches."""
        ctx = tf.distribute.get_replica_context()
        return self.synchronized and ctx is not None and ctx.num_replicas_in_sync > 1

    def _batch_moments(self, x, mask):
        """Statistics of a batch in the math dtype.

        Returns `(centered, mean, variance, count)`: `centered = x - mean` computed without
        cancellation, the batch mean and biased variance per channel, and the number of values
        per channel that entered them.
        """
        axes = self._reduction_axes
        shape = self._broadcast_shape(len(x.shape))
        weights = None if mask is None else self._mask_weights(x, mask)
        ctx = tf.distribute.get_replica_context()
        synchronized = self._synchronized_now()
        # A masked-out first sample may hold padding far from the data: no shift then.
        pivot = self._pivot(x)
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
            count = tf.cast(self._values_per_channel(x), x.dtype)
            centered = shifted - tf.reshape(shifted_mean, shape)
        else:
            shifted_mean, variance = tf.nn.weighted_moments(shifted, axes, weights)
            count = tf.reduce_sum(weights, axes)
            centered = shifted - tf.reshape(shifted_mean, shape)
        mean = shifted_mean + tf.reshape(pivot, [-1])
        return centered, mean, variance, count

    def _update_moving(self, mean, variance, count):
        """Moving-statistics update; skipped (and counted) when the batch had NaN/Inf statistics
        or fewer than two values per channel. No host op: this runs inside XLA-compiled steps."""
        dtype = mean.dtype
        mean = tf.stop_gradient(mean)
        variance = tf.stop_gradient(variance)
        count = tf.cast(count, dtype)
        if self.unbiased_variance:
            variance = variance * tf.math.divide_no_nan(count, count - 1.0)
        finite = tf.logical_and(
            tf.reduce_all(tf.math.is_finite(mean)), tf.reduce_all(tf.math.is_finite(variance))
        )
        enough = tf.reduce_all(count > 1.0)
        if self.momentum is None:
            k = tf.cast(self.num_batches_tracked + 1, dtype)
            weight_new = 1.0 / k
        else:
            weight_new = tf.constant(1.0 - self.momentum, dtype)
        # momentum * old + (1 - momentum) * new, not old + (new - old) * w: with a tiny batch
        # variance and momentum 0, the latter would round the result to the old value's ulp.
        old_mean = tf.cast(self.moving_mean, dtype)
        old_variance = tf.cast(self.moving_variance, dtype)
        new_mean = old_mean * (1.0 - weight_new) + mean * weight_new
        new_variance = old_variance * (1.0 - weight_new) + variance * weight_new
        # tf.where, not a Python branch: the same graph serves eager, tf.function and model.fit.
        update = tf.logical_and(finite, enough)
        self.moving_mean.assign(
            tf.cast(tf.where(update, new_mean, old_mean), self.moving_mean.dtype)
        )
        self.moving_variance.assign(
            tf.cast(tf.where(update, new_variance, old_variance), self.moving_variance.dtype)
        )
        if self.momentum is None:
            self.num_batches_tracked.assign_add(tf.cast(update, tf.int64))
        # An empty batch is no skip: there was nothing to learn from.
        skipped = tf.logical_and(tf.logical_not(update), tf.reduce_any(count > 0.0))
        self._skipped.variable.assign_add(tf.cast(skipped, tf.int64))
        if tf.executing_eagerly() and not bool(finite):
            warnings.warn(
                f"keras_bn.BatchNorm '{self.name}': the batch statistics contain NaN or Inf; "
                "the moving statistics were not updated for this batch.",
                RuntimeWarning,
                stacklevel=3,
            )

    # ---------------------------------------------------------------------------------------
    # Call

    def _use_fused(self, inputs, mask):
        """Channels-last inputs of any rank, no mask, no cross-replica statistics, and an epsilon
        the kernel will not change (`fused_honours_epsilon`)."""
        rank = len(inputs.shape)
        return (
            self._axis == rank - 1
            and mask is None
            and not self.synchronized
            and fused_honours_epsilon(self.epsilon)
            and inputs.dtype in (tf.float32, tf.float16, tf.bfloat16)
        )

    def _gamma_beta(self, channels, dtype):
        return gamma_beta(self, channels, dtype)

    def call(self, inputs, training=None, mask=None):
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise KerasBNError(
                expected(
                    "The mask must have one dimension less than the inputs",
                    f"mask rank {len(inputs.shape) - 1}",
                    f"mask.shape={tuple(mask.shape)}, inputs.shape={tuple(inputs.shape)}",
                )
            )
        if BACKEND == "tensorflow":
            return self._tf_call(tf.convert_to_tensor(inputs), training, mask)
        return self._ops_call(ops.convert_to_tensor(inputs), training, mask)

    def _tf_call(self, inputs, training, mask):
        # BatchNorm overflows in float16: statistics and the affine map run in float32, or in
        # float64 for float64 inputs.
        math_dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
        channels = inputs.shape[self._axis]
        gamma, beta = self._gamma_beta(channels, math_dtype)
        if training and self.trainable:
            count = self._values_per_channel(inputs)
            if isinstance(count, int) and count == 0:  # statically empty: nothing to learn from
                return tf.cast(inputs, self.compute_dtype)
            # Across replicas the global count is what matters: no local one-value check.
            if not self._synchronized_now():
                inputs = self._check_one_value(inputs, count)
                if not isinstance(count, int):
                    # Under XLA the run-time check above is dropped: a NaN scale makes the
                    # outputs (and the loss) NaN instead of a silently wrong beta.
                    nan = tf.constant(float("nan"), math_dtype)
                    gamma = tf.where(tf.equal(count, 1), nan, gamma)
            if not self._use_fused(inputs, mask):
                outputs, mean, variance, count = self._generic_train(inputs, mask, gamma, beta)
            else:
                outputs, mean, variance, count = self._fused_train(inputs, gamma, beta)
            self._update_moving(mean, variance, count)
            return outputs
        mean = tf.cast(self.moving_mean, math_dtype)
        variance = tf.cast(self.moving_variance, math_dtype)
        if self._use_fused(inputs, mask):
            # One pass over the data instead of a subtract, a multiply and an add.
            x = self._as_4d(inputs)
            outputs = self._fused(x, gamma, beta, mean, variance, training=False)[0]
            return tf.cast(tf.reshape(outputs, tf.shape(inputs)), self.compute_dtype)
        # (x - mean) * inv + beta, not x * inv + (beta - mean * inv): with a large mean and a
        # small variance the latter cancels two large numbers (error 0.06 on outputs of 2.4 at
        # mean 1e4, variance 1e-4, epsilon 1e-6).
        inv = gamma * tf.math.rsqrt(variance + tf.cast(self.epsilon, math_dtype))
        shape = self._broadcast_shape(len(inputs.shape))
        x = tf.cast(inputs, math_dtype)
        outputs = (x - tf.reshape(mean, shape)) * tf.reshape(inv, shape) + tf.reshape(beta, shape)
        return tf.cast(outputs, self.compute_dtype)

    def _generic_train(self, inputs, mask, gamma, beta):
        x = tf.cast(inputs, gamma.dtype)
        centered, mean, variance, count = self._batch_moments(x, mask)
        inv = gamma * tf.math.rsqrt(variance + tf.cast(self.epsilon, x.dtype))
        shape = self._broadcast_shape(len(inputs.shape))
        outputs = centered * tf.reshape(inv, shape) + tf.reshape(beta, shape)
        return tf.cast(outputs, self.compute_dtype), mean, variance, count

    def _fused_train(self, inputs, gamma, beta):
        """FusedBatchNormV3 in training mode on the input shifted by one of its samples; returns
        output (in the compute dtype), batch mean, BIASED batch variance and the number of values
        per channel.

        The kernel's plain two-pass variance loses digits once |mean| / std exceeds ~1e3 in
        float32 (0.6% at 1e6), and XLA, which expands the kernel into E[x^2] - E[x]^2, loses them
        sooner. On `x - pivot` the mean is that sample's distance from the mean (a few standard
        deviations for a typical sample), and the kernel's outputs `(x' - mean(x')) * s + beta`
        are those of `x`, as is its gradient (the shift has none).

        Why the shift on every batch and not a `tf.cond` to a fallback for ill-conditioned
        batches, as before: the cond and its gradient made tracing a training step about 3x
        slower than Keras's. Measured on a 2-core Xeon, first `fit` of 16 Conv-BN-ReLU blocks:
        2.9 s with the cond, 1.0 s shifted, Keras 1.0 s; with XLA 4.3, 2.3 and 2.0 s. The cond's
        XLA gradient was also NaN at mean 1e4, std 0.01. In one A/B run the shifted step took
        0.95 to 1.02 of the cond's time (float32: NHWC 1.02 and 0.98, 2-D 0.95, 1x1
        Conv-BN-ReLU 0.96; mixed_float16 2-D 1.14). Inputs are cast to float32 first, as Keras's
        layer does: `x - pivot` can overflow float16.

        The kernel reduces over every axis but the last, so rank 2 and 3 inputs are viewed as
        (N, L, 1, C) -- a free reshape -- and rank 5 runs as NDHWC.
        """
        x = tf.cast(inputs, tf.float32)
        pivot = self._pivot(x)
        outputs, shifted_mean, unbiased = self._fused(
            self._as_4d(x - pivot),
            gamma,
            beta,
            tf.constant([], tf.float32),
            tf.constant([], tf.float32),
            training=True,
        )
        outputs = tf.cast(tf.reshape(outputs, tf.shape(inputs)), self.compute_dtype)
        # The kernel returns the Bessel-corrected variance; undo it to keep one convention here.
        n = tf.cast(self._values_per_channel(inputs), tf.float32)
        variance = unbiased * tf.math.divide_no_nan(n - 1.0, n)
        return outputs, shifted_mean + tf.reshape(pivot, [-1]), variance, n

    @staticmethod
    def _as_4d(inputs):
        """Rank 2 and 3 channels-last inputs viewed as (N, L, 1, C): a free reshape."""
        if len(inputs.shape) >= 4:
            return inputs
        shape = tf.shape(inputs)
        return tf.reshape(inputs, tf.concat([shape[:1], [-1, 1], shape[-1:]], 0))

    def _fused(self, x, gamma, beta, mean, variance, training):
        outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=gamma,
            offset=beta,
            mean=mean,
            variance=variance,
            epsilon=self.epsilon,
            data_format="NDHWC" if len(x.shape) == 5 else "NHWC",
            is_training=training,
        )
        return outputs, mean, variance

    # ---------------------------------------------------------------------------------------
    # JAX and PyTorch: the same statistics in keras.ops. Shapes are static on both (jax.jit
    # traces with concrete shapes, torch runs eagerly or under torch.compile with known sizes),
    # so the one-value check is a Python error and there is no run-time assert to drop.

    def _ops_replicas(self, inputs):
        """`(slices, sum_over_processes)`: how many slices of this batch take their statistics
        separately (JAX devices under keras.distribution with synchronized=False), and the
        all-reduce that makes the statistics global (torch.distributed with synchronized=True),
        or None. See keras_bn/_replicas.py."""
        if BACKEND == "jax" and not self.synchronized and self._axis != 0:
            return _replicas.jax_batch_slices(self.name, int(inputs.shape[0])), None
        if BACKEND == "torch" and self.synchronized and _replicas.torch_world_size() > 1:
            return 1, internals.torch_all_reduce_sum
        return 1, None

    def _ops_call(self, inputs, training, mask):
        math_dtype = (
            "float64" if keras.backend.standardize_dtype(inputs.dtype) == "float64" else "float32"
        )
        channels = inputs.shape[self._axis]
        gamma, beta = self._gamma_beta(channels, math_dtype)
        x = ops.cast(inputs, math_dtype)
        epsilon = ops.convert_to_tensor(self.epsilon, dtype=math_dtype)  # not via float32
        if training and self.trainable:
            slices, sum_over_processes = self._ops_replicas(inputs)
            count = math.prod(int(inputs.shape[i]) for i in self._reduction_axes) // slices
            # A process with nothing to learn from still joins the others' all-reduce.
            if count == 0 and sum_over_processes is None:
                return ops.cast(inputs, self.compute_dtype)
            if count == 1 and sum_over_processes is None:
                if not (BACKEND == "jax" and internals.traced_by_jax(inputs)):
                    raise KerasBNError(_batch_of_one_message(tuple(inputs.shape)))
                # Inside jax.jit, as under XLA on TensorFlow: an exception raised while Keras's
                # JAX trainer traces its step leaves the model's variables purged (measured:
                # predict then fails). NaN outputs make the loss NaN instead of a silently wrong
                # beta, and the moving statistics are left alone (one value: no update).
                gamma = gamma * float("nan")
            if BACKEND == "torch" and mask is None and sum_over_processes is None:
                native = self._torch_native(x, gamma, beta, training=True)
                if native is not None:
                    outputs, mean, variance = native
                    self._ops_update_moving(mean, variance, count)
                    return ops.cast(outputs, self.compute_dtype)
            # Each slice of the batch (one per JAX device) is a leading axis of its own.
            rank = len(inputs.shape) + (slices > 1)
            axis = self._axis + (slices > 1)
            axes = [i for i in range(rank) if i != axis and not (slices > 1 and i == 0)]
            if slices > 1:
                x = ops.reshape(x, (slices, -1, *x.shape[1:]))
                if mask is not None:
                    mask = ops.reshape(mask, (slices, -1, *mask.shape[1:]))
            # JAX without a mask: the custom-gradient normalization centres x itself.
            custom = BACKEND == "jax" and mask is None
            moments = self._ops_moments(x, mask, axes, sum_over_processes, shift=custom)
            if custom:
                pivot, shifted_mean, variance, counts = moments
                mean = pivot + shifted_mean
            else:
                centered, mean, variance, counts = moments
            if sum_over_processes is not None:
                # The global batch decides (every process sees the same count): one value in all.
                one = ops.all(counts == 1.0)
                if internals.concrete_bool(one):
                    raise KerasBNError(_batch_of_one_message(tuple(inputs.shape)))
                gamma = ops.where(one, float("nan"), gamma)
            shape = [1] * rank
            shape[axis] = -1
            if custom:
                outputs = _normalize_with_batch_gradient(
                    x, ops.reshape(gamma, shape), ops.reshape(beta, shape), pivot, shifted_mean,
                    variance, epsilon, axes, count,
                )  # fmt: skip
            else:
                inv = ops.reshape(gamma, shape) * ops.rsqrt(variance + epsilon)
                outputs = centered * inv + ops.reshape(beta, shape)
            if slices > 1:
                outputs = ops.reshape(outputs, inputs.shape)
            per_slice = (slices, channels)
            static = mask is None and sum_over_processes is None  # count: a Python int
            self._ops_update_moving(
                ops.reshape(mean, per_slice),
                ops.reshape(variance, per_slice),
                count if static else ops.reshape(counts, per_slice),
            )
            return ops.cast(outputs, self.compute_dtype)
        if BACKEND == "torch" and mask is None:
            native = self._torch_native(x, gamma, beta, training=False)
            if native is not None:
                return ops.cast(native[0], self.compute_dtype)
        # (x - mean) * inv + beta, as on TensorFlow: no cancellation of two large numbers.
        shape = self._broadcast_shape(len(inputs.shape))
        mean = ops.cast(self.moving_mean, math_dtype)
        inv = gamma * ops.rsqrt(ops.cast(self.moving_variance, math_dtype) + epsilon)
        outputs = (x - ops.reshape(mean, shape)) * ops.reshape(inv, shape) + ops.reshape(
            beta, shape
        )
        return ops.cast(outputs, self.compute_dtype)

    def _torch_native(self, x, gamma, beta, training):
        """PyTorch's own BatchNorm kernel (`torch.nn.functional.batch_norm`), the counterpart of
        the fused kernel on TensorFlow: in eager mode, where it is 2 to 5 times faster than
        keras.ops (measured on CPU: 21 against 57 ms for a (32, 56, 56, 64) training step with
        its gradient), for data whose mean is at most 100 standard deviations from 0.

        Returns `(outputs, mean, variance)` (training: the batch mean and biased variance, as
        rows of shape (1, C); inference: only `outputs` counts), or None where the keras.ops
        path must run instead: under torch.compile (inductor fuses that path itself, and the
        check below would read a value on the host), and for ill-conditioned data. Measured on
        CPU (torch 2.13, 4096 values per channel): the kernel's training mean misses by 6e-7
        standard deviations at |mean| / std = 0.7 but by 3e-4 at 500, and its inference
        computes `x * s + (beta - mean * s)`, which cancels as the ratio grows. Ratio <= 100
        keeps both within about 1e-4 of an output's unit; beyond it (mean 1e4, std 0.01: 3% off)
        the shifted keras.ops moments take over. The check reads one boolean per call on the
        host: on a GPU a synchronization per BatchNorm and step."""
        import torch
        import torch.nn.functional as functional

        if torch.compiler.is_compiling():
            return None
        channels = x.shape[self._axis]
        # The kernel wants channels at axis 1: a view, no copy.
        view = torch.movedim(x, self._axis, 1) if self._axis != 1 else x
        epsilon = self.epsilon
        if training:
            mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
            unbiased = torch.zeros(channels, dtype=x.dtype, device=x.device)
            # momentum=1.0: its running statistics become the batch's (variance unbiased).
            outputs = functional.batch_norm(
                view, mean, unbiased, gamma, beta, training=True, momentum=1.0, eps=epsilon
            )
            n = x.numel() // channels
            variance = unbiased * ((n - 1) / n)
        else:
            mean = ops.cast(self.moving_mean, x.dtype)
            variance = ops.cast(self.moving_variance, x.dtype)
        if bool(torch.any(torch.square(mean) > 1e4 * (variance + epsilon))):
            return None
        if not training:
            outputs = functional.batch_norm(
                view, mean, variance, gamma, beta, training=False, eps=epsilon
            )
        if self._axis != 1:
            outputs = torch.movedim(outputs, 1, self._axis)
        return outputs, ops.reshape(mean, (1, -1)), ops.reshape(variance, (1, -1))

    @staticmethod
    def _ops_moments(x, mask, axes, sum_over_processes=None, shift=False):
        """`_batch_moments` in keras.ops: shifted by one sample, two passes, biased variance.

        Returns `(centered, mean, variance, count)`, the statistics with the reduced `axes` kept
        (size 1). With `sum_over_processes` every sum is over all processes' batches (torch's
        synchronized statistics, the same two all-reduces as on TensorFlow). `shift=True`
        (unmasked only) returns `(pivot, shifted_mean, variance, count)` instead, `mean = pivot
        + shifted_mean` in two parts, for a caller that centres `x` itself."""

        def ratio(a, b):
            # a / b, 0 where b is 0 (then a is 0 too: an empty or all-masked channel). Neither
            # ops.divide_no_nan nor ops.maximum: Keras 3.15's torch versions return float32 for
            # float64 inputs.
            return a / ops.where(b > 0.0, b, 1.0)

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
                pivot = ratio(sum_over_processes(pivot), nonempty)
                count = sum_over_processes(count)
            pivot = ops.stop_gradient(pivot)
            shifted = x - pivot
            shifted_mean = ratio(total(shifted), count)
            centered = shifted - shifted_mean
            variance = ratio(total(ops.square(centered)), count)
            if shift:
                return pivot, shifted_mean, variance, count
            return centered, shifted_mean + pivot, variance, count
        # A masked-out first sample may hold padding far from the data: no shift then.
        weights = ops.broadcast_to(ops.expand_dims(ops.cast(mask, x.dtype), -1), ops.shape(x))
        count = total(weights)
        # An all-masked channel: mean 0, and no update (count 0).
        mean = ratio(total(x * weights), count)
        centered = x - mean
        variance = ratio(total(ops.square(centered) * weights), count)
        return centered, mean, variance, count

    def _ops_update_moving(self, mean, variance, count):
        """`_update_moving` in keras.ops: the same skip rules, no host op (jax.jit and
        torch.compile run it inside the compiled step).

        `mean`, `variance` and `count` have a row per slice of the batch whose statistics were
        taken separately (one per JAX device without synchronization, else one row). Each row
        updates the moving statistics, or keeps the old value if it is skipped, and the rows
        are averaged: what `tf.distribute` does with per-replica updates of a variable whose
        aggregation is "mean". `count` is a Python int where every channel of every row saw the
        same static number of values (no mask, no all-reduce): the checks on it are then Python
        (in eager PyTorch each keras.ops call costs about 15 us; measured: this update took 0.6
        ms of a 1.6 ms step on a (256, 1024) input)."""
        dtype = mean.dtype
        rows = mean.shape[0]
        mean, variance = ops.stop_gradient(mean), ops.stop_gradient(variance)
        static = isinstance(count, int)
        if static:
            # count >= 1 here (an empty batch returned early), and 1 only inside jax.jit (one
            # value raises elsewhere). Not `count > 1` on torch: under torch.compile with dynamic
            # shapes `count` is symbolic, and Keras cannot make a tensor of a symbolic bool.
            enough, seen = (count > 1 if BACKEND == "jax" else True), True
            if self.unbiased_variance:
                variance = variance * (count / (count - 1) if enough else 0.0)
        else:
            count = ops.cast(count, dtype)
            if self.unbiased_variance:
                variance = variance * ops.where(
                    count > 1.0, count / ops.where(count > 1.0, count - 1.0, 1.0), 0.0
                )
            enough, seen = ops.all(count > 1.0, axis=1), ops.any(count > 0.0, axis=1)
        finite = ops.all(ops.isfinite(ops.concatenate([mean, variance], axis=1)), axis=1)
        if static:  # one value per channel: nothing to learn
            update = finite if enough else ops.zeros_like(finite)
        else:
            update = ops.logical_and(finite, enough)
        if self.momentum is None:
            weight_new = 1.0 / (ops.cast(self.num_batches_tracked, dtype) + 1.0)
        else:
            weight_new = 1.0 - self.momentum
        old_mean = ops.cast(self.moving_mean, dtype)
        old_variance = ops.cast(self.moving_variance, dtype)
        new_mean = old_mean * (1.0 - weight_new) + mean * weight_new
        new_variance = old_variance * (1.0 - weight_new) + variance * weight_new
        keep = ops.expand_dims(update, 1)
        new_mean = ops.where(keep, new_mean, old_mean)
        new_variance = ops.where(keep, new_variance, old_variance)
        if rows > 1:
            # A sum over the rows divided by their number, not ops.mean (see _ops_moments).
            new_mean = ops.sum(new_mean, axis=0) / rows
            new_variance = ops.sum(new_variance, axis=0) / rows
        self.moving_mean.assign(ops.cast(ops.reshape(new_mean, (-1,)), self.moving_mean.dtype))
        self.moving_variance.assign(
            ops.cast(ops.reshape(new_variance, (-1,)), self.moving_variance.dtype)
        )
        if self.momentum is None:
            tracked = self.num_batches_tracked
            tracked.assign(tracked + ops.cast(ops.any(update), tracked.dtype))
        all_finite = internals.concrete_bool(ops.all(finite))
        if not (static and enough and all_finite is True):  # else nothing was skipped
            # An empty batch is no skip: there was nothing to learn from.
            skipped = ops.logical_and(ops.logical_not(update), seen)
            skipped = ops.any(skipped)
            counter = self._skipped.variable
            if BACKEND == "jax":
                # JAX's compiled step carries only the model's own variables in and out: the
                # counter, kept out of them (see _Counter), counts what it sees outside jax.jit.
                if internals.concrete_bool(skipped):
                    counter.assign(counter.value + 1)
            else:
                counter.assign(counter + ops.cast(skipped, counter.dtype))
        if all_finite is False:
            warnings.warn(
                f"keras_bn.BatchNorm '{self.name}': the batch statistics contain NaN or Inf; "
                "the moving statistics were not updated for this batch.",
                RuntimeWarning,
                stacklevel=4,
            )

    def get_config(self):
        base_config = super().get_config()
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "unbiased_variance": self.unbiased_variance,
            "synchronized": self.synchronized,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
        }
        return {**base_config, **config}
