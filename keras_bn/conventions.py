"""Conversions between the BatchNorm conventions of Keras, PyTorch and ONNX.

| quantity          | Keras / keras_bn                        | PyTorch                                   | ONNX BatchNormalization |
|-------------------|-----------------------------------------|-------------------------------------------|-------------------------|
| momentum          | weight of the OLD value, default 0.99   | weight of the NEW batch value, default 0.1 | weight of the OLD value, default 0.9 |
| moving update     | m = momentum*m + (1-momentum)*batch     | m = (1-momentum)*m + momentum*batch       | as Keras                |
| cumulative mean   | momentum=None (keras_bn)                | momentum=None                             | -                       |
| epsilon           | 1e-3                                    | 1e-5                                      | 1e-5                    |
| moving variance   | biased (divide by n)                    | unbiased (divide by n-1)                  | inference only          |
| normalization var | biased                                  | biased                                    | biased                  |
"""

from __future__ import annotations

import math

from keras_bn.errors import KerasBNError, expected

KERAS_MOMENTUM = 0.99
KERAS_EPSILON = 1e-3
TORCH_MOMENTUM = 0.1
TORCH_EPSILON = 1e-5
ONNX_EPSILON = 1e-5


def check_momentum(momentum, name):
    if momentum is None:
        return None
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not math.isfinite(momentum)
        or not 0.0 <= momentum <= 1.0
    ):
        raise KerasBNError(
            expected(
                f"Invalid `{name}`",
                "a number in [0, 1], or None for a cumulative average",
                f"{name}={momentum!r}",
            )
        )
    return float(momentum)


def torch_momentum_to_keras(momentum: float | None) -> float | None:
    """PyTorch momentum (weight of the new value) -> Keras momentum (weight of the old value).

    `keras = 1 - torch`; `None` (cumulative average) stays `None`.

    Example:
        ```python
        keras_bn.torch_momentum_to_keras(0.1)  # 0.9
        ```
    """
    momentum = check_momentum(momentum, "momentum")
    return None if momentum is None else 1.0 - momentum


def keras_momentum_to_torch(momentum: float | None) -> float | None:
    """Keras momentum (weight of the old value) -> PyTorch momentum (weight of the new value).

    `torch = 1 - keras`; `None` (cumulative average) stays `None`.

    Example:
        ```python
        keras_bn.keras_momentum_to_torch(0.99)  # 0.01
        ```
    """
    momentum = check_momentum(momentum, "momentum")
    return None if momentum is None else 1.0 - momentum
