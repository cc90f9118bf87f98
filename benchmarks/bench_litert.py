"""LiteRT files from keras_bn.export.to_litert against Keras's own model.export(format="litert")
of the unfolded model: LiteRT ops, size, and the LiteRT interpreter's latency at batch 1
(XNNPACK, 1 and 2 threads), in one process, interleaved round by round.

    python benchmarks/bench_litert.py [--rounds 15] [--calls 50]

Models: the digits CNN of the demo (keras_bn.BatchNorm), the issue's Conv(relu) -> BN -> Conv ->
BN -> Dense -> BN network (keras_bn.BatchNorm and, for Keras's side, Keras's
BatchNormalization), and MobileNetV2 0.35 at 96x96 (Keras's BatchNormalization, random weights
and statistics).
"""

import argparse
import collections
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import results  # noqa: E402  (benchmarks/results.py, beside this script)
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

import keras_bn  # noqa: E402
from keras_bn.export import litert  # noqa: E402
from keras_bn.export.demo import build_model  # noqa: E402

L = keras.layers


def randomize(model, seed=0):
    """Statistics and affine weights of a trained-looking model, so nothing folds trivially."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, (keras_bn.BatchNorm, L.BatchNormalization)):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
                layer.beta.assign(rng.normal(0, 0.2, n).astype("float32"))
    return model


def three_batchnorms(bn):
    inputs = keras.Input((32, 32, 3))
    x = bn()(L.Conv2D(16, 3, activation="relu")(inputs))
    x = bn()(L.Conv2D(16, 3)(x))
    x = L.Dense(10)(L.GlobalAveragePooling2D()(x))
    return randomize(keras.Model(inputs, bn()(x)))


def keras_export(model):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.tflite")
        model.export(path, format="litert", verbose=False)
        with open(path, "rb") as f:
            return f.read()


def ours(model, folder):
    path = os.path.join(folder, f"{model.name}.tflite")
    litert.to_litert(model, path)
    with open(path, "rb") as f:
        return f.read()


def invoker(content, shape, threads):
    interpreter = Interpreter(model_content=content, num_threads=threads)
    interpreter.allocate_tensors()
    (detail,) = interpreter.get_input_details()
    x = np.random.default_rng(0).normal(size=(1, *shape)).astype("float32")
    interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()  # warm-up
    return interpreter.invoke


def median_ms(call, calls):
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def ops_text(content):
    counts = collections.Counter(kind for kind, _ in litert.op_details(content))
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    cases = [
        ("digits CNN", randomize(build_model(momentum=0.9)), None),
        ("3 BatchNorms", three_batchnorms(keras_bn.BatchNorm), three_batchnorms(L.BatchNormalization)),
        ("MobileNetV2 0.35 96x96", randomize(keras.applications.MobileNetV2(
            (96, 96, 3), alpha=0.35, weights=None, classifier_activation=None)), None),
    ]  # fmt: skip
    files = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, model, keras_twin in cases:
            files[name] = {
                "keras-bn to_litert": ours(model, folder),
                "Keras export, unfolded": keras_export(model),
            }
            if keras_twin is not None:
                files[name]["Keras export, Keras's BatchNormalization"] = keras_export(keras_twin)
    print(f"median of {args.rounds} interleaved rounds x {args.calls} invokes, batch 1, XNNPACK")
    print(
        "| model | file | LiteRT ops | size (KiB) | 1 thread (ms) | 2 threads (ms) | keras-bn / this, 1 thread | 2 threads |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, model, _ in cases:
        shape = model.inputs[0].shape[1:]
        calls = {
            (side, t): invoker(content, shape, t)
            for side, content in files[name].items()
            for t in (1, 2)
        }
        times = collections.defaultdict(list)
        for _ in range(args.rounds):
            for key, call in calls.items():
                times[key].append(median_ms(call, args.calls))
        for side, content in files[name].items():
            ratios = [
                statistics.median(
                    a / b for a, b in zip(times[("keras-bn to_litert", t)], times[(side, t)])
                )
                for t in (1, 2)
            ]
            print(
                f"| {name} | {side} | {ops_text(content)} | {len(content) / 1024:.1f} | "
                f"{statistics.median(times[(side, 1)]):.3f} | "
                f"{statistics.median(times[(side, 2)]):.3f} | {ratios[0]:.2f} | {ratios[1]:.2f} |"
            )


if __name__ == "__main__":
    with results.recorded("litert"):
        main()
