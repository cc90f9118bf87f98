"""`keras_bn.BatchNorm`: a Keras 3 BatchNorm layer with explicit, convertible conventions.

This file holds the layer's state and contract: its arguments, weights, config and the choice of
kernel. The arithmetic is in `_stats` (every backend), `_tf_kernels` (TensorFlow) and
`_ops_kernels`/`_torch_kernels` (JAX and PyTorch).
"""

from __future__ import annotations

import math
import warnings

import keras
from keras import constraints, initializers, ops, regularizers

from keras_bn import _keras_internals as internals
from keras_bn import _stats, _variants
from keras_bn.conventions import (
    KERAS_EPSILON,
    KERAS_MOMENTUM,
    TORCH_EPSILON,
    TORCH_MOMENTUM,
    check_momentum,
    torch_momentum_to_keras,
)
from keras_bn.errors import KerasBNError, SkippedUpdateWarning, expected

BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":
    from keras_bn import _tf_kernels as _kernels
else:
    from keras_bn import _ops_kernels as _kernels


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
    host ops: add the `keras_bn.SkippedUpdatesCallback()` to `fit` to be warned after each epoch.

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
    use PyTorch's own kernel, `torch.nn.functional.batch_norm`, instead (`keras_bn._torch_kernels`).
    On JAX the unmasked training normalization has BatchNorm's textbook gradient, written for
    XLA (`keras_bn._stats.normalize_with_batch_gradient`).

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
        count_batches: If True, training batches are counted in the non-trainable weight
            `num_batches_tracked` with any momentum, as PyTorch's layers count them (its
            state dicts carry the count). With `momentum=None` the count is kept anyway: the
            cumulative average needs it.
        renorm: If True, batch renormalization (Ioffe, 2017) with Keras 3's arithmetic: in
            training the batch-normalized values are corrected by `r` and `d` against moving
            `renorm_mean`/`renorm_stddev` (see `keras_bn._variants`); the moving variance is
            derived from a moving standard deviation, `max(moving_stddev**2 - epsilon, 0)`, as
            Keras does. Inference is unchanged.
        renorm_clipping: With `renorm`, optional bounds {"rmin", "rmax", "dmax"}: `r` is clipped
            to [rmin, rmax] and `d` to [-dmax, dmax].
        renorm_momentum: With `renorm`, the momentum (Keras's, weight of the old value) of
            `renorm_mean` and `renorm_stddev`.
        virtual_batch_size: Rows per ghost batch (tf-keras's ghost batch normalization): in
            training each batch is split into ghost batches, each normalized with its own
            statistics (ghost batch g holds rows g, g + G, g + 2G, ... of G ghost batches);
            the moving statistics take one update per batch, from the ghost batches' average.
            The batch size must be a multiple of it. Inference is unchanged.
        beta_initializer: As in `keras.layers.BatchNormalization`.
        gamma_initializer: As in `keras.layers.BatchNormalization`.
        moving_mean_initializer: As in `keras.layers.BatchNormalization`.
        moving_variance_initializer: As in `keras.layers.BatchNormalization`.
        beta_regularizer: As in `keras.layers.BatchNormalization`.
        gamma_regularizer: As in `keras.layers.BatchNormalization`.
        beta_constraint: As in `keras.layers.BatchNormalization`.
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

    Example:
        ```python
        import keras
        import keras_bn

        model = keras.Sequential([
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, use_bias=False),
            keras_bn.BatchNorm(),  # Keras's conventions: momentum 0.99, epsilon 1e-3
            keras.layers.ReLU(),
        ])
        ported = keras_bn.BatchNorm.from_torch(momentum=0.1, eps=1e-5)  # PyTorch's
        ```

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
        count_batches: bool = False,
        renorm: bool = False,
        renorm_clipping: dict | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
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
        self.momentum = check_momentum(momentum, "momentum")
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
            ("count_batches", count_batches),
        ):
            if not isinstance(flag, bool):
                raise KerasBNError(
                    expected(f"Invalid `{flag_name}`", "True or False", f"{flag_name}={flag!r}")
                )
        self.center = center
        self.scale = scale
        self.unbiased_variance = unbiased_variance
        self.synchronized = synchronized
        self.count_batches = count_batches
        self._check_variants(renorm, renorm_clipping, renorm_momentum, virtual_batch_size)
        self.renorm = renorm
        self.renorm_clipping = dict(renorm_clipping) if renorm_clipping else None
        self.renorm_momentum = float(renorm_momentum)
        self.virtual_batch_size = virtual_batch_size
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
        self.moving_stddev = self.renorm_mean = self.renorm_stddev = None
        self._skipped = None

    def _check_variants(self, renorm, clipping, renorm_momentum, virtual_batch_size):
        """Validates the batch-renormalization and ghost-batch arguments (in __init__, which also
        reads configs from model files)."""
        if not isinstance(renorm, bool):
            raise KerasBNError(expected("Invalid `renorm`", "True or False", f"renorm={renorm!r}"))
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
                raise KerasBNError(
                    expected("Invalid `renorm_clipping`", "dmax >= 0", f"{clipping!r}")
                )
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
                ("momentum=None", self.momentum is None and renorm, "Keras's renorm has none"),
                ("unbiased_variance=True", self.unbiased_variance and renorm,
                 "renorm derives the moving variance from a moving standard deviation"),
                ("synchronized=True", self.synchronized, "its statistics are per replica"),
            ):  # fmt: skip
                if value:
                    raise KerasBNError(
                        expected(f"{variant} with {flag}", f"not {flag} ({why})", flag)
                    )

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
        PyTorch's running_var, and training batches are counted in `num_batches_tracked` as
        PyTorch counts them. `affine=False` gives no gamma and no beta. Other keyword arguments
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
            count_batches=True,
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
        channels = input_shape[self.axis % rank]
        if channels is None:
            raise KerasBNError(
                expected(
                    "The channel axis must have a known size",
                    "an int",
                    f"None at axis {self.axis} of input shape {tuple(input_shape)}",
                )
            )
        self._add_weights((channels,))
        self.input_spec = keras.layers.InputSpec(ndim=rank, axes={self.axis % rank: channels})

    def _add_weights(self, shape):
        """Weights in Keras's order (gamma, beta, moving_mean, moving_variance), so that
        get_weights()/set_weights() interchange with keras.layers.BatchNormalization; then
        `num_batches_tracked` for momentum=None or count_batches=True, and the skip counter, which is no weight."""
        for name, used in (("gamma", self.scale), ("beta", self.center)):
            if used:
                weight = self.add_weight(
                    shape=shape,
                    name=name,
                    initializer=getattr(self, f"{name}_initializer"),
                    regularizer=getattr(self, f"{name}_regularizer"),
                    constraint=getattr(self, f"{name}_constraint"),
                    trainable=True,
                    autocast=False,
                )
                setattr(self, name, weight)
        # aggregation="mean": under a tf.distribute strategy each replica assigns the moving
        # statistics from replica context; with synchronized=True they are identical anyway.
        for name in ("moving_mean", "moving_variance"):
            weight = self.add_weight(
                shape=shape,
                name=name,
                initializer=getattr(self, f"{name}_initializer"),
                trainable=False,
                autocast=False,
                aggregation="mean",
            )
            setattr(self, name, weight)
        if self.renorm:
            # Keras 3's names and order, so that set_weights interchanges with its renorm layer.
            # The moving standard deviation starts at sqrt of the moving variance's start.
            def stddev_initializer(shape, dtype=None):
                return ops.sqrt(self.moving_variance_initializer(shape, dtype=dtype))

            for name, initializer in (
                ("moving_stddev", stddev_initializer),
                ("renorm_mean", self.moving_mean_initializer),
                ("renorm_stddev", stddev_initializer),
            ):
                weight = self.add_weight(
                    shape=shape,
                    name=name,
                    initializer=initializer,
                    trainable=False,
                    autocast=False,
                    aggregation="mean",
                )
                setattr(self, name, weight)
        if self.momentum is None or self.count_batches:
            self.num_batches_tracked = self.add_weight(
                shape=(),
                name="num_batches_tracked",
                initializer="zeros",
                dtype="int64",
                trainable=False,
                autocast=False,
                aggregation="only_first_replica",
            )
        counter = keras.Variable(
            keras.initializers.Zeros(),
            shape=(),
            dtype="int64",
            trainable=False,
            name="skipped_updates",
            aggregation="only_first_replica",
        )
        self._skipped = _Counter(counter)

    def compute_output_shape(self, input_shape):
        return input_shape

    @property
    def skipped_updates(self) -> int:
        """Training batches that did not update the moving statistics (see the class docstring)."""
        return 0 if self._skipped is None else int(self._skipped.variable.numpy())

    def call(self, inputs, training=None, mask=None):
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise KerasBNError(
                expected(
                    "The mask must have one dimension less than the inputs",
                    f"mask rank {len(inputs.shape) - 1}",
                    f"mask.shape={tuple(mask.shape)}, inputs.shape={tuple(inputs.shape)}",
                )
            )
        if not (training and self.trainable):
            return _kernels.infer(self, inputs, mask)
        if self.renorm and BACKEND == "tensorflow":
            # The plain kernel (fused where it can be), then the renorm correction.
            outputs, statistics = _kernels.train(self, inputs, mask)
            if statistics is None:
                return outputs
            outputs = _variants.renormalized(self, outputs, *statistics[:2])
            self._update_renorm(*statistics)
            return outputs
        if self.renorm or self.virtual_batch_size is not None:
            if inputs.shape[0] == 0:
                return ops.cast(inputs, self.compute_dtype)
            outputs, statistics = _variants.train(self, inputs, mask)
            if self.renorm:
                self._update_renorm(*statistics)
                return outputs
        else:
            outputs, statistics = _kernels.train(self, inputs, mask)
        if statistics is not None:  # None: an empty batch, nothing to learn from
            self._update_moving(*statistics)
        return outputs

    def _update_renorm(self, mean, variance, count):
        """Assigns `_variants.renorm_update`'s statistics, or keeps the old ones (and counts the
        skip) when the batch's are not finite."""
        mean, variance = (ops.stop_gradient(ops.reshape(t, (-1,))) for t in (mean, variance))
        finite = ops.logical_and(ops.all(ops.isfinite(mean)), ops.all(ops.isfinite(variance)))
        for variable, value in _variants.renorm_update(self, mean, variance):
            kept = ops.where(finite, value, ops.cast(variable, value.dtype))
            variable.assign(ops.cast(kept, variable.dtype))
        if self.num_batches_tracked is not None:
            tracked = self.num_batches_tracked
            tracked.assign(tracked + ops.cast(finite, tracked.dtype))
        if BACKEND != "jax":
            counter = self._skipped.variable
            counter.assign(counter + ops.cast(ops.logical_not(finite), counter.dtype))
        elif internals.concrete_bool(finite) is False:
            self._skipped.variable.assign(self._skipped.variable.value + 1)

    def _update_moving(self, mean, variance, count):
        """Assigns `_stats.moving_update`'s result (no host op: this runs inside compiled steps),
        counts a skipped batch and, in eager mode, warns of non-finite statistics."""
        update = _stats.moving_update(
            self.moving_mean,
            self.moving_variance,
            mean,
            variance,
            count,
            momentum=self.momentum,
            unbiased=self.unbiased_variance,
            batches_tracked=self.num_batches_tracked,
            concrete=internals.concrete_bool,
        )
        self.moving_mean.assign(ops.cast(update.mean, self.moving_mean.dtype))
        self.moving_variance.assign(ops.cast(update.variance, self.moving_variance.dtype))
        if self.num_batches_tracked is not None:
            tracked = self.num_batches_tracked
            tracked.assign(tracked + ops.cast(ops.any(update.updated), tracked.dtype))
        if update.skipped is not False:
            counter = self._skipped.variable
            if BACKEND == "jax":
                # JAX's compiled step carries only the model's own variables in and out: the
                # counter, kept out of them (see _Counter), counts what it sees outside jax.jit.
                if internals.concrete_bool(update.skipped):
                    counter.assign(counter.value + 1)
            else:
                counter.assign(counter + ops.cast(update.skipped, counter.dtype))
        if update.all_finite is False:
            warnings.warn(
                f"keras_bn.BatchNorm '{self.name}': the batch statistics contain NaN or Inf; "
                "the moving statistics were not updated for this batch.",
                SkippedUpdateWarning,
                stacklevel=3,
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
            "count_batches": self.count_batches,
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
            "virtual_batch_size": self.virtual_batch_size,
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
