"""export.to_onnx (fold + convert + check + verify) vs raw tf2onnx.convert.from_function on the
unfolded ResNet50 (224x224), and onnxruntime latency of both graphs, side by side in one process.

Raw tf2onnx runs twice a round: as tf2onnx runs by default, and with TF2ONNX_CATCH_ERRORS=FALSE,
the switch to_onnx uses (it skips tf2onnx's per-optimizer graph copies), so the table shows both
the target ratio and what fold + check + verify cost on top of the same conversion.

    python benchmarks/bench_export.py [--rounds 3] [--ort-rounds 15]
"""

import argparse
import gc
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import results  # noqa: E402  (benchmarks/results.py, beside this script)
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

from keras_bn import export  # noqa: E402


def raw_convert(model, catch_errors=None):
    if catch_errors is not None:
        os.environ["TF2ONNX_CATCH_ERRORS"] = catch_errors
    try:
        return _raw_convert(model)
    finally:
        os.environ.pop("TF2ONNX_CATCH_ERRORS", None)


def _raw_convert(model):
    spec = [tf.TensorSpec((None, 224, 224, 3), tf.float32, name="input")]

    @tf.function(input_signature=spec)
    def serve(x):
        return model(x, training=False)

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec)
    return proto


def session(path_or_bytes, optimized):
    """The same onnxruntime session for both graphs: keras-bn's own (CPU, optimizations on or
    off)."""
    from keras_bn.export.onnx_verify import make_session

    return make_session(path_or_bytes, optimized)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ort-rounds", type=int, default=15)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, TF {tf.__version__}, "
        f"tf2onnx {tf2onnx.__version__}, onnxruntime {ort.__version__}"
    )
    model = keras.applications.ResNet50(weights=None)
    out = tempfile.mkdtemp()
    os.environ.pop("TF2ONNX_CATCH_ERRORS", None)
    proto = raw_convert(model)  # warm-up: first-call costs of TF and tf2onnx
    times = {"raw": [], "raw_nocopy": [], "ours": []}
    runs = {
        "raw": lambda i: raw_convert(model),
        "raw_nocopy": lambda i: raw_convert(model, catch_errors="FALSE"),
        "ours": lambda i: export.to_onnx(model, os.path.join(out, f"ours{i}.onnx")),
    }
    order = list(runs)
    for i in range(args.rounds):
        for name in order[i % 3 :] + order[: i % 3]:  # rotate the order: no side always goes first
            gc.collect()  # every side starts from the same heap
            start = time.perf_counter()
            result = runs[name](i)
            times[name].append(time.perf_counter() - start)
            if name == "raw":
                proto = result
            elif name == "ours":
                report = result
        print(
            f"round {i}: raw {times['raw'][-1]:.1f}s, raw without copies "
            f"{times['raw_nocopy'][-1]:.1f}s, to_onnx {times['ours'][-1]:.1f}s",
            flush=True,
        )
    ours, raw, raw_nocopy = times["ours"], times["raw"], times["raw_nocopy"]
    ratios = [a / b for a, b in zip(ours, raw)]
    ratios_nocopy = [a / b for a, b in zip(ours, raw_nocopy)]
    print(f"| ResNet50 224x224, median of {args.rounds} rounds | time (s) | to_onnx / this |")
    print("|---|---|---|")
    print(
        f"| raw tf2onnx.from_function (unfolded), tf2onnx defaults | {statistics.median(raw):.1f} "
        f"| {statistics.median(ratios):.2f} |"
    )
    print(
        f"| raw tf2onnx.from_function (unfolded), TF2ONNX_CATCH_ERRORS=FALSE | "
        f"{statistics.median(raw_nocopy):.1f} | {statistics.median(ratios_nocopy):.2f} |"
    )
    print(
        f"| export.to_onnx: fold + convert + check + verify | {statistics.median(ours):.1f} | 1.00 |"
    )
    print(
        "steps of the last to_onnx: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items())
    )
    print(f"ONNX ops, ours: {report.op_counts}")
    raw_ops = {}
    for n in proto.graph.node:
        raw_ops[n.op_type] = raw_ops.get(n.op_type, 0) + 1
    print(f"ONNX ops, raw:  {raw_ops}")

    x = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype("float32")
    print()
    print("| onnxruntime, batch 1 | raw (ms) | ours (ms) | ours/raw |")
    print("|---|---|---|---|")
    for optimized in (True, False):
        s_raw = session(proto.SerializeToString(), optimized)
        s_ours = session(os.path.join(out, "ours0.onnx"), optimized)
        feeds = {
            "raw": (s_raw, {s_raw.get_inputs()[0].name: x}),
            "ours": (s_ours, {s_ours.get_inputs()[0].name: x}),
        }
        times = {k: [] for k in feeds}
        per_round = []
        for _ in range(args.ort_rounds):
            for k, (s, feed) in feeds.items():
                s.run(None, feed)
                start = time.perf_counter()
                for _ in range(3):
                    s.run(None, feed)
                times[k].append((time.perf_counter() - start) / 3)
            per_round.append(times["ours"][-1] / times["raw"][-1])
        label = "optimizations enabled" if optimized else "optimizations disabled"
        print(
            f"| {label} | {1e3 * statistics.median(times['raw']):.1f} | "
            f"{1e3 * statistics.median(times['ours']):.1f} | {statistics.median(per_round):.2f} |"
        )


if __name__ == "__main__":
    with results.recorded("export"):
        main()
