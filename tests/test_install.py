"""keras-bn as users install it: the wheel and sdist that `python -m build` makes, installed (not
editable) in fresh virtual environments, run from another directory through the `keras-bn`
console script, with its output in a pipe as in CI or a log file."""

import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.slow  # a build, virtual environments and whole commands: 10 s to 40 s each

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a terminal, not a pipe, may show: escape codes, carriage returns, backspaces.
CONTROL = re.compile(r"[\x1b\r\x08]")
# TensorFlow's C++ log (absl): "I0000 00:00:1796303884.273309   20061 port.cc:153] ...".
CPP_LOG = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog", re.MULTILINE)


def user_environment():
    """The environment a user's shell gives: no test-suite log settings, no backend chosen."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP_", "KERAS_"))}
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """(wheel, sdist) built from this checkout, without network (`--no-isolation`)."""
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), ROOT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


def make_venv(path, wheel, system_site_packages):
    """A new virtual environment with the wheel installed by pip, from the file alone."""
    venv.create(path, system_site_packages=system_site_packages, with_pip=True)
    python = path / "bin" / "python"
    run = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return python


def run_in(python, args, cwd, env, timeout=600):
    return subprocess.run(
        [str(a) for a in (python, *args)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_wheel_and_sdist_hold_the_package_and_its_licence(dist):
    wheel, sdist = dist
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("keras_bn", "keras_bn"), ("export", "keras_bn/export")):
        sources = {f for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".py")}
        assert {f"{package}/{f}" for f in sources} <= names, sorted(names)
    assert "keras_bn/export/ort_worker.py" in names  # run by path, in a child process
    assert "keras_bn/py.typed" in names
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    licence = [n for n in names if n.startswith(info) and n.endswith("LICENSE")]
    assert licence, sorted(n for n in names if n.startswith(info))
    assert b"Apache License" in zipfile.ZipFile(wheel).read(licence[0])
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "keras-bn = keras_bn.export.cli:console_main" in entry_points
    # The base install is keras, numpy and h5py; everything else comes with an extra.
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    required = [Requirement(r) for r in re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)]
    base = {canonicalize_name(r.name) for r in required if r.marker is None}
    assert base == {"keras", "numpy", "h5py"}, base
    extras = set(re.findall(r"^Provides-Extra: (.+)$", metadata, re.M))
    assert {"tensorflow", "jax", "torch", "onnx", "demo", "all", "dev"} <= extras, extras

    def names_for(extra):
        return {
            canonicalize_name(r.name)
            for r in required
            if r.marker is not None and r.marker.evaluate({"extra": extra})
        }

    assert "tensorflow" not in names_for("jax") and "torch" not in names_for("jax")
    assert {"tensorflow", "tf2onnx", "onnx", "onnxruntime"} <= names_for("onnx")
    assert "scikit-learn" in names_for("demo")
    with tarfile.open(sdist) as archive:
        members = {m.split("/", 1)[1] for m in archive.getnames() if "/" in m}
    assert {"setup.cfg", "LICENSE", "README.md", "export/cli.py", "keras_bn/layer.py"} <= members


def test_the_installed_wheel_runs_the_demo_and_export_quietly_in_a_pipe(dist, tmp_path):
    # A fresh venv with the wheel installed, its dependencies from this Python (so no download),
    # run by path from another directory: the venv need not be activated.
    python = make_venv(tmp_path / "venv", dist[0], system_site_packages=True)
    keras_bn_cli = tmp_path / "venv" / "bin" / "keras-bn"
    work = tmp_path / "work"
    work.mkdir()
    env = user_environment()
    where = run_in(
        python, ["-c", "import keras_bn.export; print(keras_bn.export.__file__)"], work, env
    )
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.strip().startswith(str(tmp_path / "venv")), where.stdout  # not the checkout

    # Two epochs (38 steps): the installed command end to end; tests/test_cli.py holds the full
    # eight-epoch story to its numbers.
    demo = run_in(keras_bn_cli, ["demo", "--out", "out", "--epochs", "2"], work, env)
    assert demo.returncode == 0, demo.stderr[-3000:]
    for stream in (demo.stdout, demo.stderr):
        assert not CONTROL.search(stream), repr(stream[:2000])
        assert not CPP_LOG.search(stream), stream[:2000]
    # The demo reads as a story: the steps, the table, where the files are.
    for step in ("1. train", "2. diagnose", "3. recalibrate", "4. fold and export"):
        assert step in demo.stdout, demo.stdout
    assert re.search(r"^Epoch 2/2$", demo.stdout, re.M)  # plain epoch lines, no progress bar
    accuracy = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(trained Keras|ONNX \(onnxruntime\)) +([\d.]+) ", demo.stdout, re.M)
    }
    # Keras's momentum 0.99 for 38 steps: stale statistics, repaired by recalibration and kept
    # through the fold and the export.
    assert accuracy["trained Keras"] < 0.5 < accuracy["ONNX (onnxruntime)"], accuracy
    files = ["folded.keras", "folded.onnx", "folded.tflite", "recalibrated.keras", "trained.keras"]
    assert sorted(os.listdir(work / "out")) == files
    assert os.listdir(work) == ["out"]  # nothing stray in the current directory
    assert all(f"out/{f}" in demo.stdout for f in files), demo.stdout

    export = run_in(keras_bn_cli, ["export", "out/trained.keras", "-o", "m.onnx"], work, env)
    assert export.returncode == 0, export.stderr[-3000:]
    for stream in (export.stdout, export.stderr):
        assert not CONTROL.search(stream) and not CPP_LOG.search(stream), stream[:2000]
    assert "[keras-bn] verifying with onnxruntime" in export.stderr
    assert f"wrote {work / 'm.onnx'}" in export.stdout and (work / "m.onnx").is_file()


def requirement_closure(requirements, extra):
    """The installed distributions that `requirements` (Requires-Dist lines, with `extra`
    chosen) pull in, recursively, as pip would install them: {name: Distribution}."""
    found, todo = {}, [(Requirement(r), extra) for r in requirements]
    done = set()
    while todo:
        requirement, chosen = todo.pop()
        marker = requirement.marker
        if marker is not None and not marker.evaluate({"extra": chosen or ""}):
            continue
        name = canonicalize_name(requirement.name)
        for wanted in {""} | requirement.extras:
            if (name, wanted) in done:
                continue
            done.add((name, wanted))
            found[name] = importlib.metadata.distribution(requirement.name)
            todo += [(Requirement(r), wanted) for r in found[name].requires or ()]
    return found


def link_distribution(dist, site_packages):
    """Links a distribution's top-level files and folders into `site_packages` (a namespace
    folder shared by two distributions becomes a folder of links)."""

    def link(source, target):
        if not target.exists():
            target.symlink_to(source)
        elif target.is_dir() and source.is_dir():
            if target.is_symlink():  # another distribution's: split it into links
                other = target.resolve()
                target.unlink()
                target.mkdir()
                for child in other.iterdir():
                    (target / child.name).symlink_to(child)
            for child in source.iterdir():
                link(child, target / child.name)

    for top in {p.parts[0] for p in dist.files or () if p.parts[0] not in ("..", "__pycache__")}:
        source = dist.locate_file(top)
        if source.exists():
            link(source, site_packages / top)


JAX_ONLY_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np, keras, keras_bn

    absent = [m for m in ("tensorflow", "tf2onnx", "onnx", "onnxruntime", "sklearn", "torch")
              if importlib.util.find_spec(m) is not None]
    rng = np.random.default_rng(0)
    x = (2.0 * rng.normal(size=(96, 6, 6, 2)) + 1.0).astype("float32")
    y = rng.integers(0, 3, 96)
    model = keras.Sequential([
        keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, name="conv"),
        keras_bn.BatchNorm(momentum=0.9, name="bn"), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    folded, fold_report = keras_bn.fold_bn(model)
    fold_error = float(np.abs(folded.predict(x, verbose=0) - model.predict(x, verbose=0)).max())
    new, _ = keras_bn.recalibrate(model, x, batch_size=16, verbose=0)
    conv = keras.Model(model.inputs, model.get_layer("conv").output).predict(x, verbose=0)
    model.save(sys.argv[1])
    print(json.dumps({
        "backend": keras.backend.backend(),
        "tensorflow_imported": "tensorflow" in sys.modules,
        "installed_but_should_not_be": absent,
        "keras_bn": keras_bn.__file__,
        "loss": [float(v) for v in history.history["loss"]],
        "folded": [type(l).__name__ for l in folded.layers],
        "fold_error": fold_error,
        "moving_mean": new.get_layer("bn").moving_mean.numpy().tolist(),
        "moving_variance": new.get_layer("bn").moving_variance.numpy().tolist(),
        "conv_output": conv.reshape(-1, 4).astype("float64").tolist(),
    }))
""")


