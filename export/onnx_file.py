"""An ONNX file from outside (`keras-bn verify`), read and run as untrusted input.

Reading is bounded before any tensor is made: the file is a regular file of at most
`OnnxLimits.max_file_bytes`; external data must lie inside the file's folder; only the standard
operator domains are accepted (no custom ops, whose kernels would be code); `onnx.checker` passes;
every tensor the file stores or declares (initializers, Constant nodes) and every tensor whose
shape ONNX's shape inference can tell (with constant folding of shapes, `data_prop=True`: a
`ConstantOfShape` of 2.5e9 values is caught here) fits in the memory the run may take.

Running happens in a process of its own (`ort_worker.py`) with an address-space limit
(`max_memory_gib`) and a time limit (`max_seconds`): a `Loop` of 1e12 iterations or a tensor
whose size only the inputs decide ends as a clear error, and Ctrl-C or SIGTERM end it with the
parent.

Example:
    proto = load(path)  # KerasBNError if the file is refused
    (outputs,) = run(proto.SerializeToString(), [{"image": x}], ["logits"], [(0, "enabled")])
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np
import onnx

from keras_bn.errors import KerasBNError, expected

from .files import GiB, check_regular_file

STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")  # the operator sets of the ONNX standard


@dataclasses.dataclass(frozen=True)
class OnnxLimits:
    """Bounds on an ONNX file from outside; the command line can raise them
    (`keras-bn verify --max-onnx-gib`, `--max-onnx-seconds`)."""

    max_file_bytes: int = 2 * GiB  # protobuf's own limit for one message
    max_memory_gib: float = 8.0  # address space of the onnxruntime process, and any one tensor
    max_seconds: float = 300.0  # all the runs of one verification


DEFAULT_LIMITS = OnnxLimits()


def _refuse(what, expected_value, received, fix=None):
    raise KerasBNError(expected(what, expected_value, received, fix))


def _bytes(dims, elem_type):
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, TypeError, ValueError):  # UNDEFINED, strings: count them as 8 bytes
        itemsize = 8
    return math.prod(int(d) for d in dims) * itemsize


def _check_size(nbytes, what, limits):
    if nbytes > limits.max_memory_gib * GiB:
        _refuse(
            what,
            f"at most {limits.max_memory_gib:g} GiB per tensor",
            f"{nbytes / GiB:.3g} GiB",
            "If the file is trusted, raise the limit (keras-bn verify --max-onnx-gib).",
        )


def _check_tensor(tensor, where, limits):
    _check_size(
        _bytes(tensor.dims, tensor.data_type),
        f"The ONNX file declares {where} '{tensor.name}' larger than allowed",
        limits,
    )


def _check_external_data(proto, folder, limits):
    from onnx import external_data_helper

    total = 0
    for tensor in _all_tensors(proto.graph):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = os.path.normpath(info.location)
        target = os.path.realpath(os.path.join(folder, location))
        if os.path.isabs(info.location) or not target.startswith(os.path.realpath(folder) + os.sep):
            _refuse(
                "The ONNX file's external data lies outside its folder",
                "external data files beside the .onnx file",
                f"tensor '{tensor.name}' at {info.location!r}",
            )
        size = check_regular_file(target, "ONNX external data file").st_size
        offset = info.offset or 0
        length = info.length if info.length is not None else size - offset
        if offset + length > size:
            _refuse(
                "The ONNX file's external data is shorter than it declares",
                f"{offset + length} bytes in {info.location!r}",
                f"{size} bytes",
            )
        total += length
    if total > limits.max_file_bytes:
        _refuse(
            "The ONNX file's external data is larger than allowed",
            f"at most {limits.max_file_bytes / GiB:g} GiB",
            f"{total / GiB:.3g} GiB",
        )
    if total:
        external_data_helper.load_external_data_for_model(proto, folder)


def load(path, limits=DEFAULT_LIMITS) -> onnx.ModelProto:
    """The checked `ModelProto` of the ONNX file at `path`, or a `KerasBNError` saying what is
    refused and why (see the module docstring)."""
    path = os.fspath(path)
    size = check_regular_file(path, "ONNX file").st_size
    if size > limits.max_file_bytes:
        _refuse(
            "The ONNX file is larger than allowed",
            f"at most {limits.max_file_bytes / GiB:g} GiB",
            f"{size / GiB:.3g} GiB",
        )
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as error:  # protobuf's DecodeError, and others for a damaged file
        _refuse(
            "The ONNX file could not be read",
            "a valid .onnx file",
            f"{type(error).__name__} for {path!r}",
        )
    domains = {o.domain for o in proto.opset_import} | {n.domain for n in _all_nodes(proto.graph)}
    custom = sorted(d for d in domains if d not in STANDARD_DOMAINS)
    if custom:
        _refuse(
            "The ONNX file uses operators outside the standard domain (custom operators run "
            "code that is not part of onnxruntime)",
            "only standard ONNX operators, as a Keras model exports to",
            f"domains {custom}",
        )
    for tensor in _all_tensors(proto.graph):  # initializers and Constant values, subgraphs too
        _check_tensor(tensor, "tensor", limits)
    _check_external_data(proto, os.path.dirname(os.path.abspath(path)), limits)
    try:
        onnx.checker.check_model(proto)
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as error:  # onnx's ValidationError, InferenceError
        message = " ".join(str(error).split())[:600]
        _refuse(
            "The ONNX file is not a valid ONNX model",
            "a file that passes onnx.checker and ONNX shape inference",
            f"{type(error).__name__}: {message}",
        )
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shape = [d.dim_value for d in dims]
            _check_size(
                _bytes(shape, tensor_type.elem_type),
                f"The ONNX graph computes '{value.name}' of shape {shape}, larger than allowed",
                limits,
            )
    return proto


def _all_tensors(graph):
    """Every tensor a graph stores: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            yield from attribute.tensors
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _all_tensors(sub)


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            for sub in attribute.graphs:
                yield from _all_nodes(sub)


