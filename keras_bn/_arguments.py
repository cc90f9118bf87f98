"""Checks of `keras_bn.BatchNorm`'s constructor arguments, each with its message. They run in
`__init__`, which also reads configs from model files."""

from __future__ import annotations

import math

from keras_bn.conventions import check_momentum
from keras_bn.errors import KerasBNError, expected


def check_axis(axis):
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise KerasBNError(
            expected(
                "Invalid `axis`", "an integer (-1 or 1 for channels last/first)", f"axis={axis!r}"
            )
        )
    return axis


def check_epsilon(epsilon) -> float:
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, (int, float))
        or not math.isfinite(epsilon)
        or epsilon <= 0
    ):
        raise KerasBNError(
            expected("Invalid `epsilon`", "a finite number > 0", f"epsilon={epsilon!r}")
        )
    return float(epsilon)


def check_flags(**flags):
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise KerasBNError(expected(f"Invalid `{name}`", "True or False", f"{name}={flag!r}"))


def check_variants(layer, renorm, clipping, renorm_momentum, virtual_batch_size):
    """Validates the batch-renormalization and ghost-batch arguments (in __init__, which also
    reads configs from model files)."""
    check_momentum(renorm_momentum, "renorm_momentum")
    if renorm_momentum is None:
        raise KerasBNError(
            expected("Invalid `renorm_momentum`", "a number in [0, 1]", "renorm_momentum=None")
        )
    if clipping is not None:
        if not isinstance(clipping, dict) or set(clipping) - {"rmin", "rmax", "dmax"}:
            raise KerasBNError(
                expected(
                    "Invalid `renorm_clipping`",
                    'a dict with keys among "rmin", "rmax", "dmax"',
                    f"renorm_clipping={clipping!r}",
                )
            )
        rmin, rmax, dmax = (clipping.get(k) for k in ("rmin", "rmax", "dmax"))
        if rmin is not None and rmax is not None and rmax < rmin:
            raise KerasBNError(
                expected("Invalid `renorm_clipping`", "rmax >= rmin", f"{clipping!r}")
            )
        if dmax is not None and dmax < 0:
            raise KerasBNError(expected("Invalid `renorm_clipping`", "dmax >= 0", f"{clipping!r}"))
    if virtual_batch_size is not None and (
        isinstance(virtual_batch_size, bool)
        or not isinstance(virtual_batch_size, int)
        or virtual_batch_size < 1
    ):
        raise KerasBNError(
            expected(
                "Invalid `virtual_batch_size`",
                "a positive integer (rows per ghost batch), or None",
                f"virtual_batch_size={virtual_batch_size!r}",
            )
        )
    if renorm and virtual_batch_size is not None:
        raise KerasBNError(
            expected(
                "renorm and virtual_batch_size",
                "one of them (keras_bn does not combine them)",
                "both",
            )
        )
    variant = "renorm=True" if renorm else None
    if virtual_batch_size is not None:
        variant = "virtual_batch_size"
    if variant is not None:
        for flag, value, why in (
            ("momentum=None", layer.momentum is None and renorm, "Keras's renorm has none"),
            ("unbiased_variance=True", layer.unbiased_variance and renorm,
             "renorm derives the moving variance from a moving standard deviation"),
            ("synchronized=True", layer.synchronized, "its statistics are per replica"),
        ):  # fmt: skip
            if value:
                raise KerasBNError(expected(f"{variant} with {flag}", f"not {flag} ({why})", flag))
