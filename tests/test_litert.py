"""LiteRT: keras_bn.BatchNorm converts as plainly as Keras's layer, and export.to_litert folds,
converts, runs the file in ai_edge_litert's interpreter and writes only what it verified."""

import collections
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf2onnx
from ai_edge_litert.interpreter import Interpreter

import keras_bn
from keras_bn import export
from keras_bn.export import litert
from keras_bn.export.demo import build_model, load_digits_split
from tests.test_cli import cli_in_process
from tests.test_export import PATTERNS
from tests.test_fold import randomize_bn
from tests.tolerances import FOLD_RTOL, ORT_ATOL

L = keras.layers
# What a layer's run-time broadcast shape turns into in a LiteRT graph.
SHAPE_OPS = {"SHAPE", "RESHAPE", "STRIDED_SLICE", "CONCATENATION"}


def three_batchnorms(bn, dense_bn=True):
    """Conv(relu) -> BN -> Conv -> BN -> GlobalAveragePooling -> Dense [-> BN], the issue's
    model, with trained-looking statistics."""
    inputs = keras.Input((16, 16, 3), name="image")
    x = bn(name="bn1")(L.Conv2D(8, 3, activation="relu")(inputs))
    x = bn(name="bn2")(L.Conv2D(8, 3)(x))
    x = L.Dense(4)(L.GlobalAveragePooling2D()(x))
    return randomize_bn(keras.Model(inputs, bn(name="bn3")(x) if dense_bn else x))


def keras_litert_ops(model, tmp_path):
    path = tmp_path / f"{model.name}.tflite"
    model.export(str(path), format="litert", verbose=False)
    return collections.Counter(kind for kind, _ in litert.op_details(path.read_bytes()))


def xnnpack_partitions(content):
    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    return keras_bn._keras_internals.litert_delegate_partitions(interpreter)


def test_the_unfolded_layer_converts_as_plainly_as_keras_own(tmp_path):
    # Channels-last images: the same ops as Keras's layer, the BatchNorm after the plain conv
    # fused into it, the one after the ReLU a MUL and an ADD, and no run-time shape ops.
    ours = keras_litert_ops(three_batchnorms(keras_bn.BatchNorm, dense_bn=False), tmp_path)
    theirs = keras_litert_ops(three_batchnorms(L.BatchNormalization, dense_bn=False), tmp_path)
    assert not SHAPE_OPS & set(ours), ours
    assert ours == theirs, (ours, theirs)
    # After a Dense, the layer's centred inference `(x - mean) * s + beta` (which keeps its
    # digits at a large mean and a small variance, where Keras's `x * s + t` loses them) stays a
    # SUB, a MUL and an ADD the converter does not fuse; still no shape ops. Folding removes it.
    ours = keras_litert_ops(three_batchnorms(keras_bn.BatchNorm), tmp_path)
    theirs = keras_litert_ops(three_batchnorms(L.BatchNormalization), tmp_path)
    assert not SHAPE_OPS & set(ours), ours
    assert ours - theirs == collections.Counter(SUB=1, MUL=1, ADD=1), (ours, theirs)
    report = export.to_litert(three_batchnorms(keras_bn.BatchNorm), tmp_path / "folded.tflite")
    assert report.residue == {} and not {"SUB", "MUL"} & set(report.ops), report.ops
    # XNNPACK takes each graph whole: one partition (the old layer's shape ops split it in four).
    unfolded = tmp_path / "unfolded.tflite"
    three_batchnorms(keras_bn.BatchNorm).export(str(unfolded), format="litert", verbose=False)
    assert report.delegate_partitions == xnnpack_partitions(unfolded.read_bytes()) == 1
    # Raw tf2onnx: no more nodes for our layer than for Keras's.
    counts = {}
    for name, bn in (("ours", keras_bn.BatchNorm), ("keras", L.BatchNormalization)):
        model = three_batchnorms(bn)
        spec = [tf.TensorSpec((None, 16, 16, 3), tf.float32, name="image")]
        proto, _ = tf2onnx.convert.from_function(
            tf.function(lambda x, m=model: m(x, training=False), input_signature=spec),
            input_signature=spec,
        )
        counts[name] = collections.Counter(n.op_type for n in proto.graph.node)
    assert sum(counts["ours"].values()) <= sum(counts["keras"].values()), counts
    assert not {"Shape", "Reshape", "Slice", "Concat"} & set(counts["ours"]), counts


