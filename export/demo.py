"""`keras-bn demo`: the whole package on real data that ships with scikit-learn (8x8 digits).

Trains a small CNN with keras_bn.BatchNorm at Keras's default momentum 0.99, as most users do,
for about 150 steps: too few for the moving statistics to forget their initial 0/1, so the model
is good in training and bad at inference. `diagnose` says why, `recalibrate` computes precise
statistics from the training images (no labels), and the recalibrated model is folded, exported
to ONNX and verified in onnxruntime. Prints a summary (accuracies before and after, errors,
BatchNorms before and after folding, ONNX and LiteRT op counts, latencies) and writes
trained.keras, recalibrated.keras, folded.keras, folded.onnx and folded.tflite to the output
directory.
"""

import math
import os
import statistics
import time

import numpy as np

from keras_bn._environment import progress_verbose


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


def build_model(use_batchnorm=True, seed=0, momentum=0.9):
    """The digits CNN. momentum 0.9 (PyTorch's 0.1) by default: with about 150 training steps,
    Keras's default 0.99 leaves the initial 0/1 with 0.99**150 = 22% of the moving statistics,
    and inference accuracy collapses (the demo shows it, then repairs it)."""
    import keras

    import keras_bn

    keras.utils.set_random_seed(seed)
    L = keras.layers
    norm = (
        (lambda name: keras_bn.BatchNorm(momentum=momentum, name=name))
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
    import keras_bn
    from keras_bn import export

    from .files import atomic_output, save_keras

    say = print if verbose else (lambda *a, **k: None)
    _make_folder(out_dir)
    x_train, x_test, y_train, y_test = load_digits_split()
    say(f"data: scikit-learn digits, {len(x_train)} train / {len(x_test)} test images of 8x8")

    def write(model, name):
        path = os.path.join(out_dir, name)
        with atomic_output(path, ".keras") as handle:
            save_keras(model, handle)
        return path

    say("1. train with Keras's default momentum 0.99")
    model, history, steps = _train(x_train, y_train, epochs, verbose)
    trained_path = write(model, "trained.keras")

    say(f"\n2. diagnose ({steps} training steps; momentum 0.99 needs 459 to forget 0/1)")
    diagnosis = keras_bn.diagnose(model, x_train, batch_size=64)
    say(diagnosis)

    say("\n3. recalibrate on the training images (no labels)")
    recalibrated, recalibration = keras_bn.recalibrate(
        model, x_train, batch_size=64, verbose=1 if verbose else 0
    )
    say(recalibration)
    recalibrated_path = write(recalibrated, "recalibrated.keras")

    say("\n4. fold and export the recalibrated model")
    folded, fold_report = keras_bn.fold_bn(recalibrated, samples=x_test)
    say(fold_report)
    folded_path = write(folded, "folded.keras")
    onnx_path = os.path.join(out_dir, "folded.onnx")
    export_report = export.to_onnx(recalibrated, onnx_path, samples=x_test)
    litert_path = os.path.join(out_dir, "folded.tflite")
    litert_report = export.to_litert(recalibrated, litert_path, samples=x_test)
    models = {"trained Keras": model, "recalibrated Keras": recalibrated, "folded Keras": folded}
    table = _compare(models, onnx_path, litert_path, x_test, y_test)

    bn_before, bn_after = _count_batchnorms(model), _count_batchnorms(folded)
    train_accuracy = float(history.history["accuracy"][-1])
    accuracy = table["accuracy"]
    say("")
    _print_table(say, table)
    say(
        f"trained with momentum 0.99 for {steps} steps: training accuracy {train_accuracy:.4f}, "
        f"test accuracy {accuracy['trained Keras']:.4f} from its moving statistics "
        f"(diagnosis: {diagnosis.verdict.value}), {accuracy['recalibrated Keras']:.4f} "
        "after recalibration"
    )
    say("errors and same predictions: against the recalibrated Keras model")
    say(f"BatchNorms: {bn_before} before, {bn_after} after folding")
    _print_files(say, export_report, litert_report)
    say(f"wrote {trained_path}, {recalibrated_path}, {folded_path}, {onnx_path}, {litert_path}")
    return {
        "training_steps": steps,
        "train_accuracy": train_accuracy,
        "accuracy": accuracy,
        "diagnosis": diagnosis.to_dict(),
        "recalibration": recalibration.to_dict(),
        "identical_predictions": table["identical"],
        "max_abs_error": table["max_err"],
        "latency_ms_batch64": table["latency"],
        "batchnorms_before": bn_before,
        "batchnorms_after": bn_after,
        "onnx_op_counts": export_report.op_counts,
        "verification_passed": export_report.verification.passed,
        "litert_ops": litert_report.ops,
        "litert_size_bytes": litert_report.size_bytes,
        "files": [trained_path, recalibrated_path, folded_path, onnx_path, litert_path],
    }


def _print_files(say, export_report, litert_report):
    """The ONNX and LiteRT lines of the summary."""
    ops = ", ".join(f"{k} {v}" for k, v in sorted(export_report.op_counts.items()))
    say(f"ONNX ops: {ops}")
    say(
        f"onnxruntime verification: {'passed' if export_report.verification.passed else 'FAILED'}, "
        f"max abs error {export_report.verification.max_abs_error:.2e}"
    )
    ops = ", ".join(f"{k} {v}" for k, v in sorted(litert_report.ops.items()))
    say(
        f"LiteRT ops: {ops}; {litert_report.size_bytes / 1024:.1f} KiB, verified in the interpreter"
    )


def _count_batchnorms(model):
    import keras_bn
    from keras_bn import _keras_internals as internals

    return sum(
        isinstance(layer, keras_bn.fold.BATCHNORM_TYPES) for layer in internals.all_layers(model)
    )


def _make_folder(out_dir):
    from keras_bn.errors import KerasBNError, expected

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise KerasBNError(
            expected(
                "The demo's output folder is a file", "a folder (made if missing)", repr(out_dir)
            )
        )
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise KerasBNError(
            expected(
                "The demo's output folder cannot be made",
                "a folder this user can write",
                f"{out_dir!r}: {error.strerror}",
            )
        ) from None


def _train(x_train, y_train, epochs, verbose):
    """(model, history, training steps): the demo CNN trained with Keras's momentum 0.99."""
    import keras

    model = build_model(momentum=0.99)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        x_train,
        y_train,
        batch_size=64,
        epochs=epochs,
        validation_split=0.1,
        verbose=progress_verbose(1 if verbose else 0),
    )
    # Keras keeps the first ceil(0.9 n) samples for training (validation_split=0.1).
    steps = epochs * math.ceil(math.ceil(len(x_train) * 0.9) / 64)
    return model, history, steps


