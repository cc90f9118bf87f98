"""`diagnose`: why a BatchNorm model is bad at inference, without changing anything.

Per BatchNorm: the mode it runs in under `fit` and why (the fine-tuning question), whether its
statistics are still their initial values, channels whose inference scale `gamma/sqrt(var+eps)`
is huge (noise amplifiers, float16 overflow after folding), corrupt statistics, and, given data,
how far the moving statistics are from the data's population statistics and what that costs the
model's outputs. Each row ends in a verdict and the action to take.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from keras_bn import _data, _processes
from keras_bn._graph import BATCHNORM_TYPES, require_graph, walk
from keras_bn.fold import (
    DisplayEnum,
    fold_bn,
    statistics_problem,
)
from keras_bn.recalibration import recalibrate
from keras_bn.verification import compare, run_inference, run_original

# An inference scale gamma / sqrt(var + eps) above this amplifies noise and, folded into a
# float16 kernel, can overflow it.
LARGE_SCALE = 1e3
# Drift, in population standard deviations, past which the moving statistics are wrong.
DRIFT_LIMIT = 0.5
# Weight of the initial 0/1 in the moving statistics past which they are stale (5%: Keras's
# momentum 0.99 gets there after 299 updates).
STALE_WEIGHT = 0.05
# Share of the deviation from the population statistics that the initial values must explain
# (cos^2 between the two), in the means and in the variances each, before the deviation is read
# as a leftover of them.
EXPLAINED = 0.75
# A channel whose moving variance is below this share of epsilon is dead: its inputs do not vary
# (a ReLU before it that never fires), and the BatchNorm outputs a constant there.
DEAD_VARIANCE = 1e-2


def _initial_weight(mean, var, pop_mean, pop_var, epsilon):
    """Least-squares w in `moving = w * initial + (1 - w) * population` (initial: mean 0,
    variance 1), fitted to the means and to the variances of every channel separately, each in
    units of its population scale (std for means, variance + eps for variances): 0 for converged
    statistics, 1 for untouched ones; the smaller of the two, clipped to [0, 1].

    None unless the initial values explain the deviation in both: at least 75% of its squared
    norm (cos^2 >= 0.75) in the means and in the variances, each moved towards 0/1. Statistics
    from other data (means far from 0 and variances far from 1, moved anywhere) are then not
    mistaken for a leftover of the initial values because one of the two happens to point that
    way. A random deviation passes 0.75 one time in 170 over 3 channels, one in 850 over 4, and
    never in 200,000 random draws over 32 (for either of the two). Also None when the data's own
    statistics are 0/1 in both, so that there is nothing to tell apart."""
    std = np.sqrt(pop_var + epsilon)
    parts = (
        ((mean - pop_mean) / std, (0.0 - pop_mean) / std),
        ((var - pop_var) / (pop_var + epsilon), (1.0 - pop_var) / (pop_var + epsilon)),
    )
    weights = []
    for moved, initial in parts:
        norm, deviation = float(np.dot(initial, initial)), float(np.dot(moved, moved))
        if not norm > 1e-12:
            continue  # this part cannot tell: the population is at its initial value
        projection = float(np.dot(moved, initial))
        if deviation > 0 and (projection <= 0 or projection**2 < EXPLAINED * norm * deviation):
            return None
        weights.append(float(np.clip(projection / norm, 0.0, 1.0)))
    return min(weights) if weights else None


class Verdict(DisplayEnum):
    """Worst first: the order is the severity."""

    CORRUPT = "corrupt"
    STALE = "stale"
    DRIFTED = "drifted"
    FLOAT16 = "float16 unsafe"
    DEAD = "dead channels"
    OK = "ok"


_ACTIONS = {
    Verdict.CORRUPT: "recompute the statistics: keras_bn.recalibrate(model, data)",
    Verdict.STALE: "recalibrate with keras_bn.recalibrate, or lower momentum to 0.9 for short runs",
    Verdict.DRIFTED: "recalibrate with keras_bn.recalibrate on data like the inference data",
    Verdict.FLOAT16: "export float32, or float16 with this layer's producer kept float32 "
    "(to_onnx(..., precision='float16', keep_float=[...]))",
    Verdict.DEAD: "these channels output a constant: the activation before them never fires "
    "on the training data; prune them, or check that layer's initialization and learning rate",
    Verdict.OK: "",
}


@dataclasses.dataclass
class DiagnosisRow:
    name: str
    mode_under_fit: str  # "training" or "inference"
    mode_reason: str
    momentum: float | None
    updates_to_forget_init: int | None  # updates until the initial value weighs < 1%
    initial_values: bool  # moving mean all 0 and moving variance all 1
    large_scale_channels: int
    problem: str | None  # corrupt statistics
    dead_channels: int = 0  # moving variance < DEAD_VARIANCE * epsilon
    # gamma <= 0: such a channel's scale cannot fold through a ReLU before the BatchNorm
    nonpositive_gammas: int = 0
    float16: str | None = None  # why its folded weights do not survive float16
    drift: float | None = None  # max |moving_mean - mean| / std over channels (with data)
    variance_ratio: float | None = None  # max over channels of max(r, 1/r), r = moving/pop var
    # With data: the weight w the initial values (0, 1) still have in the moving statistics,
    # moving ~ w * initial + (1 - w) * population, and the updates that leave that weight,
    # log(w) / log(momentum).
    initial_weight: float | None = None
    updates_seen: int | None = None
    verdict: Verdict = Verdict.OK
    action: str = ""

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "verdict": self.verdict.value}


@dataclasses.dataclass
class DiagnosisReport:
    rows: list[DiagnosisRow] = dataclasses.field(default_factory=list)
    output_error: float | None = None  # max relative output change after recalibration

    @property
    def verdict(self) -> Verdict:
        order = list(Verdict)
        return min((r.verdict for r in self.rows), key=order.index, default=Verdict.OK)

    @property
    def healthy(self) -> bool:
        return self.verdict == Verdict.OK

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict.value,
            "healthy": self.healthy,
            "output_error": self.output_error,
            "rows": [r.to_dict() for r in self.rows],
        }

    def __str__(self):
        width = max([len(r.name) for r in self.rows] + [9])
        lines = [
            f"{'BatchNorm':<{width}}  {'verdict':<8}  {'under fit':<9}  {'drift':>6}  "
            f"{'var ratio':>9}  notes"
        ]
        for r in self.rows:
            notes = [r.mode_reason]
            if r.initial_weight is not None and r.initial_weight >= STALE_WEIGHT:
                seen = f", as after about {r.updates_seen} updates" if r.updates_seen else ""
                needs = (
                    f"; momentum {r.momentum} needs {r.updates_to_forget_init}"
                    if r.updates_to_forget_init
                    else ""
                )
                notes.append(
                    f"the initial 0/1 still weighs {100 * r.initial_weight:.0f}% in the moving "
                    f"statistics{seen}{needs}"
                )
            if r.initial_values:
                notes.append(
                    f"statistics still 0/1 (momentum {r.momentum} forgets them after "
                    f"{r.updates_to_forget_init} updates)"
                    if r.updates_to_forget_init
                    else "statistics still 0/1"
                )
            if r.large_scale_channels:
                notes.append(
                    f"{r.large_scale_channels} channel(s) with gamma/sqrt(var+eps) > "
                    f"{LARGE_SCALE:g}"
                )
            if r.problem:
                notes.append(r.problem)
            if r.dead_channels:
                notes.append(
                    f"{r.dead_channels} dead channel(s) (moving variance < "
                    f"{DEAD_VARIANCE:g} x epsilon)"
                )
            if r.nonpositive_gammas:
                notes.append(
                    f"{r.nonpositive_gammas} channel(s) with gamma <= 0 (they keep a multiply "
                    "when folding through a ReLU)"
                )
            if r.float16:
                notes.append(f"for float16, folded {r.float16}")
            drift = "-" if r.drift is None else f"{r.drift:.3g}"
            ratio = "-" if r.variance_ratio is None else f"{r.variance_ratio:.3g}"
            lines.append(
                f"{r.name:<{width}}  {r.verdict.value:<8}  {r.mode_under_fit:<9}  "
                f"{drift:>6}  {ratio:>9}  {'; '.join(n for n in notes if n)}"
            )
            if r.action:
                lines.append(f"{'':<{width}}  -> {r.action}")
        if self.output_error is not None:
            lines.append(
                f"outputs change by {self.output_error:.3g} (relative to their scale) "
                "when the statistics are recalibrated on the data"
            )
        lines.append(f"overall: {self.verdict.value}")
        return "\n".join(lines)


def _diagnose_layer(site, float16, population):
    """The `DiagnosisRow` of one BatchNorm; `population` is its recalibrated copy, or None
    without data."""
    layer = site.layer
    if site.frozen_by:
        mode, why = "inference", f"inside frozen model '{site.frozen_by}'"
    elif not layer.trainable:
        mode, why = "inference", "trainable=False"
    elif site.inference_call:
        mode, why = "inference", "called with training=False"
    else:
        mode, why = "training", ""
    mean = np.asarray(layer.moving_mean, np.float64)
    var = np.asarray(layer.moving_variance, np.float64)
    gamma = np.asarray(layer.gamma, np.float64) if layer.scale else np.ones_like(mean)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.abs(gamma) / np.sqrt(var + layer.epsilon)
    row = DiagnosisRow(
        name=site.path,
        mode_under_fit=mode,
        mode_reason=why,
        momentum=layer.momentum,
        updates_to_forget_init=_updates_to_forget(layer.momentum),
        initial_values=bool(np.all(mean == 0.0) and np.all(var == 1.0)),
        large_scale_channels=int(np.sum(scale > LARGE_SCALE)),
        problem=statistics_problem(layer),
        dead_channels=int(np.sum(var < DEAD_VARIANCE * layer.epsilon)),
        nonpositive_gammas=int(np.sum(gamma <= 0)),
        float16=float16,
    )
    if population is not None and row.problem is None:
        pop_mean = np.asarray(population.moving_mean, np.float64)
        pop_var = np.asarray(population.moving_variance, np.float64)
        std = np.sqrt(pop_var + layer.epsilon)
        row.drift = float(np.max(np.abs(mean - pop_mean) / std))
        ratio = (var + layer.epsilon) / (pop_var + layer.epsilon)
        row.variance_ratio = float(np.max(np.maximum(ratio, 1.0 / ratio)))
        row.initial_weight = _initial_weight(mean, var, pop_mean, pop_var, layer.epsilon)
        momentum = layer.momentum
        if row.initial_weight and momentum and 0.0 < momentum < 1.0:
            row.updates_seen = round(math.log(row.initial_weight) / math.log(momentum))
    if row.problem:
        row.verdict = Verdict.CORRUPT
    elif mode == "training" and (
        row.initial_values
        or (row.initial_weight is not None and row.initial_weight >= STALE_WEIGHT)
    ):
        row.verdict = Verdict.STALE
    elif row.drift is not None and (row.drift > DRIFT_LIMIT or row.variance_ratio > 2.0):
        row.verdict = Verdict.DRIFTED
    elif row.float16:
        row.verdict = Verdict.FLOAT16
    elif row.dead_channels:
        row.verdict = Verdict.DEAD
    row.action = _ACTIONS[row.verdict]
    return row


def _updates_to_forget(momentum):
    """Updates until the initial value weighs less than 1%: momentum**n < 0.01."""
    if momentum is None or not 0.0 < momentum < 1.0:
        return None
    return math.ceil(math.log(0.01) / math.log(momentum))


def diagnose(
    model: keras.Model, data=None, *, batch_size: int = 32, distributed="auto", verbose: int = 0
) -> DiagnosisReport:
    """Diagnoses the BatchNorms of `model` (nothing is changed) and returns a `DiagnosisReport`;
    `report.healthy` is False when any row's verdict is not "ok".

    Without `data`: the mode under `fit` (inference when the layer has `trainable=False`, is
    called with `training=False`, or sits inside a frozen nested model), statistics still equal
    to their initializers (0 and 1), channels with `gamma/sqrt(var+eps)` above 1e3, corrupt
    statistics, dead channels (moving variance below 1% of epsilon: the activation before them
    never fired), channels with `gamma <= 0` (they cannot fold through a ReLU), and folded
    weights that float16 cannot hold (`keras_bn.fold_math.float16_problem`: overflow, or more
    than 1% of them below float16's smallest normal number).

    With `data` (any form `keras_bn.recalibrate` takes): each layer's drift from the data's
    population statistics, in population standard deviations, the variance ratio, the weight
    the initial 0/1 still has in the moving statistics (stale when it is 5% or more: a
    short run whose exponential average has not forgotten its start, the usual "good in
    training, bad at inference"), and how much the model's outputs change when the statistics
    are recalibrated.

    Args:
        model: A Sequential or Functional model with at least one BatchNorm.
        data: Optional data, in any form `keras_bn.recalibrate` takes (labels are ignored).
        batch_size: Rows per batch when `data` is arrays; use the training batch size.
        distributed: As for `keras_bn.recalibrate`: "auto" (default) compares with the
            statistics of every process's data in a distributed run, so that every process
            reports the same verdicts; False, this process's data only.
        verbose: 1 shows the progress bar of the recalibration with `data`; 0 (default) is
            silent.

    Returns:
        A `DiagnosisReport`: one row per BatchNorm with its verdict (ok, dead channels,
        float16 unsafe, drifted, stale, corrupt) and the action to take; `report.healthy`,
        `report.verdict` (the worst), `report.to_dict()`.

    Raises:
        KerasBNError: A model without a graph or without BatchNorm, or unusable data.

    Example:
        ```python
        report = keras_bn.diagnose(model, x_train)
        print(report)
        if not report.healthy:
            model, _ = keras_bn.recalibrate(model, x_train)
        ```
    """
    require_graph(model, "diagnose")
    report = DiagnosisReport()
    _, plan = fold_bn(model, verify=False)  # what folding would write, for float16
    float16 = {row.name: row.float16 for row in plan.rows}  # by path, "outer/inner/bn"
    population = None
    if data is not None:
        recalibrated, _ = recalibrate(
            model, data, batch_size=batch_size, distributed=distributed, verbose=verbose
        )
        # By path: same-named BatchNorms in two nested models are two layers.
        population = {
            site.path: site.layer
            for site in walk(recalibrated)
            if isinstance(site.layer, BATCHNORM_TYPES)
        }
    for site in walk(model):
        if isinstance(site.layer, BATCHNORM_TYPES):
            ref = None if population is None else population[site.path]
            report.rows.append(_diagnose_layer(site, float16.get(site.path), ref))
    if not report.rows:
        from keras_bn.errors import KerasBNError, expected

        raise KerasBNError(
            expected(
                "The model has no BatchNorm to diagnose",
                "a model with BatchNorm layers",
                f"model '{model.name}' without one",
            )
        )
    if population is not None:
        first = next(
            _data.batches(model, data, batch_size), None
        )  # None: a spent one-shot iterator
        if first is not None:
            before = keras.tree.flatten(run_original(model, first, "first batch of the data"))
            after = keras.tree.flatten(run_inference(recalibrated, first, as_numpy=True))
            report.output_error = max(compare(b, a).max_rel for b, a in zip(before, after))
        report.output_error = _largest_over_processes(report.output_error, distributed)
    return report


def _largest_over_processes(error, distributed):
    """The output change on the first batch of every process's shard, the largest (None when no
    process had a batch), so that every process of a distributed run reports one number."""
    processes = _processes.find(distributed)
    if processes is None or not processes.merges_at_the_end:
        return error
    errors = processes.gather(np.array([np.nan if error is None else error]))[:, 0]
    errors = errors[~np.isnan(errors)]
    return float(errors.max()) if errors.size else None
