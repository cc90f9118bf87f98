"""Reduced-precision export against the anchor: raw tf2onnx (unfolded), then the same onnxruntime
conversion, against `export.to_onnx(precision=...)`, side by side in one process.

Models: the demo's digits CNN, trained 6 epochs, with the real test images and labels; and
MobileNetV2 (weights=None, alpha=0.35, 96x96) with randomized BatchNorm statistics and synthetic
calibration data. For each side and precision it prints the float Mul/Add between quantized ops
(what raw export leaves from BatchNorm), the int8 kernels onnxruntime fused and the ops it still
runs in float on dequantized tensors (`quantize.runtime_split`), top-1 agreement, cosine and
accuracy against the float32 Keras model, file size, onnxruntime latency at batch 1 and 32
(median of interleaved rounds) and the batch-32 latency over keras-bn's float32 (median of the
per-round ratios).

    python benchmarks/bench_quantize.py [--rounds 30] [--model all|digits|mobilenet]
"""

import argparse
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import results  # noqa: E402  (benchmarks/results.py, beside this script)
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

from keras_bn import export  # noqa: E402
from keras_bn.export import quantize  # noqa: E402
from keras_bn.export.demo import build_model, load_digits_split  # noqa: E402
from keras_bn.verification import agreement  # noqa: E402


def raw_onnx(model):
    """Raw tf2onnx on the unfolded model, as a user without keras-bn would export it."""
    spec = [tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name="input")]

    @tf.function(input_signature=spec)
    def serve(x):
        return model(x, training=False)

    os.environ.pop("TF2ONNX_CATCH_ERRORS", None)
    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec)
    return proto.SerializeToString()


def session(model_bytes):
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def latencies(sessions, x, rounds):
    """({name: {batch: median ms}}, {name: {batch: median of per-round ratios to keras-bn
    float32}}), the sessions interleaved within each round. The ratio is taken within each round
    and then its median: on a shared machine whose speed drifts between rounds, it varies less
    than the ratio of two medians."""
    out = {name: {} for name in sessions}
    ratios = {name: {} for name in sessions}
    for batch in (1, 32):
        feed = np.resize(x, (batch, *x.shape[1:])).astype(np.float32)
        times = {name: [] for name in sessions}
        for s in sessions.values():
            s.run(None, {s.get_inputs()[0].name: feed})
        for _ in range(rounds):
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, {s.get_inputs()[0].name: feed})
                times[name].append(time.perf_counter() - start)
        base = times[("keras-bn", "float32")]
        for name in sessions:
            out[name][batch] = 1e3 * statistics.median(times[name])
            ratios[name][batch] = statistics.median(t / b for t, b in zip(times[name], base))
    return out, ratios


def digits():
    x_train, x_test, y_train, y_test = load_digits_split()
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x_train, y_train, batch_size=64, epochs=6, verbose=0)
    # Its first Conv reads one channel: a 3x3 int8 convolution with a reduction depth of 9, which
    # onnxruntime runs 5x slower than float32 (144 against 27 us at batch 32, measured with its
    # profiler). The last row keeps it float32 (keep_float=["conv1"]).
    return "digits CNN", model, x_train[:512], x_test, y_test, ["conv1"]


def mobilenet(rng):
    # Logits (classifier_activation=None): the softmax of a randomly initialized network is 0.001
    # in all 1000 classes to float32 precision, which int8 rounds to 0 (measured): no output to
    # compare. The BatchNorms get random statistics, scales and shifts.
    model = keras.applications.MobileNetV2(
        weights=None, alpha=0.35, input_shape=(96, 96, 3), classifier_activation=None
    )
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, c).astype("float32"))
            layer.moving_mean.assign(rng.normal(0, 0.1, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
    calibration = rng.random((64, 96, 96, 3), dtype=np.float32)
    samples = rng.random((64, 96, 96, 3), dtype=np.float32)
    return "MobileNetV2 0.35 96x96", model, calibration, samples, None, []


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--model", choices=["all", "digits", "mobilenet"], default="all")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, TF {tf.__version__}, "
        f"tf2onnx {tf2onnx.__version__}, onnxruntime {ort.__version__}; latency: median of "
        f"{args.rounds} interleaved rounds"
    )
    print(
        "| model | side | precision | float Mul/Add | onnxruntime int8 kernels / float ops | "
        "top-1 agreement | cosine | accuracy | size (KiB) | batch 1 (ms) | batch 32 (ms) | "
        "batch 32 / keras-bn float32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    out = tempfile.mkdtemp(prefix="bench-quantize-")
    models = {"digits": digits, "mobilenet": lambda: mobilenet(rng)}
    chosen = list(models) if args.model == "all" else [args.model]
    for name, model, calibration, samples, labels, keep_float in (models[m]() for m in chosen):
        reference = np.asarray(model(samples, training=False))
        raw32 = raw_onnx(model)
        input_name = session(raw32).get_inputs()[0].name
        feeds = [{input_name: calibration[i : i + 32]} for i in range(0, len(calibration), 32)]
        graphs = {
            ("raw", "float32"): raw32,
            ("raw", "float16"): quantize.to_float16(raw32),
            # The same quantizer settings as to_onnx's on this machine (7-bit weights where
            # uint8 x int8 sums can saturate: quantize.int8_may_saturate).
            ("raw", "int8"): quantize.to_int8(
                raw32, feeds, reduce_range=quantize.int8_may_saturate()
            ),
        }
        for precision in ("float32", "float16", "int8"):
            path = os.path.join(out, f"{name}-{precision}.onnx".replace(" ", "_"))
            kwargs = {"calibration": calibration} if precision == "int8" else {}
            if name.startswith("MobileNet"):  # random weights: top-1 over near-ties, cosine only
                kwargs["min_agreement"] = 0.0
            export.to_onnx(model, path, samples=samples, precision=precision, **kwargs)
            with open(path, "rb") as handle:
                graphs[("keras-bn", precision)] = handle.read()
        if keep_float:
            side = f"keras-bn, {', '.join(keep_float)} float32"
            path = os.path.join(out, f"{name}-keep.onnx".replace(" ", "_"))
            export.to_onnx(
                model, path, samples=samples, precision="int8", calibration=calibration,
                keep_float=keep_float,
            )  # fmt: skip
            with open(path, "rb") as handle:
                graphs[(side, "int8")] = handle.read()
        sessions = {key: session(b) for key, b in graphs.items()}
        latency, ratio = latencies(sessions, samples, args.rounds)
        for key, model_bytes in graphs.items():
            s = sessions[key]
            result = agreement(reference, s.run(None, {s.get_inputs()[0].name: samples})[0], labels)
            _, _, floating = quantize.op_split(onnx.load_from_string(model_bytes))
            mul_add = floating.get("Mul", 0) + floating.get("Add", 0) if key[1] == "int8" else "-"
            runtime = "-"
            if key[1] == "int8":
                int8, left = quantize.runtime_split(model_bytes)
                runtime = f"{sum(int8.values())} / {sum(left.values())}" + (
                    f" ({', '.join(f'{op} {n}' for op, n in sorted(left.items()))})" if left else ""
                )
            accuracy = "-" if result.accuracy is None else f"{result.accuracy:.4f}"
            print(
                f"| {name} | {key[0]} | {key[1]} | {mul_add} | {runtime} | {result.top1:.4f} | "
                f"{result.cosine:.6f} | {accuracy} | {len(model_bytes) / 1024:.1f} | "
                f"{latency[key][1]:.3f} | {latency[key][32]:.3f} | {ratio[key][32]:.2f} |"
            )


if __name__ == "__main__":
    with results.recorded("quantize"):
        main()
