"""Pure NumPy math of BatchNorm folding. Knows nothing of Keras layers or graphs.

At inference a BatchNorm is a per-channel affine map

    y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta = x * s + t,
    s = gamma / sqrt(moving_variance + epsilon),   t = beta - moving_mean * s.

Backward folding (producer -> BN), for a layer z = W * x + b whose output channel is o:

    W'[..., o] = W[..., o] * s[o],   b'[o] = b[o] * s[o] + t[o]

Forward folding (BN -> consumer), for a layer whose input channel is c and which sees every input
value through its kernel without padding (Dense, or a conv with 'valid' padding or 1x1 kernels):

    W'[..., c, o] = W[..., c, o] * s[c],   b'[o] = b[o] + sum_{spatial, c} W[..., c, o] * t[c]

    Depthwise (output channel c * M + m sees input channel c only):
        W'[..., c, m] = W[..., c, m] * s[c],   b'[c * M + m] = b[c * M + m] + sum_{spatial} W[..., c, m] * t[c]
    Separable (depthwise D, then pointwise P, one bias after P): D' = D * s[c] as above, and the
    constant the depthwise step makes, d[j] = sum_{spatial} D[..., j] * t[c(j)], goes through P:
        b'[o] = b[o] + sum_j P[j, o] * d[j]

Keras kernel layouts (output channels last, unlike PyTorch):
    Dense (in, out); Conv (k..., in / groups, out); ConvTranspose (k..., out, in);
    DepthwiseConv (k..., in, depth_multiplier) with output channel c * depth_multiplier + m;
    SeparableConv: pointwise kernel (1..., in * depth_multiplier, out).

All arithmetic runs in float64; callers cast back to each variable's dtype.
"""

import ml_dtypes
import numpy as np

from keras_bn.errors import KerasBNError, expected


def bn_scale_shift(moving_mean, moving_variance, epsilon, gamma=None, beta=None, dtype=None):
    """Returns (s, t) in float64, or raises KerasBNError when the statistics cannot be folded.

    `gamma=None` means scale=False (gamma = 1); `beta=None` means center=False (beta = 0).
    `dtype` is the one the layer adds `moving_variance + epsilon` in (its variables' dtype;
    None: float64): the sum must be positive there, not only in float64. A float32 variance
    of -1e-5 with epsilon 1e-5 sums to 0 in float32, where the layer divides by zero, and to
    2.5e-14 in float64, which would fold into finite weights.
    """
    mean = np.asarray(moving_mean, np.float64)
    var = np.asarray(moving_variance, np.float64)
    gamma = np.ones_like(mean) if gamma is None else np.asarray(gamma, np.float64)
    beta = np.zeros_like(mean) if beta is None else np.asarray(beta, np.float64)
    for name, value in (
        ("moving_mean", mean),
        ("moving_variance", var),
        ("gamma", gamma),
        ("beta", beta),
    ):
        if not np.all(np.isfinite(value)):
            bad = int(np.sum(~np.isfinite(value)))
            raise KerasBNError(
                expected(
                    f"{name} has {bad} non-finite value(s)",
                    "finite values",
                    f"{value[~np.isfinite(value)][:3].tolist()}",
                )
            )
    denominator = var + epsilon
    as_computed = denominator
    if dtype is not None:
        layer_dtype = _numpy_dtype(dtype)
        if layer_dtype.kind == "f" and layer_dtype.itemsize < 8:
            as_computed = var.astype(layer_dtype) + np.asarray(epsilon, layer_dtype)
    if np.any(denominator <= 0) or np.any(as_computed <= 0):
        worst = min(float(np.min(denominator)), float(np.min(as_computed)))
        where = "" if as_computed is denominator else f" (computed in {_numpy_dtype(dtype)})"
        raise KerasBNError(
            expected(
                f"moving_variance + epsilon must be positive{where}", "> 0", f"min {worst:.6g}"
            )
        )
    s = gamma / np.sqrt(denominator)
    t = beta - mean * s
    return s, t


def fold_backward(kernel, bias, s, t, out_axis=-1):
    """Folds y = z * s + t into z = x @ kernel + bias, the output channel on `out_axis` of kernel.

    `W' = W * s` along `out_axis`, `b' = b * s + t` (`bias=None`: no bias, b = 0).
    Dense and Conv use out_axis=-1; ConvTranspose uses out_axis=-2.
    """
    kernel = np.asarray(kernel, np.float64)
    shape = [1] * kernel.ndim
    shape[out_axis] = -1
    new_kernel = kernel * np.reshape(s, shape)
    b = 0.0 if bias is None else np.asarray(bias, np.float64)
    return new_kernel, b * s + t


def fold_backward_depthwise(kernel, bias, s, t):
    """Depthwise kernel (k..., in, multiplier): output channel c * multiplier + m scales
    W[..., c, m]; `b' = b * s + t` on the flattened (in * multiplier) channels."""
    kernel = np.asarray(kernel, np.float64)
    channels, multiplier = kernel.shape[-2:]
    new_kernel = kernel * np.reshape(s, (channels, multiplier))
    b = 0.0 if bias is None else np.asarray(bias, np.float64)
    return new_kernel, b * s + t


