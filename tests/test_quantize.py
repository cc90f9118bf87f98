"""Reduced-precision export (precision="float16" / "int8"): real onnxruntime conversion and static
quantization, accepted by agreement with the float32 Keras model, and nothing written otherwise."""

import os
import re
import tempfile

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from keras_bn import KerasBNError, VerificationError, export
from keras_bn.export import quantize
from keras_bn.verification import agreement
from tests.test_export import PATTERNS

L = keras.layers

# The pattern suite's BatchNorm kinds: after Dense, DepthwiseConv2D, Conv2DTranspose, a grouped
# convolution, and before a Conv (BN -> Conv).
QUANTIZED_PATTERNS = [
    "dense",
    "depthwise2d",
    "conv2d_transpose",
    "grouped_conv2d",
    "bn_then_valid_conv",
]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """A temporary directory of this test's own for tempfile (the quantizer's and onnxruntime's
    calibration files), so that what is left there can be checked while other tests run."""
    folder = tmp_path / "tempfile"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def left_in(folder):
    """What is left in `folder`, less TensorFlow's autograph cache (converted code that TF keeps
    for the life of the process, whoever traced it)."""
    return [n for n in os.listdir(folder) if not n.startswith("__autograph_generated_file")]


def inputs_for(model, rng, n):
    return rng.normal(size=(n, *model.inputs[0].shape[1:])).astype("float32")


@pytest.mark.parametrize("precision", ["float16", "int8"])
@pytest.mark.parametrize("name", QUANTIZED_PATTERNS)
def test_pattern_suite_passes_its_agreement_bound(name, precision, tmp_path, rng, private_tmp):
    model = PATTERNS[name]()
    calibration, samples = inputs_for(model, rng, 64), inputs_for(model, rng, 32)
    path = tmp_path / f"{name}.onnx"
    # The dense pattern's (batch, 5) tanh output is shaped like a classifier's but is none: on
    # random inputs its top-1 "agreement" counts near-ties (int8 measured 0.97). The cosine
    # bound judges it; a user sets min_agreement=0 for such an output the same way.
    bounds = {"min_agreement": 0.0} if name == "dense" else {}
    report = export.to_onnx(
        model, path, samples=samples, precision=precision, calibration=calibration, **bounds
    )
    q = report.quantization
    assert q.precision == precision and q.input_set == "samples"
    graph = onnx.load(path)
    ops = [n.op_type for n in graph.graph.node]
    assert "BatchNormalization" not in ops
    qdq, quantized, floating = quantize.op_split(graph)
    # No Mul/Add left from a BatchNorm: every one folded into its neighbour (the one Add is a
    # Dense's bias, as tf2onnx writes Dense: MatMul + Add; see test_export's pattern suite).
    assert "Mul" not in ops and ops.count("Add") <= 1, ops
    if precision == "int8":
        assert qdq.get("QuantizeLinear", 0) > 0 and quantized, (qdq, quantized)
        weights = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8]
        assert weights  # int8 weights stored as such
        # What onnxruntime runs: each layer one int8 kernel, but ConvTranspose, for which its CPU
        # provider has none (it runs in float between DequantizeLinear and QuantizeLinear). The
        # final tanh (which onnxruntime's quantizer leaves unquantized) runs on the dequantized
        # output.
        kernel = {"dense": "QGemm", "conv2d_transpose": None}.get(name, "QLinearConv")
        assert q.runtime_int8_ops == ({kernel: 1} if kernel else {}), q.runtime_int8_ops
        left = {"ConvTranspose": 1} if name == "conv2d_transpose" else {}
        if "Tanh" in ops:
            left["Tanh"] = 1
        assert q.runtime_float_ops == left, q.runtime_float_ops
    else:
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer)
        assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # Independent check of the bound: our own onnxruntime run against Keras, cosine in NumPy.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: samples})[0].astype(np.float64)
    ref = np.asarray(model(samples, training=False), np.float64)
    cosine = np.dot(out.ravel(), ref.ravel()) / (np.linalg.norm(out) * np.linalg.norm(ref))
    assert cosine >= (0.999 if precision == "float16" else 0.99), cosine
    np.testing.assert_allclose(next(iter(q.agreement.values())).cosine, cosine, rtol=1e-6)
    assert q.bytes > 0 and q.float32_bytes > 0  # tiny graphs: sizes are reported, not compared
    assert left_in(private_tmp) == []  # the quantizer's temporary files are gone


