"""User data to batches of model inputs, for `recalibrate` and `diagnose`: arrays, `(x, y)`,
lists and dicts by input name, `tf.data.Dataset`, `keras.utils.PyDataset` and any iterable of
batches, each batch checked against `model.inputs` with one shape and dtype policy
(`keras_bn.verification.cast_numbers`: a value its input's dtype cannot hold is refused, not
turned into inf)."""

from __future__ import annotations

import itertools
import math
import sys

import keras
import numpy as np
from keras import ops

from keras_bn.errors import KerasBNError, expected
from keras_bn.verification import (
    arrays_per_input,
    batch_shape_text,
    cast_numbers,
    refuse_sparse,
    wrong_shape,
)

INFINITE = "infinite"  # what known_batch_count says of data that never ends


def as_input_list(model, x):
    """One batch `x` (array, list/tuple of arrays, or dict by input name) as a list of tensors in
    `model.inputs` order."""
    names, inputs, arrays = arrays_per_input(model, x, "batch")
    batch = []
    for name, spec, array in zip(names, inputs, arrays):
        # Backend tensors stay where they are; anything else (NumPy, lists, a tf.data element
        # on another backend) is read as NumPy first.
        tensor = array if ops.is_tensor(array) else np.asarray(array)
        if wrong_shape(spec, tensor.shape):
            raise KerasBNError(
                expected(
                    f"Data for input '{name}' has the wrong shape",
                    batch_shape_text(spec),
                    f"shape {tuple(tensor.shape)}",
                )
            )
        try:
            dtype = keras.backend.standardize_dtype(tensor.dtype)
        except ValueError:  # NumPy strings and objects have no Keras dtype
            dtype = str(np.asarray(tensor).dtype.name)
        if not dtype.startswith(("float", "bfloat", "int", "uint")):
            raise KerasBNError(
                expected(
                    f"Data for input '{name}' is not numeric",
                    f"numbers castable to {spec.dtype}",
                    f"dtype {'string' if dtype.startswith('str') else dtype}",
                )
            )
        target = keras.backend.standardize_dtype(spec.dtype)
        if isinstance(tensor, np.ndarray) and target != "bfloat16" and tensor.dtype != target:
            tensor = cast_numbers(tensor, target, f"Data for input '{name}'")
        batch.append(ops.cast(tensor, spec.dtype))
    return batch


def is_tf_dataset(data):
    """A tf.data.Dataset, on any backend (Keras takes them everywhere), without importing TF."""
    # getattr: another thread may be importing TensorFlow right now (a half-made module).
    dataset = getattr(getattr(sys.modules.get("tensorflow"), "data", None), "Dataset", None)
    return isinstance(dataset, type) and isinstance(data, dataset)


def strip_labels(element, inputs=1):
    """`(x, y)` or `(x, y, sample_weight)` -> x, as Keras's `fit` reads a batch; labels are
    ignored. A list counts as such a tuple (a PyTorch DataLoader over `(x, y)` yields lists)
    unless it is the inputs of a model with that many: one array per input, none of them itself
    a list, tuple or dict."""
    if isinstance(element, tuple) and 2 <= len(element) <= 3:
        return element[0]
    if isinstance(element, list) and 2 <= len(element) <= 3:
        nested = isinstance(element[0], (list, tuple, dict))
        if len(element) != inputs or nested:
            return element[0]
    return element


def batches(model, data, batch_size):
    """Yields batches of model inputs from `data`: arrays (and lists/dicts of arrays, and `(x, y)`)
    are cut into `batch_size` rows; a `tf.data.Dataset`, a `keras.utils.PyDataset` or any
    iterable yields its own batches."""
    inputs = len(keras.tree.flatten(model.inputs))
    refuse_sparse(strip_labels(data) if isinstance(data, tuple) else data, "data")
    if is_tf_dataset(data) or isinstance(data, keras.utils.PyDataset):
        if is_tf_dataset(data):
            source = data
        else:  # a PyDataset without numbatches never ends: `batches=` stops it
            count = data.numbatches
            source = (data[i] for i in (range(count) if count is not None else itertools.count()))
        for element in source:
            yield as_input_list(model, strip_labels(element, inputs))
        return
    x = strip_labels(data) if isinstance(data, tuple) else data
    arrays = None
    if isinstance(x, np.ndarray) or (
        isinstance(x, (list, dict))
        and x
        and all(isinstance(a, np.ndarray) for a in (x.values() if isinstance(x, dict) else x))
    ):
        arrays = x
    if arrays is None:
        if not hasattr(data, "__iter__"):
            raise KerasBNError(
                expected(
                    "Unusable data",
                    "an array, (x, y), a list or dict of "
                    "arrays, a tf.data.Dataset, a keras.utils.PyDataset or an "
                    "iterable of batches",
                    type(data).__name__,
                )
            )
        for element in data:
            yield as_input_list(model, strip_labels(element, inputs))
        return
    flat = (
        list(arrays.values())
        if isinstance(arrays, dict)
        else (list(arrays) if isinstance(arrays, list) else [arrays])
    )
    if any(a.ndim == 0 for a in flat):
        raise KerasBNError(
            expected(
                "The data arrays need a batch axis",
                "arrays of shape (rows, ...)",
                f"shapes {[a.shape for a in flat]}",
            )
        )
    total = len(flat[0])
    if any(len(a) != total for a in flat):
        raise KerasBNError(
            expected(
                "The data arrays need one length",
                "equal first dimensions",
                f"lengths {[len(a) for a in flat]}",
            )
        )
    for start in range(0, total, batch_size):
        if isinstance(arrays, dict):
            chunk = {k: v[start : start + batch_size] for k, v in arrays.items()}
        elif isinstance(arrays, list):
            chunk = [a[start : start + batch_size] for a in arrays]
        else:
            chunk = arrays[start : start + batch_size]
        yield as_input_list(model, chunk)


def known_batch_count(data, batch_size):
    """The number of batches `batches` will yield, when it is known without iterating (None
    when not, `INFINITE` for a dataset that says it never ends)."""
    x = strip_labels(data) if isinstance(data, tuple) else data
    if isinstance(x, np.ndarray):
        return math.ceil(len(x) / batch_size) if x.ndim else None  # 0-d: batches refuses it
    if isinstance(x, (list, dict)) and x:
        first = next(iter(x.values())) if isinstance(x, dict) else x[0]
        if isinstance(first, np.ndarray) and first.ndim:
            return math.ceil(len(first) / batch_size)
    if isinstance(data, keras.utils.PyDataset):
        return INFINITE if data.numbatches is None else data.numbatches
    if is_tf_dataset(data):
        n = int(data.cardinality())
        if n == -1:  # tf.data.INFINITE_CARDINALITY (-2: unknown)
            return INFINITE
        return n if n >= 0 else None
    return None
