"""`recalibrate`: precise BatchNorm statistics for Keras 3 (fvcore's PreciseBN, PyTorch's
`update_bn`), computed from data after training.

The moving statistics a BatchNorm keeps during training are an exponential average of batch
statistics taken while the weights were still moving. With Keras's momentum 0.99 they forget their
initial value (mean 0, variance 1) only after about 460 updates (0.99**460 ~ 0.01), so short runs
and small data sets ship stale statistics: good in training, bad at inference. Recalibration runs
the trained model over data and replaces them with statistics of the final weights.

How statistics are collected: each BatchNorm normalizes with the statistics of its batch, as in
training, so the layers after it see what they saw in training; every other layer runs in
inference mode (Dropout and noise layers do not fire, unlike `update_bn`, which calls
`model.train()`). Nothing is assigned while the data runs: the per-batch sums are returned by one
`tf.function` (on JAX and PyTorch: eager keras.ops) and merged in float64 on the host.

Estimators (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021, section 3: "population
statistics"; fvcore `fvcore.nn.precise_bn`):

- "population": the mean and variance of every value the layer saw, over all batches, weighted by
  sample count. Batches are merged with the parallel-variance update of Chan, Golub & LeVeque
  (1979): for partial results (n_a, mean_a, M2_a), (n_b, mean_b, M2_b),
  `delta = mean_b - mean_a`, `mean = mean_a + delta * n_b / n`, `M2 = M2_a + M2_b +
  delta**2 * n_a * n_b / n`, so no E[x^2] - E[x]^2 and no stored activations. The variance is
  `M2 / n`, or `M2 / (n - 1)` for a layer with `unbiased_variance=True` (PyTorch's running_var).
- "batch_mean": the equal-weight average of the per-batch means and variances, fvcore's
  `update_bn_stats` and PyTorch's `torch.optim.swa_utils.update_bn` (which sets momentum=None, a
  cumulative average). Per-batch variances are biased, or unbiased with `unbiased_variance=True`.
"""

from __future__ import annotations

import contextlib
import dataclasses

import keras
import numpy as np
from keras import ops

from keras_bn import _data, _processes, _stats
from keras_bn import _keras_internals as internals
from keras_bn._environment import progress_verbose
from keras_bn._graph import BATCHNORM_TYPES, require_graph, run_inference, walk
from keras_bn.errors import KerasBNError, expected
from keras_bn.layer import BatchNorm
from keras_bn.verification import (
    in_background,
    model_failure,
)

# TensorFlow keeps its compiled collection step (tf.function, tf.distribute, the fused kernel);
# JAX and PyTorch collect with keras.ops, eagerly (`_ops_moments`).
BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":
    import tensorflow as tf

    from keras_bn import _tf_kernels

ESTIMATORS = ("population", "batch_mean")


@dataclasses.dataclass
class RecalibrationRow:
    """One BatchNorm: how far its statistics moved, in units of the new standard deviation
    `sqrt(var_new + eps)` (max over channels), and how many values per channel it saw."""

    name: str
    values_per_channel: int
    batches: int  # calls, for a BatchNorm shared by several branches (each call counts once)
    mean_shift: float  # max |mean_new - mean_old| / sqrt(var_new + eps)
    std_change: float  # max |sqrt(var_old + eps) - sqrt(var_new + eps)| / sqrt(var_new + eps)
    skipped: str | None = None  # why it was left alone (only_trainable=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RecalibrationReport:
    """`batches` and each row's values per channel count every process of a distributed run;
    `processes` and `engine` say which ones were merged (1 and None for one process), and
    `process_batches` how many batches each read, in rank order, where each read its own shard
    (None where every process read the same data, as under `tf.distribute`)."""

    estimator: str
    batches: int
    rows: list[RecalibrationRow] = dataclasses.field(default_factory=list)
    processes: int = 1
    engine: str | None = None
    process_batches: list[int] | None = None

    def to_dict(self) -> dict:
        return {
            "estimator": self.estimator,
            "batches": self.batches,
            "processes": self.processes,
            "engine": self.engine,
            "process_batches": self.process_batches,
            "rows": [r.to_dict() for r in self.rows],
        }

    def merged_line(self) -> str | None:
        """The line saying how the processes' statistics were merged, or None for one process."""
        if self.processes < 2:
            return None
        if self.process_batches is None:
            return (
                f"every batch split across {self.processes} processes ({self.engine}), its "
                "statistics all-reduced; values per channel count all of them"
            )
        shards = " + ".join(str(b) for b in self.process_batches)
        return (
            f"statistics of {self.processes} processes merged ({self.engine}), batches per "
            f"process {shards}; values per channel count all of them"
        )

    def __str__(self):
        width = max([len(r.name) for r in self.rows] + [9])
        lines = [
            f"{'BatchNorm':<{width}}  {'values/channel':>14}  {'mean shift':>10}  "
            f"{'std change':>10}  (in new standard deviations)"
        ]
        for r in self.rows:
            if r.skipped:
                lines.append(f"{r.name:<{width}}  {'-':>14}  {'-':>10}  {'-':>10}  {r.skipped}")
            else:
                lines.append(
                    f"{r.name:<{width}}  {r.values_per_channel:>14}  "
                    f"{r.mean_shift:>10.3g}  {r.std_change:>10.3g}"
                )
        lines.append(
            f"{len(self.rows)} BatchNorm(s) recalibrated over {self.batches} batches "
            f"({self.estimator} statistics)"
        )
        if self.merged_line():
            lines.append(self.merged_line())
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Collection


