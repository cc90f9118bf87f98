"""Reduced-precision ONNX graphs, made from the float32 graph `to_onnx` has already verified.

- float16: `onnxruntime.transformers.float16.convert_float_to_float16`, the converter that ships
  inside onnxruntime, with `keep_io_types=True` (inputs and outputs stay float32).
- int8: `onnxruntime.quantization.quantize_static`, QDQ format, per-channel symmetric int8
  weights, int8 activations calibrated on the caller's data (MinMax by default, or Entropy /
  Percentile), after onnxruntime's `quant_pre_process` (shape inference and graph optimization,
  which lets more ops be quantized).

Folding matters here: a BatchNorm left in the graph is a float Mul+Add between quantized ops
(onnxruntime cannot quantize BatchNormalization by itself), and one folded into its Conv or Gemm
quantizes with it. Both converters write only inside a temporary directory that is removed when
they finish or fail.
"""

from __future__ import annotations

import collections
import os
import tempfile

import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers import float16

PRECISIONS = ("float32", "float16", "int8")
CALIBRATE_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class _Feeds(CalibrationDataReader):
    """onnxruntime's calibration reader over a list of {input name: array} batches."""

    def __init__(self, feeds):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def to_float16(model_bytes: bytes) -> bytes:
    proto = float16.convert_float_to_float16(onnx.load_from_string(model_bytes), keep_io_types=True)
    return proto.SerializeToString()


def to_int8(model_bytes: bytes, feeds, calibrate_method: str = "minmax") -> bytes:
    """Static QDQ int8 quantization of a float32 graph, calibrated on `feeds` (a list of
    {input name: array} batches)."""
    with tempfile.TemporaryDirectory(prefix="keras-bn-quantize-") as tmp:
        float_path = os.path.join(tmp, "float32.onnx")
        prepared = os.path.join(tmp, "prepared.onnx")
        quantized = os.path.join(tmp, "int8.onnx")
        with open(float_path, "wb") as handle:
            handle.write(model_bytes)
        quant_pre_process(float_path, prepared)
        quantize_static(
            prepared,
            quantized,
            _Feeds(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8,
            calibrate_method=CALIBRATE_METHODS[calibrate_method],
            extra_options={"WeightSymmetric": True},
        )
        with open(quantized, "rb") as handle:
            return handle.read()


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
