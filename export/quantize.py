"""Reduced-precision ONNX graphs, made from the float32 graph `to_onnx` has already verified.

- float16: `onnxruntime.transformers.float16.convert_float_to_float16`, the converter that ships
  inside onnxruntime, with `keep_io_types=True` (inputs and outputs stay float32).
- int8: `onnxruntime.quantization.quantize_static`, QDQ format, per-channel symmetric int8
  weights, uint8 activations calibrated on the caller's data (MinMax by default, or Entropy /
  Percentile), after onnxruntime's `quant_pre_process` (shape inference and graph optimization,
  which lets more ops be quantized).

Why uint8 activations (onnxruntime's "U8S8"), not its int8 default ("S8S8"): onnxruntime runs a
QDQ graph fast only where its graph optimizer fuses DequantizeLinear -> op -> QuantizeLinear into
one int8 kernel (QLinearConv, QLinearAdd, QGemm...). With int8 activations onnxruntime 1.32 on x86_64
leaves every residual Add in float, and the Convs next to them (tests/test_quantize.py checks this
on an inverted-residual block); with uint8 activations they fuse. `runtime_split` reports what
fused.

Why 7-bit weights (`reduce_range`) on an x86-64 CPU without VNNI: there onnxruntime's U8S8
kernels multiply with VPMADDUBSW, which adds two uint8 x int8 products into an int16 that
saturates at 32767 (255 * 127 * 2 = 64770), so a dot product can silently clip; 7-bit weights keep
every pair below it. That is onnxruntime's own guidance for such CPUs (`quantize_static`'s
docstring, "Choosing parameters for CPU inference"). On a CPU without VNNI, with 8-bit weights,
the Dense and grouped-Conv2D patterns of the test suite fall below the 0.99 cosine bound, and
with 7-bit weights every pattern passes. VNNI (VPDPBUSD) accumulates in int32 and does not
saturate, so there the full 8 bits are kept. The check is of the machine that quantizes and
verifies: a graph verified on a VNNI machine with 8-bit weights can saturate on one without it
(pass `reduce_range=True` for such targets).

Folding matters here: a BatchNorm left in the graph is a float Mul+Add between quantized ops
(onnxruntime cannot quantize BatchNormalization by itself), and one folded into its Conv or Gemm
quantizes with it. Both converters write only inside a temporary directory that is removed when
they finish or fail. `quant_pre_process` runs in a child process whose working directory is that
temporary directory: where its symbolic shape inference cannot infer every shape (a Conv1D over an
open length followed by a Cropping1D, say) it saves `sym_shape_infer_temp.onnx` and an external
data file into the working directory before it raises, and nothing removes them.
"""

from __future__ import annotations

import collections
import os
import platform
import re
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.transformers import float16

from keras_bn.errors import KerasBNError, expected

PRECISIONS = ("float32", "float16", "int8")
CALIBRATE_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# CPU flags (Linux /proc/cpuinfo names) of a dot-product instruction that accumulates in int32.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
X86_64 = ("x86_64", "amd64", "x64")
# onnxruntime's fused integer kernels: the ONNX QLinear* ops and its contrib ops of that family.
INT8_KERNELS = ("QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat")


class _Feeds(CalibrationDataReader):
    """onnxruntime's calibration reader over a list of {input name: array} batches."""

    def __init__(self, feeds):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def cpu_flags(path="/proc/cpuinfo") -> set[str] | None:
    """This CPU's feature flags as Linux names them, or None where they cannot be read (another
    OS, a restricted /proc)."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return None


# `int8_may_saturate`'s default for `flags`: read this CPU's. None is a value of its own there,
# flags that could not be read, so it cannot also mean "not given".
THIS_CPU = object()


def int8_may_saturate(machine=None, flags=THIS_CPU) -> bool:
    """True where onnxruntime's uint8 x int8 kernels can saturate (see the module docstring): an
    x86-64 CPU without VNNI, and an x86-64 CPU whose flags cannot be read (`flags=None`; 7-bit
    weights cost a little precision, a saturated sum costs the answer). `machine` and `flags`
    default to this machine's `platform.machine()` and `cpu_flags()`."""
    machine = (platform.machine() if machine is None else machine).lower()
    if machine not in X86_64:
        return False  # ARM and others: no VPMADDUBSW
    flags = cpu_flags() if flags is THIS_CPU else flags
    return flags is None or not any(flag in flags for flag in VNNI_FLAGS)


