"""The keras-bn command line: every exit code and every bad input. The console script runs in real
subprocesses where the process is what is tested (the demo as pip installs it, an export with its
progress lines, signals, peak memory); everything else calls `export.cli.main` in this process,
the same code without the signal handlers, which spares a TensorFlow import (12 s on a slow
2-core machine) per case."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn
from tests.test_fold import randomize_bn

L = keras.layers
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "keras_bn.export.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def cli_in_process(*args):
    """`export.cli.main` in this process (what a notebook does), for every case whose process is
    not under test: the same code as the console script but the signal handlers, without a
    TensorFlow import per case. Argparse's usage errors (SystemExit) become the exit code."""
    import contextlib
    import io
    import types

    from keras_bn.export import cli as cli_module

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_module.main([str(a) for a in args])
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def one_line_error(run, pattern):
    lines = [l for l in run.stderr.splitlines() if l.startswith("keras-bn: error:")]
    assert len(lines) == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    keras.utils.set_random_seed(0)  # the same fixture models in every run
    root = tmp_path_factory.mktemp("cli")
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras_bn.BatchNorm(name="bn1", momentum=None)(L.Conv2D(4, 3, use_bias=False)(inputs))
    x = L.GlobalAveragePooling2D()(L.ReLU()(x))
    model = randomize_bn(
        keras.Model(inputs, L.BatchNormalization(name="bn2", momentum=0.9)(L.Dense(3)(x)))
    )
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
    np.save(
        root / "samples.npy", np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype("float32")
    )
    (root / "samples.onnx").write_bytes((root / "samples.npy").read_bytes())
    np.save(root / "wrong_shape.npy", np.zeros((5, 8, 3), np.float32))
    np.save(root / "strings.npy", np.full((5, 8, 8, 3), "a"))
    big_in = keras.Input((3,))
    big = keras.Model(big_in, L.ReLU()(L.BatchNormalization(name="bn")(L.Dense(2)(big_in))))
    big.get_layer("bn").set_weights(
        [
            np.full(2, 1e38, np.float32),
            np.zeros(2, np.float32),
            np.full(2, 10.0, np.float32),
            np.ones(2, np.float32),
        ]
    )
    big.save(root / "gamma_1e38.keras")
    return root


def test_inspect(files):
    run = cli_in_process("inspect", files / "model.keras")
    assert run.returncode == 0, run.stderr
    assert "bn1" in run.stdout and "cumulative" in run.stdout and "0.9 / 0.1" in run.stdout
    assert "folded backward" in run.stdout
    assert "[keras-bn] loading" in run.stderr
    data = json.loads(cli_in_process("inspect", files / "model.keras", "--json").stdout)
    assert [b["name"] for b in data["batchnorms"]] == ["bn1", "bn2"]
    assert data["fold_plan"]["counts"]["folded backward"] == 2


def test_fold_export_verify_round_trip(files, tmp_path):
    before = sorted(os.listdir(files))
    run = cli_in_process(
        "fold",
        files / "model.keras",
        "-o",
        tmp_path / "folded.keras",
        "--samples",
        files / "samples.npy",
    )
    assert run.returncode == 0, run.stderr
    folded = keras.saving.load_model(tmp_path / "folded.keras")
    assert not any(isinstance(l, (keras_bn.BatchNorm, L.BatchNormalization)) for l in folded.layers)
    run = cli(
        "export", files / "model.keras", "-o", tmp_path / "model.onnx", "--json", "--opset", "13"
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["verification"]["passed"] and report["batchnorms_folded"] == 2
    assert report["opset"] == 13
    steps = [l.split("] ")[1].split(":")[0] for l in run.stderr.splitlines() if "done in" in l]
    assert steps[1:] == [
        "folding",
        "converting with tf2onnx",
        "checking the graph",
        "verifying with onnxruntime",
        "writing",
    ], run.stderr
    assert "BatchNormalization" not in report["op_counts"]
    run = cli_in_process(
        "verify", files / "model.keras", tmp_path / "model.onnx", "--samples", files / "samples.npy"
    )
    assert run.returncode == 0 and "verification passed" in run.stdout
    # Exit code 1: the ONNX graph does not match this model.
    run = cli_in_process("verify", files / "other.keras", tmp_path / "model.onnx")
    assert run.returncode == 1 and "verification FAILED" in run.stdout
    assert sorted(os.listdir(files)) == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".keras-bn-")]


