"""keras_bn on the JAX and PyTorch backends of Keras 3, each in a subprocess (Keras picks its
backend once per process, from KERAS_BACKEND): the whole layer, recalibration and diagnosis
files (among them the torch statistics where Keras's own lose their digits); fold_bn,
recalibrate, diagnose and the command line on the demo CNN and a residual network trained there,
exported and recalibrated here under TensorFlow; synchronized statistics on JAX's DataParallel
(torch.distributed's are in tests/test_distributed.py)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import export

pytestmark = pytest.mark.slow  # a Keras backend per subprocess: 10 s to 2.5 min each

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import jax  # noqa: F401

    HAVE_JAX = True
except ImportError:
    HAVE_JAX = False
# Both backends are in the dev extra; without them (a bare install) their cases skip, saying so.
BACKENDS = [
    pytest.param(
        "jax",
        marks=pytest.mark.skipif(not HAVE_JAX, reason='JAX not installed: pip install -e ".[dev]"'),
    ),
    "torch",
]
# What the layer file may skip on another backend, and why (see tests/test_layer.py).
ALLOWED_SKIPS = {
    "TensorFlow machinery",
    "JAX has no float64 without jax_enable_x64",
    "JAX tracers only",
}


def run_on(backend, args, timeout=600):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


# The layer, statistics, recalibration and diagnosis files, whole, in one pytest run per backend.
EXPECTED_COUNTS = {"jax": {"passed": 133, "skipped": 12}, "torch": {"passed": 171, "skipped": 11}}
FILES = [
    "tests/test_layer.py",
    "tests/test_stats.py",
    "tests/test_recalibrate.py",
    "tests/test_diagnose.py",
]


# Also on PyTorch's backend: the state-dict import, whose twins there are Keras models running on
# torch (7 s; on JAX each shape compiles, 50 s, for arithmetic that is NumPy's and Keras's).
EXTRA_FILES = {"torch": ["tests/test_interop.py"]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_and_recalibration_files_pass_on_backend(backend):
    files = [*FILES, *EXTRA_FILES.get(backend, [])]
    run = run_on(backend, ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|skipped|failed|error)", summary)}
    # Exact, so that a test that stops being collected is noticed. TensorFlow runs these files
    # as 154 tests, one skipped (JAX tracers only); the other backends collect 145, of which
    # PyTorch skips 11 (TensorFlow machinery, JAX tracers) and JAX 12 (TensorFlow machinery, and
    # float64, which JAX lacks without jax_enable_x64); PyTorch also runs the 37 interop tests.
    assert counts == EXPECTED_COUNTS[backend], summary
    reasons = set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.+)", run.stdout))
    assert reasons <= ALLOWED_SKIPS, reasons


FOLD_SCRIPT = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    import keras_bn
    from keras_bn.export.demo import build_model, load_digits_split

    L = keras.layers
    out = sys.argv[1]

    def residual():
        keras.utils.set_random_seed(1)
        inputs = keras.Input((8, 8, 1))
        x = L.ReLU()(keras_bn.BatchNorm(momentum=0.9)(L.Conv2D(8, 3, padding="same")(inputs)))
        y = L.ReLU()(L.BatchNormalization(momentum=0.9)(L.Conv2D(8, 3, padding="same")(x)))
        y = L.BatchNormalization(momentum=0.9)(L.Conv2D(8, 3, padding="same")(y))
        x = L.GlobalAveragePooling2D()(L.ReLU()(L.Add()([x, y])))
        return keras.Model(inputs, L.Dense(10)(x), name="residual")

    x_train, x_test, y_train, y_test = load_digits_split()
    result = {"backend": keras.backend.backend()}
    for name, model in (("digits_cnn", build_model()), ("residual", residual())):
        # Keras's default per backend: jax.jit on JAX, eager on torch (torch.compile of the
        # layer is covered by the layer file; here it would cost two minutes of compiling).
        model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        model.fit(x_train, y_train, batch_size=64, epochs=2, verbose=0)
        folded, report = keras_bn.fold_bn(model)
        reference = model.predict(x_test, verbose=0)
        folded.save(f"{out}/{name}.folded.keras")
        np.save(f"{out}/{name}.reference.npy", reference)
        result[name] = {
            "folded": len(report.folded),
            "not_folded": len(report.not_folded),
            "max_error": float(np.abs(folded.predict(x_test, verbose=0) - reference).max()),
            "scale": float(np.abs(reference).max()),
            "accuracy": float((reference.argmax(1) == y_test).mean()),
            "diagnosed": [str(row.verdict) for row in keras_bn.diagnose(model).rows],
        }
        # Recalibrated there; the parent recalibrates the same trained model under TensorFlow.
        model.save(f"{out}/{name}.trained.keras")
        recalibrated, report = keras_bn.recalibrate(model, x_train, batch_size=64, verbose=0)
        stats = [keras.ops.convert_to_numpy(v) for layer in recalibrated.layers
                 if isinstance(layer, (keras_bn.BatchNorm, L.BatchNormalization))
                 for v in (layer.moving_mean, layer.moving_variance)]
        np.savez(f"{out}/{name}.recalibrated.npz", *stats)
        with_data = keras_bn.diagnose(recalibrated, x_train, batch_size=64)
        result[name].update(recalibrated_rows=len(report.rows),
                            healthy_after=bool(with_data.healthy),
                            accuracy_after=float((recalibrated.predict(x_test, verbose=0).argmax(1)
                                                  == y_test).mean()))
    # The command line there, in this process: doctor, recalibrate, doctor again, on the demo
    # CNN trained 4 steps at momentum 0.99 (stale statistics).
    import contextlib, io
    from keras_bn.export.cli import main as cli
    stale = build_model(momentum=0.99)
    stale.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stale.fit(x_train[:256], y_train[:256], batch_size=64, epochs=1, verbose=0)
    stale.save(f"{out}/stale.keras")
    np.save(f"{out}/x.npy", x_train[:256])
    runs = []
    for argv in (["doctor", f"{out}/stale.keras", "--data", f"{out}/x.npy", "--json"],
                 ["recalibrate", f"{out}/stale.keras", "--data", f"{out}/x.npy", "-o",
                  f"{out}/stale.recalibrated.keras"],
                 ["doctor", f"{out}/stale.recalibrated.keras", "--data", f"{out}/x.npy",
                  "--json"]):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = cli(argv)
        runs.append({"exit": code, "stdout": printed.getvalue()})
    result["cli"] = runs
    from keras_bn import export
    try:
        export.to_onnx(model, f"{out}/here.onnx")
    except keras_bn.KerasBNError as error:
        result["export_error"] = str(error)
    print(json.dumps(result))
""")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fold_on_backend_then_export_under_tensorflow(backend, tmp_path):
    run = run_on(backend, ["-c", FOLD_SCRIPT, str(tmp_path)])
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["backend"] == backend
    # Every BatchNorm folded (4 in the digits CNN, 3 in the residual network), and the folded
    # model computes what the trained one does, on the backend that trained it.
    assert result["digits_cnn"]["folded"] == 4 and result["residual"]["folded"] == 3, result
    for name in ("digits_cnn", "residual"):
        r = result[name]
        assert r["not_folded"] == 0 and r["max_error"] <= 1e-4 * r["scale"], r
        assert r["accuracy"] > 0.3, r  # trained two epochs (measured 0.43 to 0.9); chance is 0.1
        # diagnose without data reads the weights: a row per BatchNorm, trained, none corrupt.
        assert len(r["diagnosed"]) == r["folded"] and "corrupt" not in r["diagnosed"], r
    for name in ("digits_cnn", "residual"):
        r = result[name]
        # Recalibrated there, and diagnosed with data: healthy afterwards.
        assert r["recalibrated_rows"] == r["folded"] and r["healthy_after"], r
        assert r["accuracy_after"] >= r["accuracy"] - 0.05, r
    assert re.search(
        r"ONNX export \(tf2onnx converts TensorFlow graphs\) runs on the TensorFlow backend in "
        r"this version\. .* Run it there: "
        r"`KERAS_BACKEND=tensorflow keras-bn export model\.keras -o model\.onnx`",
        result["export_error"],
    ), result["export_error"]
    assert not (tmp_path / "here.onnx").exists()
    # keras-bn doctor / recalibrate there: stale (exit 1), repaired (exit 0), then healthy.
    doctor, recalibrate, again = result["cli"]
    assert doctor["exit"] == 1 and json.loads(doctor["stdout"])["verdict"] == "stale", doctor
    assert recalibrate["exit"] == 0 and "recalibrated" in recalibrate["stdout"], recalibrate
    assert again["exit"] == 0 and json.loads(again["stdout"])["verdict"] == "ok", again
    # ... and the file it wrote loads here with TensorFlow's recalibrated statistics.
    x_stale = np.load(tmp_path / "x.npy")
    here, _ = keras_bn.recalibrate(
        keras.saving.load_model(tmp_path / "stale.keras"), x_stale, verbose=0
    )
    loaded = keras.saving.load_model(tmp_path / "stale.recalibrated.keras")
    for a, b in zip(here.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    # The .keras files folded there load here, under TensorFlow, and export verified.
    from keras_bn.export.demo import load_digits_split

    x_train, x_test = load_digits_split()[:2]
    for name in ("digits_cnn", "residual"):
        folded = keras.saving.load_model(tmp_path / f"{name}.folded.keras")
        reference = np.load(tmp_path / f"{name}.reference.npy")
        np.testing.assert_allclose(
            folded.predict(x_test, verbose=0), reference, atol=1e-4 * np.abs(reference).max()
        )
        report = export.to_onnx(folded, tmp_path / f"{name}.onnx", samples=x_test)
        assert report.verification.passed and "BatchNormalization" not in report.op_counts
        # The same trained model recalibrated here, on TensorFlow's own collection path (float64
        # sums; tests/test_recalibrate.py holds it to NumPy), gives the statistics the
        # backend's keras.ops path gave there.
        trained = keras.saving.load_model(tmp_path / f"{name}.trained.keras")
        here, _ = keras_bn.recalibrate(trained, x_train, batch_size=64, verbose=0)
        there = np.load(tmp_path / f"{name}.recalibrated.npz")
        mine = [
            v.numpy()
            for layer in here.layers
            if isinstance(layer, (keras_bn.BatchNorm, keras.layers.BatchNormalization))
            for v in (layer.moving_mean, layer.moving_variance)
        ]
        assert len(mine) == len(there.files) == 2 * result[name]["folded"]
        for i, value in enumerate(mine):
            np.testing.assert_allclose(
                there[f"arr_{i}"], value, rtol=1e-4, atol=1e-5, err_msg=f"{name} #{i}"
            )


# ----------------------------------------------------------------------------------------------
# synchronized=True on each backend's own distributed engine: two replicas of 4 samples each
# must learn what one batch of 8 does, and with synchronized=False each replica its own half.

DATA = "np.random.default_rng(0).normal(3.0, 2.0, size=(8, 5)).astype('float32')"

JAX_SYNC_SCRIPT = textwrap.dedent(f"""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import json, jax, keras, numpy as np
    import keras_bn

    data = {DATA}
    data[4:] += 10.0  # the halves differ, so one device's statistics are not the batch's
    target = np.zeros_like(data)
    result = {{"devices": len(jax.devices())}}
    dist = keras.distribution.DataParallel(devices=jax.devices())

    def trained(make, distributed):
        keras.distribution.set_distribution(dist if distributed else None)
        model = keras.Sequential([keras.Input((5,)), make()])
        model.compile(keras.optimizers.SGD(0.0), "mse")  # Keras's default: jax.jit
        model.fit(data, target, batch_size=8, epochs=1, verbose=0, shuffle=False)
        sharded = jax.device_put(data, dist.get_data_layout(data.shape).backend_layout)
        out = model.layers[0](sharded if distributed else data, training=True)
        layer = model.layers[0]
        return {{"mean": np.asarray(layer.moving_mean.value).tolist(),
                "var": np.asarray(layer.moving_variance.value).tolist(),
                "out": np.asarray(out).tolist()}}

    for sync in (True, False):
        result[f"ours_{{sync}}"] = trained(
            lambda: keras_bn.BatchNorm(momentum=0.0, synchronized=sync), True)
    result["keras"] = trained(lambda: keras.layers.BatchNormalization(momentum=0.0), True)
    result["unbiased_False"] = trained(
        lambda: keras_bn.BatchNorm.from_torch(momentum=1.0, eps=1e-3), True)
    result["plain"] = trained(lambda: keras_bn.BatchNorm(momentum=0.0), False)
    keras.distribution.set_distribution(dist)
    # A mask (Keras's: no channel axis) splits with the batch: each half's unmasked values.
    sequences = data.reshape(8, 1, 5).repeat(3, axis=1) + np.arange(3)[None, :, None]
    mask = np.ones((8, 3), bool)
    mask[:, 2] = False
    mask[5:, 1] = False
    put = lambda a: jax.device_put(a, dist.get_data_layout(a.shape).backend_layout)
    masked = keras_bn.BatchNorm(momentum=0.0)
    masked(put(sequences), training=True, mask=put(mask))
    result["masked_False"] = {{"mean": np.asarray(masked.moving_mean.value).tolist(),
                              "var": np.asarray(masked.moving_variance.value).tolist()}}
    # The gradient with each device's statistics: d/dx and d/dgamma of sum(y * w).
    weights = np.random.default_rng(1).normal(size=data.shape).astype("float32")
    layer = keras_bn.BatchNorm(momentum=0.0)
    layer.build(data.shape)
    def loss(x, gamma):
        y, _ = layer.stateless_call([gamma, layer.beta.value],
                                    [v.value for v in layer.non_trainable_variables],
                                    x, training=True)
        return jax.numpy.sum(y * weights)
    dx, dgamma = jax.jit(jax.grad(loss, argnums=(0, 1)))(put(data), layer.gamma.value)
    result["grad_False"] = {{"dx": np.asarray(dx).tolist(), "dgamma": np.asarray(dgamma).tolist()}}
    try:
        keras_bn.BatchNorm()(data[:6].reshape(3, 2, 5), training=True)
    except keras_bn.KerasBNError as error:
        result["indivisible"] = str(error)
    print(json.dumps(result))
""")


@pytest.mark.skipif(not HAVE_JAX, reason='JAX not installed: pip install -e ".[dev]"')
def test_jax_data_parallel_statistics():
    run = run_on("jax", ["-c", JAX_SYNC_SCRIPT])
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2, result
    data = np.random.default_rng(0).normal(3.0, 2.0, size=(8, 5)).astype("float32")
    data[4:] += 10.0
    halves = [data[:4], data[4:]]
    sync, local, plain = result["ours_True"], result["ours_False"], result["plain"]
    # synchronized=True over two devices: the batch of 8 (NumPy), and what no distribution gives.
    np.testing.assert_allclose(sync["mean"], data.mean(0), rtol=1e-5)
    np.testing.assert_allclose(sync["var"], data.var(0), rtol=1e-5)
    np.testing.assert_allclose(sync["out"], plain["out"], atol=1e-5)
    np.testing.assert_allclose(plain["var"], data.var(0), rtol=1e-5)
    # Measured: Keras's own layer (no synchronized mode on JAX) learns the global batch too,
    # since its reductions run on arrays sharded over the devices (keras_bn/_replicas.py).
    np.testing.assert_allclose(result["keras"]["var"], data.var(0), rtol=1e-5)
    # synchronized=False: each device normalizes with its own half, and the moving statistics
    # average the two devices' updates, as tf.distribute does.
    np.testing.assert_allclose(local["mean"], np.mean([h.mean(0) for h in halves], 0), rtol=1e-5)
    np.testing.assert_allclose(local["var"], np.mean([h.var(0) for h in halves], 0), rtol=1e-5)
    own = np.concatenate([(h - h.mean(0)) / np.sqrt(h.var(0) + 1e-3) for h in halves])
    np.testing.assert_allclose(local["out"], own, atol=1e-4)
    assert not np.allclose(local["var"], data.var(0), rtol=0.1)  # the negative case
    unbiased = np.mean([h.var(0, ddof=1) for h in halves], 0)
    np.testing.assert_allclose(result["unbiased_False"]["var"], unbiased, rtol=1e-5)
    # Per half, Ioffe & Szegedy's gradient in float64: dx = r (w - (sum w + xhat sum(w xhat))/n),
    # dgamma = sum over both halves of sum(w xhat).
    w = np.random.default_rng(1).normal(size=data.shape)
    dx, dgamma = [], 0.0
    for h in (slice(0, 4), slice(4, 8)):
        half = data[h].astype(np.float64)
        r = 1 / np.sqrt(half.var(0) + 1e-3)
        xhat = (half - half.mean(0)) * r
        dx.append(r * (w[h] - (w[h].sum(0) + xhat * (w[h] * xhat).sum(0)) / 4))
        dgamma = dgamma + (w[h] * xhat).sum(0)
    grad = result["grad_False"]
    np.testing.assert_allclose(grad["dx"], np.concatenate(dx), atol=1e-4)
    np.testing.assert_allclose(grad["dgamma"], dgamma, rtol=1e-4, atol=1e-5)
    sequences = data.reshape(8, 1, 5).repeat(3, axis=1) + np.arange(3)[None, :, None]
    mask = np.ones((8, 3), bool)
    mask[:, 2] = False
    mask[5:, 1] = False
    kept = [sequences[h][mask[h]] for h in (slice(0, 4), slice(4, 8))]  # (values, 5) per half
    masked = result["masked_False"]
    np.testing.assert_allclose(masked["mean"], np.mean([k.mean(0) for k in kept], 0), rtol=1e-5)
    np.testing.assert_allclose(masked["var"], np.mean([k.var(0) for k in kept], 0), rtol=1e-5)
    assert re.search(
        r"split across 2 devices.*Expected: a batch size divisible by 2.*Received: a batch of 3",
        result["indivisible"],
    ), result["indivisible"]


# PyTorch's torch.distributed: in tests/test_distributed.py, whose two gloo workers check the
# synchronized layer (statistics, outputs and input gradients of the global batch) as well as
# recalibration across processes, in one launch.


# Keras 3.16 brings keras.distribution to the PyTorch backend (DTensor). Under its DataParallel,
# `fit` must give synchronized=True the global batch's statistics once, not all-reduce an
# already-global reduction. Runs where Keras has it (.ci/nightly, against keras-nightly).
KERAS_TORCH_DISTRIBUTION = os.path.exists(
    os.path.join(os.path.dirname(keras.__file__), "src", "backend", "torch", "distribution_lib.py")
)

KERAS_DISTRIBUTION_SCRIPT = textwrap.dedent(f"""
    import json, os, socket, sys
    import numpy as np, torch.multiprocessing as mp

    def replica(rank, port, out):
        os.environ.update(KERAS_BACKEND="torch", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          WORLD_SIZE="2", RANK=str(rank))
        import keras, keras_bn
        keras.distribution.initialize()
        keras.distribution.set_distribution(keras.distribution.DataParallel(
            devices=keras.distribution.list_devices(), auto_shard_dataset=False))
        data = {DATA}
        data[4:] += 10.0
        local = data[4 * rank: 4 * rank + 4]  # each process its own half, as a loader gives it
        result = {{}}
        for name, layer in (("True", lambda: keras_bn.BatchNorm(momentum=0.0, synchronized=True)),
                            ("False", lambda: keras_bn.BatchNorm(momentum=0.0)),
                            ("keras", lambda: keras.layers.BatchNormalization(momentum=0.0))):
            model = keras.Sequential([keras.Input((5,)), layer(), keras.layers.Dense(1)])
            model.compile("sgd", "mse")
            model.fit(local, np.zeros((4, 1), "float32"), batch_size=4, verbose=0, shuffle=False)
            bn = model.layers[0]
            result[name] = {{"mean": np.asarray(bn.moving_mean.numpy()).tolist(),
                            "var": np.asarray(bn.moving_variance.numpy()).tolist()}}
        # recalibrate there: each process its half, every process the statistics of all 8 rows.
        model = keras.Sequential([keras.Input((5,)), keras_bn.BatchNorm()])
        new, report = keras_bn.recalibrate(model, local, batch_size=4, verbose=0)
        bn = new.layers[0]
        result["recalibrated"] = {{"mean": np.asarray(bn.moving_mean.numpy()).tolist(),
                                  "var": np.asarray(bn.moving_variance.numpy()).tolist(),
                                  "processes": report.processes}}
        with open(f"{{out}}/{{rank}}.json", "w") as f:
            json.dump(result, f)

    if __name__ == "__main__":
        out = sys.argv[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(replica, args=(port, out), nprocs=2)
        print(json.dumps([json.load(open(f"{{out}}/{{r}}.json")) for r in (0, 1)]))
""")


@pytest.mark.skipif(
    not KERAS_TORCH_DISTRIBUTION, reason="this Keras has no keras.distribution on PyTorch (3.16+)"
)
def test_torch_synchronized_statistics_under_keras_distribution(tmp_path):
    script = tmp_path / "keras_distribution.py"
    script.write_text(KERAS_DISTRIBUTION_SCRIPT)
    run = run_on("torch", [str(script), str(tmp_path)], timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = json.loads(run.stdout.strip().splitlines()[-1])
    data = np.random.default_rng(0).normal(3.0, 2.0, size=(8, 5)).astype("float32")
    data[4:] += 10.0
    for rank, half in zip(ranks, (data[:4], data[4:])):
        # synchronized=True: the batch of 8's statistics once (a second all-reduce would double
        # them); synchronized=False and Keras's own layer: the process's half.
        np.testing.assert_allclose(rank["True"]["mean"], data.mean(0), rtol=1e-5)
        np.testing.assert_allclose(rank["True"]["var"], data.var(0), rtol=1e-5)
        for local in ("False", "keras"):
            np.testing.assert_allclose(rank[local]["mean"], half.mean(0), rtol=1e-5)
            np.testing.assert_allclose(rank[local]["var"], half.var(0), rtol=1e-4)
        # recalibrate under Keras's torch distribution: merged over both processes.
        assert rank["recalibrated"]["processes"] == 2
        np.testing.assert_allclose(rank["recalibrated"]["mean"], data.mean(0), rtol=1e-6)
        np.testing.assert_allclose(rank["recalibrated"]["var"], data.var(0), rtol=1e-6)
