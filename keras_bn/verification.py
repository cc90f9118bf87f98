"""Verification shared by `fold_bn` and `keras_bn.export`: inputs, the acceptance rule, and the one
table of tolerances.

Acceptance rule, per output: `max|candidate - reference| <= atol + rtol * scale`, where `scale`
is the largest finite |value| of THAT output of the original model (an output of magnitude 1e3
does not loosen the check of an output of magnitude 1). NaN or Inf in the candidate agree only
where the original model produced the same value at the same place.

Tolerances follow the lowest-precision compute dtype of the model's layers: a `mixed_float16`
model cannot agree to float32 digits, because a fold or a conversion changes the float16 rounding
of every layer after it by about one unit in the last place (2**-10 relative, 2**-7 for bfloat16).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses

import keras
import numpy as np

from keras_bn import _keras_internals as internals
from keras_bn.errors import KerasBNError, expected, one_line, plain_text


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float  # relative to the largest |value| of the output being compared
    atol: float

    def accepts(self, max_abs: float, scale: float) -> bool:
        return bool(np.isfinite(max_abs) and max_abs <= self.atol + self.rtol * scale)


# The one place for tolerances. float32: a fold or a conversion reorders float32 sums (~1e-7
# relative per layer). float16 and bfloat16: about ten units in the last place of the dtype.
TOLERANCES = {
    "float32": Tolerance(rtol=1e-5, atol=1e-6),
    "float64": Tolerance(rtol=1e-5, atol=1e-6),  # verification still runs float32 graphs (ONNX)
    "float16": Tolerance(rtol=1e-2, atol=1e-3),
    "bfloat16": Tolerance(rtol=5e-2, atol=5e-3),
}
_PRECISION_ORDER = ["bfloat16", "float16", "float32", "float64"]


def compute_dtype(model: keras.Model) -> str:
    """The lowest-precision compute dtype of the model's layers ('float32' when none is set)."""
    found = {getattr(layer, "compute_dtype", None) for layer in internals.all_layers(model)}
    for dtype in _PRECISION_ORDER:
        if dtype in found:
            return dtype
    return "float32"