@pytest.mark.parametrize(
    "args,pattern",
    [
        (
            ["inspect", "{d}/missing.keras"],
            r"The model file does not exist\. Expected: a path to a \.keras file\. Received: '.*missing\.keras'",
        ),
        (["inspect", "{d}/garbage.keras"], r"not a valid \.keras archive .*Received: 2048 bytes"),
        (["inspect", "{d}/truncated.keras"], r"not a valid \.keras archive|archive is damaged"),
        (["inspect", "{d}/model.h5"], r"Refusing to load a legacy HDF5 file.*--unsafe"),
        (
            ["export", "{d}/model.keras", "-o", "{d}/model.keras"],
            r"The output would overwrite an input",
        ),
        (
            ["fold", "{d}/model.keras", "-o", "{d}/nowhere/out.keras"],
            r"The output directory does not exist",
        ),
        (
            ["fold", "{d}/corrupt.keras", "-o", "{t}/out.keras"],
            r"BatchNorm 'bn2' has corrupt statistics: moving_variance has 1 non-finite",
        ),
        (
            ["export", "{d}/model.keras", "-o", "{t}/o.onnx", "--samples", "{d}/missing.npy"],
            r"The samples file does not exist",
        ),
        (
            ["export", "{d}/model.keras", "-o", "{t}/o.onnx", "--opset", "19"],
            r"Unsupported ONNX opset\. Expected: an integer from 7 .* to 18 .*Received: 19",
        ),
        (
            ["export", "{d}/model.keras", "-o", "{d}/samples.npy", "--samples", "{d}/samples.npy"],
            r"The output would overwrite an input.*samples\.npy', which is also an input",
        ),
        (["export", "{d}/model.keras", "-o", "{t}/o.npy"], r"The output must be a \.onnx file"),
        (
            [
                "export",
                "{d}/model.keras",
                "-o",
                "{d}/samples.onnx",
                "--samples",
                "{d}/samples.onnx",
            ],
            r"The output would overwrite an input",
        ),
        (["fold", "{d}/model.keras", "-o", "{t}/out.onnx"], r"The output must be a \.keras file"),
        (
            ["fold", "{d}/gamma_1e38.keras", "-o", "{t}/out.keras"],
            r"BatchNorm 'bn' has corrupt statistics: its inference shift beta - mean \* scale reaches -?9\.995e\+38, beyond float32's largest value",
        ),
        (
            ["export", "{d}/model.keras", "-o", "{t}/o.onnx", "--samples", "{d}/wrong_shape.npy"],
            r"Samples for input 'image' have the wrong shape\. Expected: shape \(batch, 8, 8, 3\)\. Received: shape \(5, 8, 3\)",
        ),
        (
            ["fold", "{d}/model.keras", "-o", "{t}/out.keras", "--samples", "{d}/strings.npy"],
            r"The samples file does not hold numbers\. Expected: an array of integers or floats.*Received: dtype <U1",
        ),
    ],
)
def test_bad_input_exits_2(files, tmp_path, args, pattern):
    before = {name: (files / name).read_bytes() for name in os.listdir(files)}
    run = cli_in_process(*[a.format(d=files, t=tmp_path) for a in args])
    assert run.returncode == 2, (run.stdout, run.stderr[-2000:])
    one_line_error(run, pattern)
    assert "\x1b[" not in run.stderr
    assert os.listdir(tmp_path) == []
    assert {name: (files / name).read_bytes() for name in os.listdir(files)} == before


