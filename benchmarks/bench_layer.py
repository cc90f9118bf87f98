"""keras_bn.BatchNorm vs keras.layers.BatchNormalization, side by side in one process.

Measures a training step (forward, backward, moving-statistics update) and an inference step
for NHWC (32, 56, 56, 64) and 2-D (256, 1024) float32 inputs, compiled as each backend compiles
a step: a tf.function on TensorFlow, jax.jit of the layers' stateless call with jax.grad on JAX,
eager autograd on PyTorch (Keras's default there). Runs are interleaved (ours, Keras, ours,
Keras, ...) and the reported ratio is the median of per-round ratios, so machine noise hits both
sides alike.

Batch renormalization against Keras's renorm layer, and ghost batches (virtual_batch_size=8)
against Keras's plain layer, on the NHWC input.

Then the first training step of a network (16 Conv2D-BN-ReLU blocks on (64, 16, 16, 8), a new
model each round, `fit` on one batch with Keras's default compile settings for the backend):
what a user waits for before training starts, mostly tracing and compiling the step.

    python benchmarks/bench_layer.py [--backend tensorflow|jax|torch] [--rounds 15]
        [--first-rounds 3] [--json]
"""

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _backend_from_argv():
    """--backend must be known before Keras is imported: Keras reads KERAS_BACKEND once."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default=None)
    known, _ = parser.parse_known_args()
    if known.backend:
        os.environ["KERAS_BACKEND"] = known.backend


_backend_from_argv()

import keras  # noqa: E402
import results  # noqa: E402  (benchmarks/results.py, beside this script)

import keras_bn  # noqa: E402

BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":
    import tensorflow as tf

CASES = {"NHWC (32,56,56,64)": (32, 56, 56, 64), "2-D (256,1024)": (256, 1024)}
# The layer inside a network, where XLA cannot fuse its elementwise work into the loss: a 1x1
# Conv2D (as in ResNet's bottlenecks and MobileNet), the BatchNorm, ReLU.
BLOCK = ("block 1x1 Conv2D-BN-ReLU (32,56,56,64)", (32, 56, 56, 64))


def block(norm, shape):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input(shape[1:]),
            keras.layers.Conv2D(shape[-1], 1, use_bias=False),
            norm,
            keras.layers.ReLU(),
        ]
    )


FIRST_STEP = ("first fit step, 16 Conv2D-BN-ReLU blocks (64,16,16,8)", (64, 16, 16, 8), 16)


def first_fit_seconds(norm_factory):
    """Seconds of the first `fit` call (one batch) of a new 16-block network: tracing, compiling
    and one step, as Keras's default `compile` does them on this backend."""
    import numpy as np

    _, shape, blocks = FIRST_STEP
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape[1:])
    x = inputs
    for _ in range(blocks):
        x = keras.layers.ReLU()(
            norm_factory()(keras.layers.Conv2D(shape[-1], 3, padding="same")(x))
        )
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x)))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = np.random.default_rng(0).standard_normal(shape).astype("float32")
    labels = np.arange(shape[0]) % 10
    start = time.perf_counter()
    model.fit(data, labels, batch_size=shape[0], epochs=1, verbose=0)
    return time.perf_counter() - start, model.jit_compile


def make_steps(layer, shape):
    return {"tensorflow": tf_steps, "jax": jax_steps, "torch": torch_steps}[BACKEND](layer, shape)


def jax_steps(layer, shape):
    import jax
    import jax.numpy as jnp

    if not layer.built:
        layer.build(shape)
    x = 1.0 + 2.0 * jax.random.normal(jax.random.key(1), shape)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, non_trainable, x):
        y, updated = layer.stateless_call(trainable, non_trainable, x, training=True)
        return jnp.sum(y * y), updated

    train = jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))
    infer = jax.jit(lambda t, n, x: layer.stateless_call(t, n, x, training=False)[0])
    return {
        "train": lambda: train(trainable, non_trainable, x),
        "infer": lambda: infer(trainable, non_trainable, x),
    }


def torch_steps(layer, shape):
    import torch

    if not layer.built:
        layer.build(shape)
    torch.manual_seed(1)
    x = (1.0 + 2.0 * torch.randn(shape)).requires_grad_(True)
    weights = [w.value for w in layer.trainable_weights]

    def train_step():
        y = layer(x, training=True)
        return torch.autograd.grad((y * y).sum(), [x, *weights])

    def infer_step():
        with torch.no_grad():
            return layer(x, training=False)

    return {"train": train_step, "infer": infer_step}


def tf_steps(layer, shape):
    if not layer.built:
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
    keras.tree.map_structure(lambda t: keras.ops.convert_to_numpy(t), out)  # wait for it
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--first-rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--backend", choices=["tensorflow", "jax", "torch"], default=None, help="KERAS_BACKEND"
    )
    args = parser.parse_args()
    rows = []
    pairs = [
        (case, make_steps(keras_bn.BatchNorm(), shape),
         make_steps(keras.layers.BatchNormalization(), shape))
        for case, shape in CASES.items()
    ]  # fmt: skip
    # The variants: batch renormalization against Keras's own renorm layer; ghost batches of 8
    # (Keras 3 has none) against Keras's plain layer, the cost of the per-ghost statistics.
    shape = CASES["NHWC (32,56,56,64)"]
    clipping = {"rmax": 3.0, "dmax": 5.0}
    pairs.append(
        (
            "renorm NHWC (32,56,56,64) vs Keras renorm",
            make_steps(keras_bn.BatchNorm(renorm=True, renorm_clipping=clipping), shape),
            make_steps(
                keras.layers.BatchNormalization(renorm=True, renorm_clipping=clipping), shape
            ),
        )
    )
    pairs.append(
        (
            "ghost batches of 8, NHWC (32,56,56,64) vs Keras plain",
            make_steps(keras_bn.BatchNorm(virtual_batch_size=8), shape),
            make_steps(keras.layers.BatchNormalization(), shape),
        )
    )
    case, shape = BLOCK
    pairs.append(
        (
            case,
            make_steps(block(keras_bn.BatchNorm(), shape), shape),
            make_steps(block(keras.layers.BatchNormalization(), shape), shape),
        )
    )
    for case, ours, theirs in pairs:
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
    firsts, jit = [], None
    for _ in range(args.first_rounds):
        a, jit = first_fit_seconds(keras_bn.BatchNorm)
        b, _ = first_fit_seconds(keras.layers.BatchNormalization)
        firsts.append((a, b))
    if firsts:
        rows.append(
            {
                "case": f"{FIRST_STEP[0]}, jit_compile={jit}",
                "step": "first fit",
                "keras_bn_ms": 1e3 * statistics.median(a for a, _ in firsts),
                "keras_ms": 1e3 * statistics.median(b for _, b in firsts),
                "ratio": statistics.median(a / b for a, b in firsts),
            }
        )
    library = __import__(BACKEND)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, backend {BACKEND} "
        f"{library.__version__}, Keras {keras.__version__}"
    )
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
    with results.recorded(f"layer_{BACKEND}"):
        main()
