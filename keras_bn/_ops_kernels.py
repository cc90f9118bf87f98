"""BatchNorm on JAX and PyTorch: `_stats`' keras.ops arithmetic, with the batch split per JAX
device or summed over torch.distributed processes (`_replicas`), and PyTorch's own kernel where it
is exact enough (`_torch_kernels`).

Shapes are static on both backends (jax.jit traces with concrete shapes, torch runs eagerly or
under torch.compile with known sizes), so the one-value check is a Python error and there is no
run-time assert to drop.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_bn import _keras_internals as internals
from keras_bn import _replicas, _stats
from keras_bn.errors import KerasBNError

BACKEND = keras.backend.backend()


def _replication(layer, inputs, axis):
    """`(slices, sum_over_processes)`: how many slices of this batch take their statistics
    separately (JAX devices under keras.distribution with synchronized=False), and the
    all-reduce that makes the statistics global (torch.distributed with synchronized=True),
    or None."""
    if BACKEND == "jax" and not layer.synchronized and axis != 0:
        return _replicas.jax_batch_slices(layer.name, int(inputs.shape[0])), None
    if BACKEND == "torch" and layer.synchronized and _replicas.torch_world_size() > 1:
        return 1, internals.torch_all_reduce_sum
    return 1, None


def _prepare(layer, inputs):
    inputs = ops.convert_to_tensor(inputs)
    float64 = keras.backend.standardize_dtype(inputs.dtype) == "float64"
    math_dtype = "float64" if float64 else "float32"
    axis = layer.axis % len(inputs.shape)
    gamma, beta = _stats.gamma_beta(layer, inputs.shape[axis], math_dtype)
    epsilon = ops.convert_to_tensor(layer.epsilon, dtype=math_dtype)  # not via float32
    return inputs, ops.cast(inputs, math_dtype), axis, gamma, beta, epsilon


def _torch_native(layer, x, gamma, beta, axis, moving=None):
    if BACKEND != "torch":
        return None
    from keras_bn import _torch_kernels

    return _torch_kernels.native(x, gamma, beta, axis, layer.epsilon, moving)


def train(layer, inputs, mask):
    """Training mode: `(outputs, statistics)`, `statistics = (mean, variance, count)` with a row
    per slice of the batch for `_stats.moving_update` (`count` a Python int where it is static),
    or None for an empty batch."""
    inputs, x, axis, gamma, beta, epsilon = _prepare(layer, inputs)
    channels = inputs.shape[axis]
    slices, sum_over_processes = _replication(layer, inputs, axis)
    count = math.prod(int(n) for i, n in enumerate(inputs.shape) if i != axis) // slices
    # A process with nothing to learn from still joins the others' all-reduce.
    if count == 0 and sum_over_processes is None:
        return ops.cast(inputs, layer.compute_dtype), None
    if count == 1 and sum_over_processes is None:
        if not (BACKEND == "jax" and internals.traced_by_jax(inputs)):
            raise KerasBNError(_stats.batch_of_one_message(tuple(inputs.shape)))
        # Inside jax.jit, as under XLA on TensorFlow: an exception raised while Keras's JAX
        # trainer traces its step leaves the model's variables purged (measured: predict then
        # fails). NaN outputs make the loss NaN instead of a silently wrong beta, and the moving
        # statistics are left alone (one value: no update).
        gamma = gamma * float("nan")
    if mask is None and sum_over_processes is None:
        native = _torch_native(layer, x, gamma, beta, axis)
        if native is not None:
            outputs, mean, variance = native
            return ops.cast(outputs, layer.compute_dtype), (mean, variance, count)
    # Each slice of the batch (one per JAX device) is a leading axis of its own.
    split = slices > 1
    rank, axis = len(inputs.shape) + split, axis + split
    axes = [i for i in range(rank) if i != axis and not (split and i == 0)]
    if split:
        x = ops.reshape(x, (slices, -1, *x.shape[1:]))
        if mask is not None:
            mask = ops.reshape(mask, (slices, -1, *mask.shape[1:]))
    # JAX without a mask: the custom-gradient normalization centres x itself.
    custom = BACKEND == "jax" and mask is None
    moments = _stats.moments(x, axes, mask, sum_over_processes, shift=custom)
    if custom:
        pivot, shifted_mean, variance, counts = moments
        mean = pivot + shifted_mean
    else:
        centered, mean, variance, counts = moments
    if sum_over_processes is not None:
        # The global batch decides (every process sees the same count): one value in all.
        one = ops.all(counts == 1.0)
        if internals.concrete_bool(one):
            raise KerasBNError(_stats.batch_of_one_message(tuple(inputs.shape)))
        gamma = ops.where(one, float("nan"), gamma)
    shape = _stats.channel_shape(rank, axis)
    gamma, beta = ops.reshape(gamma, shape), ops.reshape(beta, shape)
    if custom:
        outputs = _stats.normalize_with_batch_gradient(
            x, gamma, beta, pivot, shifted_mean, variance, epsilon, axes, count
        )
    else:
        outputs = centered * (gamma * ops.rsqrt(variance + epsilon)) + beta
    if split:
        outputs = ops.reshape(outputs, inputs.shape)
    per_slice = (slices, channels)
    static = mask is None and sum_over_processes is None  # count: a Python int
    rows = (
        ops.reshape(mean, per_slice),
        ops.reshape(variance, per_slice),
        count if static else ops.reshape(counts, per_slice),
    )
    return ops.cast(outputs, layer.compute_dtype), rows


def infer(layer, inputs, mask):
    """Inference mode with the moving statistics: PyTorch's kernel where it is exact enough, else
    `_stats.normalize`."""
    inputs, x, axis, gamma, beta, epsilon = _prepare(layer, inputs)
    moving = (layer.moving_mean, layer.moving_variance)
    if mask is None:
        native = _torch_native(layer, x, gamma, beta, axis, moving)
        if native is not None:
            return ops.cast(native[0], layer.compute_dtype)
    shape = _stats.channel_shape(len(inputs.shape), axis)
    mean, variance = (ops.cast(v, x.dtype) for v in moving)
    outputs = _stats.normalize(
        x, *(ops.reshape(v, shape) for v in (mean, variance, gamma, beta)), epsilon
    )
    return ops.cast(outputs, layer.compute_dtype)