@pytest.mark.parametrize("command", ["fold", "export"])
def test_unwritable_destination_is_refused_before_loading(files, tmp_path, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    suffix = ".keras" if command == "fold" else ".onnx"
    os.chmod(locked, 0o555)
    try:
        run = cli_in_process(command, files / "model.keras", "-o", locked / f"out{suffix}")
        assert run.returncode == 2
        one_line_error(run, r"The output directory is not writable")
        assert "loading" not in run.stderr  # refused up front
    finally:
        os.chmod(locked, 0o755)
    readonly = tmp_path / f"ro{suffix}"
    readonly.write_bytes(b"keep")
    os.chmod(readonly, 0o444)
    run = cli_in_process(command, files / "model.keras", "-o", readonly)
    assert run.returncode == 2 and "loading" not in run.stderr
    one_line_error(run, r"The output file is read-only")
    assert readonly.read_bytes() == b"keep"


# The CLI in a subprocess that announces a phase and waits there, so a signal lands in that phase
# whatever the machine's load: "converting" (inside the real tf2onnx call) or "writing" (half of
# the ONNX bytes written to the output's temporary file).
PAUSED_CLI = textwrap.dedent("""
    import sys, time
    import tf2onnx.convert
    # Not the converter module: it imports onnxruntime, which writes $TMPDIR/.ses on import,
    # and the command imports it itself inside its private temporary folder.
    from keras_bn.export import cli, files

    phase = sys.argv[1]
    real_convert, real_output = tf2onnx.convert.from_function, files.atomic_output

    def paused_convert(*args, **kwargs):
        result = real_convert(*args, **kwargs)
        if phase == "converting":
            print("PAUSED", flush=True)
            time.sleep(600)
        return result

    class PausedHandle:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            print("PAUSED", flush=True)
            time.sleep(600)

    import contextlib

    @contextlib.contextmanager
    def paused_output(path, suffix=""):
        with real_output(path, suffix) as handle:
            yield PausedHandle(handle) if phase == "writing" else handle

    tf2onnx.convert.from_function = paused_convert
    files.atomic_output = paused_output  # before the converter imports it
    sys.argv = ["keras-bn"] + sys.argv[2:]
    sys.exit(cli.console_main())
""")


# SIGKILL in both phases (nothing can clean up after it); SIGTERM and SIGINT once each, in the
# phase where their handler has a temporary file to remove or not.
@pytest.mark.parametrize(
    "sig,phase",
    [
        (signal.SIGKILL, "converting"),
        (signal.SIGKILL, "writing"),
        (signal.SIGTERM, "writing"),
        (signal.SIGINT, "converting"),
    ],
)
def test_killed_export_leaves_the_directory_as_it_was(files, tmp_path, sig, phase):
    out_dir, tmpdir = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmpdir.mkdir()
    out = out_dir / "o.onnx"
    out.write_bytes(b"previous export")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PAUSED_CLI,
            phase,
            "export",
            str(files / "model.keras"),
            "-o",
            str(out),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**ENV, "TMPDIR": str(tmpdir)},
    )
    assert proc.stdout.readline().strip() == "PAUSED", proc.stderr.read()[-3000:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), err[-3000:]
    if sig != signal.SIGKILL:
        word = "interrupted" if sig == signal.SIGINT else "terminated"
        assert f"keras-bn: error: {word}" in err and "Traceback" not in err
    assert out.read_bytes() == b"previous export"
    assert os.listdir(out_dir) == ["o.onnx"]  # no temporary file, even after SIGKILL
    # $TMPDIR: the handlers remove keras-bn's temporary folder; after SIGKILL it stays, named
    # for a later command to remove once stale (tests/test_files.py).
    left = os.listdir(tmpdir)
    if sig == signal.SIGKILL:
        assert len(left) == 1 and left[0].startswith(".keras-bn-") and left[0].endswith(".tmp")
    else:
        assert left == []


