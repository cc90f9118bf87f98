"""The keras-bn command line through real subprocesses: every exit code and every bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_bn
from tests.test_fold import randomize_bn

L = keras.layers
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def cli(*args):
    return subprocess.run([sys.executable, "-m", "export.cli", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=300)


def one_line_error(run, pattern):
    lines = [l for l in run.stderr.splitlines() if l.startswith("keras-bn: error:")]
    assert len(lines) == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    import re
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras_bn.BatchNorm(name="bn1", momentum=None)(L.Conv2D(4, 3, use_bias=False)(inputs))
    x = L.GlobalAveragePooling2D()(L.ReLU()(x))
    model = randomize_bn(keras.Model(inputs, L.BatchNormalization(name="bn2", momentum=0.9)(L.Dense(3)(x))))
    model.save(root / "model.keras")
    other = randomize_bn(keras.models.clone_model(model), seed=7)
    for w in other.weights:
        if "kernel" in w.path:
            w.assign(np.asarray(w) * 2.0)
    other.save(root / "other.keras")
    model.save(root / "model.h5")
    (root / "garbage.keras").write_bytes(os.urandom(2048))
    data = (root / "model.keras").read_bytes()
    (root / "truncated.keras").write_bytes(data[: len(data) // 2])
    marker = root / "lambda_ran"
    # The path is a literal in the lambda's code: it would create the marker file if it ran.
    code = eval(f"lambda t: t * 2.0 + float(bool(open({str(marker)!r}, 'w')))")  # noqa: S307
    lam = keras.Model(inputs, L.Lambda(code)(inputs))
    lam.save(root / "lambda.keras")
    if marker.exists():
        marker.unlink()
    bad = keras.models.clone_model(model)
    bad.set_weights(model.get_weights())
    bad.get_layer("bn2").moving_variance.assign(np.array([1.0, np.nan, -3.0], np.float32))
    bad.save(root / "corrupt.keras")
    np.save(root / "samples.npy", np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype("float32"))
    return root


def test_inspect(files):
    run = cli("inspect", files / "model.keras")
    assert run.returncode == 0, run.stderr
    assert "bn1" in run.stdout and "cumulative" in run.stdout and "0.9 / 0.1" in run.stdout
    assert "folded backward" in run.stdout
    assert "[keras-bn] loading" in run.stderr
    data = json.loads(cli("inspect", files / "model.keras", "--json").stdout)
    assert [b["name"] for b in data["batchnorms"]] == ["bn1", "bn2"]
    assert data["fold_plan"]["counts"]["folded backward"] == 2


def test_fold_export_verify_round_trip(files, tmp_path):
    before = sorted(os.listdir(files))
    run = cli("fold", files / "model.keras", "-o", tmp_path / "folded.keras", "--samples", files / "samples.npy")
    assert run.returncode == 0, run.stderr
    folded = keras.saving.load_model(tmp_path / "folded.keras")
    assert not any(isinstance(l, (keras_bn.BatchNorm, L.BatchNormalization)) for l in folded.layers)
    run = cli("export", files / "model.keras", "-o", tmp_path / "model.onnx", "--json", "--opset", "13")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["verification"]["passed"] and report["batchnorms_folded"] == 2
    assert report["opset"] == 13
    steps = [l.split("] ")[1].split(":")[0] for l in run.stderr.splitlines() if "done in" in l]
    assert steps[1:] == ["folding", "converting with tf2onnx", "checking the graph",
                         "verifying with onnxruntime", "writing"], run.stderr
    assert "BatchNormalization" not in report["op_counts"]
    run = cli("verify", files / "model.keras", tmp_path / "model.onnx", "--samples", files / "samples.npy")
    assert run.returncode == 0 and "verification passed" in run.stdout
    # Exit code 1: the ONNX graph does not match this model.
    run = cli("verify", files / "other.keras", tmp_path / "model.onnx")
    assert run.returncode == 1 and "verification FAILED" in run.stdout
    assert sorted(os.listdir(files)) == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".keras-bn-")]


@pytest.mark.parametrize("args,pattern", [
    (["inspect", "{d}/missing.keras"], r"The model file does not exist\. Expected: a path to a \.keras file\. Received: '.*missing\.keras'"),
    (["inspect", "{d}/garbage.keras"], r"not a valid \.keras archive .*Received: 2048 bytes"),
    (["inspect", "{d}/truncated.keras"], r"not a valid \.keras archive|archive is damaged"),
    (["inspect", "{d}/model.h5"], r"Refusing to load a legacy HDF5 file.*--unsafe"),
    (["export", "{d}/model.keras", "-o", "{d}/model.keras"], r"The output would overwrite an input"),
    (["fold", "{d}/model.keras", "-o", "{d}/nowhere/out.keras"], r"The output directory does not exist"),
    (["fold", "{d}/corrupt.keras", "-o", "{t}/out.keras"], r"BatchNorm 'bn2' has corrupt statistics: moving_variance has 1 non-finite"),
    (["export", "{d}/model.keras", "-o", "{t}/o.onnx", "--samples", "{d}/missing.npy"], r"The samples file does not exist"),
    (["export", "{d}/model.keras", "-o", "{t}/o.onnx", "--opset", "19"], r"Unsupported ONNX opset\. Expected: an integer from 7 .* to 18 .*Received: 19"),
])
def test_bad_input_exits_2(files, tmp_path, args, pattern):
    run = cli(*[a.format(d=files, t=tmp_path) for a in args])
    assert run.returncode == 2, (run.stdout, run.stderr[-2000:])
    one_line_error(run, pattern)
    assert not os.path.exists(tmp_path / "out.keras") and not os.path.exists(tmp_path / "o.onnx")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_killed_export_leaves_the_previous_output_intact(files, tmp_path, sig):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous export")
    proc = subprocess.Popen([sys.executable, "-m", "export.cli", "export", str(files / "model.keras"),
                             "-o", str(out)], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=ENV)
    for line in proc.stderr:
        if "converting with tf2onnx" in line:
            break
    assert proc.poll() is None, "the export finished before it could be stopped"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), err
    if sig != signal.SIGKILL:
        word = "interrupted" if sig == signal.SIGINT else "terminated"
        assert f"keras-bn: error: {word}" in err and "Traceback" not in err
    assert out.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["o.onnx"]  # no temporary file left either


def test_terminated_mid_write_removes_the_temporary_file(tmp_path):
    # SIGTERM while the output is being written: the half-written temporary file goes, the
    # previous output stays.
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous export")
    code = textwrap.dedent("""
        import os, signal, sys, time
        from export import cli
        from export.files import atomic_output
        signal.signal(signal.SIGTERM, cli._terminate)
        with atomic_output(sys.argv[1], ".onnx") as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"half")
            print(os.path.basename(tmp), flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
    """)
    run = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert run.returncode == 143 and "keras-bn: error: terminated" in run.stderr, run.stderr
    assert run.stdout.startswith(".keras-bn-")  # the temporary file did exist
    assert out.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["o.onnx"]


def test_lambda_model_is_refused_and_its_code_never_runs(files):
    run = cli("inspect", files / "lambda.keras")
    assert run.returncode == 2
    one_line_error(run, r"contains a Lambda layer.*its code does not run")
    assert not (files / "lambda_ran").exists()


def test_negative_variance_is_refused(files, tmp_path):
    model = keras.saving.load_model(files / "model.keras")
    model.get_layer("bn1").moving_variance.assign(-np.ones(4, np.float32))
    model.save(tmp_path / "negative.keras")
    run = cli("export", tmp_path / "negative.keras", "-o", tmp_path / "n.onnx")
    assert run.returncode == 2
    one_line_error(run, r"BatchNorm 'bn1' has corrupt statistics: moving_variance \+ epsilon must be positive")
    assert not (tmp_path / "n.onnx").exists()


def test_unsafe_h5_warns_and_debug_shows_traceback(files):
    run = cli("inspect", files / "model.h5", "--unsafe")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "without safe_mode" in run.stderr and "bn1" in run.stdout
    run = cli("inspect", files / "missing.keras", "--debug")
    assert run.returncode == 2 and "Traceback" in run.stderr


def test_usage_errors_exit_2():
    run = cli("export")
    assert run.returncode == 2 and "keras-bn: error:" in run.stderr
    run = cli("frobnicate")
    assert run.returncode == 2


def test_demo_through_the_console_script(tmp_path):
    # The Quickstart's main command, as installed by pip (console script `keras-bn`).
    import shutil

    exe = shutil.which("keras-bn")
    assert exe, "the keras-bn console script is not installed: pip install -e ."
    out = tmp_path / "demo"
    run = subprocess.run([exe, "demo", "--out", str(out), "--json"], capture_output=True,
                         text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["verification_passed"] and summary["batchnorms_after"] == 0
    assert summary["batchnorms_before"] == 4
    assert all(a > 0.95 for a in summary["accuracy"].values()), summary["accuracy"]
    assert all(summary["identical_predictions"].values())
    assert max(summary["max_abs_error"].values()) < 1e-4
    assert sorted(os.listdir(out)) == ["folded.keras", "folded.onnx", "trained.keras"]
    folded = keras.saving.load_model(out / "folded.keras")
    assert not any(isinstance(l, (keras_bn.BatchNorm, L.BatchNormalization)) for l in folded.layers)
    # A second run over the same directory replaces the files.
    run = subprocess.run([exe, "demo", "--out", str(out), "--epochs", "1", "--json"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["folded.keras", "folded.onnx", "trained.keras"]
