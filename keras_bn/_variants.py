"""BatchNorm's two variants in training, in keras.ops on every backend: batch renormalization
(`renorm=True`, a correction of the plain training kernel's outputs) and ghost batches
(`virtual_batch_size`, a training step of their own). At inference both are
the plain layer (`y = x * s + t` from the moving statistics), so fold, recalibrate, diagnose and
export treat them as any BatchNorm.

Batch renormalization (Ioffe, "Batch Renormalization", NIPS 2017), with Keras 3's arithmetic:

    std = sqrt(var(batch) + epsilon),   s_r = max(renorm_stddev, sqrt(epsilon))
    r = clip(std / s_r, rmin, rmax),    d = clip((mean(batch) - renorm_mean) / s_r, -dmax, dmax)
    y = (x - mean(batch)) / std * (r * gamma) + (d * gamma + beta)      r, d without gradient

Ghost batches (Hoffer et al., "Train longer, generalize better", 2017), with tf-keras's grouping:
a batch of B rows is read as V = virtual_batch_size rows by G = B / V ghost batches, ghost batch
g holding rows g, g + G, g + 2G, ...; each is normalized with its own statistics, and the moving
statistics take one update per batch from the mean of the ghost batches' means and variances.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_bn import _stats
from keras_bn.errors import KerasBNError, expected


def _math(layer, inputs):
    inputs = ops.convert_to_tensor(inputs)
    float64 = keras.backend.standardize_dtype(inputs.dtype) == "float64"
    return inputs, ops.cast(inputs, "float64" if float64 else "float32")


def train(layer, inputs, mask):
    """`(outputs, (mean, variance, count))` for a training step of a ghost-batch layer: one row
    of statistics per batch (the ghost batches' average), `count` the values per channel behind
    it."""
    inputs, x = _math(layer, inputs)
    rank = len(inputs.shape)
    axis = layer.axis % rank
    channels = int(inputs.shape[axis])
    gamma, beta = _stats.gamma_beta(layer, channels, x.dtype)
    epsilon = ops.convert_to_tensor(layer.epsilon, dtype=x.dtype)
    ghost = layer.virtual_batch_size
    if ghost is not None:
        if axis == 0:
            raise KerasBNError(
                expected("Ghost batches split the batch axis", "a channel axis other than 0",
                         f"axis={layer.axis}")
            )  # fmt: skip
        batch = inputs.shape[0]
        if batch is not None and int(batch) % ghost:
            raise KerasBNError(
                expected(
                    f"BatchNorm '{layer.name}': the batch splits into ghost batches",
                    f"a batch size that is a multiple of virtual_batch_size={ghost}",
                    f"a batch of {batch}",
                    "Use a batch size that virtual_batch_size divides (drop the last partial "
                    "batch: drop_remainder=True in tf.data).",
                )
            )
        x = ops.reshape(x, (ghost, -1, *x.shape[1:]))  # [i, g] = row i * G + g: tf-keras's
        if mask is not None:
            mask = ops.reshape(mask, (ghost, -1, *mask.shape[1:]))
        rank, axis = rank + 1, axis + 1
        axes = [i for i in range(rank) if i not in (1, axis)]
    else:
        axes = [i for i in range(rank) if i != axis]
    centered, mean, variance, count = _stats.moments(x, axes, mask)
    static = mask is None and all(x.shape[i] is not None for i in axes)
    n = math.prod(int(x.shape[i]) for i in axes) if static else None
    if n is not None and n < 2:
        raise KerasBNError(_stats.batch_of_one_message(tuple(inputs.shape)))
    shape = _stats.channel_shape(rank, axis)
    gamma, beta = ops.reshape(gamma, shape), ops.reshape(beta, shape)
    outputs = centered / ops.sqrt(variance + epsilon) * gamma + beta
    if ghost is not None:
        outputs = ops.reshape(outputs, ops.shape(inputs))
        # One moving update per batch: the ghost batches' statistics averaged.
        mean = ops.mean(ops.reshape(mean, (-1, channels)), axis=0)
        variance = ops.mean(ops.reshape(variance, (-1, channels)), axis=0)
        count = ops.reshape(count, (-1, channels))[:1]
    rows = (
        ops.reshape(mean, (1, channels)),
        ops.reshape(variance, (1, channels)),
        n if n is not None else ops.reshape(count, (1, channels)),
    )
    return ops.cast(outputs, layer.compute_dtype), rows


def renormalized(layer, outputs, mean, variance):
    """Batch renormalization applied to a plain BatchNorm's training outputs `y = x̂·γ + β` (the
    backend's training kernel, fused on TensorFlow): `(y − β)·r + (d·γ + β)`, which is
    `x̂·(r·γ) + (d·γ + β)` with the same gradients (`r` and `d` carry none). `mean` and
    `variance` have a row per slice of the batch normalized on its own (JAX devices without
    synchronization), each slice corrected by its own `r` and `d`."""
    rank = len(outputs.shape)
    axis = layer.axis % rank
    y = ops.cast(outputs, "float64" if outputs.dtype == "float64" else "float32")
    channels, rows = int(outputs.shape[axis]), int(mean.shape[0])
    if rows > 1:
        y = ops.reshape(y, (rows, -1, *y.shape[1:]))
        rank, axis = rank + 1, axis + 1
    gamma, beta = _stats.gamma_beta(layer, channels, y.dtype)
    shape = _stats.channel_shape(rank, axis)
    gamma, beta = ops.reshape(gamma, shape), ops.reshape(beta, shape)
    shape[0] = rows if rows > 1 else 1
    mean, variance = (ops.reshape(ops.cast(t, y.dtype), shape) for t in (mean, variance))
    epsilon = ops.convert_to_tensor(layer.epsilon, dtype=y.dtype)
    r, d = _renorm_correction(layer, mean, ops.sqrt(variance + epsilon), epsilon, shape)
    y = (y - beta) * r + (d * gamma + beta)
    if rows > 1:
        y = ops.reshape(y, ops.shape(outputs))
    return ops.cast(y, layer.compute_dtype)


def _renorm_correction(layer, mean, std, epsilon, shape):
    """`(r, d)` against the renorm statistics of earlier batches, clipped, without gradient."""
    renorm_mean = ops.reshape(ops.cast(layer.renorm_mean, mean.dtype), shape)
    renorm_std = ops.maximum(
        ops.reshape(ops.cast(layer.renorm_stddev, mean.dtype), shape), ops.sqrt(epsilon)
    )
    r = std / renorm_std
    d = (mean - renorm_mean) / renorm_std
    clipping = layer.renorm_clipping or {}
    if clipping.get("rmin") is not None:
        r = ops.maximum(r, clipping["rmin"])
    if clipping.get("rmax") is not None:
        r = ops.minimum(r, clipping["rmax"])
    if clipping.get("dmax") is not None:
        d = ops.clip(d, -clipping["dmax"], clipping["dmax"])
    return ops.stop_gradient(r), ops.stop_gradient(d)


def renorm_update(layer, mean, variance):
    """The statistics after a renorm step, as Keras 3 updates them: `renorm_mean` and
    `renorm_stddev` with `renorm_momentum`, `moving_mean` and `moving_stddev` with `momentum`,
    and `moving_variance = max(moving_stddev**2 - epsilon, 0)`. Returns [(variable, value)]."""
    std = ops.sqrt(variance + layer.epsilon)
    m, rm = layer.momentum, layer.renorm_momentum

    def ema(variable, value, momentum):
        return ops.cast(variable, value.dtype) * momentum + value * (1.0 - momentum)

    moving_std = ema(layer.moving_stddev, std, m)
    return [
        (layer.renorm_mean, ema(layer.renorm_mean, mean, rm)),
        (layer.renorm_stddev, ema(layer.renorm_stddev, std, rm)),
        (layer.moving_mean, ema(layer.moving_mean, mean, m)),
        (layer.moving_stddev, moving_std),
        (layer.moving_variance, ops.relu(moving_std * moving_std - layer.epsilon)),
    ]


def add_renorm_weights(layer, shape):
    """Adds `moving_stddev`, `renorm_mean` and `renorm_stddev` to a renorm layer."""

    # Keras 3's names and order, so that set_weights interchanges with its renorm layer.
    # The moving standard deviation starts at sqrt of the moving variance's start.
    def stddev_initializer(shape, dtype=None):
        return ops.sqrt(layer.moving_variance_initializer(shape, dtype=dtype))

    for name, initializer in (
        ("moving_stddev", stddev_initializer),
        ("renorm_mean", layer.moving_mean_initializer),
        ("renorm_stddev", stddev_initializer),
    ):
        weight = layer.add_weight(
            shape=shape,
            name=name,
            initializer=initializer,
            trainable=False,
            autocast=False,
            aggregation="mean",
        )
        setattr(layer, name, weight)


def update_renorm(layer, mean, variance, count):
    """Assigns `renorm_update`'s statistics, or keeps the old ones when the batch's are not
    finite; returns whether they were (a boolean tensor)."""
    # A row per slice of the batch (JAX devices without synchronization): their average.
    mean, variance = (
        ops.stop_gradient(ops.mean(ops.reshape(t, (-1, t.shape[-1])), axis=0))
        for t in (mean, variance)
    )
    finite = ops.logical_and(ops.all(ops.isfinite(mean)), ops.all(ops.isfinite(variance)))
    for variable, value in renorm_update(layer, mean, variance):
        kept = ops.where(finite, value, ops.cast(variable, value.dtype))
        variable.assign(ops.cast(kept, variable.dtype))
    if layer.num_batches_tracked is not None:
        tracked = layer.num_batches_tracked
        tracked.assign(tracked + ops.cast(finite, tracked.dtype))
    return finite