def tolerance_for(
    model: keras.Model, rtol: float | None = None, atol: float | None = None
) -> Tolerance:
    """The model's default `Tolerance` (by `compute_dtype`), with `rtol`/`atol` overriding it."""
    default = TOLERANCES[compute_dtype(model)]
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not np.isfinite(value)
            or value < 0
        ):
            raise KerasBNError(
                expected(
                    f"Invalid `{name}`",
                    "a finite number >= 0, or None for the default of the model's compute dtype",
                    f"{name}={value!r}",
                )
            )
    return Tolerance(
        rtol=default.rtol if rtol is None else float(rtol),
        atol=default.atol if atol is None else float(atol),
    )


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One output on one input set."""

    max_abs: float
    max_rel: float  # max_abs / scale
    scale: float  # largest finite |reference value|


def compare(reference, candidate) -> Comparison:
    """Compares ONE output. Positions where the reference is NaN/Inf agree only with the same
    value in the candidate; anywhere else a NaN/Inf in the candidate is an infinite error."""
    r = np.asarray(reference, np.float64)
    c = np.asarray(candidate, np.float64)
    if r.shape != c.shape:
        return Comparison(float("inf"), float("inf"), 0.0)
    with np.errstate(invalid="ignore"):
        same_special = (~np.isfinite(r)) & ((r == c) | (np.isnan(r) & np.isnan(c)))
        diff = np.where(same_special, 0.0, np.abs(r - c))
    diff = np.where(np.isnan(diff), np.inf, diff)
    max_abs = float(np.max(diff)) if diff.size else 0.0
    finite = np.abs(r[np.isfinite(r)])
    scale = float(np.max(finite)) if finite.size else 0.0
    return Comparison(max_abs, max_abs / scale if scale > 0 else max_abs, scale)


def output_names(model: keras.Model) -> list[str]:
    """The model's output names. Keras 3.15's Sequential has no `output_names`: there the name is
    that of the layer making each output."""
    names = getattr(model, "output_names", None)
    if names:
        return list(names)
    return list(internals.graph_model(model).output_names)


# Reduced-precision exports are accepted by agreement, not elementwise tolerance: the defaults
# of `keras_bn.export.to_onnx(precision=...)` (top-1 agreement and cosine similarity with the
# float32 Keras model, per output).
AGREEMENT = {
    "float16": {"min_agreement": 0.99, "min_cosine": 0.999},
    "int8": {"min_agreement": 0.98, "min_cosine": 0.99},
}


@dataclasses.dataclass(frozen=True)
class Agreement:
    """One output of a reduced-precision graph against the float32 reference, on one input set.
    `top1` is None for outputs that are not classification-shaped (rank 2 with >= 2 classes);
    the accuracies are None without labels."""

    top1: float | None  # share of samples whose argmax is the reference's
    cosine: float  # of the flattened outputs, in float64
    mean_abs_rel: float  # mean |candidate - reference| / scale
    max_abs_rel: float  # max |candidate - reference| / scale
    reference_accuracy: float | None = None
    accuracy: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def agreement(reference, candidate, labels=None) -> Agreement:
    """Compares ONE output of a quantized or float16 graph with the float32 reference: top-1
    agreement (classification-shaped outputs), cosine similarity, mean and max absolute error
    relative to the reference's scale (largest finite |value|), and, given integer `labels`, the
    accuracy of both. A non-finite candidate value counts as disagreement everywhere it stands."""
    r = np.asarray(reference, np.float64)
    c = np.asarray(candidate, np.float64)
    if r.shape != c.shape:
        raise KerasBNError(
            expected(
                "The reduced-precision graph's output has another shape",
                f"shape {r.shape}",
                f"shape {c.shape}",
                "This is a bug in keras-bn; report it with the model.",
            )
        )
    finite = np.isfinite(r)
    scale = float(np.max(np.abs(r[finite]))) if finite.any() else 0.0
    error = np.where(np.isfinite(c), np.abs(c - r), np.inf)
    denominator = scale if scale > 0 else 1.0
    flat_r, flat_c = r.ravel(), np.where(np.isfinite(c), c, 0.0).ravel()
    norms = float(np.linalg.norm(flat_r) * np.linalg.norm(flat_c))
    cosine = float(np.dot(flat_r, flat_c) / norms) if norms > 0 else float(np.array_equal(r, c))
    if not np.all(np.isfinite(c)):
        cosine = min(cosine, 0.0)
    top1 = reference_accuracy = accuracy = None
    if r.ndim == 2 and r.shape[1] >= 2:
        predicted, expected_class = np.argmax(flat_c.reshape(c.shape), 1), np.argmax(r, 1)
        top1 = float(np.mean(predicted == expected_class))
        if labels is not None:
            y = np.asarray(labels).reshape(-1)
            reference_accuracy = float(np.mean(expected_class == y))
            accuracy = float(np.mean(predicted == y))
    return Agreement(
        top1=top1,
        cosine=cosine,
        mean_abs_rel=float(np.mean(error) / denominator),
        max_abs_rel=float(np.max(error) / denominator),
        reference_accuracy=reference_accuracy,
        accuracy=accuracy,
    )


# The lengths tried, smallest first, for a dimension the model leaves open (None): powers of two,
# which also divide evenly through the poolings and strides of most models. The largest bounds
# the memory of a synthetic batch.
OPEN_DIMENSIONS = tuple(2**k for k in range(4, 17))  # 16 ... 65536


def batch_size_of(model: keras.Model, default: int = 4) -> int:
    """The batch size the model's inputs fix (`keras.Input(batch_size=...)`), else `default`."""
    fixed = {x.shape[0] for x in keras.tree.flatten(model.inputs) if x.shape[0] is not None}
    return fixed.pop() if len(fixed) == 1 else default


def fixed_batch(model: keras.Model) -> bool:
    """Whether the model's inputs fix the batch size."""
    return any(x.shape[0] is not None for x in keras.tree.flatten(model.inputs))


def _accepts(model, shapes, batch) -> bool:
    """Whether Keras's symbolic shape inference runs `model` on inputs of `shapes` (one per input,
    without the batch axis): cheap, nothing is computed. A layer that refuses the shape (a
    Cropping1D longer than the input, a Concatenate of mismatched lengths) raises there."""
    inputs = keras.tree.flatten(model.inputs)
    tensors = [keras.KerasTensor((batch, *s), dtype=x.dtype) for x, s in zip(inputs, shapes)]
    graph = internals.graph_model(model)
    struct = internals.inputs_struct(graph) if internals.is_functional(graph) else None
    try:
        if struct is not None:
            model.compute_output_spec(keras.tree.pack_sequence_as(struct, tensors))
        else:
            model.compute_output_spec(tensors[0] if len(tensors) == 1 else tensors)
    except Exception:
        return False
    return True


