"""Folded ResNet50 vs the same network with its BatchNorms simply removed, and fold_bn's own time.

1. Inference (tf.function, 224x224, batch 8 and 1) of three models built from one ResNet50:
   with BatchNorm, folded by fold_bn, and with every BatchNorm replaced by nothing ("removed",
   the physical bound of folding: same convs, no normalization). Runs are interleaved and the
   reported ratio is the median of per-round ratios.
2. fold_bn wall time (without verification, then with it) on ResNet50 and ResNet152, to show it
   grows linearly with the number of layers.

    python benchmarks/bench_fold.py [--rounds 9]
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import results  # noqa: E402  (benchmarks/results.py, beside this script)
import tensorflow as tf  # noqa: E402

import keras_bn  # noqa: E402
from keras_bn.fold import BATCHNORM_TYPES  # noqa: E402


def remove_batchnorms(model):
    """Same graph with every BatchNorm replaced by identity (weights copied): the bound."""

    def clone(layer):
        if isinstance(layer, BATCHNORM_TYPES):
            return keras.layers.Activation("linear", name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    removed = keras.models.clone_model(
        model,
        clone_function=clone,
        call_function=lambda layer, *a, **k: (
            layer(a[0]) if isinstance(layer, keras.layers.Activation) else layer(*a, **k)
        ),
    )
    for old, new in zip(model.layers, removed.layers):
        if not isinstance(old, BATCHNORM_TYPES):
            new.set_weights(old.get_weights())
    return removed


def time_model(fn, x, repeats):
    fn(x)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x).numpy()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, TF {tf.__version__}, "
        f"Keras {keras.__version__}"
    )

    model = keras.applications.ResNet50(weights=None)
    folded, report = keras_bn.fold_bn(model)
    removed = remove_batchnorms(model)
    assert not any(isinstance(l, BATCHNORM_TYPES) for l in removed.layers)
    fns = {
        name: tf.function(lambda x, m=m: m(x, training=False), jit_compile=False)
        for name, m in (("bn", model), ("folded", folded), ("removed", removed))
    }
    print(
        "| ResNet50 224x224 | with BN (ms) | folded (ms) | BN removed (ms) | folded/removed | removed/BN |"
    )
    print("|---|---|---|---|---|---|")
    for batch, repeats in ((8, 2), (1, 5)):
        x = tf.constant(
            np.random.default_rng(0).normal(size=(batch, 224, 224, 3)).astype("float32")
        )
        times = {k: [] for k in fns}
        ratios, bound = [], []
        for _ in range(args.rounds):
            for k, fn in fns.items():
                times[k].append(time_model(fn, x, repeats))
            ratios.append(times["folded"][-1] / times["removed"][-1])
            bound.append(times["removed"][-1] / times["bn"][-1])
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(
            f"| batch {batch} | {med['bn']:.1f} | {med['folded']:.1f} | {med['removed']:.1f} | "
            f"{statistics.median(ratios):.3f} | {statistics.median(bound):.3f} |"
        )

    print()
    print(
        "| model | layers | BatchNorms | fold_bn, no verify (s) | fold_bn + verify (s) | s per 100 layers |"
    )
    print("|---|---|---|---|---|---|")
    for name in ("ResNet50", "ResNet152"):
        m = getattr(keras.applications, name)(weights=None)
        no_verify, with_verify = [], []
        for _ in range(3):
            start = time.perf_counter()
            keras_bn.fold_bn(m, verify=False)
            no_verify.append(time.perf_counter() - start)
            start = time.perf_counter()
            _, rep = keras_bn.fold_bn(m)
            with_verify.append(time.perf_counter() - start)
        t = statistics.median(no_verify)
        print(
            f"| {name} | {len(m.layers)} | {rep.batchnorms} | {t:.2f} | "
            f"{statistics.median(with_verify):.2f} | {100 * t / len(m.layers):.3f} |"
        )


if __name__ == "__main__":
    with results.recorded("fold"):
        main()