def to_float16(model_bytes: bytes, keep_float_nodes=()) -> bytes:
    """The float32 graph in float16, inputs and outputs kept float32; the nodes named in
    `keep_float_nodes` stay float32 (the converter's `node_block_list`)."""
    proto = float16.convert_float_to_float16(
        onnx.load_from_string(model_bytes),
        keep_io_types=True,
        node_block_list=list(keep_float_nodes) or None,
    )
    return proto.SerializeToString()


FLOAT16_MAX = 65504.0  # the largest finite float16


def float16_range(model_bytes: bytes, feeds, rows=8):
    """The float32 graph run with every float tensor exposed, on `feeds` (a list of {input
    name: array}, `rows` samples at a time): `(checked, overflows)`, where `checked` is the
    number of tensors looked at and `overflows` lists `(tensor, [nodes that make or read it],
    max |value|)` for each tensor whose values leave float16's range (|x| > 65504, which float16
    rounds to inf).

    Every tensor counts, the graph's inputs and outputs and those of `keep_float` layers too:
    onnxruntime's converter (`to_float16`) casts them all to float16 between ops (a kept
    MatMul's output goes through a Cast to float16 and back before the next op), so
    keeping a layer in float32 does not keep its values from overflowing. onnxruntime's CPU
    provider computes many float16 ops in float32, so agreement measured there can miss an
    overflow that real float16 arithmetic (a GPU, an NPU) turns into inf or NaN: the float32
    values are the ones to judge."""
    proto = onnx.load_from_string(model_bytes)
    inferred = onnx.shape_inference.infer_shapes(proto)
    float_type = onnx.TensorProto.FLOAT
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.input})
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.output})
    weights = {t.name for t in proto.graph.initializer}  # checked when folded (float16_problem)
    held = collections.defaultdict(list)  # tensor -> the nodes that make or read it
    for node in proto.graph.node:
        for name in [*node.output, *node.input]:
            if name and name not in weights:
                held[name].append(node.name)
    watched = [name for name in held if types.get(name) == float_type]
    exposed = {o.name for o in proto.graph.output}
    proto.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, float_type, None)
        for name in watched
        if name not in exposed
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    largest = dict.fromkeys(watched, 0.0)
    for feed in feeds:
        total = len(next(iter(feed.values())))
        for start in range(0, total, rows):
            part = {k: v[start : start + rows] for k, v in feed.items()}
            for name, value in zip(watched, session.run(watched, part)):
                value = np.abs(np.asarray(value, np.float32))
                if value.size:
                    top = float(np.max(np.where(np.isnan(value), 0.0, value)))
                    largest[name] = max(largest[name], top)
    overflows = [
        (name, held[name], largest[name]) for name in watched if largest[name] > FLOAT16_MAX
    ]
    return len(watched), sorted(overflows, key=lambda o: -o[2])


def layer_nodes(proto, layer_names) -> list[str]:
    """The names of the ONNX nodes that the Keras layers `layer_names` became. tf2onnx names each
    node by the TensorFlow name scope it was traced in, which holds the layer's name, uniquified
    with a suffix (`model_1/conv1_1/BiasAdd` for layer `conv1`). A layer with no node of its own
    (a BatchNorm folded into its Conv, an activation tf2onnx fused into its producer) is an error
    that says so."""
    found = []
    for name in layer_names:
        scope = re.compile(rf"(^|/){re.escape(name)}(_\d+)?/")
        nodes = [n.name for n in proto.graph.node if scope.search(n.name)]
        if not nodes:
            raise KerasBNError(
                expected(
                    f"keep_float layer '{name}' to be an op of the exported graph",
                    "a layer with a node of its own (a Conv, Dense or other compute layer)",
                    "no node: it was folded or fused into a neighbour",
                    "Name the layer it went into (a BatchNorm folds into the Conv or Dense "
                    "next to it).",
                )
            )
        found += nodes
    return found