def test_a_jax_only_environment_trains_folds_recalibrates_and_refuses_export(dist, tmp_path):
    # `pip install "keras-bn[jax]"`: the wheel's own requirements with the jax extra, resolved
    # against what this Python has installed and linked into a venv that sees nothing else.
    wheel = dist[0]
    python = make_venv(tmp_path / "venv", wheel, system_site_packages=False)
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    requirements = re.findall(r"^Requires-Dist: (.+)$", text, re.M)
    closure = requirement_closure(requirements, "jax")
    assert {"keras", "jax", "jaxlib", "numpy", "h5py"} <= set(closure), sorted(closure)
    assert not {"tensorflow", "tf2onnx", "onnxruntime", "scikit-learn", "torch"} & set(closure)
    (site_packages,) = (tmp_path / "venv" / "lib").glob("python*/site-packages")
    for distribution in closure.values():
        link_distribution(distribution, site_packages)
    work = tmp_path / "work"
    work.mkdir()
    env = {**user_environment(), "KERAS_BACKEND": "jax"}

    run = run_in(python, ["-c", JAX_ONLY_SCRIPT, "model.keras"], work, env)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["backend"] == "jax" and not result["tensorflow_imported"]
    assert result["installed_but_should_not_be"] == []
    assert result["keras_bn"].startswith(str(tmp_path / "venv"))
    assert all(math.isfinite(v) for v in result["loss"]), result["loss"]
    assert "BatchNorm" not in result["folded"] and result["fold_error"] < 1e-4
    # Recalibrated statistics are the population statistics of the BatchNorm's input, by NumPy.
    conv = np.asarray(result["conv_output"])
    np.testing.assert_allclose(result["moving_mean"], conv.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["moving_variance"], conv.var(0), rtol=1e-5, atol=1e-6)

    cli = tmp_path / "venv" / "bin" / "keras-bn"
    fold = run_in(cli, ["fold", "model.keras", "-o", "folded.keras"], work, env)
    assert fold.returncode == 0 and (work / "folded.keras").is_file(), fold.stderr[-3000:]
    for command, extra in ((["export", "model.keras", "-o", "m.onnx"], "onnx"), (["demo"], "demo")):
        refused = run_in(cli, command, work, env)
        assert refused.returncode == 2, refused.stderr[-3000:]
        line = refused.stderr.strip()
        assert "\n" not in line and "Traceback" not in line, line
        assert line.startswith(f"keras-bn: error: keras-bn {command[0]} needs the packages"), line
        assert f'Install them: pip install "keras-bn[{extra}]"' in line, line
        assert "tensorflow" in line.split("Received:")[1], line
    assert sorted(os.listdir(work)) == ["folded.keras", "model.keras"]  # nothing else written