def input_shapes(model: keras.Model, shapes=None) -> list[tuple]:
    """Each model input's shape without the batch axis, every open (None) dimension filled.

    `shapes` (the caller's: one shape per input, a list of them, or a dict by input name; each
    without the batch axis) is checked against the model's inputs and taken as it is. Without it,
    open dimensions take the first of `OPEN_DIMENSIONS` (16, 32, ... 65536) on which Keras's
    symbolic shape inference runs the model: a model that crops 10,000 positions gets 16384.
    Raises `KerasBNError` asking for samples or an input shape when none works."""
    inputs = keras.tree.flatten(model.inputs)
    if shapes is not None:
        return _check_shapes(model, shapes)
    declared = [tuple(x.shape[1:]) for x in inputs]
    if all(d is not None for shape in declared for d in shape):
        return declared
    batch = batch_size_of(model)
    for size in OPEN_DIMENSIONS:
        filled = [tuple(size if d is None else d for d in shape) for shape in declared]
        if _accepts(model, filled, batch):
            return filled
    # Shape inference may refuse what running does (a custom layer without a shape function):
    # one real run at the smallest length decides.
    filled = [tuple(OPEN_DIMENSIONS[0] if d is None else d for d in shape) for shape in declared]
    try:
        run_inference(model, [np.zeros((batch, *s), x.dtype) for x, s in zip(inputs, filled)])
        return filled
    except Exception:
        pass
    raise KerasBNError(
        expected(
            f"No input length is known to work for model '{model.name}': its inputs leave "
            "dimensions open, and Keras's shape inference refused every length tried",
            f"inputs of shape {[batch_shape_text(x) for x in inputs]} with the open dimensions "
            f"set to one of {OPEN_DIMENSIONS[0]}...{OPEN_DIMENSIONS[-1]}",
            "a refusal at every one",
            "Pass real inputs (samples=, keras-bn --samples) or the shape to use "
            "(input_shapes=, keras-bn --input-shape).",
        )
    )


def _check_shapes(model, shapes):
    inputs = keras.tree.flatten(model.inputs)
    names = [x.name for x in inputs]
    if isinstance(shapes, dict):
        if set(shapes) != set(names):
            raise KerasBNError(
                expected("The input shapes' keys do not match the model inputs",
                         f"keys {names}", f"keys {sorted(shapes)}")
            )  # fmt: skip
        shapes = [shapes[n] for n in names]
    elif isinstance(shapes, (tuple, list)) and all(
        isinstance(d, (int, np.integer)) for d in shapes
    ):
        shapes = [shapes]  # one shape, for a one-input model
    shapes = list(shapes)
    if len(shapes) != len(inputs):
        raise KerasBNError(
            expected("The input shapes do not match the model's inputs",
                     f"{len(inputs)} shape(s), one per input {names}", f"{len(shapes)} shape(s)")
        )  # fmt: skip
    checked = []
    for x, shape in zip(inputs, shapes):
        try:
            shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            shape = None
        if shape is None or any(d < 1 for d in shape) or wrong_shape(x, (1, *shape)):
            raise KerasBNError(
                expected(
                    f"The input shape for input '{x.name}' does not fit it",
                    f"the shape without the batch axis, ({', '.join(map(str, x.shape[1:]))}) "
                    "with every open dimension a positive length",
                    repr(shape),
                )
            )
        checked.append(shape)
    return checked


def synthetic_inputs(
    model: keras.Model, batch_size: int = 4, seed: int = 0, shapes=None
) -> list[np.ndarray]:
    """Deterministic inputs for a model: N(0, 1) floats (zeros for integer inputs).

    `shapes`: each input's shape without the batch axis (the samples' shape, say); None takes
    `input_shapes(model)`, which fills open dimensions with a length the model accepts. The
    batch is `batch_size`, or the one the model's inputs fix."""
    rng = np.random.default_rng(seed)
    shapes = input_shapes(model) if shapes is None else [tuple(s) for s in shapes]
    batch = batch_size_of(model, batch_size)
    arrays = []
    for x, shape in zip(keras.tree.flatten(model.inputs), shapes):
        dtype = keras.backend.standardize_dtype(x.dtype)
        if dtype == "string":
            raise KerasBNError(
                expected(
                    f"Model '{model.name}' takes text (input '{x.name}'), and verification "
                    "runs it on inputs it makes up, which are numbers",
                    "numeric model inputs",
                    f"input '{x.name}' of dtype string",
                    "Fold the numeric part of the model (a keras.Model from the first layer "
                    "after the text preprocessing), or fold_bn(..., verify=False).",
                )
            )
        if "int" in dtype or dtype == "bool":
            arrays.append(np.zeros((batch, *shape), dtype))
        else:
            arrays.append(rng.standard_normal((batch, *shape)).astype(x.dtype))
    return arrays


def _describe(array):
    return f"shape {tuple(array.shape)}, dtype {array.dtype}"


