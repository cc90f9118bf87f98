"""Writes the notebooks of this folder from the cells below, without outputs.

    python notebooks/make_notebooks.py

The test suite executes every notebook (tests/test_notebooks.py); the cells assert what they
claim, so a notebook whose story stops being true fails the suite.
"""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).parent

SETUP = """\
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import keras
import tensorflow as tf
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import keras_bn
np.set_printoptions(precision=4, suppress=True)"""

NB1 = [
    (
        "md",
        """# BatchNorm ten years on, in Keras

The post this project grew from walks through BatchNorm with a PyTorch example. Here is the same
walk with `keras_bn.BatchNorm`, which states its conventions and can take PyTorch's.""",
    ),
    ("code", SETUP),
    (
        "md",
        """## Moving statistics after three passes of a constant batch

PyTorch's `momentum=0.1` is the weight of the **new** batch value; Keras's momentum is the weight
of the **old** moving value (default 0.99). `BatchNorm.from_torch(momentum=0.1)` converts
(Keras momentum 0.9) and keeps PyTorch's unbiased running variance and epsilon 1e-5.""",
    ),
    (
        "code",
        """\
torch_style = keras_bn.BatchNorm.from_torch(momentum=0.1)          # Keras momentum 0.9
keras_style = keras_bn.BatchNorm(momentum=0.99, epsilon=1e-3)       # Keras defaults
batch = np.array([[7.0], [7.0], [7.0]], np.float32)
rows = []
for step in ("first", "second", "third"):
    torch_style(batch, training=True)
    keras_style(batch, training=True)
    rows.append((step, float(torch_style.moving_mean[0]), float(torch_style.moving_variance[0]),
                 float(keras_style.moving_mean[0]), float(keras_style.moving_variance[0])))
print(f"{'pass':<7} {'PyTorch mean':>12} {'PyTorch var':>11} {'Keras mean':>10} {'Keras var':>9}")
for r in rows:
    print(f"{r[0]:<7} {r[1]:>12.4f} {r[2]:>11.4f} {r[3]:>10.4f} {r[4]:>9.4f}")
# The post's PyTorch output: 0.7000/0.9000, 1.3300/0.8100, 1.8970/0.7290
np.testing.assert_allclose([r[1] for r in rows], [0.7, 1.33, 1.897], rtol=1e-6)
np.testing.assert_allclose([r[2] for r in rows], [0.9, 0.81, 0.729], rtol=1e-6)
# Keras convention: 0.99 * old + 0.01 * 7
np.testing.assert_allclose([r[3] for r in rows], [0.07, 0.1393, 0.207907], rtol=1e-5)""",
    ),
    (
        "md",
        """## The batch of one

In training a sample of one has no spread: the batch variance is 0 and the output is just beta.
Like PyTorch, keras_bn refuses it; inference on one sample uses the moving statistics.""",
    ),
    (
        "code",
        """\
one = np.array([[3.0]], np.float32)
try:
    torch_style(one, training=True)
    raise AssertionError("expected an error")
except ValueError as error:
    message = next(l for l in str(error).splitlines() if "Expected more than 1 value" in l)
    print("training:", message)
out = torch_style(one, training=False)
print("inference:", float(out[0, 0]))   # PyTorch prints 1.2918
np.testing.assert_allclose(float(out[0, 0]), (3 - 1.897) / np.sqrt(0.729 + 1e-5), rtol=1e-6)""",
    ),
    (
        "md",
        """## Is normalization linear? Training mode vs inference mode

Standardizing with a **fixed** mean and variance is affine: `y = x * s + t`. In training mode,
though, BatchNorm computes the mean and variance from the batch itself, so a sample's output
depends on the other samples, and scaling the whole batch leaves the output unchanged, which no
affine map with a non-zero slope does. In inference mode it is exactly `y = x * s + t` per channel,
and that is why it can be folded into the neighbouring layer.""",
    ),
    (
        "code",
        """\
rng = np.random.default_rng(0)
bn = keras_bn.BatchNorm(momentum=0.9)
bn.build((None, 4))
bn.moving_mean.assign([0.5, -1.0, 2.0, 0.0]); bn.moving_variance.assign([1.0, 4.0, 0.25, 2.0])
x = rng.normal(size=(8, 4)).astype("float32")
# 1. A sample's output changes when the other samples change (training mode).
other = x.copy(); other[1:] += 5.0
y_a = bn(x, training=True)[0]; y_b = bn(other, training=True)[0]
print("sample 0, training, two different batches:", np.asarray(y_a), np.asarray(y_b))
assert not np.allclose(y_a, y_b, atol=1e-3)
# 2. Scaling the whole batch by 3 leaves the training output unchanged (up to epsilon).
np.testing.assert_allclose(bn(3 * x, training=True), bn(x, training=True), atol=2e-3)
print("training output of 3*x equals that of x: no affine map with slope != 0 does that")
# 3. Inference: exactly y = x * s + t with s, t from the moving statistics.
s = 1.0 / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
t = -bn.moving_mean.numpy() * s
np.testing.assert_allclose(bn(x, training=False), x * s + t, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(bn(3 * x, training=False), 3 * x * s + t, rtol=1e-5, atol=1e-5)
print("inference: y = x * s + t, s =", s, "t =", t)""",
    ),
    (
        "md",
        """## The bias before a BatchNorm is redundant

In training, a bias added before BatchNorm is subtracted again with the batch mean: its gradient
is zero. At inference folding absorbs it (and keras_bn adds a bias where there was none).""",
    ),
    (
        "code",
        """\
inputs = keras.Input((6,))
dense = keras.layers.Dense(3, use_bias=True)
model = keras.Model(inputs, keras_bn.BatchNorm()(dense(inputs)))
data = rng.normal(size=(16, 6)).astype("float32")
with tf.GradientTape() as tape:
    loss = tf.reduce_sum(tf.sin(model(data, training=True)))
grad_kernel, grad_bias = tape.gradient(loss, [dense.kernel, dense.bias])
print("gradient of the bias:", np.asarray(grad_bias))
np.testing.assert_allclose(grad_bias, 0.0, atol=1e-5)
assert np.abs(np.asarray(grad_kernel)).max() > 1e-2
folded, report = keras_bn.fold_bn(model)
print(report)""",
    ),
    (
        "md",
        """## Covariate shift, drawn

A layer's input distribution moves as the layers before it learn. Below, a fixed unit sees its
input's mean and spread drift over training steps (left); after BatchNorm (training mode) the
distribution it passes on stays standardized (right).""",
    ),
    (
        "code",
        """\
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
norm = keras_bn.BatchNorm(momentum=0.9)
for step, shift in enumerate([0.0, 1.5, 3.0, 4.5]):
    batch = (rng.normal(size=(512, 1)) * (1 + step) + shift).astype("float32")
    axes[0].hist(batch[:, 0], bins=40, alpha=0.5, label=f"step {step}")
    out = np.asarray(norm(batch, training=True))
    axes[1].hist(out[:, 0], bins=40, alpha=0.5, label=f"step {step}")
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-2
axes[0].set_title("input to the layer: shifting"); axes[1].set_title("after BatchNorm (training)")
axes[0].legend(); plt.tight_layout(); plt.show()""",
    ),
]

