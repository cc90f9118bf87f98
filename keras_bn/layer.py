"""`keras_bn.BatchNorm`: a Keras 3 BatchNorm layer with explicit, convertible conventions.

This file holds the layer's state and contract: its arguments, weights, config and the choice of
kernel. The arithmetic is in `_stats` (every backend), `_tf_kernels` (TensorFlow) and
`_ops_kernels`/`_torch_kernels` (JAX and PyTorch).
"""

from __future__ import annotations

import warnings

import keras
from keras import constraints, initializers, ops, regularizers

from keras_bn import _arguments, _stats, _variants
from keras_bn import _keras_internals as internals
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

    Conventions: Keras's momentum is the weight of the OLD value (0.99, epsilon 1e-3); PyTorch's
    the weight of the NEW one (0.1, eps 1e-5, unbiased running variance). `keras_bn.conventions`
    and the user guide have the table. `BatchNorm.from_torch(momentum=0.1, eps=1e-5,
    affine=True)` builds a layer with PyTorch's semantics.

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

    Statistics are computed on the input shifted by one of its samples, so data with a large
    mean and a tiny spread (mean 1e4, std 0.01) keeps its variance to ~1e-5 relative, where
    E[x^2] - E[x]^2 gives 0. On TensorFlow, channels-last inputs without a mask use the fused
    kernel (`FusedBatchNormV3`) on that shifted input, wherever it keeps epsilon as given (any
    epsilon without a GPU or TPU, else `epsilon >= 1.001e-5`).

    On JAX and PyTorch the same statistics are computed in keras.ops; eager PyTorch uses its own
    kernel where it is exact enough (`keras_bn._torch_kernels`).

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
        self.axis = _arguments.check_axis(axis)
        self.momentum = check_momentum(momentum, "momentum")
        self.epsilon = _arguments.check_epsilon(epsilon)
        _arguments.check_flags(
            center=center,
            scale=scale,
            unbiased_variance=unbiased_variance,
            synchronized=synchronized,
            count_batches=count_batches,
            renorm=renorm,
        )
        self.center = center
        self.scale = scale
        self.unbiased_variance = unbiased_variance
        self.synchronized = synchronized
        self.count_batches = count_batches
        _arguments.check_variants(
            self, renorm, renorm_clipping, renorm_momentum, virtual_batch_size
        )
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
        _arguments.check_flags(affine=affine)
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
            _variants.add_renorm_weights(self, shape)
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
        if self.renorm:  # the plain kernel (fused where it can be), then the correction
            outputs, statistics = _kernels.train(self, inputs, mask)
            if statistics is None:
                return outputs
            outputs = _variants.renormalized(self, outputs, *statistics[:2])
            self._count_skipped(ops.logical_not(_variants.update_renorm(self, *statistics)))
            return outputs
        if self.virtual_batch_size is not None:
            if inputs.shape[0] == 0:
                return ops.cast(inputs, self.compute_dtype)
            outputs, statistics = _variants.train(self, inputs, mask)
        else:
            outputs, statistics = _kernels.train(self, inputs, mask)
        if statistics is not None:  # None: an empty batch, nothing to learn from
            self._update_moving(*statistics)
        return outputs

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
            self._count_skipped(update.skipped)
        if update.all_finite is False:
            warnings.warn(
                f"keras_bn.BatchNorm '{self.name}': the batch statistics contain NaN or Inf; "
                "the moving statistics were not updated for this batch.",
                SkippedUpdateWarning,
                stacklevel=3,
            )

    def _count_skipped(self, skipped):
        """Adds a skipped batch (a boolean tensor) to the counter, inside compiled steps too."""
        counter = self._skipped.variable
        if BACKEND == "jax":  # counts outside jax.jit only: the counter is no model variable
            if internals.concrete_bool(skipped):
                counter.assign(counter.value + 1)
        else:
            counter.assign(counter + ops.cast(skipped, counter.dtype))

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
