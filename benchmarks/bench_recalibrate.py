"""keras_bn.recalibrate against model.predict over the same data, and its memory as data grows.

1. Time, recalibrate against model.predict over the same data and batch size, interleaved rounds,
   median of per-round ratios, on the digits CNN of the demo and on ResNet50 (weights=None):
   - first call: each side on a fresh copy of the model, so both trace their function (what a
     user's one call costs, including recalibrate's copy of the model);
   - per batch: warm predict against the warm collection step (what each further batch costs).
2. Memory: peak RSS of a fresh process recalibrating the digits CNN over N and 10 x N batches that
   stream from a tf.data generator (never materialized).
3. Two processes: the digits CNN on PyTorch's backend, two gloo processes each recalibrating
   half of the data and merging (`distributed="auto"`), against process 0 alone over all of it
   (`distributed=False`), in the same launched run, interleaved rounds, median per-round ratio;
   one PyTorch thread per process, so that the two processes do not share a core.

    python benchmarks/bench_recalibrate.py [--rounds 5]
"""

import argparse
import json
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
import results  # noqa: E402  (benchmarks/results.py, beside this script)
import tensorflow as tf  # noqa: E402

import keras_bn  # noqa: E402
from keras_bn import recalibration  # noqa: E402
from keras_bn._keras_internals import all_layers  # noqa: E402
from keras_bn.export.demo import build_model  # noqa: E402
from keras_bn.fold import BATCHNORM_TYPES  # noqa: E402

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
    keras_bn.recalibrate(model, data, verbose=0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import json, os, statistics, sys, time
    rank, port, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    os.environ["KERAS_BACKEND"] = "torch"
    import numpy as np, torch, torch.distributed as dist, keras_bn
    torch.set_num_threads(1)  # one core each: two processes do not fight over two cores
    from keras_bn.export.demo import build_model
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    model = build_model()
    x = np.random.default_rng(0).random((4096, 8, 8, 1), dtype=np.float32)
    half = x[2048 * rank: 2048 * (rank + 1)]
    keras_bn.recalibrate(model, half, batch_size=64, verbose=0)  # warm-up, both modes
    one, two, alone = [], [], []
    for _ in range(rounds):
        dist.barrier()
        if rank == 0:  # one process over all the data, the other waiting
            start = time.perf_counter()
            keras_bn.recalibrate(model, x, batch_size=64, distributed=False, verbose=0)
            one.append(time.perf_counter() - start)
        for times, distributed in ((two, "auto"), (alone, False)):
            dist.barrier()
            start = time.perf_counter()
            keras_bn.recalibrate(model, half, batch_size=64, distributed=distributed, verbose=0)
            times.append(time.perf_counter() - start)
        dist.barrier()  # both halves done: the slower one is the run's time
    if rank == 0:
        median = statistics.median
        print(json.dumps({"one": median(one), "two": median(two), "alone": median(alone),
                          "ratio": median([b / a for a, b in zip(one, two)]),
                          "merge": median([b / a for a, b in zip(alone, two)])}))
""")


def two_processes(rounds):
    """Process 0's median seconds: alone over all the data ("one"), half of it merged with
    process 1's half ("two"), half of it not merged ("alone"); median per-round ratios two/one
    ("ratio") and two/alone ("merge")."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_PROCESS_SCRIPT, str(rank), port, str(rounds)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    outputs = [proc.communicate()[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise RuntimeError("the two-process run failed")
    return json.loads(outputs[0].strip().splitlines()[-1])


def fresh(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def interleaved(sides, rounds):
    """{side: median seconds} and the median per-round ratio recalibrate / predict; each round
    alternates which side runs first."""
    times = {name: [] for name in sides}
    for i in range(rounds):
        for name in sides if i % 2 == 0 else list(sides)[::-1]:
            run = sides[name]()  # set-up (fresh models) is not timed
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    ratios = [r / p for r, p in zip(times["recalibrate"], times["predict"])]
    return {k: statistics.median(v) for k, v in times.items()}, statistics.median(ratios)


def first_call(model, x, batch_size, rounds):
    """A user's call: each side on a fresh copy of the model, so both trace their function."""

    def predict():
        m = fresh(model)
        return lambda: m.predict(x, batch_size=batch_size, verbose=0)

    def recalibrate():
        m = fresh(model)
        return lambda: keras_bn.recalibrate(m, x, batch_size=batch_size, verbose=0)

    return interleaved({"predict": predict, "recalibrate": recalibrate}, rounds)


def per_batch(model, x, batch_size, rounds):
    """Steady state: Keras's warm predict against the warm collection step over the same batches
    (no tracing, no copy), i.e. what each further batch costs."""
    bns = [layer for layer in all_layers(model) if isinstance(layer, BATCHNORM_TYPES)]
    step = recalibration._step(model, {id(bn): bn for bn in bns}, None)
    batches = [[tf.constant(x[i : i + batch_size])] for i in range(0, len(x), batch_size)]
    model.predict(x[:batch_size], verbose=0)
    step(batches[0])

    def predict():
        return lambda: model.predict(x, batch_size=batch_size, verbose=0)

    def collect():
        return lambda: [step(b) for b in batches]

    return interleaved({"predict": predict, "recalibrate": collect}, rounds)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, TF {tf.__version__}, "
        f"Keras {keras.__version__}; median of {args.rounds} interleaved rounds"
    )
    print("| model | data | call | predict (s) | recalibrate (s) | recalibrate / predict |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    cases = [
        ("digits CNN", build_model(), rng.random((4096, 8, 8, 1), dtype=np.float32), 64, 1),
        (
            "ResNet50",
            keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3)),
            rng.random((64, 224, 224, 3), dtype=np.float32),
            16,
            2,
        ),
    ]
    for name, model, x, batch_size, slow in cases:
        rounds = max(3, args.rounds // slow)
        data = f"{len(x)} x {x.shape[1]}x{x.shape[2]}, batch {batch_size}"
        for call, measure in (("first call", first_call), ("per batch", per_batch)):
            times, ratio = measure(model, x, batch_size, rounds)
            print(
                f"| {name} | {data} | {call} | {times['predict']:.3f} | "
                f"{times['recalibrate']:.3f} | {ratio:.2f} |"
            )
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
    two = two_processes(args.rounds)
    print(
        "\nPyTorch backend, one thread per process, digits CNN, 4096 x 8x8, batch 64, "
        "process 0's times, median of "
        f"{args.rounds} interleaved rounds:\n\n"
        "| run | time (s) | / 1 process |\n|---|---|---|\n"
        f"| 1 process, all the data | {two['one']:.3f} | |\n"
        f"| 2 gloo processes, half each, merged | {two['two']:.3f} | {two['ratio']:.2f} |\n"
        f"| 2 gloo processes, half each, not merged (`distributed=False`) | {two['alone']:.3f} "
        f"| |\n\nmerged / not merged: {two['merge']:.2f}"
    )


if __name__ == "__main__":
    with results.recorded("recalibrate"):
        main()