NB2 = [
    (
        "md",
        """# Training with and without BatchNorm

The same small CNN on scikit-learn's bundled 8x8 digits, with `keras_bn.BatchNorm` and without
(an Identity in its place, convolutions with biases), at several learning rates of plain SGD with
momentum. We measure, on this problem, whether BatchNorm trains faster and tolerates higher
learning rates, and print what we find rather than what we expect.""",
    ),
    ("code", SETUP),
    (
        "code",
        """\
from keras_bn.export.demo import build_model, load_digits_split
x_train, x_test, y_train, y_test = load_digits_split()
EPOCHS = 6
results = {}
for use_bn in (True, False):
    for lr in (0.01, 0.1, 0.5):
        model = build_model(use_batchnorm=use_bn, seed=0)
        model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        history = model.fit(x_train, y_train, batch_size=32, epochs=EPOCHS, verbose=0)
        loss, acc = model.evaluate(x_test, y_test, verbose=0)
        results[(use_bn, lr)] = (history.history["loss"], acc)
        print(f"BatchNorm={use_bn!s:<5} lr={lr:<4} final train loss "
              f"{history.history['loss'][-1]:8.4f}  test accuracy {acc:.4f}")""",
    ),
    (
        "code",
        """\
fig, axes = plt.subplots(1, 3, figsize=(12, 3), sharey=True)
for ax, lr in zip(axes, (0.01, 0.1, 0.5)):
    for use_bn in (True, False):
        losses = np.nan_to_num(results[(use_bn, lr)][0], nan=10.0, posinf=10.0)
        ax.plot(range(1, EPOCHS + 1), losses, marker="o", label="BatchNorm" if use_bn else "no BatchNorm")
    ax.set_title(f"SGD lr={lr}"); ax.set_xlabel("epoch"); ax.set_yscale("log")
axes[0].set_ylabel("train loss"); axes[0].legend(); plt.tight_layout(); plt.show()""",
    ),
    (
        "code",
        """\
# What this run shows (asserted, so the text cannot drift from the numbers):
best_bn = max(results[(True, lr)][1] for lr in (0.01, 0.1, 0.5))
best_plain = max(results[(False, lr)][1] for lr in (0.01, 0.1, 0.5))
print(f"best test accuracy: with BatchNorm {best_bn:.4f}, without {best_plain:.4f}")
high_lr_bn, high_lr_plain = results[(True, 0.5)][1], results[(False, 0.5)][1]
print(f"at lr=0.5: with BatchNorm {high_lr_bn:.4f}, without {high_lr_plain:.4f}")
slow_bn, slow_plain = results[(True, 0.01)][0][-1], results[(False, 0.01)][0][-1]
print(f"train loss after {EPOCHS} epochs at lr=0.01: with BatchNorm {slow_bn:.4f}, without {slow_plain:.4f}")
assert best_bn > 0.9
verdict_speed = "faster" if slow_bn < slow_plain else "not faster"
verdict_lr = "tolerates lr=0.5 better" if high_lr_bn > high_lr_plain + 0.05 else "no clear gain at lr=0.5"
print(f"Here, BatchNorm trains {verdict_speed} at a small learning rate and {verdict_lr}.")""",
    ),
]