def to_int8(
    model_bytes: bytes,
    feeds,
    calibrate_method: str = "minmax",
    keep_float=(),
    reduce_range: bool = False,
) -> bytes:
    """Static QDQ int8 quantization of a float32 graph, calibrated on `feeds` (a list of
    {input name: array} batches). The nodes of the Keras layers named in `keep_float` stay
    float32 (onnxruntime's `nodes_to_exclude`); `reduce_range=True` quantizes weights to 7 bits
    (onnxruntime's `reduce_range`, symmetric: [-64, 64])."""
    with tempfile.TemporaryDirectory(prefix="keras-bn-quantize-") as tmp:
        float_path = os.path.join(tmp, "float32.onnx")
        prepared = os.path.join(tmp, "prepared.onnx")
        quantized = os.path.join(tmp, "int8.onnx")
        with open(float_path, "wb") as handle:
            handle.write(model_bytes)
        pre_process(float_path, prepared, tmp)
        excluded = layer_nodes(onnx.load(prepared), keep_float) if keep_float else []
        quantize_static(
            prepared,
            quantized,
            _Feeds(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,  # fuses where QInt8 does not: see above
            calibrate_method=CALIBRATE_METHODS[calibrate_method],
            nodes_to_exclude=excluded,
            extra_options={"WeightSymmetric": True},
        )
        with open(quantized, "rb") as handle:
            return handle.read()


# Runs onnxruntime's quant_pre_process on argv[1] -> argv[2]; argv[3] == "1" skips the symbolic
# shape inference.
_PRE_PROCESS = (
    "import sys\n"
    "from onnxruntime.quantization.shape_inference import quant_pre_process\n"
    "quant_pre_process(sys.argv[1], sys.argv[2], skip_symbolic_shape=sys.argv[3] == '1')\n"
)
_INCOMPLETE = "Incomplete symbolic shape inference"


def pre_process(float_path, prepared_path, directory) -> bool:
    """onnxruntime's `quant_pre_process` (shape inference and graph optimization) of the graph at
    `float_path` into `prepared_path`, in a child process working in `directory` (see the module
    docstring). Where the symbolic shape inference is incomplete it runs again without it: ONNX's
    own shape inference and the optimizer still run, which is what convolutional graphs need.
    Returns whether the symbolic step was skipped."""
    for skip in (False, True):
        run = subprocess.run(
            [sys.executable, "-c", _PRE_PROCESS, float_path, prepared_path, "1" if skip else "0"],
            cwd=directory,
            capture_output=True,
            text=True,
        )
        if run.returncode == 0:
            return skip
        if _INCOMPLETE not in run.stderr:
            break
    raise RuntimeError(
        f"onnxruntime's quant_pre_process failed on the verified float32 graph: "
        f"{run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}"
    )


def op_split(proto) -> tuple[dict, dict, dict]:
    """(QDQ ops, quantized ops, float ops) of a QDQ graph, as counts by op type. An op is
    quantized when every input that is not an initializer comes from a DequantizeLinear (in QDQ
    form onnxruntime then runs it in int8); any other op, Q/DQ aside, computes in float."""
    producers = {out: node.op_type for node in proto.graph.node for out in node.output}
    initializers = {init.name for init in proto.graph.initializer}
    qdq, quantized, floating = collections.Counter(), collections.Counter(), collections.Counter()
    for node in proto.graph.node:
        if node.op_type in QDQ_OPS:
            qdq[node.op_type] += 1
            continue
        inputs = [i for i in node.input if i and i not in initializers]
        if inputs and all(producers.get(i) == "DequantizeLinear" for i in inputs):
            quantized[node.op_type] += 1
        else:
            floating[node.op_type] += 1
    return dict(qdq), dict(quantized), dict(floating)


def runtime_split(model_bytes: bytes) -> tuple[dict, dict]:
    """(int8 kernels, float ops on dequantized tensors) of the graph onnxruntime runs: the QDQ
    graph after onnxruntime's own optimizer (ORT_ENABLE_EXTENDED, the level that fuses
    DequantizeLinear -> op -> QuantizeLinear into one integer kernel and does no layout change for
    this machine's CPU), as counts by op type. An op runs in float on dequantized tensors when it
    reads the output of a DequantizeLinear that survived the fusion: onnxruntime found no int8
    kernel for it (ConvTranspose has none on the CPU provider; onnxruntime's quantizer leaves Tanh
    unquantized) and runs it in float32 between DequantizeLinear and QuantizeLinear, or after the
    graph's last quantized op. A DequantizeLinear that feeds a graph output only counts nowhere."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="keras-bn-runtime-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        proto = onnx.load(options.optimized_model_filepath)
    dequantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    int8, floating = collections.Counter(), collections.Counter()
    for node in proto.graph.node:
        if node.op_type in QDQ_OPS:
            continue
        if node.op_type.startswith("QLinear") or node.op_type in INT8_KERNELS:
            int8[node.op_type] += 1
        elif any(i in dequantized for i in node.input):
            floating[node.op_type] += 1
    return dict(int8), dict(floating)