def _moments(bn, x, mask):
    """Per-channel `(count, pivot, shifted_mean, M2)` of one BatchNorm's batch input (its mean
    is `pivot + shifted_mean`, added in float64 by the caller), and its training-mode
    output, normalized with those statistics: `_tf_kernels.recalibration_moments` on TensorFlow
    (float64 sums), `_ops_moments` on the other backends."""
    if BACKEND == "tensorflow":
        return _tf_kernels.recalibration_moments(bn, x, mask)
    return _ops_moments(bn, x, mask)


def _ops_moments(bn, x, mask):
    """`_moments` in keras.ops (JAX, PyTorch): the layer's own training statistics
    (`_stats.moments`: shifted by one sample, then two passes), in float32 (float64 for
    float64 inputs; JAX has none without jax_enable_x64), merged across batches in float64 on
    the host. The two-pass M2 of a batch is the sum of squared deviations from its own mean,
    so it keeps its digits without the float64 sums of the TensorFlow path (held to NumPy's
    float64 statistics by tests/test_backends.py). The mean comes back in its two parts,
    the pivot (one sample) and the mean of `x - pivot`, added in float64 on the host: their
    float32 sum would round the mean at the scale of the sample, not of the spread."""
    rank = len(x.shape)
    axis = bn.axis % rank
    axes = [i for i in range(rank) if i != axis]
    dtype = "float64" if keras.backend.standardize_dtype(x.dtype) == "float64" else "float32"
    out_dtype, x = x.dtype, ops.cast(x, dtype)
    gamma, beta = _stats.gamma_beta(bn, x.shape[axis], dtype)
    shape = [1] * rank
    shape[axis] = -1
    epsilon = ops.convert_to_tensor(bn.epsilon, dtype=dtype)
    if mask is None:
        pivot, shifted_mean, variance, count = _stats.moments(x, axes, shift=True)
        centered = (x - pivot) - shifted_mean
    else:
        centered, pivot, variance, count = _stats.moments(x, axes, mask)
        shifted_mean = ops.zeros_like(pivot)
    inv = ops.reshape(gamma, shape) * ops.rsqrt(variance + epsilon)
    outputs = ops.cast(centered * inv + ops.reshape(beta, shape), out_dtype)
    count, pivot, shifted_mean = (ops.reshape(t, (-1,)) for t in (count, pivot, shifted_mean))
    return (count, pivot, shifted_mean, ops.reshape(variance, (-1,)) * count), outputs


def _collector(model, targets):
    """A function of one batch (a list of input tensors) returning {layer id: [(count, pivot,
    shifted_mean, M2) per call]} for `targets` (the BatchNorms to recalibrate), running them on
    batch statistics and everything else in inference mode (`_graph.run_inference`). A BatchNorm
    called more than once in the graph (a shared layer) reports each call. Traced once per
    replica under a strategy: each trace collects into its own dict."""

    def collect(inputs):
        collected = {}

        def replace(op):
            if id(op) not in targets:
                return None

            def call(x, *args, mask=None, **kwargs):
                if mask is None:
                    mask = internals.keras_mask(x)
                stats, outputs = _moments(op, x, mask)
                collected.setdefault(str(id(op)), []).append(stats)
                return internals.set_keras_mask(outputs, mask)

            return call

        run_inference(model, inputs, replace)
        return collected

    return collect


