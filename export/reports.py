"""What an export returns: `ExportReport`, with the ONNX verification (`VerifyReport`, a
`VerifyRow` per output, input set and onnxruntime optimization level) and, for float16 and int8,
the `QuantizationReport`. Each has `to_dict()` for JSON and `str()` for people."""

from __future__ import annotations

import dataclasses

import keras_bn


@dataclasses.dataclass
class VerifyRow:
    """One output of one input set at one onnxruntime optimization level."""

    output: str
    input_set: str  # "synthetic" or "samples"
    batch: int
    first_sample_only: bool  # the dynamic-batch check: the set's first sample at batch 1
    optimization: str  # "disabled" or "enabled"
    max_abs_error: float
    max_rel_error: float
    passed: bool

    @property
    def inputs(self) -> str:
        return f"{self.input_set}, batch {self.batch}"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "inputs": self.inputs}


@dataclasses.dataclass
class VerifyReport:
    """Keras (inference mode) vs onnxruntime, per output, input set and optimization level."""

    rows: list[VerifyRow] = dataclasses.field(default_factory=list)
    atol: float | None = None
    rtol: float | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def max_abs_error(self) -> float:
        return max((r.max_abs_error for r in self.rows), default=0.0)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "atol": self.atol,
            "rtol": self.rtol,
            "max_abs_error": self.max_abs_error,
            "rows": [r.to_dict() for r in self.rows],
        }

    def __str__(self):
        lines = [
            f"{'output':<20} {'inputs':<26} {'ort optimizations':<18} {'max abs err':>12} "
            f"{'max rel err':>12}  ok"
        ]
        for r in self.rows:
            lines.append(
                f"{r.output:<20} {r.inputs:<26} {r.optimization:<18} "
                f"{r.max_abs_error:>12.3g} {r.max_rel_error:>12.3g}  "
                f"{'yes' if r.passed else 'NO'}"
            )
        lines.append(
            f"verification {'passed' if self.passed else 'FAILED'} "
            f"(atol={self.atol:g}, rtol={self.rtol:g} x max|that keras output|)"
        )
        return "\n".join(lines)


@dataclasses.dataclass
class QuantizationReport:
    """A float16 or int8 export: judged by agreement with the float32 Keras model per output
    (`keras_bn.verification.agreement`), on the samples, else the calibration data, else
    synthetic inputs."""

    precision: str
    input_set: str
    min_agreement: float
    min_cosine: float
    agreement: dict  # output name -> keras_bn.verification.Agreement
    float32_bytes: int
    bytes: int
    qdq_ops: dict[str, int]
    quantized_ops: dict[str, int]
    float_ops: dict[str, int]
    latency_ms: dict  # {"float32" | precision: {batch: median ms}}
    # int8: what onnxruntime runs after fusing Q/DQ (quantize.runtime_split): its integer kernels,
    # and the ops it runs in float on dequantized tensors. Empty for float16.
    runtime_int8_ops: dict[str, int] = dataclasses.field(default_factory=dict)
    runtime_float_ops: dict[str, int] = dataclasses.field(default_factory=dict)
    kept_float: list = dataclasses.field(default_factory=list)  # the keep_float layers
    # int8: 7-bit weights (onnxruntime's reduce_range), and why (this CPU, or the caller's word)
    reduce_range: bool = False
    reduce_range_reason: str = ""
    # float16: the float32 graph's tensors checked against float16's range before converting
    # (quantize.float16_range): how many, on how many inputs. onnxruntime's CPU provider runs
    # many float16 ops in float32, so agreement there cannot show an overflow.
    float16_range: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            **{k: v for k, v in dataclasses.asdict(self).items() if k != "agreement"},
            "agreement": {k: v.to_dict() for k, v in self.agreement.items()},
        }

    def __str__(self):
        size = f"{self.bytes / 1024:.1f} KiB (float32 {self.float32_bytes / 1024:.1f} KiB)"
        lines = [
            f"{self.precision}: {size}; ops quantized {sum(self.quantized_ops.values())}, float "
            f"{sum(self.float_ops.values())}, Q/DQ {sum(self.qdq_ops.values())}"
            if self.precision == "int8"
            else f"{self.precision}: {size}"
        ]
        if self.precision == "int8":
            left = ", ".join(f"{op} {n}" for op, n in sorted(self.runtime_float_ops.items()))
            lines.append(
                f"  onnxruntime runs {sum(self.runtime_int8_ops.values())} int8 kernels and "
                f"{sum(self.runtime_float_ops.values())} float ops on dequantized tensors"
                + (f" ({left})" if left else "")
                + (f"; kept float32: {', '.join(self.kept_float)}" if self.kept_float else "")
            )
            bits = "7-bit (reduce_range)" if self.reduce_range else "8-bit"
            lines.append(f"  weights {bits}: {self.reduce_range_reason}")
        if self.float16_range:
            r = self.float16_range
            lines.append(
                f"  range: {r['checked_tensors']} float32 tensors within float16's "
                f"+-{r['limit']:g} on {r['check_inputs']} inputs"
                + (f"; kept float32: {', '.join(self.kept_float)}" if self.kept_float else "")
            )
        for name, a in self.agreement.items():
            top1 = "-" if a.top1 is None else f"{a.top1:.4f}"
            accuracy = (
                ""
                if a.accuracy is None
                else f", accuracy {a.reference_accuracy:.4f} -> {a.accuracy:.4f}"
            )
            lines.append(
                f"  '{name}' on {self.input_set}: top-1 agreement {top1}, cosine {a.cosine:.6f}, "
                f"mean/max error {a.mean_abs_rel:.2e}/{a.max_abs_rel:.2e} of scale{accuracy}"
            )
        for batch in sorted(self.latency_ms.get("float32", {})):
            ms = {k: v[batch] for k, v in self.latency_ms.items()}
            lines.append(
                f"  onnxruntime latency, batch {batch}: float32 {ms['float32']:.3f} ms, "
                f"{self.precision} {ms[self.precision]:.3f} ms "
                f"({ms[self.precision] / ms['float32']:.2f}x)"
            )
        return "\n".join(lines)


@dataclasses.dataclass
class ExportReport:
    path: str
    op_counts: dict[str, int]
    fold: keras_bn.FoldReport | None
    verification: VerifyReport
    timings: dict[str, float]
    opset: int
    quantization: QuantizationReport | None = None  # precision="float16" or "int8"

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "opset": self.opset,
            "op_counts": self.op_counts,
            "batchnorms_folded": len(self.fold.folded) if self.fold else 0,
            "fold": self.fold.to_dict() if self.fold else None,
            "verification": self.verification.to_dict(),
            "timings_s": self.timings,
            "quantization": self.quantization.to_dict() if self.quantization else None,
        }

    def __str__(self):
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items()))
        lines = [f"wrote {self.path} (opset {self.opset})", f"ONNX ops: {ops}"]
        if self.fold is not None:
            c, action = self.fold.counts, keras_bn.fold.Action
            lines.append(
                f"BatchNorms: {self.fold.batchnorms} in the model, {len(self.fold.folded)} "
                f"folded, {c[action.AFFINE]} replaced by affine, {c[action.KEPT]} kept"
            )
        lines.append(str(self.verification))
        if self.quantization is not None:
            lines.append(str(self.quantization))
        lines.append("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        return "\n".join(lines)