def run(model_bytes: bytes, feeds, outputs, runs, limits=DEFAULT_LIMITS):
    """Runs the ONNX graph `model_bytes` in onnxruntime in a process of its own, bounded by
    `limits` (memory and time). `feeds`: a list of {input name: array}; `runs`: [(feed index,
    "disabled" | "enabled" graph optimizations)]. Returns, per run, the arrays of `outputs`.
    An error of onnxruntime on the file, or a limit reached, is a `KerasBNError`."""
    with tempfile.TemporaryDirectory(prefix="keras-bn-ort-") as job:
        with open(os.path.join(job, "model.onnx"), "wb") as f:
            f.write(model_bytes)
        np.savez(
            os.path.join(job, "feeds.npz"),
            **{f"{i}/{name}": a for i, feed in enumerate(feeds) for name, a in feed.items()},
        )
        with open(os.path.join(job, "job.json"), "w") as f:
            json.dump({"outputs": list(outputs), "runs": [[str(i), lvl] for i, lvl in runs]}, f)
        memory = int(limits.max_memory_gib * GiB)

        def limit():  # in the child, before exec
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ort_worker.py")
        try:
            done = subprocess.run(
                [sys.executable, worker, job],
                preexec_fn=limit,
                capture_output=True,
                text=True,
                timeout=limits.max_seconds,
            )
        except subprocess.TimeoutExpired:
            _refuse(
                "onnxruntime did not finish the ONNX file in the time allowed",
                f"all runs within {limits.max_seconds:g} s",
                "still running; it was stopped",
                "If the file is trusted and slow, raise the limit (--max-onnx-seconds).",
            )
        error_file = os.path.join(job, "error.json")
        if os.path.exists(error_file):
            with open(error_file) as f:
                error = json.load(f)
            text = " ".join(error["message"].split())
            if (
                error["type"] == "MemoryError"
                or "bad_alloc" in text
                or "Failed to allocate" in text
            ):
                _refuse(
                    "onnxruntime needs more memory for the ONNX file than allowed",
                    f"at most {limits.max_memory_gib:g} GiB",
                    f"{error['type']}: {text[:300]}",
                    "If the file is trusted, raise the limit (--max-onnx-gib).",
                )
            _refuse(
                "onnxruntime could not run the ONNX file on the model's inputs",
                "an ONNX graph that takes the Keras model's inputs",
                f"{error['type']}: {text[:600]}",
            )
        if done.returncode != 0:
            _refuse(
                "onnxruntime ended without a result on the ONNX file",
                f"a run within {limits.max_memory_gib:g} GiB of memory",
                f"exit status {done.returncode}: {' '.join(done.stderr.split())[-300:]}",
                "If the file is trusted, raise the limit (--max-onnx-gib).",
            )
        with np.load(os.path.join(job, "outputs.npz"), allow_pickle=False) as data:
            return [[data[f"{r}/{k}"] for k in range(len(outputs))] for r in range(len(runs))]