def interpreter_outputs(path, x):
    """The file run directly in the interpreter: an independent check of `litert.run`."""
    interpreter = Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner()
    (name,) = runner.get_input_details()
    return runner(**{name: x})["output_0"]


def through_relu():
    """Conv(relu) -> BN -> Flatten -> Dense: the scale folds through the ReLU, the shift into the
    Dense."""
    inputs = keras.Input((8, 8, 3), name="features")
    x = L.BatchNormalization()(L.Conv2D(4, 3, activation="relu")(inputs))
    return randomize_bn(keras.Model(inputs, L.Dense(2)(L.Flatten()(x))))


# The fold table's patterns (tests/test_export.py), and folding through an activation.
LITERT_PATTERNS = {**PATTERNS, "through_relu": through_relu}


@pytest.mark.parametrize("name", list(LITERT_PATTERNS))
def test_float32_verifies_with_no_batchnorm_residue(name, tmp_path, rng):
    model = LITERT_PATTERNS[name]()
    path = tmp_path / f"{name}.tflite"
    report = export.to_litert(model, path)
    assert report.passed and len(report.rows) == 2  # synthetic batch 4 and batch 1
    # Every BatchNorm folded: no op carries a BatchNorm's name, and no multiply is left (the
    # shape ops of Conv1D and Conv2DTranspose are theirs, with or without a BatchNorm).
    assert report.residue == {} and not {"MUL", "SUB"} & set(report.ops), report.ops
    assert report.fold.counts[keras_bn.fold.Action.AFFINE] == 0
    assert path.stat().st_size == report.size_bytes
    x = rng.normal(size=(3, *model.inputs[0].shape[1:])).astype("float32")
    reference = np.asarray(model(x, training=False))
    np.testing.assert_allclose(
        interpreter_outputs(path, x), reference, atol=ORT_ATOL + FOLD_RTOL * np.abs(reference).max()
    )


def test_a_batchnorm_with_nothing_to_fold_into_is_named_as_residue(tmp_path):
    # Flatten -> BN -> model output: nothing to fold into, so a ChannelAffine multiply-add stays,
    # and the report says which BatchNorm left it (the negative case of the test above).
    inputs = keras.Input((3, 4), name="features")
    x = L.BatchNormalization(name="lonely")(L.Flatten()(inputs))
    model = randomize_bn(keras.Model(inputs, x))
    report = export.to_litert(model, tmp_path / "m.tflite")
    assert report.passed and set(report.residue) == {"lonely"}
    assert {"MUL", "ADD"} & set(report.residue["lonely"]), report.residue


@pytest.fixture(scope="module")
def digits():
    keras.utils.set_random_seed(0)
    x_train, x_test, y_train, y_test = load_digits_split()
    model = build_model(momentum=0.9)
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=64, epochs=3, verbose=0)
    return model, x_train, x_test, y_test


@pytest.mark.parametrize("precision", ["float16", "dynamic", "int8"])
def test_reduced_files_reach_their_agreement_on_the_digits_cnn(precision, digits, tmp_path):
    model, x_train, x_test, y_test = digits
    path = tmp_path / f"{precision}.tflite"
    report = export.to_litert(
        model, path, precision=precision, calibration=x_train, samples=x_test, labels=y_test
    )
    (result,) = report.agreement.values()
    bound = {"float16": (0.99, 0.999), "dynamic": (0.98, 0.99), "int8": (0.98, 0.99)}[precision]
    assert result.top1 >= bound[0] and result.cosine >= bound[1], result
    assert abs(result.accuracy - result.reference_accuracy) <= 0.02, result
    assert report.residue == {} and not SHAPE_OPS & set(report.ops)
    float32_size = len(litert.convert(keras_bn.fold_bn(model)[0]))
    assert report.size_bytes < 0.7 * float32_size, (report.size_bytes, float32_size)
    # Independently: the interpreter's logits against Keras's, by NumPy.
    logits = interpreter_outputs(path, x_test)
    reference = model.predict(x_test, verbose=0)
    assert np.mean(logits.argmax(1) == reference.argmax(1)) >= bound[0]
    if precision == "int8":
        assert {"CONV_2D", "FULLY_CONNECTED"} <= set(report.ops)
        assert not {"MUL", "ADD"} & set(report.ops)  # no float op left by a BatchNorm