def inverted_residual():
    """MobileNetV2's block: 1x1 expand -> BN -> ReLU6, depthwise 3x3 -> BN -> ReLU6, 1x1 project
    -> BN, added to the input; then a 1x1 Conv reading the sum."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 8))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(16, 1, use_bias=False)(inputs)))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same")(x)))
    x = L.Add()([inputs, L.BatchNormalization()(L.Conv2D(8, 1, use_bias=False)(x))])
    model = keras.Model(inputs, L.Conv2D(16, 1)(x))
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.3, c))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
    return model


def test_int8_inverted_residual_runs_in_int8_kernels_only(tmp_path, rng):
    model = inverted_residual()
    x = rng.normal(size=(64, 12, 12, 8)).astype("float32")
    report = export.to_onnx(model, tmp_path / "r.onnx", precision="int8", calibration=x)
    q = report.quantization
    # Four Convs and one Add in the model, each one onnxruntime int8 kernel; nothing float.
    assert q.runtime_int8_ops == {"QLinearConv": 4, "QLinearAdd": 1}, q.runtime_int8_ops
    assert q.runtime_float_ops == {}
    assert "onnxruntime runs 5 int8 kernels and 0 float ops on dequantized tensors" in str(report)
    # Why the activations are uint8: the same float32 graph quantized with onnxruntime's int8
    # activations (its default) leaves the residual Add, the Conv after it and a Transpose between
    # them in float.
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float32 = tmp_path / "f.onnx"
    export.to_onnx(model, float32, samples=x)
    name = ort.InferenceSession(str(float32)).get_inputs()[0].name
    quant_pre_process(str(float32), str(tmp_path / "prepared.onnx"))
    quantize_static(
        str(tmp_path / "prepared.onnx"),
        str(tmp_path / "s8.onnx"),
        quantize._Feeds([{name: x}]),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QInt8,
        extra_options={"WeightSymmetric": True},
    )
    int8, floating = quantize.runtime_split((tmp_path / "s8.onnx").read_bytes())
    assert int8 == {"QLinearConv": 3}, int8
    assert floating == {"Add": 1, "Conv": 1, "Transpose": 1}, floating


def classifier():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="digit")
    x = L.BatchNormalization()(L.Conv2D(8, 3, use_bias=False)(inputs))
    x = L.GlobalAveragePooling2D()(L.ReLU()(x))
    return keras.Model(inputs, L.Dense(10, name="logits")(L.BatchNormalization()(x)))


def test_agreement_and_accuracy_are_reported_for_classification_outputs(tmp_path, rng):
    model = classifier()
    x = rng.random((256, 8, 8, 1), dtype=np.float32)
    labels = np.argmax(np.asarray(model(x, training=False)), 1)  # the float model is "right"
    labels[:10] = (labels[:10] + 1) % 10  # and wrong on ten
    report = export.to_onnx(
        model,
        tmp_path / "c.onnx",
        precision="int8",
        calibration=x,
        labels=labels,
        measure_latency=True,
    )
    a = report.quantization.agreement["logits"]
    assert report.quantization.input_set == "calibration data"
    assert a.reference_accuracy == pytest.approx(246 / 256)
    assert a.top1 >= 0.98 and abs(a.accuracy - a.reference_accuracy) <= 1 - a.top1 + 1e-9
    assert set(report.quantization.latency_ms) == {"float32", "int8"}
    assert all(ms > 0 for times in report.quantization.latency_ms.values() for ms in times.values())
    assert (
        "top-1 agreement" in str(report) and report.to_dict()["quantization"]["precision"] == "int8"
    )
    assert report.quantization.runtime_int8_ops == {
        "QLinearConv": 1,
        "QLinearGlobalAveragePool": 1,
        "QLinearMatMul": 1,
    }
    assert report.to_dict()["quantization"]["runtime_float_ops"] == {}


def test_keep_float_leaves_the_named_layer_in_float32(tmp_path, rng):
    model = classifier()
    conv = next(layer.name for layer in model.layers if isinstance(layer, L.Conv2D))
    x = rng.random((128, 8, 8, 1), dtype=np.float32)
    path = tmp_path / "k.onnx"
    report = export.to_onnx(model, path, precision="int8", calibration=x, keep_float=[conv])
    q = report.quantization
    assert q.kept_float == [conv] and f"kept float32: {conv}" in str(report)
    # The Conv is a float Conv with float32 weights; the rest is still int8.
    assert q.runtime_int8_ops == {"QLinearGlobalAveragePool": 1, "QLinearMatMul": 1}
    graph = onnx.load(path)
    floats = {i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1 and convs[0].input[1] in floats and f"/{conv}" in convs[0].name
    # Negative cases, each before any quantization: a name that is no layer, a BatchNorm that
    # folding removes, keep_float in a float32 export.
    bn = next(layer.name for layer in model.layers if isinstance(layer, L.BatchNormalization))
    for kwargs, message in (
        ({"precision": "int8", "keep_float": ["nope"]}, r"`keep_float` names layers of the model"),
        ({"precision": "int8", "keep_float": [bn]}, r"it was folded or fused into a neighbour"),
        ({"keep_float": [conv]}, r"Expected: precision='float16' or 'int8'"),
    ):
        with pytest.raises(KerasBNError, match=message):
            export.to_onnx(model, tmp_path / "bad.onnx", calibration=x, **kwargs)
    assert not (tmp_path / "bad.onnx").exists()


def int8_weights(graph):
    """The quantized weights of a QDQ graph: int8 initializers that a DequantizeLinear reads as
    its data (input 0; input 2 is the zero point; activations are uint8)."""
    data = {n.input[0] for n in graph.graph.node if n.op_type == "DequantizeLinear"}
    return [
        onnx.numpy_helper.to_array(i)
        for i in graph.graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and i.name in data
    ]


def test_reduce_range_quantizes_weights_to_7_bits(tmp_path, rng):
    model = classifier()
    x = rng.random((128, 8, 8, 1), dtype=np.float32)
    peaks = {}
    for reduce_range in (True, False):
        path = tmp_path / f"{reduce_range}.onnx"
        q = export.to_onnx(
            model, path, precision="int8", calibration=x, reduce_range=reduce_range
        ).quantization
        assert q.reduce_range is reduce_range
        assert q.reduce_range_reason == f"reduce_range={reduce_range} was asked for"
        weights = int8_weights(onnx.load(path))
        assert len(weights) == 2  # the Conv (with its BatchNorm folded in) and the Dense
        # Symmetric per channel: each channel's largest weight maps to the range's end.
        peaks[reduce_range] = max(int(np.abs(w.astype(int)).max()) for w in weights)
    assert peaks == {True: 64, False: 127}
    assert "weights 8-bit: reduce_range=False was asked for" in str(
        export.to_onnx(
            model, tmp_path / "s.onnx", precision="int8", calibration=x, reduce_range=False
        )
    )
    # None decides by this machine, and says so.
    q = export.to_onnx(model, tmp_path / "auto.onnx", precision="int8", calibration=x).quantization
    assert q.reduce_range is quantize.int8_may_saturate()
    assert ("without VNNI" in q.reduce_range_reason) is q.reduce_range
    # Negative cases, before any work: not a bool, and reduce_range without int8.
    for kwargs, message in (
        ({"precision": "int8", "reduce_range": "yes"}, r"Invalid `reduce_range`"),
        ({"precision": "float16", "reduce_range": True}, r"Expected: precision='int8'"),
    ):
        with pytest.raises(KerasBNError, match=message):
            export.to_onnx(model, tmp_path / "bad.onnx", calibration=x, **kwargs)
    assert not (tmp_path / "bad.onnx").exists()


def test_int8_may_saturate_on_x86_without_vnni(tmp_path):
    # onnxruntime's guidance (quantize_static): reduce_range on x86-64 without VNNI only.
    zen3 = {"sse4_2", "avx", "avx2", "fma"}  # the flags of the machine the bug was found on
    assert quantize.int8_may_saturate("x86_64", zen3)
    assert quantize.int8_may_saturate("AMD64", zen3)  # Windows spells it so
    assert not quantize.int8_may_saturate("x86_64", zen3 | {"avx512f", "avx512_vnni"})
    assert not quantize.int8_may_saturate("x86_64", zen3 | {"avx_vnni"})  # Alder Lake
    assert not quantize.int8_may_saturate("aarch64", zen3)
    assert not quantize.int8_may_saturate("arm64", set())
    # Unreadable flags on x86-64: the safe answer, whatever this machine's CPU has (found on an
    # AVX-512 VNNI machine, where None was taken for "read this CPU's flags").
    assert quantize.int8_may_saturate("x86_64", None) is True
    # The default is this CPU's flags, as cpu_flags() reads them.
    assert quantize.int8_may_saturate("x86_64") is quantize.int8_may_saturate(
        "x86_64", quantize.cpu_flags()
    )
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\n"
        "flags\t\t: fpu sse2 avx2 avx512_vnni\nbogomips\t: 4890.81\n\n"
    )
    assert quantize.cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", "avx512_vnni"}
    assert quantize.cpu_flags(tmp_path / "missing") is None
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # ARM's word for them
    assert quantize.cpu_flags(cpuinfo) is None


def test_below_the_bound_nothing_is_written(tmp_path, rng, private_tmp):
    model = classifier()
    x = rng.random((64, 8, 8, 1), dtype=np.float32)
    path = tmp_path / "strict.onnx"
    # int8 never reproduces float32 exactly: a cosine of 1.0 cannot be reached.
    with pytest.raises(
        VerificationError,
        match=r"The int8 graph's output 'logits' disagrees with the float32 Keras model on the "
        r"calibration data; nothing was written\. Expected: cosine similarity >= 1\. Received: 0\.9",
    ):
        export.to_onnx(model, path, precision="int8", calibration=x, min_cosine=1.0)
    assert not path.exists() and os.listdir(tmp_path) == ["tempfile"]
    assert left_in(private_tmp) == []


def test_bad_reduced_precision_arguments_are_refused_before_any_work(tmp_path, rng):
    model = classifier()
    x = rng.random((16, 8, 8, 1), dtype=np.float32)
    path = tmp_path / "m.onnx"
    cases = [
        ({"precision": "int8"}, r"int8 export needs calibration data"),
        ({"precision": "int4", "calibration": x}, r"Unknown `precision`"),
        ({"precision": "int8", "calibration": x[:, :4]}, r"wrong shape|shape"),
        ({"precision": "int8", "calibration": x, "calibrate_method": "kl"}, r"calibrate_method"),
        ({"precision": "float16", "min_agreement": 1.5}, r"Invalid `min_agreement`"),
        ({"precision": "int8", "calibration": x, "labels": np.zeros(3)}, r"integers"),
        ({"precision": "int8", "calibration": x, "labels": np.zeros(3, int)}, r"16 labels"),
    ]
    for kwargs, message in cases:
        with pytest.raises(KerasBNError, match=message):
            export.to_onnx(model, path, **kwargs)
    assert not path.exists()


def test_reduced_precision_of_a_mixed_precision_model_is_refused(tmp_path, rng, mixed_policy):
    mixed_policy("mixed_float16")
    model = classifier()
    x = rng.random((16, 8, 8, 1), dtype=np.float32)
    with pytest.raises(
        KerasBNError,
        match=r"precision='int8' converts a float32 graph\. Expected: a float32 model\. "
        r"Received: a model computing in float16",
    ):
        export.to_onnx(model, tmp_path / "m.onnx", precision="int8", calibration=x)
    assert os.listdir(tmp_path) == []


def test_agreement_against_numpy():
    reference = np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]])
    candidate = np.array([[0.9, 0.1, -1.0], [0.0, 0.5, 1.0]])  # second row's argmax moves
    a = agreement(reference, candidate, labels=[0, 2])
    assert a.top1 == 0.5 and a.reference_accuracy == 0.5 and a.accuracy == 1.0
    cos = np.dot(reference.ravel(), candidate.ravel()) / (
        np.linalg.norm(reference) * np.linalg.norm(candidate)
    )
    assert a.cosine == pytest.approx(cos)
    assert a.max_abs_rel == pytest.approx(1.5 / 2.0) and a.mean_abs_rel == pytest.approx(
        1.7 / 6 / 2
    )
    nan = agreement(reference, np.where(reference > 1, np.nan, candidate))
    assert nan.max_abs_rel == np.inf and nan.cosine <= 0.0
    assert agreement(np.ones((4, 3, 3)), np.ones((4, 3, 3))).top1 is None  # not a classifier


def test_export_command_precision_exit_codes(tmp_path, rng):
    import json

    from tests.test_cli import cli_in_process, one_line_error

    model = classifier()
    model.save(tmp_path / "m.keras")
    x = rng.random((128, 8, 8, 1), dtype=np.float32)
    np.save(tmp_path / "calib.npy", x)
    np.save(tmp_path / "y.npy", np.argmax(np.asarray(model(x, training=False)), 1))
    out = tmp_path / "m.int8.onnx"
    run = cli_in_process(
        "export", tmp_path / "m.keras", "-o", out, "--precision", "int8",
        "--calibration", tmp_path / "calib.npy", "--labels", tmp_path / "y.npy", "--json",
        "--reduce-range", "on",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)["quantization"]
    assert (
        summary["precision"] == "int8"
        and summary["agreement"]["logits"]["reference_accuracy"] == 1.0
        and summary["reduce_range"] is True
    )
    assert "calibrating and quantizing to int8" in run.stderr and out.exists()
    graph = onnx.load(out)
    assert any(n.op_type == "QuantizeLinear" for n in graph.graph.node)
    # Below the bound: exit 1, the output and the value named, nothing written.
    strict = tmp_path / "strict.onnx"
    run = cli_in_process(
        "export", tmp_path / "m.keras", "-o", strict, "--precision", "int8",
        "--calibration", tmp_path / "calib.npy", "--min-cosine", "1.0",
    )  # fmt: skip
    assert run.returncode == 1 and not strict.exists()
    one_line_error(
        run, r"output 'logits' disagrees .* Expected: cosine similarity >= 1\. Received: 0\.9"
    )
    # Bad input: exit 2 before any work.
    run = cli_in_process("export", tmp_path / "m.keras", "-o", strict, "--precision", "int8")
    assert run.returncode == 2
    one_line_error(run, r"int8 export needs calibration data")
    run = cli_in_process("export", tmp_path / "m.keras", "-o", strict, "--reduce-range", "on")
    assert run.returncode == 2 and not strict.exists()
    one_line_error(run, r"`reduce_range` chooses 7-bit weights .* Expected: precision='int8'")
    run = cli_in_process(
        "export", tmp_path / "m.keras", "-o", strict, "--precision", "int8",
        "--calibration", tmp_path / "calib.npy", "--keep-float", "nope",
    )  # fmt: skip
    assert run.returncode == 2 and not strict.exists()
    one_line_error(run, r"`keep_float` names layers of the model")
    np.save(tmp_path / "wrong.npy", x[:, :4])
    run = cli_in_process(
        "export", tmp_path / "m.keras", "-o", strict, "--precision", "int8",
        "--calibration", tmp_path / "wrong.npy",
    )  # fmt: skip
    assert run.returncode == 2 and not strict.exists()
    one_line_error(run, r"shape")
    # The calibration file is an input: never the output.
    run = cli_in_process(
        "export", tmp_path / "m.keras", "-o", tmp_path / "calib.npy", "--precision", "int8",
        "--calibration", tmp_path / "calib.npy",
    )  # fmt: skip
    assert run.returncode == 2 and np.array_equal(np.load(tmp_path / "calib.npy"), x)


def test_keras_native_int8_after_folding_keeps_no_float_batchnorm(rng):
    # Keras 3's own model.quantize("int8") quantizes Dense (EinsumDense, Embedding) layers and
    # nothing else: a BatchNorm stays a float layer between them. Folded first, Dense -> BN
    # becomes one Dense, and the quantized model has no float BatchNorm left.
    import keras_bn
    from keras_bn.verification import AGREEMENT

    keras.utils.set_random_seed(0)
    inputs = keras.Input((20,))
    x = L.ReLU()(L.BatchNormalization()(L.Dense(64, use_bias=False)(inputs)))
    x = L.ReLU()(L.BatchNormalization()(L.Dense(32)(x)))
    model = keras.Model(inputs, L.Dense(10, name="logits")(x))
    x = rng.normal(size=(512, 20)).astype("float32")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, rng.integers(0, 10, 512), epochs=2, verbose=0)
    reference = model.predict(x, verbose=0)
    folded, _ = keras_bn.fold_bn(model)
    folded.quantize("int8")
    dense = [layer for layer in folded.layers if isinstance(layer, L.Dense)]
    assert len(dense) == 3 and all(layer.quantization_mode == "int8" for layer in dense)
    assert all(layer.kernel.dtype == "int8" for layer in dense)
    assert not any(isinstance(layer, L.BatchNormalization) for layer in folded.layers)
    a = agreement(reference, folded.predict(x, verbose=0))
    assert a.top1 >= AGREEMENT["int8"]["min_agreement"], a  # measured 0.986
    assert a.cosine >= AGREEMENT["int8"]["min_cosine"], a  # measured 0.99994
    # Negative: quantized without folding, both BatchNorms stay float layers.
    unfolded = keras.models.clone_model(model)
    unfolded.set_weights(model.get_weights())
    unfolded.quantize("int8")
    kept = [layer for layer in unfolded.layers if isinstance(layer, L.BatchNormalization)]
    assert len(kept) == 2 and all(v.dtype == "float32" for layer in kept for v in layer.weights)


class PlainConv1D(keras.layers.Conv1D):
    """A custom Conv1D (its own call): exported as Keras traces it, a dilated one wrapped in
    SpaceToBatch/BatchToSpace."""

    def call(self, inputs):
        return super().call(inputs)


def test_int8_of_an_open_length_model_leaves_the_working_directory_as_it_was(
    tmp_path, monkeypatch, rng
):
    # onnxruntime's symbolic shape inference gives up on this graph (measured: "Incomplete
    # symbolic shape inference", a SpaceToBatch-wrapped dilated conv added to its input over
    # an open length) and writes sym_shape_infer_temp.onnx into the working directory before
    # raising; the export runs it where nothing can escape, then without the symbolic step.
    L = keras.layers
    inputs = keras.Input((None, 4), name="sequence")
    y = L.Conv1D(8, 1)(inputs)
    x = L.Add()([PlainConv1D(8, 3, dilation_rate=2, padding="same")(y), y])
    x = L.BatchNormalization()(x)
    model = keras.Model(inputs, L.Conv1D(3, 1, name="head")(L.Cropping1D((40, 40))(x)))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    samples = rng.normal(size=(16, 100, 4)).astype("float32")
    report = export.to_onnx(model, tmp_path / "m.onnx", precision="int8", calibration=samples)
    assert report.quantization.agreement["head"].cosine >= 0.99
    assert os.listdir(work) == []
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "work"]
    # The symbolic step itself still fails on the float32 graph, in a directory of its own.
    float_path = str(tmp_path / "float32.onnx")
    export.to_onnx(model, float_path, samples=samples)
    with tempfile.TemporaryDirectory() as scratch:
        assert quantize.pre_process(float_path, os.path.join(scratch, "p.onnx"), scratch) is True


def test_float16_export_refuses_folded_weights_it_cannot_hold_unless_kept_float(tmp_path, rng):
    # Running variances up to 2.3e8 (a UNet's first BatchNorm on astronomical images): folded,
    # about half of the conv's weights fall below float16's smallest normal number.
    L = keras.layers
    inputs = keras.Input((8, 8, 2), name="image")
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv")(inputs))
    model = keras.Model(inputs, L.Conv2D(2, 1, name="head")(L.ReLU()(x)))
    model.get_layer("conv").set_weights(
        [rng.normal(0, 0.05, (3, 3, 2, 4)).astype("float32"), np.zeros(4, "float32")]
    )
    model.get_layer("bn").moving_variance.assign(np.array([2.3e8, 1e8, 1.0, 2.0], "float32"))
    path = tmp_path / "m.onnx"
    with pytest.raises(KerasBNError, match=r"float16 cannot hold.*'conv'.*keep_float=\['conv'\]"):
        export.to_onnx(model, path, precision="float16")
    assert not path.exists()
    report = export.to_onnx(model, path, precision="float16", keep_float=["conv"])
    graph = onnx.load(path)
    floats = {i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    halves = {i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    # tf2onnx names a node by the layer's scope, uniquified: functional_1/conv_1/convolution.
    scope = {n.name: re.sub(r"_\d+$", "", (["", *n.name.split("/")])[-2]) for n in graph.graph.node}
    convs = {scope[n.name]: n for n in graph.graph.node if n.op_type == "Conv"}
    assert convs["conv"].input[1] in floats and convs["head"].input[1] in halves
    assert report.quantization.agreement["head"].cosine >= 0.999


def test_float16_export_refuses_activations_beyond_float16s_range(tmp_path, rng):
    # A hidden activation reaching about 7e4 (float16's largest number is 65504), scaled back
    # down by the next layer.
    L = keras.layers
    inputs = keras.Input((4,), name="x")
    hidden = L.Dense(8, name="hidden", activation="relu")(inputs)
    model = keras.Model(inputs, L.Dense(3, name="out")(hidden))
    model.get_layer("hidden").set_weights([np.full((4, 8), 1e4, "float32"), np.zeros(8, "float32")])
    model.get_layer("out").set_weights(
        [rng.normal(0, 1e-4, (8, 3)).astype("float32"), np.zeros(3, "float32")]
    )
    samples = np.abs(rng.normal(1.75, 0.1, (16, 4))).astype("float32")  # hidden ~ 7e4
    assert np.abs(model.predict(samples, verbose=0)).max() < 100
    path = tmp_path / "m.onnx"
    pattern = r"float16 graph would overflow.*[^']*/Relu:0' \(in hidden, out\) up to 7\.\d+e\+04"
    with pytest.raises(VerificationError, match=pattern):
        export.to_onnx(model, path, precision="float16", samples=samples)
    # keep_float does not help: onnxruntime's converter stores the tensors between kept ops in
    # float16 too (they pass through a Cast to float16 and back).
    with pytest.raises(VerificationError, match=r"float16 graph would overflow"):
        export.to_onnx(model, path, precision="float16", samples=samples, keep_float=["hidden"])
    assert not path.exists()
    # What the check prevents: the float16 graph as the converter makes it, in float16
    # arithmetic (onnx's reference evaluator, NumPy float16), gives inf or NaN.
    float32_path = tmp_path / "f32.onnx"
    export.to_onnx(model, float32_path)
    half = onnx.load_from_string(quantize.to_float16(float32_path.read_bytes()))
    # The converter appends its input casts at the end; the reference evaluator wants the nodes
    # in topological order.
    ready = {i.name for i in half.graph.input} | {t.name for t in half.graph.initializer} | {""}
    nodes, ordered = list(half.graph.node), []
    while nodes:
        node = next(n for n in nodes if all(i in ready for i in n.input))
        nodes.remove(node)
        ordered.append(node)
        ready.update(node.output)
    del half.graph.node[:]
    half.graph.node.extend(ordered)
    from onnx.reference import ReferenceEvaluator

    (out,) = ReferenceEvaluator(half).run(None, {"x": samples})
    assert not np.all(np.isfinite(out))
    # Ten times smaller (hidden ~ 7e3): within range, checked and exported.
    model.get_layer("hidden").set_weights([np.full((4, 8), 1e3, "float32"), np.zeros(8, "float32")])
    report = export.to_onnx(model, path, precision="float16", samples=samples)
    assert report.quantization.float16_range["checked_tensors"] >= 4
    assert report.quantization.float16_range["check_inputs"] == 4 + 16
    assert "within float16's +-65504 on 20 inputs" in str(report.quantization)