def _step(model, targets, strategy):
    """The compiled collection step, `step(inputs) -> {key: [(count, pivot, shifted_mean, M2),
    ...]}` as NumPy.

    Without a strategy (or with one replica) one `tf.function` with a fixed input signature, so
    the partial last batch does not retrace. Under a strategy with several replicas each global
    batch is split by rows across the replicas (replica r of R takes rows r*k to (r+1)*k,
    k = ceil(B / R); under MultiWorkerMirroredStrategy each worker takes its replicas' rows of the
    same global batch), the statistics are all-reduced inside `_moments`, and replica 0's copy is
    returned."""
    collect = _collector(model, targets)
    if BACKEND == "jax":
        return _jax_step(model, collect)
    if BACKEND != "tensorflow":
        # Eagerly, as Keras's own torch trainer runs by default (torch.compile would compile
        # the model for a pass over the data).
        def eager(inputs):
            with _no_gradient():
                return keras.tree.map_structure(ops.convert_to_numpy, collect(inputs))

        return eager
    if strategy is None or strategy.num_replicas_in_sync == 1:
        signature = [
            [tf.TensorSpec((None, *x.shape[1:]), x.dtype) for x in keras.tree.flatten(model.inputs)]
        ]
        compiled = tf.function(collect, input_signature=signature, autograph=False)
        return lambda inputs: keras.tree.map_structure(lambda t: t.numpy(), compiled(inputs))

    replicas = strategy.num_replicas_in_sync

    @tf.function(reduce_retracing=True, autograph=False)
    def run(distributed):
        return strategy.run(collect, args=(distributed,))

    def step(inputs):
        k = -(-int(inputs[0].shape[0]) // replicas)

        def rows(context):
            start = context.replica_id_in_sync_group * k
            return [t[start : start + k] for t in inputs]

        distributed = strategy.experimental_distribute_values_from_function(rows)
        results = run(distributed)
        return keras.tree.map_structure(
            lambda t: strategy.experimental_local_results(t)[0].numpy(), results
        )

    return step


def _jax_step(model, collect):
    """The collection step on JAX: `jax.jit` of `collect` with the model's variables as
    arguments, read through `keras.StatelessScope` (as Keras's `stateless_call` reads them), so
    that the weights are inputs of the program, not constants baked into it. One compilation per
    input shape: the full batches and the partial last one. Compiled, a batch costs a fraction of
    an eager one, compilation included, and the statistics agree with the eager ones to float32
    rounding."""
    import jax

    variables = list(model.variables)
    # This process's whole copy of each weight, read once: in a run of several processes the
    # weights of a keras.distribution model span all of them, and each process reads its own
    # shard of the data with them (`_processes.local_jax_value`).
    values = [_processes.local_jax_value(v.value) for v in variables]

    def pure(values, inputs):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return collect(inputs)

    compiled = jax.jit(pure)

    def step(inputs):
        results = compiled(values, list(inputs))
        return keras.tree.map_structure(ops.convert_to_numpy, results)

    return step


def _no_gradient():
    """No autograd graph on PyTorch, where every op records one by default."""
    if BACKEND == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


class _Population:
    """Chan et al.'s parallel merge of (count, mean, M2) per channel, in float64."""

    def __init__(self, unbiased):
        self.unbiased = unbiased
        self.n = self.mean = self.m2 = None
        self.batches = 0

    def add(self, count, mean, m2):
        count, mean, m2 = (np.asarray(v, np.float64) for v in (count, mean, m2))
        self.batches += 1
        if self.n is None:
            self.n, self.mean, self.m2 = count, mean, m2
            return
        n = self.n + count
        delta = mean - self.mean
        with np.errstate(invalid="ignore", divide="ignore"):
            weight = np.where(n > 0, count / n, 0.0)
            self.mean = self.mean + delta * weight
            self.m2 = self.m2 + m2 + np.where(n > 0, delta**2 * self.n * count / n, 0.0)
        self.n = n

    def result(self):
        denominator = self.n - 1 if self.unbiased else self.n
        return self.mean, self.m2 / denominator

    def to_vector(self):
        """`[batches, n, mean, M2]` (per channel), what one process sends to the others."""
        return np.concatenate([[float(self.batches)], self.n, self.mean, self.m2])

    @classmethod
    def from_vectors(cls, unbiased, rows):
        """The merge of every process's `to_vector`, in rank order (Chan's update again); None
        when no process saw a batch."""
        merged = cls(unbiased)
        batches = 0
        for batches_r, n, mean, m2 in _split_vectors(rows):
            if batches_r:  # an empty shard sends zeros: nothing to add
                merged.add(n, mean, m2)
                batches += int(batches_r)
        merged.batches = batches
        return merged if batches else None


class _BatchMean:
    """Equal-weight average of per-batch means and variances (fvcore / `update_bn`). A trailing
    batch with less than half the values of the first (a small remainder of the data) is merged
    into the batch before it (Chan's merge) instead of weighing as much as a full one: one row
    of data has variance 0, and as a batch of its own it would pull the average variance down
    by a whole batch's weight. A remainder of half a batch or more counts as a batch, as in
    `update_bn`. The two newest batches wait outside the sums, so that merging never subtracts
    from them."""

    def __init__(self, unbiased):
        self.unbiased = unbiased
        self.sum_mean = self.sum_var = 0.0
        self.summed = 0  # batches in the sums
        self.pending = []  # (count, mean, m2) of the newest batches, at most two
        self.n = None  # values per channel, all batches
        self.first = None  # the first batch's values per channel (its smallest)

    def _variance(self, count, m2):
        with np.errstate(invalid="ignore", divide="ignore"):
            return m2 / (count - 1 if self.unbiased else count)

    def _sum(self, row):
        count, mean, m2 = row
        self.sum_mean = self.sum_mean + mean
        self.sum_var = self.sum_var + self._variance(count, m2)
        self.summed += 1

    @property
    def batches(self):
        return self.summed + len(self.pending)

    def add(self, count, mean, m2):
        row = tuple(np.asarray(v, np.float64) for v in (count, mean, m2))
        self.n = row[0] if self.n is None else self.n + row[0]
        if self.first is None:
            self.first = float(np.min(row[0]))
        self.pending.append(row)
        if len(self.pending) > 2:
            self._sum(self.pending.pop(0))

    def result(self):
        sum_mean, sum_var, summed = self._closed()
        return sum_mean / summed, sum_var / summed

    def to_vector(self):
        """`[batches, n, sum of means, sum of variances]` (per channel), after this process's
        own trailing remainder is merged: what one process sends to the others."""
        sum_mean, sum_var, summed = self._closed()
        channels = np.shape(self.n)
        return np.concatenate(
            [[float(summed)], self.n, *(np.broadcast_to(v, channels) for v in (sum_mean, sum_var))]
        )

    @classmethod
    def from_vectors(cls, unbiased, rows):
        """Every process's batches averaged with equal weights (each process's trailing
        remainder merged into its own previous batch, as on one process); None when no
        process saw a batch."""
        merged = cls(unbiased)
        for summed, n, sum_mean, sum_var in _split_vectors(rows):
            if summed:
                merged.sum_mean = merged.sum_mean + sum_mean
                merged.sum_var = merged.sum_var + sum_var
                merged.summed += int(summed)
                merged.n = n if merged.n is None else merged.n + n
        return merged if merged.summed else None

    def _closed(self):
        """`(sum of means, sum of variances, batches)` of every batch so far, the trailing
        remainder merged."""
        sum_mean, sum_var, summed = self.sum_mean, self.sum_var, self.summed
        rows = list(self.pending)
        if len(rows) == 2 and 2 * np.min(rows[1][0]) < self.first:
            (n1, mean1, m21), (n2, mean2, m22) = rows
            n = n1 + n2
            with np.errstate(invalid="ignore", divide="ignore"):
                weight = np.where(n > 0, n2 / n, 0.0)
                delta = mean2 - mean1
                rows = [
                    (
                        n,
                        mean1 + delta * weight,
                        m21 + m22 + np.where(n > 0, delta**2 * n1 * n2 / n, 0.0),
                    )
                ]
        for count, mean, m2 in rows:
            sum_mean = sum_mean + mean
            sum_var = sum_var + self._variance(count, m2)
            summed += 1
        return sum_mean, sum_var, summed


def _split_vectors(rows):
    """Each process's `[batches, a, b, c]` vector (three per-channel parts) as its four parts."""
    channels = (rows.shape[1] - 1) // 3
    for row in rows:
        yield (
            row[0],
            row[1 : 1 + channels],
            row[1 + channels : 1 + 2 * channels],
            row[1 + 2 * channels :],
        )


def _merge_processes(processes, targets, accumulators, seen, error, estimator):
    """Every process's partial statistics, gathered through the engine's collective and merged in
    rank order: `(accumulators, batches per process)`, the same on every process. A process
    that failed, or read no batch, still joins both collectives (`_processes.gather_outcome`),
    so that no process waits for it."""
    estimate = _Population if estimator == "population" else _BatchMean
    parts = []
    for key, bn in targets.items():
        accumulator = accumulators.get(str(key))
        channels = int(bn.moving_mean.shape[0])
        parts.append(np.zeros(1 + 3 * channels) if accumulator is None else accumulator.to_vector())
    vector = np.concatenate(parts)
    per_process = _processes.gather_outcome(processes, error, seen, len(vector))
    rows = processes.gather(vector)
    merged, start = {}, 0
    for (key, bn), part in zip(targets.items(), parts):
        unbiased = getattr(bn, "unbiased_variance", False)
        accumulator = estimate.from_vectors(unbiased, rows[:, start : start + len(part)])
        start += len(part)
        if accumulator is not None:
            merged[str(key)] = accumulator
    return merged, per_process


def _run_step(model, step, inputs, index):
    """`step(inputs)`, with an exception the model raises on the caller's batch turned into a
    `KerasBNError` naming the batch (the data's problem, not a bug of keras_bn)."""
    try:
        return step(inputs)
    except KerasBNError:
        raise
    except Exception as error:
        raise model_failure(model, f"batch {index} of the data", inputs, error) from None


def recalibrate(
    model: keras.Model,
    data,
    *,
    batch_size: int = 32,
    batches: int | None = None,
    estimator: str = "population",
    only_trainable: bool = False,
    distributed="auto",
    verbose: int = 1,
) -> tuple[keras.Model, RecalibrationReport]:
    """Returns `(new_model, report)`: a copy of `model` whose BatchNorms (`keras_bn.BatchNorm`
    and `keras.layers.BatchNormalization`, nested models included) hold moving statistics
    estimated from `data`. The caller's model is not changed.

    Args:
        model: A Sequential or Functional model with at least one BatchNorm.
        data: An array, `(x, y)` (labels are ignored), a list or dict of arrays (one per input),
            a `tf.data.Dataset` or `keras.utils.PyDataset` of batches, or an iterable of batches.
        batch_size: Rows per batch when `data` is arrays. BatchNorms normalize with the statistics
            of their batch while the statistics of the layers after them are collected, as in
            training: use the training batch size.
        batches: Use at most this many batches (None: all).
        estimator: "population" (every value weighted equally, Wu & Johnson 2021) or
            "batch_mean" (the average of per-batch statistics, fvcore / `update_bn`); see the
            module docstring for the formulas.
        only_trainable: Leave BatchNorms with `trainable=False` alone. By default they are
            recalibrated too: freezing a BatchNorm for fine-tuning keeps its statistics from the
            old data, and stale statistics are exactly what this function is for.
        distributed: "auto" (default): in a distributed run (an initialized
            `torch.distributed` process group, JAX with several processes, a
            `tf.distribute` strategy) every process ends with the statistics of all the
            processes' data, identical everywhere; every process must call `recalibrate`.
            False: this process's data only. See the guide's "Distributed runs" for who
            shards the data on each engine.
        verbose: 1 (default) shows a Keras progress bar, 0 is silent, as in `model.predict`.

    Returns:
        `(new_model, report)`: the recalibrated copy, and a `RecalibrationReport` with one row per
        BatchNorm (values seen, how far the mean and standard deviation moved).

    Raises:
        KerasBNError: no BatchNorm, unusable data (wrong shape or dtype, no batch), or statistics
            that are not finite (NaN in the data); the caller's model is unchanged and nothing is
            returned.

    Example:
        ```python
        new_model, report = keras_bn.recalibrate(model, x_train, batch_size=64)
        print(report)
        new_model.evaluate(x_test, y_test)
        ```
    """
    require_graph(model, "recalibrate")
    if verbose not in (0, 1):  # True and False too
        raise KerasBNError(
            expected("Invalid `verbose`", "0 (silent) or 1 (progress bar)", repr(verbose))
        )
    if estimator not in ESTIMATORS:
        raise KerasBNError(
            expected("Unknown `estimator`", "'population' or 'batch_mean'", repr(estimator))
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KerasBNError(expected("Invalid `batch_size`", "an integer >= 1", repr(batch_size)))
    bns = [layer for layer in internals.all_layers(model) if isinstance(layer, BATCHNORM_TYPES)]
    if not bns:
        raise KerasBNError(
            expected(
                "The model has no BatchNorm to recalibrate",
                "a model with keras_bn.BatchNorm or keras.layers.BatchNormalization layers",
                f"model '{model.name}' without one",
            )
        )
    targets = {id(bn): bn for bn in bns if bn.trainable or not only_trainable}
    strategy = None
    if BACKEND == "tensorflow" and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    processes = _processes.find(distributed, strategy)
    _processes.refuse_local_writes_to_global_variables(model, distributed)
    # distributed=False under a strategy: one device's step, outside the replicas.
    step = _step(model, targets, strategy if distributed else None)

    def copy_model():  # same architecture and weights, in the caller's strategy scope
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            copy = keras.models.clone_model(model)
            copy.set_weights(model.get_weights())
        return copy

    # The copy is made on a second thread while the data runs (TF runs its kernels without the
    # GIL): on ResNet50 it costs about a sixth of a predict over 64 images when made after. Not
    # in a distributed run, where making variables can be a collective of its own.
    with in_background(copy_model, inline=processes is not None) as pending:
        accumulators, seen, error = _read_data(
            model, step, targets, data, batch_size, batches, estimator, verbose, processes
        )
    per_process = None
    if processes is not None and processes.merges_at_the_end:
        accumulators, per_process = _merge_processes(
            processes, targets, accumulators, seen, error, estimator
        )
        seen = sum(per_process)
    copy = pending.result()
    if seen == 0:
        raise KerasBNError(expected("The data gave no batch", "at least one batch", "none"))
    new_stats = _checked_statistics(targets, accumulators)
    report = RecalibrationReport(estimator=estimator, batches=seen, process_batches=per_process)
    if processes is not None:
        report.processes, report.engine = processes.count, processes.engine
    paths = {id(site.layer): site.path for site in walk(model)}  # "outer/inner/bn"
    copies = [layer for layer in internals.all_layers(copy) if isinstance(layer, BATCHNORM_TYPES)]
    for old, new in zip(bns, copies):
        if id(old) not in new_stats:
            report.rows.append(
                RecalibrationRow(
                    paths[id(old)], 0, 0, 0.0, 0.0, skipped="trainable=False (only_trainable=True)"
                )
            )
            continue
        mean, var, accumulator = new_stats[id(old)]
        report.rows.append(_assign(old, new, mean, var, accumulator, paths[id(old)]))
    return copy, report


def _batch_budget(data, batch_size, batches):
    """The number of batches the progress bar expects (None: unknown); data that never ends
    needs `batches=`."""
    total = _data.known_batch_count(data, batch_size)
    if total is _data.INFINITE and batches is None:
        raise KerasBNError(
            expected(
                "The data never ends",
                "finite data, or `batches=` (keras-bn: the data file is finite)",
                f"an infinite {type(data).__name__} (a repeat() without a count?)",
            )
        )
    if total is _data.INFINITE:
        total = None
    if batches is not None:
        total = batches if total is None else min(total, batches)
    return total


def _read_data(model, step, targets, data, batch_size, batches, estimator, verbose, processes):
    """`_accumulate` over this process's data: `(accumulators, batches, error)`. An error is
    raised, except in a run whose processes merge at the end: there it is returned, for
    `_merge_processes` to raise on every process once all of them have joined it."""
    try:
        total = _batch_budget(data, batch_size, batches)
        bar = keras.utils.Progbar(total, verbose=progress_verbose(verbose), unit_name="batch")
        return (*_accumulate(model, step, targets, data, batch_size, batches, estimator, bar), None)
    except Exception as error:
        if processes is None or not processes.merges_at_the_end:
            raise
        return {}, 0, error


def _accumulate(model, step, targets, data, batch_size, batches, estimator, bar):
    """Runs the collection step over the data: ({layer key: estimator}, batches seen)."""
    accumulators = {}
    seen = 0
    for inputs in _data.batches(model, data, batch_size):
        if batches is not None and seen >= batches:
            break
        for key, calls in _run_step(model, step, inputs, seen).items():
            accumulator = accumulators.get(key)
            if accumulator is None:
                estimate = _Population if estimator == "population" else _BatchMean
                unbiased = getattr(targets[int(key)], "unbiased_variance", False)
                accumulator = accumulators[key] = estimate(unbiased)
            for count, pivot, shifted_mean, m2 in calls:
                # The mean's two parts added in float64 (see _ops_moments).
                mean = np.asarray(pivot, np.float64) + np.asarray(shifted_mean, np.float64)
                accumulator.add(count, mean, m2)
        seen += 1
        bar.update(seen)
    return accumulators, seen


def _checked_statistics(targets, accumulators):
    """{id(bn): (mean, variance, accumulator)}, or a KerasBNError for statistics that must not
    be written: fewer than 2 values per channel, NaN or Inf, or values the layer's dtype cannot
    hold. In the model's order, not the order the step returned them in (jax.jit returns a dict
    with its keys sorted): the first of the model's BatchNorms at fault is the one named."""
    new_stats = {}
    for key, bn in targets.items():
        accumulator = accumulators.get(str(key))
        if accumulator is None:
            continue
        seen_min = int(np.min(accumulator.n))
        if seen_min < 2:
            raise KerasBNError(
                expected(
                    f"BatchNorm '{bn.name}' saw too few values to estimate a variance",
                    "at least 2 values per channel (more rows of data)",
                    f"{seen_min} value(s) in a channel",
                    "Pass more data; the model is unchanged.",
                )
            )
        mean, var = accumulator.result()
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
            raise KerasBNError(
                expected(
                    f"BatchNorm '{bn.name}' got statistics that are not finite",
                    "finite data",
                    "NaN or Inf in its inputs",
                    "Check the data for NaN/Inf; the model is unchanged.",
                )
            )
        # Judged in the dtype the layer stores them in: a float16 BatchNorm cannot hold a
        # variance above 65504, and a cast would write inf.
        stored = keras.backend.standardize_dtype(bn.moving_variance.dtype)
        with np.errstate(over="ignore"):
            fits = np.all(np.isfinite(mean.astype(stored))) and np.all(
                np.isfinite(var.astype(stored))
            )
        if not fits:
            largest = max(float(np.max(np.abs(mean))), float(np.max(var)))
            raise KerasBNError(
                expected(
                    f"BatchNorm '{bn.name}' got statistics its {stored} variables cannot hold",
                    f"statistics within {stored}'s range (largest {float(np.finfo(stored).max):g})",
                    f"a value of {largest:.4g}",
                    "Keep the BatchNorm's variables in float32 (mixed precision does), or "
                    "scale its inputs; the model is unchanged.",
                )
            )
        new_stats[id(bn)] = (mean, var, accumulator)
    return new_stats


def _assign(old, new, mean, var, accumulator, path):
    """Writes the statistics into the copy's BatchNorm `new`; the row says how far they moved
    from `old`'s."""
    old_mean = np.asarray(old.moving_mean, np.float64)
    old_var = np.asarray(old.moving_variance, np.float64)
    new_std = np.sqrt(var + old.epsilon)
    new.moving_mean.assign(mean.astype(new.moving_mean.dtype))
    new.moving_variance.assign(var.astype(new.moving_variance.dtype))
    if getattr(new, "moving_stddev", None) is not None:  # batch renormalization's (either layer)
        # Renorm derives the moving variance from it (moving_stddev**2 - epsilon) after the next
        # training step: it must agree with the new variance.
        new.moving_stddev.assign(new_std.astype(new.moving_stddev.dtype))
    if isinstance(new, BatchNorm) and new.momentum is None:
        new.num_batches_tracked.assign(accumulator.batches)
    return RecalibrationRow(
        name=path,
        values_per_channel=int(np.min(accumulator.n)),
        batches=accumulator.batches,
        mean_shift=float(np.max(np.abs(mean - old_mean) / new_std)),
        std_change=float(np.max(np.abs(np.sqrt(old_var + old.epsilon) - new_std) / new_std)),
    )