NB3 = [
    (
        "md",
        """# Fold and export

Train the digits CNN, fold its BatchNorms into the convolutions, export to ONNX, verify with
onnxruntime, and measure latency before and after.""",
    ),
    ("code", SETUP),
    (
        "code",
        """\
import tempfile, time, statistics
import onnxruntime as ort
from keras_bn import export
from keras_bn.export.demo import build_model, load_digits_split
x_train, x_test, y_train, y_test = load_digits_split()
model = build_model()
model.compile(optimizer=keras.optimizers.Adam(3e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
model.fit(x_train, y_train, batch_size=64, epochs=6, verbose=0)
print("test accuracy:", model.evaluate(x_test, y_test, verbose=0)[1])""",
    ),
    (
        "code",
        """\
folded, report = keras_bn.fold_bn(model, samples=x_test)
print(report)
assert report.counts["folded backward"] == 4
assert not any(isinstance(l, keras_bn.BatchNorm) for l in folded.layers)""",
    ),
    (
        "code",
        """\
out = tempfile.mkdtemp()
export_report = export.to_onnx(model, os.path.join(out, "digits.onnx"), samples=x_test)
print(export_report)
assert "BatchNormalization" not in export_report.op_counts and export_report.verification.passed""",
    ),
    (
        "code",
        """\
session = ort.InferenceSession(os.path.join(out, "digits.onnx"), providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
batch = x_test[:64]
fns = {"Keras, BatchNorm": tf.function(lambda x: model(x, training=False)),
       "Keras, folded": tf.function(lambda x: folded(x, training=False))}
def median_ms(fn, n=50):
    fn(); times = []
    for _ in range(n):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)
latency = {k: median_ms(lambda f=f: f(tf.constant(batch)).numpy()) for k, f in fns.items()}
latency["onnxruntime, folded"] = median_ms(lambda: session.run(None, {name: batch}))
for k, v in latency.items():
    print(f"{k:<22} {v:6.2f} ms (median, batch 64)")
np.testing.assert_array_equal(np.argmax(session.run(None, {name: x_test})[0], 1),
                              np.argmax(model.predict(x_test, verbose=0), 1))
plt.figure(figsize=(5, 2.5)); plt.barh(list(latency), list(latency.values()))
plt.xlabel("ms per batch of 64 (median)"); plt.tight_layout(); plt.show()""",
    ),
]


def write(name, cells):
    notebook = new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    notebook.cells = [
        new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells
    ]
    nbformat.write(notebook, HERE / name)


def main():
    write("01_batchnorm_ten_years_on.ipynb", NB1)
    write("02_training_with_batchnorm.ipynb", NB2)
    write("03_fold_and_export.ipynb", NB3)


if __name__ == "__main__":
    main()