def test_written_files_get_the_usual_mode(tmp_path):
    from keras_bn.export.files import atomic_output

    old = os.umask(0o027)
    try:
        with atomic_output(tmp_path / "new.onnx", ".onnx") as handle:
            handle.write(b"x")
        assert (os.stat(tmp_path / "new.onnx").st_mode & 0o777) == 0o640  # 0o666 & ~0o027
        replaced = tmp_path / "old.onnx"
        replaced.write_bytes(b"old")
        os.chmod(replaced, 0o604)
        with atomic_output(replaced, ".onnx") as handle:
            handle.write(b"y")
        assert (os.stat(replaced).st_mode & 0o777) == 0o604 and replaced.read_bytes() == b"y"
    finally:
        os.umask(old)


def test_lambda_model_is_refused_and_its_code_never_runs(files):
    run = cli_in_process("inspect", files / "lambda.keras")
    assert run.returncode == 2
    one_line_error(
        run,
        r"safe mode refused part of the model; nothing in it was run \(the model "
        r"contains a Lambda layer",
    )
    assert not (files / "lambda_ran").exists()


def test_negative_variance_is_refused(files, tmp_path):
    model = keras.saving.load_model(files / "model.keras")
    model.get_layer("bn1").moving_variance.assign(-np.ones(4, np.float32))
    model.save(tmp_path / "negative.keras")
    run = cli_in_process("export", tmp_path / "negative.keras", "-o", tmp_path / "n.onnx")
    assert run.returncode == 2
    one_line_error(
        run, r"BatchNorm 'bn1' has corrupt statistics: moving_variance \+ epsilon must be positive"
    )
    assert not (tmp_path / "n.onnx").exists()


def test_unsafe_h5_warns_and_debug_shows_traceback(files):
    with pytest.warns(RuntimeWarning, match="without safe_mode: code in it can run"):
        run = cli_in_process("inspect", files / "model.h5", "--unsafe")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "bn1" in run.stdout
    run = cli_in_process("inspect", files / "missing.keras", "--debug")
    assert run.returncode == 2 and "Traceback" in run.stderr


def test_usage_errors_exit_2():
    run = cli_in_process("export")
    assert run.returncode == 2 and "keras-bn: error:" in run.stderr
    run = cli_in_process("frobnicate")
    assert run.returncode == 2


