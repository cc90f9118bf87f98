"""`keras-bn demo`: the whole package on real data that ships with scikit-learn (8x8 digits).

Trains a small CNN with keras_bn.BatchNorm, folds it, exports it to ONNX, verifies the graph in
onnxruntime and prints a summary: accuracies, errors, BatchNorms before/after, ONNX op counts and
latencies. Writes trained.keras, folded.keras and folded.onnx to the output directory.
"""

import os
import statistics
import time

import numpy as np


def load_digits_split(seed=0):
    """scikit-learn's bundled digits (1797 images, no download), scaled to [0, 1], 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    return train_test_split(
        images,
        digits.target.astype("int64"),
        test_size=0.25,
        random_state=seed,
        stratify=digits.target,
    )


def build_model(use_batchnorm=True, seed=0):
    import keras

    import keras_bn

    keras.utils.set_random_seed(seed)
    L = keras.layers
    # momentum 0.9 (PyTorch's 0.1): with ~150 training steps, Keras's default 0.99 leaves the
    # moving variance still 20% made of its initial 1.0, and inference accuracy collapses.
    norm = (
        (lambda name: keras_bn.BatchNorm(momentum=0.9, name=name))
        if use_batchnorm
        else (lambda name: L.Identity(name=name))
    )
    inputs = keras.Input((8, 8, 1), name="digit")
    x = L.Conv2D(16, 3, padding="same", use_bias=not use_batchnorm, name="conv1")(inputs)
    x = L.ReLU()(norm("bn1")(x))
    x = L.Conv2D(32, 3, padding="same", use_bias=not use_batchnorm, name="conv2")(x)
    x = L.MaxPooling2D()(L.ReLU()(norm("bn2")(x)))
    x = L.Conv2D(32, 3, padding="same", use_bias=not use_batchnorm, name="conv3")(x)
    x = L.GlobalAveragePooling2D()(L.ReLU()(norm("bn3")(x)))
    x = L.Dense(64, use_bias=not use_batchnorm, name="fc")(x)
    x = L.ReLU()(norm("bn4")(x))
    outputs = L.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def _median_latency(fn, repeats=30):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_demo(out_dir="keras-bn-demo", epochs=8, verbose=True):
    import keras
    import onnxruntime as ort
    import tensorflow as tf

    import keras_bn
    from keras_bn import export

    from .files import atomic_output, save_keras

    say = print if verbose else (lambda *a, **k: None)
    os.makedirs(out_dir, exist_ok=True)
    x_train, x_test, y_train, y_test = load_digits_split()
    say(f"data: scikit-learn digits, {len(x_train)} train / {len(x_test)} test images of 8x8")

    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x_train,
        y_train,
        batch_size=64,
        epochs=epochs,
        validation_split=0.1,
        verbose=1 if verbose else 0,
    )
    trained_path = os.path.join(out_dir, "trained.keras")
    with atomic_output(trained_path, ".keras") as handle:
        save_keras(model, handle)

    folded, fold_report = keras_bn.fold_bn(model, samples=x_test)
    say(fold_report)
    folded_path = os.path.join(out_dir, "folded.keras")
    with atomic_output(folded_path, ".keras") as handle:
        save_keras(folded, handle)
    onnx_path = os.path.join(out_dir, "folded.onnx")
    export_report = export.to_onnx(model, onnx_path, samples=x_test)

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    logits = {
        "trained Keras": model.predict(x_test, verbose=0),
        "folded Keras": folded.predict(x_test, verbose=0),
        "ONNX (onnxruntime)": session.run(None, {input_name: x_test})[0],
    }
    accuracy = {k: float(np.mean(np.argmax(v, 1) == y_test)) for k, v in logits.items()}
    reference = np.argmax(logits["trained Keras"], 1)
    identical = {k: bool(np.array_equal(np.argmax(v, 1), reference)) for k, v in logits.items()}
    max_err = {k: float(np.max(np.abs(v - logits["trained Keras"]))) for k, v in logits.items()}

    batch = x_test[:64]
    keras_fn = tf.function(lambda x: model(x, training=False))
    folded_fn = tf.function(lambda x: folded(x, training=False))
    xb = tf.constant(batch)
    latency = {
        "trained Keras": _median_latency(lambda: keras_fn(xb).numpy()),
        "folded Keras": _median_latency(lambda: folded_fn(xb).numpy()),
        "ONNX (onnxruntime)": _median_latency(lambda: session.run(None, {input_name: batch})),
    }
    from keras_bn import _keras_internals as internals

    def count_batchnorms(m):
        return sum(
            isinstance(layer, keras_bn.fold.BATCHNORM_TYPES) for layer in internals.all_layers(m)
        )

    bn_before, bn_after = count_batchnorms(model), count_batchnorms(folded)

    say("")
    say(
        f"{'model':<20} {'test accuracy':>13} {'same predictions':>17} {'max |logit err|':>16} "
        f"{'latency, batch 64 (ms)':>23}"
    )
    for k in logits:
        say(
            f"{k:<20} {accuracy[k]:>13.4f} {str(identical[k]):>17} {max_err[k]:>16.2e} "
            f"{latency[k]:>23.2f}"
        )
    say(f"BatchNorms: {bn_before} before, {bn_after} after folding")
    ops = ", ".join(f"{k} {v}" for k, v in sorted(export_report.op_counts.items()))
    say(f"ONNX ops: {ops}")
    say(
        f"onnxruntime verification: {'passed' if export_report.verification.passed else 'FAILED'}, "
        f"max abs error {export_report.verification.max_abs_error:.2e}"
    )
    say(f"wrote {trained_path}, {folded_path}, {onnx_path}")
    return {
        "accuracy": accuracy,
        "identical_predictions": identical,
        "max_abs_error": max_err,
        "latency_ms_batch64": latency,
        "batchnorms_before": bn_before,
        "batchnorms_after": bn_after,
        "onnx_op_counts": export_report.op_counts,
        "verification_passed": export_report.verification.passed,
        "files": [trained_path, folded_path, onnx_path],
    }
