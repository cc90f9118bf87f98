"""export.to_onnx (fold + convert + check + verify) vs raw tf2onnx.convert.from_function on the
unfolded ResNet50 (224x224), and onnxruntime latency of both graphs, side by side in one process.

    python benchmarks/bench_export.py [--rounds 3] [--ort-rounds 15]
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
import onnxruntime as ort  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

import export  # noqa: E402


def raw_convert(model):
    spec = [tf.TensorSpec((None, 224, 224, 3), tf.float32, name="input")]

    @tf.function(input_signature=spec)
    def serve(x):
        return model(x, training=False)

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec)
    return proto


def session(path_or_bytes, optimized):
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ort-rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, TF {tf.__version__}, "
          f"tf2onnx {tf2onnx.__version__}, onnxruntime {ort.__version__}")
    model = keras.applications.ResNet50(weights=None)
    out = tempfile.mkdtemp()
    ours, raw, ratios = [], [], []
    for i in range(args.rounds):
        start = time.perf_counter()
        proto = raw_convert(model)
        raw.append(time.perf_counter() - start)
        start = time.perf_counter()
        report = export.to_onnx(model, os.path.join(out, f"ours{i}.onnx"))
        ours.append(time.perf_counter() - start)
        ratios.append(ours[-1] / raw[-1])
    print("| ResNet50 224x224 | time (s) |")
    print("|---|---|")
    print(f"| raw tf2onnx.from_function (unfolded) | {statistics.median(raw):.1f} |")
    print(f"| export.to_onnx: fold + convert + check + verify | {statistics.median(ours):.1f} |")
    print(f"| ratio (median of per-round ratios) | {statistics.median(ratios):.2f} |")
    print("steps of the last to_onnx: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items()))
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
        feeds = {"raw": (s_raw, {s_raw.get_inputs()[0].name: x}),
                 "ours": (s_ours, {s_ours.get_inputs()[0].name: x})}
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
        print(f"| {label} | {1e3 * statistics.median(times['raw']):.1f} | "
              f"{1e3 * statistics.median(times['ours']):.1f} | {statistics.median(per_round):.2f} |")


if __name__ == "__main__":
    main()
