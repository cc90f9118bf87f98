"""Over which samples a BatchNorm takes its batch statistics, on each backend's own distributed
engine. Nothing here communicates by itself: TensorFlow's `tf.distribute`, JAX's sharded arrays
and `torch.distributed` do.

- TensorFlow: the `tf.distribute` replica context (`_tf_kernels.train`): each replica sees its
  share of the batch; `synchronized=True` all-reduces the sums.
- JAX: under `keras.distribution` (`DataParallel`, `ModelParallel`) Keras jit-compiles the step
  over global arrays whose batch axis is sharded across the devices, and XLA (GSPMD) inserts the
  communication. A reduction over that axis is over the global batch: Keras's own
  `BatchNormalization`, which has no synchronized mode on JAX, already learns the global batch's
  mean and variance under `DataParallel`, not the devices' own (tests/test_backends.py). So `synchronized=True` needs no code on JAX, and `synchronized=False` takes the
  statistics of each device's slice of the batch separately, as on TensorFlow and PyTorch.
- PyTorch: each process of a `torch.distributed` group holds its own batch;
  `synchronized=True` sums over the group with a differentiable all-reduce
  (`_keras_internals.torch_all_reduce_sum`).
"""

from __future__ import annotations

import math

import keras

from keras_bn.errors import KerasBNError, expected


def jax_batch_slices(name: str, batch_size: int) -> int:
    """The number of devices `keras.distribution.distribution()` splits the batch axis over: the
    number of slices whose statistics an unsynchronized BatchNorm takes separately (1 without a
    distribution)."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    axis = distribution.get_data_layout((batch_size, 1)).axes[0]
    if axis is None:
        return 1
    mesh = distribution.device_mesh
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    slices = math.prod(sizes[a] for a in (axis if isinstance(axis, tuple) else (axis,)))
    if slices > 1 and batch_size % slices:
        raise KerasBNError(
            expected(
                f"BatchNorm '{name}': under {type(distribution).__name__} the batch is split "
                f"across {slices} devices, each with its own statistics",
                f"a batch size divisible by {slices} (Keras's distribution needs it too)",
                f"a batch of {batch_size}",
                "Drop the last partial batch, or pass synchronized=True.",
            )
        )
    return slices


def torch_world_size() -> int:
    """The number of processes of the default `torch.distributed` group (1 when none is set up)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