_SUBJECTS = {
    "samples": (
        "The samples' keys do not match the model inputs",
        "The samples do not match the model's inputs",
    ),
    "batch": (
        "A batch's keys do not match the model inputs",
        "A batch does not match the model's inputs",
    ),
}


def refuse_sparse(value, subject: str) -> None:
    """Raises `KerasBNError` when `value` is a sparse array (TensorFlow's SparseTensor, a SciPy
    sparse matrix, JAX's BCOO, a PyTorch sparse tensor): keras_bn reads dense arrays, and NumPy
    would make a 0-d object array of it, whose error would say nothing about why."""
    kind = type(value)
    sparse = (
        kind.__name__ in ("SparseTensor", "SparseTensorValue", "BCOO", "BCSR")
        or kind.__module__.startswith("scipy.sparse")
        or getattr(value, "is_sparse", False) is True  # torch
    )
    if sparse:
        raise KerasBNError(
            expected(
                f"The {subject} {'is' if subject == 'batch' else 'are'} sparse",
                "dense arrays (NumPy or backend tensors)",
                f"a {kind.__module__}.{kind.__name__}",
                "Convert them first: tf.sparse.to_dense(x) (TensorFlow), x.toarray() (SciPy), "
                "x.todense() (JAX), x.to_dense() (PyTorch).",
            )
        )


def arrays_per_input(model: keras.Model, data, subject: str = "samples"):
    """`(names, inputs, arrays)`: `data` (one array, a list/tuple with one array per input, or a
    dict keyed by input name) split in `model.inputs` order. Raises `KerasBNError` when the keys
    or the count do not match; `subject` ("samples" or "batch") words the message."""
    keys_message, count_message = _SUBJECTS[subject]
    refuse_sparse(data, subject)
    for value in (
        data.values() if isinstance(data, dict) else data if isinstance(data, (list, tuple)) else ()
    ):
        refuse_sparse(value, subject)
    inputs = keras.tree.flatten(model.inputs)
    names = [x.name for x in inputs]
    if isinstance(data, dict):
        if set(data) != set(names):
            raise KerasBNError(expected(keys_message, f"keys {names}", f"keys {sorted(data)}"))
        arrays = [data[n] for n in names]
    elif isinstance(data, (list, tuple)):
        arrays = list(data)
    else:
        arrays = [data]
    if len(arrays) != len(inputs):
        raise KerasBNError(
            expected(
                count_message,
                f"{len(inputs)} array(s), one per input {names}",
                f"{len(arrays)} array(s)",
            )
        )
    return names, inputs, arrays


def wrong_shape(model_input, shape) -> bool:
    """Whether `shape` cannot feed `model_input`: another rank, or a known dimension differs."""
    want = tuple(model_input.shape)
    got = tuple(shape)
    return len(got) != len(want) or any(d is not None and d != g for d, g in zip(want[1:], got[1:]))


def batch_shape_text(model_input) -> str:
    """'(batch, 8, 8, 3)' for a model input."""
    return f"(batch, {', '.join(str(d) for d in tuple(model_input.shape)[1:])})"


def cast_numbers(array: np.ndarray, target, what: str) -> np.ndarray:
    """`array` cast to `target`, or a `KerasBNError` ("<what> overflow <target>") when the cast
    would make a finite value inf: the one check that user numbers (samples, calibration,
    recalibration data) fit the model's input dtype, rather than becoming inf there and being
    reported later as NaN or Inf in the data."""
    target = np.dtype(target)
    with np.errstate(over="ignore", invalid="ignore"):
        cast = array.astype(target)
    if target.kind == "f" and not np.array_equal(
        np.isfinite(cast), np.isfinite(array.astype(np.float64))
    ):
        raise KerasBNError(
            expected(
                f"{what} overflow {target}", f"values within {target}'s range", _describe(array)
            )
        )
    return cast