@pytest.mark.slow
def test_demo_json_summary(tmp_path):
    # The Quickstart's main command as data. tests/test_install.py runs it through the console
    # script of an installed wheel, in a pipe, and reads the same story from its text.
    out = tmp_path / "demo"
    run = cli_in_process("demo", "--out", out, "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["verification_passed"] and summary["batchnorms_after"] == 0
    assert summary["batchnorms_before"] == 4
    # Keras's default momentum 0.99 over about 150 steps: stale statistics, near-chance test
    # accuracy (measured 0.10), flagged by diagnose; recalibration repairs it (measured 0.99)
    # and the folded and exported models keep the repaired predictions.
    accuracy = summary["accuracy"]
    assert accuracy["trained Keras"] < 0.5 < 0.95 < summary["train_accuracy"], summary
    assert summary["diagnosis"]["verdict"] == "stale"
    assert all(r["verdict"] == "stale" for r in summary["diagnosis"]["rows"])
    deployed = ["recalibrated Keras", "folded Keras", "ONNX (onnxruntime)", "LiteRT (interpreter)"]
    assert all(accuracy[k] > 0.95 for k in deployed), accuracy
    assert sorted(summary["identical_predictions"]) == sorted(deployed)
    assert all(summary["identical_predictions"].values())
    assert max(summary["max_abs_error"].values()) < 1e-4
    assert sorted(os.listdir(out)) == [
        "folded.keras",
        "folded.onnx",
        "folded.tflite",
        "recalibrated.keras",
        "trained.keras",
    ]
    # The LiteRT file has no op left by a BatchNorm: convolutions, pooling and dense layers.
    assert set(summary["litert_ops"]) <= {"CONV_2D", "MAX_POOL_2D", "MEAN", "FULLY_CONNECTED"}
    folded = keras.saving.load_model(out / "folded.keras")
    assert not any(isinstance(l, (keras_bn.BatchNorm, L.BatchNormalization)) for l in folded.layers)
    # A second run over the same directory replaces the files.
    run = cli_in_process("demo", "--out", out, "--epochs", "1", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(os.listdir(out)) == 5 and json.loads(run.stdout)["training_steps"] == 19


# ------------------------------------------------------------------------------------------------
# Hostile archives: refused from the zip directory and the HDF5 metadata, in bounded time and memory.

MEASURED_CLI = textwrap.dedent("""
    import resource, sys
    from keras_bn.export import cli
    code = cli.main(sys.argv[1:])
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
    sys.exit(code)
""")


def measured_cli(*args):
    run = subprocess.run(
        ["timeout", "240", sys.executable, "-c", MEASURED_CLI, *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    peak = [int(l.split()[1]) for l in run.stderr.splitlines() if l.startswith("PEAK_RSS_KB")]
    return run, (peak[0] * 1024 if peak else None)


def overlapping_zip(path, copies):
    """A zip whose central directory lists `copies` entries that all point at one deflated
    member of 1 MiB (zip-bomb style: the declared sizes add up, the file stays small)."""
    import struct
    import zlib

    data = b"\0" * (1 << 20)
    packed = zlib.compress(data)[2:-4]  # raw deflate
    crc = zlib.crc32(data)
    name = b"config.json"
    local = (
        struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(packed), len(data), len(name), 0
        )
        + name
        + packed
    )
    central = b""
    for i in range(copies):
        entry = name if i == 0 else f"m{i}.bin".encode()
        central += (
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                20,
                20,
                0,
                8,
                0,
                0,
                crc,
                len(packed),
                len(data),
                len(entry),
                0,
                0,
                0,
                0,
                0,
                0,
            )
            + entry
        )
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, copies, copies, len(central), len(local), 0)
    path.write_bytes(local + central + end)


def test_overlapping_entries_zip_bomb_is_refused_quickly(tmp_path):
    bomb = tmp_path / "bomb.keras"
    overlapping_zip(bomb, 900)
    run, peak = measured_cli("inspect", bomb)
    assert run.returncode == 2, run.stderr[-2000:]
    one_line_error(run, r"overlapping entries \(a zip bomb\)")
    assert peak < 2 * 2**30


def test_oversized_config_is_refused_before_it_is_read(files, tmp_path):
    import zipfile

    path = tmp_path / "big_config.keras"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", b" " * (65 << 20))  # 65 MiB of spaces, ~64 KiB deflated
    assert path.stat().st_size < 1 << 20
    run = cli_in_process("inspect", path)
    assert run.returncode == 2
    one_line_error(
        run,
        r"The archive's config\.json is too large\. Expected: at most 64 MiB\. "
        r"Received: 65 MiB",
    )


def test_weights_declaring_more_than_the_file_holds_are_refused(files, tmp_path):
    import zipfile

    import h5py

    with zipfile.ZipFile(files / "model.keras") as archive:
        config, metadata = archive.read("config.json"), archive.read("metadata.json")
    weights = tmp_path / "w.h5"
    with h5py.File(weights, "w") as handle:
        handle.create_dataset("layers/dense/vars/0", shape=(900_000_000,), dtype="float32")
    path = tmp_path / "hollow.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", config)
        archive.writestr("metadata.json", metadata)
        archive.write(weights, "model.weights.h5")
    assert path.stat().st_size < 64 << 10
    run, peak = measured_cli("inspect", path)
    assert run.returncode == 2, run.stderr[-2000:]
    one_line_error(
        run,
        r"weights declare more data than the file holds\. .*Received: 3600000000 "
        r"bytes declared, the largest 'layers/dense/vars/0'",
    )
    assert peak < 2 * 2**30
    # The limit is the user's to raise for a trusted huge model; a real model passes it.
    ok = cli_in_process("inspect", files / "model.keras", "--max-archive-gib", "0.5")
    assert ok.returncode == 0, ok.stderr[-2000:]
    low = cli_in_process("inspect", files / "model.keras", "--max-archive-gib", "0.000001")
    assert low.returncode == 2 and "declares more data than allowed" in low.stderr


