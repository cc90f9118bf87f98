"""BatchNorm on PyTorch's own kernel, `torch.nn.functional.batch_norm`: the counterpart of the
fused kernel on TensorFlow, taken in eager mode for well-conditioned data. Everything else on
the PyTorch backend runs the keras.ops path (`_ops_kernels`, `_stats`)."""

from __future__ import annotations

import torch
import torch.nn.functional as functional
from keras import ops


def native(x, gamma, beta, axis, epsilon, moving=None):
    """PyTorch's kernel, for data whose mean is at most 100 standard deviations from 0: in eager
    mode it is several times faster than the same step in keras.ops (benchmarks/bench_layer.py).

    `moving=None` is training mode, returning `(outputs, mean, variance)`, the batch mean and
    biased variance as rows of shape (1, C); `moving=(mean, variance)` is inference mode, where
    only `outputs` counts. Returns None where the keras.ops path must run instead: under
    torch.compile (inductor fuses that path itself, and the check below would read a value on the
    host), and for ill-conditioned data. With 4096 values per channel the kernel's training mean
    misses by about 6e-7 standard deviations at |mean| / std = 0.7 but by 3e-4 at 500, and its inference computes `x * s + (beta - mean * s)`, which cancels as the
    ratio grows. Ratio <= 100 keeps both within about 1e-4 of an output's unit; beyond it (mean
    1e4, std 0.01: 3% off) the shifted keras.ops moments take over. The check reads one boolean
    per call on the host: on a GPU a synchronization per BatchNorm and step."""
    if torch.compiler.is_compiling():
        return None
    channels = x.shape[axis]
    # The kernel wants channels at axis 1: a view, no copy.
    view = torch.movedim(x, axis, 1) if axis != 1 else x
    if moving is None:
        mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
        unbiased = torch.zeros(channels, dtype=x.dtype, device=x.device)
        # momentum=1.0: its running statistics become the batch's (variance unbiased).
        outputs = functional.batch_norm(
            view, mean, unbiased, gamma, beta, training=True, momentum=1.0, eps=epsilon
        )
        n = x.numel() // channels
        variance = unbiased * ((n - 1) / n)
    else:
        mean, variance = (ops.cast(v, x.dtype) for v in moving)
    if bool(torch.any(torch.square(mean) > 1e4 * (variance + epsilon))):
        return None
    if moving is not None:
        outputs = functional.batch_norm(
            view, mean, variance, gamma, beta, training=False, eps=epsilon
        )
    if axis != 1:
        outputs = torch.movedim(outputs, 1, axis)
    return outputs, ops.reshape(mean, (1, -1)), ops.reshape(variance, (1, -1))
