"""keras_bn.BatchNorm vs keras.layers.BatchNormalization, side by side in one process.

Measures a training step (forward, backward, moving-statistics update) and an inference step,
each a tf.function, for NHWC (32, 56, 56, 64) and 2-D (256, 1024) float32 inputs. Runs are
interleaved (ours, Keras, ours, Keras, ...) and the reported ratio is the median of per-round
ratios, so machine noise hits both sides alike.

    python benchmarks/bench_layer.py [--rounds 15] [--json]
"""

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_bn  # noqa: E402

CASES = {"NHWC (32,56,56,64)": (32, 56, 56, 64), "2-D (256,1024)": (256, 1024)}


def make_steps(layer, shape):
    layer.build(shape)
    x = tf.random.normal(shape, 1.0, 2.0, seed=1)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x] + layer.trainable_weights)

    @tf.function
    def infer_step():
        return layer(x, training=False)

    return {"train": train_step, "infer": infer_step}


def time_call(fn, repeats):
    fn()  # trace / warm up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    tf.nest.map_structure(lambda t: t.numpy(), out)
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for case, shape in CASES.items():
        ours = make_steps(keras_bn.BatchNorm(), shape)
        theirs = make_steps(keras.layers.BatchNormalization(), shape)
        for mode in ("train", "infer"):
            ratios, t_ours, t_theirs = [], [], []
            for _ in range(args.rounds):
                a = time_call(ours[mode], args.repeats)
                b = time_call(theirs[mode], args.repeats)
                t_ours.append(a)
                t_theirs.append(b)
                ratios.append(a / b)
            rows.append(
                {
                    "case": case,
                    "step": mode,
                    "keras_bn_ms": 1e3 * statistics.median(t_ours),
                    "keras_ms": 1e3 * statistics.median(t_theirs),
                    "ratio": statistics.median(ratios),
                }
            )
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, TF {tf.__version__}, Keras {keras.__version__}"
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows}, indent=2))
        return
    print(f"machine: {machine}; median of {args.rounds} interleaved rounds x {args.repeats} calls")
    print("| input | step | keras_bn (ms) | Keras (ms) | ratio keras_bn/Keras |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['step']} | {r['keras_bn_ms']:.2f} | {r['keras_ms']:.2f} | {r['ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
