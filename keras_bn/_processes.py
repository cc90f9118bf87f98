"""The processes of a distributed run that recalibrate together: which engine joins them, this
process's rank, and that engine's own all-gather. Nothing here opens a connection: the process
group, `jax.distributed` or the `tf.distribute` cluster is the caller's, set up before.

Two ways the processes' statistics meet:

- **Per batch, inside the step** (`tf.distribute`, `MultiWorkerMirroredStrategy` included): every
  worker reads the same data, as `fit` does, and each of its replicas takes its rows of every
  global batch; the statistics are all-reduced in the compiled step
  (`_tf_kernels.recalibration_moments`), so they are already global when they reach the host.
- **Once, at the end** (`torch.distributed`, JAX with several processes): every process reads its
  own shard, as its own loader gives it, and accumulates alone. Then every process all-gathers
  every process's per-channel partial results in float64, bit for bit, and merges them in rank
  order, so every process computes the same numbers from the same inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np

from keras_bn.errors import KerasBNError, expected

DISTRIBUTED = ("auto", False)


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place in a distributed run of `count` processes.

    `gather(vector) -> (count, len(vector))` float64, row r from process r, through the engine's
    collective; every process must call it the same number of times with vectors of one length.
    None where the statistics are all-reduced inside the step (`tf.distribute`)."""

    engine: str  # "torch.distributed (gloo)", "jax.distributed", "tf.distribute (...)"
    rank: int
    count: int
    gather: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def merges_at_the_end(self) -> bool:
        return self.gather is not None


def check_argument(distributed) -> None:
    if not any(distributed is value for value in DISTRIBUTED):
        raise KerasBNError(
            expected(
                "Invalid `distributed`",
                '"auto" (merge with the other processes of a distributed run) or False (this '
                "process's data only)",
                repr(distributed),
            )
        )


def find(distributed, strategy=None) -> Processes | None:
    """The distributed run this process belongs to, or None for a single process (or
    `distributed=False`). `strategy`: the `tf.distribute` strategy in scope, if any."""
    check_argument(distributed)
    if distributed is False:
        return None
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tf_workers(strategy)
    if backend == "torch":
        return _torch_group()
    if backend == "jax":
        return _jax_processes()
    return None


def _tf_workers(strategy):
    """A strategy with a cluster of several workers (MultiWorkerMirroredStrategy): the step
    all-reduces across them, nothing to gather afterwards."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return None
    spec = resolver.cluster_spec().as_dict()
    workers = sum(len(spec.get(job, ())) for job in ("chief", "worker"))
    if workers < 2:
        return None
    rank = resolver.task_id + (len(spec.get("chief", ())) if resolver.task_type == "worker" else 0)
    import tensorflow as tf

    name = type(strategy).__name__  # MultiWorkerMirroredStrategy's class is another name
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        name = "MultiWorkerMirroredStrategy"
    return Processes(f"tf.distribute ({name})", rank, workers)


def _torch_group():
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    backend = dist.get_backend()
    # NCCL moves CUDA tensors only; gloo and the others CPU ones.
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
    world = dist.get_world_size()

    def gather(vector):
        local = torch.from_numpy(np.ascontiguousarray(vector, np.float64)).to(device)
        rows = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(rows, local)
        return np.stack([row.cpu().numpy() for row in rows])

    return Processes(f"torch.distributed ({backend})", dist.get_rank(), world, gather)


def _jax_processes():
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() < 2:
        return None

    def gather(vector):
        # JAX computes in float32 unless jax_enable_x64 is on: the float64 values travel as their
        # bytes (uint32 pairs), so that nothing on the way can round them.
        words = np.ascontiguousarray(vector, np.float64).view(np.uint32)
        rows = np.asarray(multihost_utils.process_allgather(words))
        return np.ascontiguousarray(rows).view(np.float64).reshape(jax.process_count(), -1)

    return Processes("jax.distributed", jax.process_index(), jax.process_count(), gather)


def refuse_local_writes_to_global_variables(model, distributed) -> None:
    """`distributed=False` on JAX where the model's variables, or those of its copy, span
    several processes (a keras.distribution is set in a run of several): such a variable holds
    one value for all of them, so one process's own statistics cannot be written into it."""
    if distributed is not False or keras.backend.backend() != "jax":
        return
    import jax

    if jax.process_count() < 2:
        return
    spanning = keras.distribution.distribution() is not None  # the copy's variables would
    if spanning or any(not getattr(v.value, "is_fully_addressable", True) for v in model.variables):
        raise KerasBNError(
            expected(
                "distributed=False with a model whose variables span "
                f"{jax.process_count()} processes (keras.distribution)",
                'distributed="auto", so that every process writes the same statistics',
                "distributed=False",
                "A variable replicated over processes holds one value for all of them; "
                "recalibrate a model built without the distribution for per-process "
                "statistics.",
            )
        )


def local_jax_value(array):
    """A JAX variable's whole value on this process: itself when this process holds all of it,
    its local copy when it is replicated over several processes' devices (keras.distribution's
    DataParallel), else gathered from the processes that hold its shards (a collective: every
    process must ask for the same variables in the same order)."""
    if getattr(array, "is_fully_addressable", True):
        return array
    if array.is_fully_replicated:
        return array.addressable_data(0)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(array, tiled=True)


def gather_outcome(processes: Processes, error, batches: int, length: int) -> list[int]:
    """The first collective of a merge: every process says whether its own part failed, how
    many batches it read and how long its vector of statistics is, so that a failure on one
    process is an error on all of them, not a hang of the others in the next collective.
    Returns the batches of every process, in rank order; raises this process's own `error`, or
    a `KerasBNError` naming the process that failed or whose model differs."""
    rows = processes.gather(np.array([0.0 if error is None else 1.0, float(batches), length]))
    if error is not None:
        raise error
    failed = [rank for rank, row in enumerate(rows) if row[0]]
    if failed:
        raise KerasBNError(
            expected(
                f"Process {failed[0]} of {processes.count} ({processes.engine}) failed on its "
                "part of the data",
                "every process to read its shard",
                f"an error on process {failed[0]}, printed there",
                "Fix what that process reports; the model is unchanged on every process.",
            )
        )
    lengths = [int(row[2]) for row in rows]
    if len(set(lengths)) > 1:
        raise KerasBNError(
            expected(
                f"The {processes.count} processes ({processes.engine}) recalibrate different "
                "models",
                "the same model on every process",
                f"BatchNorm statistics of {' / '.join(map(str, lengths))} values per process",
                "Load the same model on every process; nothing was changed.",
            )
        )
    return [int(row[1]) for row in rows]