def check_samples(model: keras.Model, samples) -> list[np.ndarray]:
    """Returns `samples` as a list of arrays, one per model input in `model.inputs` order, or
    raises `KerasBNError` naming what was expected. Checked before any work: the number of
    arrays, the keys of a dict, each array's rank and known dimensions, one batch size, and the
    dtype. Floats of another precision are cast to the input's dtype (`np.save` writes float64)
    when every value stays finite; integers are cast to a float input; anything else is refused.
    """
    names, inputs, arrays = arrays_per_input(model, samples, "samples")
    checked = []
    for name, x, array in zip(names, inputs, arrays):
        try:
            array = np.asarray(array)
        except Exception as error:
            raise KerasBNError(
                expected(
                    f"Samples for input '{name}' are not an array",
                    "a numeric array",
                    type(array).__name__,
                )
            ) from error
        if wrong_shape(x, array.shape):
            raise KerasBNError(
                expected(
                    f"Samples for input '{name}' have the wrong shape",
                    f"shape {batch_shape_text(x)}",
                    _describe(array),
                )
            )
        target = np.dtype(str(x.dtype)) if str(x.dtype) != "bfloat16" else np.dtype(np.float32)
        if array.dtype != target:
            if array.dtype.kind not in "fiub" or (target.kind != "f" and array.dtype.kind == "f"):
                raise KerasBNError(
                    expected(
                        f"Samples for input '{name}' have an unusable dtype",
                        f"numbers castable to {target}",
                        _describe(array),
                    )
                )
            array = cast_numbers(array, target, f"Samples for input '{name}'")
        checked.append(array)
    batches = {len(a) for a in checked}
    if len(batches) > 1 or 0 in batches:
        raise KerasBNError(
            expected(
                "The samples need one batch size for every input, at least 1",
                "one batch size >= 1",
                f"batch sizes {[len(a) for a in checked]}",
            )
        )
    return checked


def run_inference(model, inputs, as_numpy=False):
    """`model` in inference mode on `inputs`, a list of arrays (one per model input); with
    `as_numpy`, the outputs as NumPy arrays (a torch output that requires grad included)."""
    try:
        outputs = model(inputs[0] if len(inputs) == 1 else inputs, training=False)
        if as_numpy:
            return keras.tree.map_structure(keras.ops.convert_to_numpy, outputs)
        return outputs
    except Exception as error:
        if type(error).__name__ != "UnimplementedError":  # TensorFlow's, without importing it
            raise
        text = plain_text(error)
        if "NHWC" in text or "NDHWC" in text or "channels_first" in text.lower():
            raise KerasBNError(
                expected(
                    "The model cannot be verified on this machine: TensorFlow on CPU runs "
                    "convolutions and pooling only channels-last",
                    "a machine that can run the model (a GPU for channels_first)",
                    f"model '{model.name}' with channels_first layers",
                    "Verify on a GPU, or pass verify=False (keras-bn: run it on a GPU machine); "
                    "the fold math itself does not depend on the data format.",
                )
            ) from None
        raise


def run_original(model, inputs, label: str):
    """`run_inference(model, inputs, as_numpy=True)` for the caller's own model. An exception the
    model raises on these inputs is the input's problem, not a bug of keras_bn: it becomes a
    `KerasBNError` (`model_failure`)."""
    try:
        return run_inference(model, inputs, as_numpy=True)
    except KerasBNError:
        raise
    except Exception as error:
        raise model_failure(model, f"the {label}", inputs, error) from None


def model_failure(model, where: str, inputs, error) -> KerasBNError:
    """The `KerasBNError` for the caller's model raising `error` on `inputs` (`where`: "the
    samples", "batch 3 of the data"): which inputs, what the model said, how to give others."""
    shapes = ", ".join(str(tuple(np.shape(a))) for a in inputs)
    return KerasBNError(
        expected(
            f"Model '{model.name}' fails on {where} (inputs of shape {shapes})",
            "inputs the model runs on",
            f"{type(error).__name__}: {one_line(error)}",
            "Pass real inputs (samples=, keras-bn --samples) or the shape to use "
            "(input_shapes=, keras-bn --input-shape).",
        )
    )


@contextlib.contextmanager
def in_background(fn, inline=False):
    """Starts `fn` on a second thread, under the caller's TF device scope, and yields its future;
    leaving the block waits for it. For Keras reference outputs computed while the calling
    thread folds or converts (TF runs its kernels without the GIL). Where a second thread could
    corrupt Keras's masks (`_keras_internals.masks_kept_per_thread`), or with `inline=True` (work
    that must not overlap the caller's: a variable created under a multi-worker strategy is a
    collective, which would race the data's all-reduces), `fn` runs on the calling thread when
    the block is left, its result or exception in the future as before."""
    if inline or internals.masks_kept_per_thread():
        pending = concurrent.futures.Future()
        yield pending
        try:
            pending.set_result(fn())
        except Exception as error:  # to the caller through pending.result(), as from a thread
            pending.set_exception(error)
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="keras-bn-reference") as pool:
        yield pool.submit(on_callers_device(fn))


def on_callers_device(fn):
    """`fn` wrapped to run under the calling thread's TF device scope (`with tf.device(...)`),
    which TF keeps per thread, when it runs on another thread."""
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    device = internals.current_tf_device()

    def run():
        with tf.device(device):
            return fn()

    return run