def _compare(models, onnx_path, litert_path, x_test, y_test):
    """Accuracy, agreement with the recalibrated model, and batch-64 latency of each Keras model,
    of the ONNX graph in onnxruntime and of the LiteRT file in its interpreter."""
    import onnxruntime as ort
    import tensorflow as tf

    from . import litert

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    logits = {name: m.predict(x_test, verbose=0) for name, m in models.items()}
    logits["ONNX (onnxruntime)"] = session.run(None, {input_name: x_test})[0]
    with open(litert_path, "rb") as f:
        interpreter = litert.interpreter_for(f.read())
    source = models["recalibrated Keras"]  # the model the file was made from
    logits["LiteRT (interpreter)"] = litert.run(interpreter, source, [x_test])[0]
    accuracy = {k: float(np.mean(np.argmax(v, 1) == y_test)) for k, v in logits.items()}
    # Everything after recalibration is compared with the recalibrated model it came from.
    deployed = {k: v for k, v in logits.items() if k != "trained Keras"}
    reference = logits["recalibrated Keras"]
    identical = {
        k: bool(np.array_equal(np.argmax(v, 1), np.argmax(reference, 1)))
        for k, v in deployed.items()
    }
    max_err = {k: float(np.max(np.abs(v - reference))) for k, v in deployed.items()}
    batch = tf.constant(x_test[:64])
    functions = {
        name: tf.function(lambda x, m=m: m(x, training=False)) for name, m in models.items()
    }
    latency = {k: _median_latency(lambda f=f: f(batch).numpy()) for k, f in functions.items()}
    latency["ONNX (onnxruntime)"] = _median_latency(
        lambda: session.run(None, {input_name: x_test[:64]})
    )
    latency["LiteRT (interpreter)"] = _median_latency(
        lambda: litert.run(interpreter, source, [x_test[:64]])
    )
    return {"accuracy": accuracy, "identical": identical, "max_err": max_err, "latency": latency}


def _print_table(say, table):
    say(
        f"{'model':<20} {'test accuracy':>13} {'same predictions':>17} {'max |logit err|':>16} "
        f"{'latency, batch 64 (ms)':>23}"
    )
    for k, accuracy in table["accuracy"].items():
        same = str(table["identical"][k]) if k in table["identical"] else "-"
        err = f"{table['max_err'][k]:.2e}" if k in table["max_err"] else "-"
        say(f"{k:<20} {accuracy:>13.4f} {same:>17} {err:>16} {table['latency'][k]:>23.2f}")