# ------------------------------------------------------------------------------------------------
# Our bugs are ours; in-process use; where verification cannot run.


def test_internal_error_exits_70_and_asks_for_a_report(files, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(keras_bn, "fold_bn", broken)  # a bug of ours, planted
    run = cli_in_process("inspect", files / "model.keras")
    assert run.returncode == 70, run.stderr[-2000:]
    assert (
        "keras-bn: internal error: ZeroDivisionError: a bug. This is a bug in keras-bn"
        in run.stderr
    )
    assert "--debug" in run.stderr and "Traceback" not in run.stderr


def test_main_in_process_installs_no_signal_handler(files, capsys):
    from keras_bn.export import cli

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert cli.main(["inspect", str(files / "missing.keras")]) == 2
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert "The model file does not exist" in capsys.readouterr().err


def cpu_runs_channels_first():
    """Whether this TensorFlow build runs an NCHW convolution on the CPU: stock TF does not;
    with oneDNN on some CPUs (AVX-512 machines here) it does."""
    try:
        tf.nn.conv2d(tf.ones((1, 3, 4, 4)), tf.ones((1, 1, 3, 2)), 1, "SAME", data_format="NCHW")
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        return False
    return True


def test_channels_first_that_cpu_cannot_run_gets_one_line(tmp_path):
    inputs = keras.Input((3, 8, 8))
    x = L.BatchNormalization(axis=1)(L.Conv2D(4, 3, data_format="channels_first")(inputs))
    keras.Model(inputs, x).save(tmp_path / "cf.keras")
    run = cli_in_process("fold", tmp_path / "cf.keras", "-o", tmp_path / "out.keras")
    if cpu_runs_channels_first():  # then the fold is verified like any other
        assert run.returncode == 0, run.stderr[-3000:]
        assert (tmp_path / "out.keras").exists() and "folded backward" in run.stdout
        return
    assert run.returncode == 2
    one_line_error(
        run,
        r"cannot be verified on this machine: TensorFlow on CPU runs convolutions "
        r"and pooling only channels-last",
    )
    assert not (tmp_path / "out.keras").exists()


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_sequential_and_mixed_precision_through_the_cli(policy, tmp_path, mixed_policy):
    mixed_policy(policy)
    model = randomize_bn(
        keras.Sequential(
            [
                keras.Input((8, 8, 3), name="image"),
                L.Conv2D(4, 3, use_bias=False),
                L.BatchNormalization(),
                L.ReLU(),
                L.Flatten(),
                L.Dense(3, name="out"),
            ]
        )
    )
    model.save(tmp_path / "seq.keras")
    run = cli_in_process("export", tmp_path / "seq.keras", "-o", tmp_path / "seq.onnx", "--json")
    if policy == "mixed_bfloat16":  # refused before any work, with the way out
        assert run.returncode == 2 and not (tmp_path / "seq.onnx").exists()
        one_line_error(run, r"computes in bfloat16.*export that")
        run = cli_in_process(
            "fold", tmp_path / "seq.keras", "-o", tmp_path / "folded.keras", "--json"
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert json.loads(run.stdout)["verification"][0]["rtol"] == 5e-2
        return
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["verification"]["passed"] and report["batchnorms_folded"] == 1
    assert report["verification"]["rtol"] == (1e-2 if policy == "mixed_float16" else 1e-5)
    run = cli_in_process("fold", tmp_path / "seq.keras", "-o", tmp_path / "folded.keras")
    assert run.returncode == 0, run.stderr[-3000:]


def test_safe_mode_refusal_says_what_keras_refused(tmp_path):
    # Not a Lambda: a StringLookup whose vocabulary is a file on the machine. Keras's safe mode
    # refuses it; the message must not blame a Lambda layer.
    import zipfile

    inputs = keras.Input((1,), dtype="string")
    model = keras.Model(inputs, L.StringLookup(vocabulary=["a", "b"], name="lookup")(inputs))
    model.save(tmp_path / "plain.keras")
    with zipfile.ZipFile(tmp_path / "plain.keras") as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    config = json.loads(members["config.json"])
    for layer in config["config"]["layers"]:
        if layer["config"].get("name") == "lookup":
            layer["config"]["vocabulary"] = "/etc/passwd"
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(tmp_path / "lookup.keras", "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    run = cli_in_process("inspect", tmp_path / "lookup.keras")
    assert run.returncode == 2, run.stderr[-2000:]
    one_line_error(
        run,
        r"safe mode refused part of the model; nothing in it was run\. Expected: "
        r"a model Keras loads with safe_mode=True\. Received: .*",
    )
    assert "Lambda" not in run.stderr


def test_recalibrate_command(files, tmp_path):
    # Exit 0, a new file, the statistics of the data.
    run = cli_in_process(
        "recalibrate",
        files / "model.keras",
        "--data",
        files / "samples.npy",
        "-o",
        tmp_path / "recal.keras",
        "--batch-size",
        "5",
        "--json",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["estimator"] == "population" and report["batches"] == 1
    new = keras.saving.load_model(tmp_path / "recal.keras")
    model = keras.saving.load_model(files / "model.keras")
    data = np.load(files / "samples.npy")
    conv = keras.Model(model.inputs, model.get_layer("bn1").input).predict(data, verbose=0)
    conv = conv.reshape(-1, conv.shape[-1]).astype(np.float64)
    np.testing.assert_allclose(new.get_layer("bn1").moving_mean.numpy(), conv.mean(0), atol=1e-5)
    np.testing.assert_allclose(new.get_layer("bn1").moving_variance.numpy(), conv.var(0), rtol=1e-5)
    # Bad input: exit 2, nothing written, the inputs untouched.
    before = (files / "samples.npy").read_bytes()
    bad = cli_in_process(
        "recalibrate",
        files / "model.keras",
        "--data",
        files / "wrong_shape.npy",
        "-o",
        tmp_path / "bad.keras",
    )
    assert bad.returncode == 2
    one_line_error(bad, r"Data for input 'image' has the wrong shape")
    assert not (tmp_path / "bad.keras").exists()
    same = cli_in_process(
        "recalibrate",
        files / "model.keras",
        "--data",
        files / "samples.npy",
        "-o",
        files / "samples.npy",
    )
    assert same.returncode == 2 and (files / "samples.npy").read_bytes() == before


def test_doctor_exit_codes(files, tmp_path):
    # The fixture model's statistics are random, not 0/1, and it trains: healthy without data.
    run = cli_in_process("doctor", files / "model.keras", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["verdict"] == "ok"
    # Its statistics are not those of the samples: drifted, exit 1, with the action.
    run = cli_in_process("doctor", files / "model.keras", "--data", files / "samples.npy")
    assert run.returncode == 1, run.stderr[-3000:]
    assert "drifted" in run.stdout and "keras_bn.recalibrate" in run.stdout
    run = cli_in_process("doctor", files / "corrupt.keras")
    assert run.returncode == 1 and "corrupt" in run.stdout
    run = cli_in_process("doctor", files / "missing.keras")
    assert run.returncode == 2
    one_line_error(run, r"The model file does not exist")


# ------------------------------------------------------------------------------------------------
# A quiet command line: TensorFlow's C++ log is filtered from stderr (tests/test_install.py runs
# the installed console script in a pipe).


def test_the_stderr_filter_drops_tensorflow_log_lines_only():
    from keras_bn import _console

    # Lines TensorFlow 2.21 printed on this project's machines, and lines that must stay.
    tensorflow = [
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        b"I0000 00:00:1796303665.512494   18597 port.cc:153] oneDNN custom operations are on.",
        b"E0000 00:00:1796303671.438791   18597 cuda_platform.cc:52] failed call to cuInit: "
        b"INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
        b"W1203 13:02:11.000001    412 cpu_allocator_impl.cc:83] Allocation exceeds 10%",
        b"To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
        b"TensorFlow with the appropriate compiler flags.",
    ]
    ours = [
        b"[keras-bn] converting with tf2onnx ...",
        b"keras-bn: error: The model has no BatchNorm to recalibrate. Expected: ...",
        b"I0000 is not a log line without its time and source",
        b"Epoch 1/8",
    ]
    assert all(_console.is_cpp_log(line) for line in tensorflow)
    assert not any(_console.is_cpp_log(line) for line in ours)
    assert _console.wants_quiet(["demo"], environ={})
    assert not _console.wants_quiet(["--verbose", "demo"], environ={})
    assert not _console.wants_quiet(["demo", "--debug"], environ={})
    assert not _console.wants_quiet(["demo"], environ={"TF_CPP_MIN_LOG_LEVEL": "0"})


def test_a_missing_extra_is_one_line_with_its_pip_command(monkeypatch):
    # The real check on a package name that is not installed, in place of the [onnx] extra's.
    from keras_bn import _environment

    monkeypatch.setitem(_environment.EXTRAS, "onnx", ("onnx", "no_such_package_kbn"))
    with pytest.raises(keras_bn.MissingExtraError) as raised:
        _environment.require_extra("onnx", "keras-bn export")
    message = str(raised.value)
    assert isinstance(raised.value, ImportError) and "\n" not in message
    assert message == (
        "keras-bn export needs the packages of keras-bn's [onnx] extra. Expected: onnx and "
        "no_such_package_kbn installed. Received: no_such_package_kbn missing. Install them: "
        'pip install "keras-bn[onnx]"'
    )
    run = cli_in_process("export", "m.keras", "-o", "m.onnx")
    assert run.returncode == 2 and run.stderr.strip() == f"keras-bn: error: {message}"
    _environment.EXTRAS["onnx"] = ("onnx",)
    _environment.require_extra("onnx", "keras-bn export")  # installed: no error


@pytest.mark.parametrize(
    "variables, pattern",
    [
        # torchrun's environment where Keras runs TensorFlow: each process alone would read only
        # its block of rows and report statistics of part of the file.
        ({"WORLD_SIZE": "2", "RANK": "0"}, r"started by torchrun .*KERAS_BACKEND=torch"),
        ({"WORLD_SIZE": "two"}, r"Invalid WORLD_SIZE .*Expected: an integer"),
        ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}, r"KERAS_DISTRIBUTION_\* .*KERAS_BACKEND=jax"),
        ({"TF_CONFIG": "{not json"}, r"Invalid TF_CONFIG"),
    ],
)
@pytest.mark.parametrize("command", ["doctor", "recalibrate"])
def test_a_launchers_environment_that_cannot_be_joined_exits_2(
    files, tmp_path, monkeypatch, variables, pattern, command
):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    args = [command, files / "model.keras", "--data", files / "samples.npy"]
    if command == "recalibrate":
        args += ["-o", tmp_path / "new.keras"]
    run = cli_in_process(*args)
    assert run.returncode == 2
    one_line_error(run, pattern)
    assert list(tmp_path.iterdir()) == []


def test_one_worker_tf_config_is_a_single_process_run(files, monkeypatch, capsys):
    # A TF_CONFIG naming one worker (a common leftover) is no distributed run: the whole file.
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}}))
    run = cli_in_process("doctor", files / "model.keras", "--data", files / "samples.npy", "--json")
    assert run.returncode in (0, 1), run.stderr[-2000:]
    assert json.loads(run.stdout)["rows"]