def fold_forward(kernel, bias, s, t, groups=1):
    """Folds x -> x * s + t into the input side of a Dense (in, out) or a Conv
    (k..., in / groups, out) kernel that applies to every input value without padding.

    `W'[..., c, o] = W[..., c, o] * s[c]`, `b'[o] = b[o] + sum W[..., c, o] * t[c]`, where for
    grouped convs input channel c of group g is `g * in_per_group + j` and output o belongs to
    group `o // out_per_group`.
    """
    kernel = np.asarray(kernel, np.float64)
    in_per_group, out = kernel.shape[-2:]
    out_per_group = out // groups
    # s_grid[j, o] = s[group(o) * in_per_group + j]
    group_of_out = np.arange(out) // out_per_group
    index = group_of_out[None, :] * in_per_group + np.arange(in_per_group)[:, None]
    s_grid, t_grid = np.asarray(s)[index], np.asarray(t)[index]
    new_kernel = kernel * s_grid
    b = np.zeros(out) if bias is None else np.asarray(bias, np.float64)
    summed = kernel.sum(axis=tuple(range(kernel.ndim - 2)))  # (in_per_group, out)
    return new_kernel, b + (summed * t_grid).sum(axis=0)


def fold_forward_depthwise(kernel, bias, s, t):
    """Folds x -> x * s + t into the input side of a depthwise kernel (k..., in, multiplier)
    that applies to every input value without padding. Returns (kernel', bias') with bias' on
    the flattened (in * multiplier) output channels."""
    kernel = np.asarray(kernel, np.float64)
    channels, multiplier = kernel.shape[-2:]
    s, t = np.asarray(s, np.float64)[:, None], np.asarray(t, np.float64)[:, None]
    constant = (kernel.sum(axis=tuple(range(kernel.ndim - 2))) * t).reshape(-1)
    b = np.zeros(channels * multiplier) if bias is None else np.asarray(bias, np.float64)
    return kernel * s, b + constant


def fold_forward_separable(depthwise_kernel, pointwise_kernel, bias, s, t):
    """Folds x -> x * s + t into the input side of a separable conv (depthwise kernel
    (k..., in, multiplier), pointwise kernel (1..., in * multiplier, out), bias (out,)).
    Returns (depthwise_kernel', bias'); the pointwise kernel is unchanged."""
    new_depthwise, constant = fold_forward_depthwise(depthwise_kernel, None, s, t)
    pointwise = np.asarray(pointwise_kernel, np.float64)
    pointwise = pointwise.reshape(pointwise.shape[-2:])  # (in * multiplier, out)
    b = np.zeros(pointwise.shape[1]) if bias is None else np.asarray(bias, np.float64)
    return new_depthwise, b + constant @ pointwise


def _numpy_dtype(dtype):
    return np.dtype(ml_dtypes.bfloat16 if str(dtype) == "bfloat16" else str(dtype))


def overflow_reason(value, dtype):
    """Why float64 `value` cannot be stored in `dtype` without becoming inf/NaN, or None.

    A folded weight past the dtype's largest finite value (float32: 3.4e38, float16: 65504) would
    be written as inf; such a fold is declined instead."""
    value = np.asarray(value, np.float64)
    largest = float(np.max(np.abs(value))) if value.size else 0.0  # NaN propagates: one pass
    if not np.isfinite(largest):
        return "is not finite"
    dtype = _numpy_dtype(dtype)
    if dtype.kind != "f" and dtype != ml_dtypes.bfloat16:
        return None
    limit = float(ml_dtypes.finfo(dtype).max)
    if largest > limit:
        return f"reaches {largest:.4g}, beyond {dtype.name}'s largest value {limit:.4g}"
    return None


def as_dtype(value, dtype):
    """`value` (float64) cast to the variable dtype `dtype` (bfloat16 included)."""
    return np.asarray(value).astype(_numpy_dtype(dtype))


# float16's smallest normal number: below it a value keeps fewer than float16's 11 significant
# bits (subnormal) or becomes 0. A folded kernel with more than this share of its nonzero
# weights down there loses precision silently in a float16 graph.
FLOAT16_TINY = float(np.finfo(np.float16).tiny)  # 6.1e-5
FLOAT16_SUBNORMAL_SHARE = 0.01


def float16_problem(value, before=None) -> str | None:
    """Why float64 weights `value` do not survive a cast to float16, or None: a value past
    float16's largest (65504, becomes inf), or more than 1% of them below its smallest normal
    number (6.1e-5: rounded to fewer bits or to 0). With `before` (the same weights before the
    fold), only the weights the fold pushed down there count, out of those that were above it:
    weights a trained model already keeps near 0 (those reading a dead channel) lose nothing
    that float32 kept."""
    value = np.abs(np.asarray(value, np.float64)).ravel()
    largest = float(np.max(value)) if value.size else 0.0
    limit = float(np.finfo(np.float16).max)
    if largest > limit:
        return f"reaches {largest:.4g}, beyond float16's largest value {limit:g}"
    if before is None:
        candidates = value > 0
    else:
        candidates = np.abs(np.asarray(before, np.float64)).ravel() >= FLOAT16_TINY
    if np.any(candidates):
        share = float(np.mean(value[candidates] < FLOAT16_TINY))
        if share > FLOAT16_SUBNORMAL_SHARE:
            return (
                f"has {100 * share:.1f}% of its weights below float16's smallest normal number "
                f"{FLOAT16_TINY:.2g} (they lose precision or become 0 in float16)"
            )
    return None
