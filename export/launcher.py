"""`keras-bn recalibrate` and `keras-bn doctor` in a distributed run: the command joins the run its
launcher started, from the environment the launcher sets, and reads its share of the data file.

| backend | launcher's environment | engine joined | rows of `--data` read by each process |
|---|---|---|---|
| PyTorch | `torchrun` (`WORLD_SIZE`, `RANK`, `MASTER_ADDR`, `MASTER_PORT`) | a gloo process group | its block of rows |
| JAX | `KERAS_DISTRIBUTION_NUM_PROCESSES`, `..._PROCESS_ID`, `..._JOB_ADDRESSES` | `keras.distribution.initialize()` | its block of rows |
| TensorFlow | `TF_CONFIG` with two workers or more | `MultiWorkerMirroredStrategy` | all; each batch is split across the workers |

Every process then ends with the statistics of the whole file (`keras_bn.recalibrate`'s
`distributed="auto"`); only process 0 writes the output file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import keras

from keras_bn import _processes
from keras_bn.errors import KerasBNError, expected


@dataclasses.dataclass
class Run:
    """This process's place in the launched run (rank 0 of 1 without a launcher)."""

    rank: int = 0
    count: int = 1
    strategy: object = None  # TensorFlow's MultiWorkerMirroredStrategy
    splits_rows: bool = False  # each process reads its block of the file's rows

    def scope(self):
        """Where the model is loaded and used: the strategy's scope on TensorFlow."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def rows(self, data):
        """This process's block of rows of `data` (an array or {input name: array}): rows
        `n * rank // count` to `n * (rank + 1) // count`, so that the blocks cover the file
        once; all of them where the engine splits each batch itself."""
        if data is None or not self.splits_rows:
            return data
        arrays = data if isinstance(data, dict) else {"": data}
        block = {}
        for name, array in arrays.items():
            n = len(array)
            block[name] = array[n * self.rank // self.count : n * (self.rank + 1) // self.count]
        return block if isinstance(data, dict) else block[""]


def _number(name):
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise KerasBNError(
            expected(f"Invalid {name} in the environment", "an integer", repr(value))
        ) from None


def _refuse(launcher, needed):
    backend = keras.backend.backend()
    raise KerasBNError(
        expected(
            f"This process was started by {launcher}, which keras-bn joins on Keras's "
            f"{needed} backend",
            f"KERAS_BACKEND={needed}",
            f"KERAS_BACKEND={backend}",
            f"Set KERAS_BACKEND={needed} for every process, or run one process without "
            f"{launcher}'s environment; each process alone would read only its part of the data.",
        )
    )


def join() -> Run:
    """Joins the run this process's launcher started, if any; see the module docstring."""
    backend = keras.backend.backend()
    world = _number("WORLD_SIZE")
    if world is not None and world > 1:
        if backend != "torch":
            _refuse("torchrun (WORLD_SIZE)", "torch")
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")  # from the launcher's MASTER_ADDR, RANK, ...
        return Run(dist.get_rank(), dist.get_world_size(), splits_rows=True)
    processes = _number("KERAS_DISTRIBUTION_NUM_PROCESSES")
    if processes is not None and processes > 1:
        if backend != "jax":
            _refuse("a KERAS_DISTRIBUTION_* launch", "jax")
        import jax

        keras.distribution.initialize()
        return Run(jax.process_index(), jax.process_count(), splits_rows=True)
    config = os.environ.get("TF_CONFIG")
    if config:
        try:
            cluster = json.loads(config).get("cluster", {})
            workers = sum(len(cluster.get(job, ())) for job in ("chief", "worker"))
        except (ValueError, AttributeError, TypeError):
            raise KerasBNError(
                expected(
                    "Invalid TF_CONFIG in the environment",
                    'JSON such as {"cluster": {"worker": [...]}, "task": {...}}',
                    repr(config[:200]),
                )
            ) from None
        if workers > 1:
            if backend != "tensorflow":
                _refuse("a TF_CONFIG cluster", "tensorflow")
            import tensorflow as tf

            strategy = tf.distribute.MultiWorkerMirroredStrategy()
            # The library's own reading of the cluster: the rank recalibrate reports.
            processes = _processes.find("auto", strategy)
            return Run(processes.rank, processes.count, strategy=strategy)
    return Run()
