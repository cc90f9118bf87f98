"""Writing outputs without losing anything: `export/files.py`'s atomic write, killed at any
moment, and its removal of temporaries that killed writers left, which must never touch anything
else."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from keras_bn.export import files
from keras_bn.export.files import atomic_output, remove_stale_temporaries, run_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stale_name(pid, tag=None, suffix=".keras"):
    return f".keras-bn-{pid}-{tag or files._WRITER_TAG}-0123456789ab{suffix}"


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def age(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_only_stale_temporaries_of_dead_writers_on_this_machine_are_removed(tmp_path):
    pid = dead_pid()
    old = files.STALE_AFTER_S + 60
    cases = {
        stale_name(pid): old,  # removed: the only one
        stale_name(pid, tag="00000000"): old,  # another host or PID namespace
        stale_name(os.getpid()): old,  # a live writer (this process)
        stale_name(pid, suffix=".onnx.bak"): old,  # not the exact pattern
        f".keras-bn-{pid}-model.keras": old,  # a user's file of a similar name
        stale_name(pid).replace("0123456789ab", "young0123456"): old,  # not 12 hex digits
        stale_name(pid, suffix=".npz"): 10,  # young: a writer elsewhere may still own it
    }
    for name, seconds in cases.items():
        (tmp_path / name).write_bytes(b"x")
        age(tmp_path / name, seconds)
    remove_stale_temporaries(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(set(cases) - {stale_name(pid)})


def test_an_input_named_like_a_temporary_is_never_removed(tmp_path):
    # The issue's case: an input renamed into the temporaries' pattern, given to a command.
    pid = dead_pid()
    model = tmp_path / stale_name(pid)
    model.write_bytes(b"the user's model")
    age(model, files.STALE_AFTER_S + 60)
    with run_inputs([model]), atomic_output(tmp_path / "out.keras", ".keras") as handle:
        handle.write(b"new")
    with atomic_output(tmp_path / "out2.keras", ".keras", keep=[model]) as handle:
        handle.write(b"new")
    assert model.read_bytes() == b"the user's model"
    # Outside a run that reads it, the same file is a stale temporary and goes.
    with atomic_output(tmp_path / "out3.keras", ".keras") as handle:
        handle.write(b"new")
    assert not model.exists()
    assert sorted(os.listdir(tmp_path)) == ["out.keras", "out2.keras", "out3.keras"]


def test_the_unnamed_file_is_linked_not_copied(tmp_path):
    # A new output gets its name by linkat: the inode written is the inode published, and no
    # named temporary ever exists. A replaced output goes through one rename.
    seen = []
    with atomic_output(tmp_path / "new.onnx", ".onnx") as handle:
        handle.write(b"x" * 1000)
        seen.append(os.fstat(handle.fileno()).st_ino)
    assert os.stat(tmp_path / "new.onnx").st_ino == seen[0]
    with atomic_output(tmp_path / "new.onnx", ".onnx") as handle:
        handle.write(b"y")
        seen.append(os.fstat(handle.fileno()).st_ino)
    assert os.stat(tmp_path / "new.onnx").st_ino == seen[1]
    assert (tmp_path / "new.onnx").read_bytes() == b"y"
    assert os.listdir(tmp_path) == ["new.onnx"]


# Loads `export/files.py` and `keras_bn/errors.py` from this checkout without the packages'
# __init__ (which import Keras: seconds per process), as `files`; argv: root, then the script's.
LOAD_FILES = textwrap.dedent("""
    import importlib.util, os, sys, types
    root = sys.argv[1]
    for name, path in (("keras_bn.errors", "keras_bn/errors.py"),
                       ("keras_bn.export.files", "export/files.py")):
        for parent in ("keras_bn", "keras_bn.export"):
            sys.modules.setdefault(parent, types.ModuleType(parent))
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    files = sys.modules["keras_bn.export.files"]
""")
# A writer of 8 MiB outputs in 64 KiB chunks for ever, alternating a new path and the replacement
# of an existing one.
WRITER = LOAD_FILES + textwrap.dedent("""
    out = sys.argv[2]
    chunk = bytes(range(256)) * 256
    print("READY", flush=True)
    i = 0
    while True:
        i += 1
        target = os.path.join(out, "replaced.onnx" if i % 2 else f"new-{i}.onnx")
        with files.atomic_output(target, ".onnx") as handle:
            for _ in range(128):
                handle.write(chunk)