def test_int8_io_takes_and_gives_int8(digits, tmp_path):
    model, x_train, x_test, y_test = digits
    path = tmp_path / "io.tflite"
    report = export.to_litert(
        model, path, precision="int8", calibration=x_train, samples=x_test, int8_io=True
    )
    interpreter = Interpreter(model_path=str(path))
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    assert next(iter(report.agreement.values())).top1 >= 0.98


def test_refusals_write_nothing(digits, tmp_path):
    model, x_train, x_test, y_test = digits
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(
        keras_bn.VerificationError, match=r"cosine similarity >= 0\.999999.*Received: 0\.9"
    ):
        export.to_litert(
            model, tmp_path / "q.tflite", precision="int8", calibration=x_train, samples=x_test,
            min_cosine=0.999999,
        )  # fmt: skip
    with pytest.raises(keras_bn.KerasBNError, match="int8 needs calibration data"):
        export.to_litert(model, tmp_path / "q.tflite", precision="int8")
    with pytest.raises(keras_bn.KerasBNError, match="Unknown `precision`.*'int4'"):
        export.to_litert(model, tmp_path / "q.tflite", precision="int4")
    with pytest.raises(keras_bn.KerasBNError, match=r"\.tflite"):
        export.to_litert(model, tmp_path / "q.onnx")

    class Determinant(L.Layer):  # an op LiteRT's builtins lack
        def call(self, x):
            return tf.linalg.det(x)

    inputs = keras.Input((3, 3))
    with pytest.raises(
        keras_bn.KerasBNError,
        match=r"cannot convert this model with LiteRT's builtin ops.*MatrixDeterminant",
    ):
        export.to_litert(keras.Model(inputs, Determinant()(inputs)), tmp_path / "det.tflite")
    assert sorted(os.listdir(tmp_path)) == before


def test_a_missing_litert_extra_is_one_line(monkeypatch):
    from keras_bn import _environment

    monkeypatch.setitem(_environment.EXTRAS, "litert", ("tensorflow", "no_such_litert_kbn"))
    with pytest.raises(keras_bn.MissingExtraError, match=r'pip install "keras-bn\[litert\]"'):
        export.to_litert(keras.Sequential([keras.Input((2,))]), "m.tflite")
    run = cli_in_process("export", "m.keras", "-o", "m.tflite")
    assert run.returncode == 2 and 'pip install "keras-bn[litert]"' in run.stderr


def test_the_command_line_picks_litert_by_extension(digits, tmp_path):
    model, x_train, x_test, y_test = digits
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", x_test)
    np.save(tmp_path / "calib.npy", x_train[:200])
    run = cli_in_process(
        "export", tmp_path / "m.keras", "-o", tmp_path / "m.tflite", "--samples",
        tmp_path / "x.npy", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["batchnorm_residue"] == {}
    run = cli_in_process(
        "export", tmp_path / "m.keras", "-o", tmp_path / "q.tflite", "--precision", "int8",
        "--calibration", tmp_path / "calib.npy", "--samples", tmp_path / "x.npy",
    )  # fmt: skip
    assert run.returncode == 0 and "top-1 agreement" in run.stdout, run.stderr
    # ONNX-only options are refused with a .tflite output, and nothing is written.
    run = cli_in_process(
        "export", tmp_path / "m.keras", "-o", tmp_path / "n.tflite", "--opset", "13"
    )
    assert run.returncode == 2 and "--opset" in run.stderr
    assert not (tmp_path / "n.tflite").exists()
