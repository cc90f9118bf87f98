"""keras_bn.recalibrate against model.predict over the same data, and its memory as data grows.

1. Time: recalibrate(model, x) vs model.predict(x), same batch size, interleaved rounds, median of
   per-round ratios; on the digits CNN of the demo and on ResNet50 (weights=None).
2. Memory: peak RSS of a fresh process recalibrating the digits CNN over N and 10 x N batches that
   stream from a tf.data generator (never materialized).

    python benchmarks/bench_recalibrate.py [--rounds 5]
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_bn  # noqa: E402
from keras_bn.export.demo import build_model  # noqa: E402

RSS_SCRIPT = textwrap.dedent("""
    import os, resource, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, tensorflow as tf, keras_bn
    from keras_bn.export.demo import build_model
    batches = int(sys.argv[1])
    model = build_model()
    def gen():
        rng = np.random.default_rng(0)
        for _ in range(batches):
            yield rng.random((64, 8, 8, 1), dtype=np.float32)
    data = tf.data.Dataset.from_generator(
        gen, output_signature=tf.TensorSpec((None, 8, 8, 1), tf.float32))
    keras_bn.recalibrate(model, data, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def ratio(model, x, batch_size, rounds):
    model.predict(x[:batch_size], verbose=0)
    keras_bn.recalibrate(model, x[: 2 * batch_size], batch_size=batch_size, progress=False)
    times = {"predict": [], "recalibrate": []}
    for i in range(rounds):
        order = ("predict", "recalibrate") if i % 2 == 0 else ("recalibrate", "predict")
        for side in order:
            start = time.perf_counter()
            if side == "predict":
                model.predict(x, batch_size=batch_size, verbose=0)
            else:
                keras_bn.recalibrate(model, x, batch_size=batch_size, progress=False)
            times[side].append(time.perf_counter() - start)
    ratios = [r / p for r, p in zip(times["recalibrate"], times["predict"])]
    return (
        statistics.median(times["predict"]),
        statistics.median(times["recalibrate"]),
        statistics.median(ratios),
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, TF {tf.__version__}, "
        f"Keras {keras.__version__}; median of {args.rounds} interleaved rounds"
    )
    print("| model | data | predict (s) | recalibrate (s) | ratio |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    cnn = build_model()
    x = rng.random((4096, 8, 8, 1), dtype=np.float32)
    p, r, q = ratio(cnn, x, 64, args.rounds)
    print(f"| digits CNN | 4096 x 8x8, batch 64 | {p:.3f} | {r:.3f} | {q:.2f} |")
    resnet = keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))
    x = rng.random((64, 224, 224, 3), dtype=np.float32)
    p, r, q = ratio(resnet, x, 16, max(3, args.rounds // 2))
    print(f"| ResNet50 | 64 x 224x224, batch 16 | {p:.2f} | {r:.2f} | {q:.2f} |")
    rss = {}
    for batches in (100, 1000):
        out = subprocess.run(
            [sys.executable, "-c", RSS_SCRIPT, str(batches)],
            capture_output=True,
            text=True,
            check=True,
        )
        rss[batches] = int(out.stdout.strip().splitlines()[-1]) / 1024
    growth = rss[1000] / rss[100] - 1
    print(
        f"\npeak RSS, digits CNN streaming from tf.data: 100 batches {rss[100]:.0f} MiB, "
        f"1000 batches {rss[1000]:.0f} MiB (+{100 * growth:.1f}%)"
    )


if __name__ == "__main__":
    main()