""")


def test_sigkill_anywhere_in_the_write_leaves_no_partial_output(tmp_path):
    size = 128 * 256 * 256
    kills = 24
    leftovers = set()
    for k in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, ROOT, str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "READY"
        # Kill points spread over the first few writes (one write takes about 10 to 40 ms).
        time.sleep(0.004 * k)
        proc.kill()
        proc.wait()
        names = os.listdir(tmp_path)
        # No temporary, but for the one window docs/security.md names: a kill between the link
        # of a replacement to its temporary name and the rename over the old output (a few
        # microseconds; longer if the writer is preempted there, as on a loaded machine). What
        # that leaves is the complete new file under the dead writer's exact pattern
        # (test_a_kill_between_link_and_rename_leaves_one_whole_temporary).
        new = [n for n in names if n.startswith(".keras-bn-") and n not in leftovers]
        assert len(new) <= 1, (k, names)
        for name in new:
            match = files._TEMP_NAME.match(name)
            assert match and int(match.group(1)) == proc.pid, (k, name)
            assert "replaced.onnx" in names, (k, names)  # only a replacement has the window
        leftovers.update(new)
        for name in names:  # every output there is whole, and so is such a temporary
            assert os.path.getsize(tmp_path / name) == size, (k, name)
    assert len(leftovers) <= 2, leftovers  # a window of microseconds: rare, never routine
    written = [n for n in os.listdir(tmp_path) if n.startswith("new-")]
    # The later kill points fall after complete writes of both kinds.
    assert written and (tmp_path / "replaced.onnx").exists(), os.listdir(tmp_path)
    expected = bytes(range(256)) * 256 * 128
    for name in os.listdir(tmp_path):
        assert (tmp_path / name).read_bytes() == expected, name


# The same writer's code, killed by itself exactly between the link of a replacement to its
# temporary name and the rename: `os.replace` is the rename.
KILLED_BEFORE_RENAME = LOAD_FILES + textwrap.dedent("""
    import signal
    target = sys.argv[2]
    os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
    with files.atomic_output(target, ".onnx") as handle:
        handle.write(b"new" * 1000)
""")


def test_a_kill_between_link_and_rename_leaves_one_whole_temporary(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BEFORE_RENAME, ROOT, str(target)])
    assert proc.wait(timeout=60) == -signal.SIGKILL
    (left,) = [n for n in os.listdir(tmp_path) if n != "model.onnx"]
    match = files._TEMP_NAME.match(left)
    assert match and int(match.group(1)) == proc.pid and match.group(2) == files._WRITER_TAG
    assert (tmp_path / left).read_bytes() == b"new" * 1000  # whole, not partial
    assert target.read_bytes() == b"old"  # the old output untouched
    # A later write leaves it while young (its writer might be elsewhere), removes it once stale.
    with atomic_output(tmp_path / "other.onnx", ".onnx") as handle:
        handle.write(b"x")
    assert left in os.listdir(tmp_path)
    age(tmp_path / left, files.STALE_AFTER_S + 60)
    with atomic_output(tmp_path / "other.onnx", ".onnx") as handle:
        handle.write(b"y")
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "other.onnx"]


# keras-bn fold in a subprocess that pauses inside Keras's own save, after Keras made its
# temporary folder in $TMPDIR (every .keras save makes one for the model's assets).
PAUSED_IN_KERAS_SAVE = textwrap.dedent("""
    import sys, time
    from keras.src.saving import saving_lib
    from keras_bn.export import cli

    real = saving_lib._save_state

    def paused(*args, **kwargs):
        print("PAUSED", flush=True)
        time.sleep(600)

    saving_lib._save_state = paused
    sys.argv = ["keras-bn", *sys.argv[1:]]
    sys.exit(cli.console_main())
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_keras_temporaries_of_a_stopped_command_do_not_stay_in_tmpdir(tmp_path, sig):
    import keras

    from tests.test_cli import cli_in_process

    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras.layers.BatchNormalization()(keras.layers.Dense(3)(inputs)))
    model.save(tmp_path / "m.keras")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_IN_KERAS_SAVE, "fold", str(tmp_path / "m.keras"), "-o",
         str(tmp_path / "o.keras")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "PAUSED", proc.stderr.read()[-3000:]
    # Keras's folder exists, inside keras-bn's own one.
    (private,) = os.listdir(tmpdir)
    assert private.startswith(".keras-bn-") and private.endswith(".tmp")
    assert os.listdir(tmpdir / private), "Keras made no temporary folder: nothing is tested"
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    if sig == signal.SIGTERM:  # the handler removes it
        assert os.listdir(tmpdir) == []
    else:  # nothing runs after SIGKILL: the next command removes it once stale
        assert os.listdir(tmpdir) == [private]
        age(tmpdir / private, files.STALE_AFTER_S + 60)
        previous = tempfile.tempdir
        tempfile.tempdir = str(tmpdir)
        try:
            run = cli_in_process("inspect", tmp_path / "m.keras")
        finally:
            tempfile.tempdir = previous
        assert run.returncode == 0, run.stderr[-2000:]
        assert os.listdir(tmpdir) == []
    assert sorted(os.listdir(tmp_path)) == ["m.keras", "tmp"]
