"""Hostile and careless inputs: every one is refused with a clear message (exit 2), or judged
truly (exit 0/1), within a bound of memory and time, and nothing in the output directory, the
current directory or $TMPDIR is created, changed or removed."""

import os
import tempfile
import time

import keras
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from keras_bn import export
from tests.test_cli import cli_in_process, one_line_error

L = keras.layers


def snapshot(*folders):
    """{path: (size, mtime)} of every file under `folders`."""
    seen = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                with vanished_is_fine():
                    info = os.lstat(path)
                    seen[path] = (info.st_size, info.st_mtime_ns)
    return seen


class vanished_is_fine:
    """Files of other processes may vanish while they are listed: skip those."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is FileNotFoundError


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """A two-output model, its verified ONNX export, and ONNX files made from it by hand."""
    keras.utils.set_random_seed(3)
    root = tmp_path_factory.mktemp("hostile")
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv")(inputs))
    features = L.GlobalAveragePooling2D(name="features")(L.ReLU()(x))
    logits = L.Dense(3, name="logits")(features)
    model = keras.Model(inputs, {"logits": logits, "features": features})
    model.save(root / "model.keras")
    export.to_onnx(model, root / "model.onnx")
    good = onnx.load(root / "model.onnx")
    assert sorted(o.name for o in good.graph.output) == ["features", "logits"]

    def variant(name, edit):
        proto = onnx.load(root / "model.onnx")
        edit(proto)
        onnx.save(proto, root / name)

    def drop_output(p):
        keep = [o for o in p.graph.output if o.name != "features"]
        del p.graph.output[:]
        p.graph.output.extend(keep)

    def add_output(p):
        inferred = onnx.shape_inference.infer_shapes(p)
        p.graph.output.extend([inferred.graph.value_info[0]])

    def rename_output(p):
        for node in p.graph.node:
            node.output[:] = ["renamed" if o == "features" else o for o in node.output]
            node.input[:] = ["renamed" if i == "features" else i for i in node.input]
        for o in p.graph.output:
            if o.name == "features":
                o.name = "renamed"

    def nchw_flag(p):
        for prop in p.metadata_props:
            if prop.key == "keras_bn.nchw_inputs":
                prop.value = "1"

    variant("missing.onnx", drop_output)
    variant("extra.onnx", add_output)
    variant("renamed.onnx", rename_output)
    variant("nchw_flag.onnx", nchw_flag)

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 8, 8, 3])
    outs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, []),
        helper.make_tensor_value_info("features", TensorProto.FLOAT, []),
    ]

    def hostile(name, nodes, initializers=(), opsets=(("", 17),)):
        graph = helper.make_graph(nodes, name, [image], outs, initializer=list(initializers))
        proto = helper.make_model(
            graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets]
        )
        with open(root / name, "wb") as f:
            f.write(proto.SerializeToString())

    two_outputs = [
        helper.make_node("ReduceSum", ["big"], ["logits"], keepdims=0),
        helper.make_node("Identity", ["logits"], ["features"]),
    ]
    # 2.5e9 float32 values from a constant shape: 10 GB.
    hostile(
        "constant_of_shape.onnx",
        [
            helper.make_node(
                "Constant", [], ["shape"], value=helper.make_tensor("s", 7, [1], [2_500_000_000])
            ),
            helper.make_node("ConstantOfShape", ["shape"], ["big"]),
            *two_outputs,
        ],
    )
    # The size decided by the batch only at run time: n x 1e9 values.
    hostile(
        "runtime_size.onnx",
        [
            helper.make_node("Shape", ["image"], ["s4"]),
            helper.make_node("Slice", ["s4", "zero", "one"], ["n"]),
            helper.make_node("Mul", ["n", "giga"], ["shape"]),
            helper.make_node("ConstantOfShape", ["shape"], ["big"]),
            *two_outputs,
        ],
        [
            helper.make_tensor("zero", 7, [1], [0]),
            helper.make_tensor("one", 7, [1], [1]),
            helper.make_tensor("giga", 7, [1], [1_000_000_000]),
        ],
    )
    # A Loop of 1e12 iterations.
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one_f"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1]),
        ],
        initializer=[helper.make_tensor("one_f", 1, [1], [1.0])],
    )
    hostile(
        "loop.onnx",
        [
            helper.make_node("Loop", ["trips", "true", "start"], ["big"], body=body),
            *two_outputs,
        ],
        [
            helper.make_tensor("trips", 7, [], [10**12]),
            helper.make_tensor("true", 9, [], [True]),
            helper.make_tensor("start", 1, [1], [0.0]),
        ],
    )
    hostile(
        "custom_domain.onnx",
        [helper.make_node("Evil", ["image"], ["big"], domain="com.example"), *two_outputs],
        opsets=(("", 17), ("com.example", 1)),
    )
    declared = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[10_000_000_000])
    hostile("declared_40gb.onnx", two_outputs, [declared])
    outside = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[4])
    outside.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../../../etc/hostname"), ("length", "16")):
        entry = outside.external_data.add()
        entry.key, entry.value = key, value
    hostile("external_outside.onnx", two_outputs, [outside])
    os.mkfifo(root / "fifo.onnx")
    (root / "garbage.onnx").write_bytes(os.urandom(1000))
    return root


VERIFY_REFUSALS = [
    ("missing.onnx", r"The ONNX graph's outputs are not the model's.*missing \['features'\]"),
    ("extra.onnx", r"The ONNX graph's outputs are not the model's.*not in the model \["),
    ("renamed.onnx", r"missing \['features'\]; not in the model \['renamed'\]"),
    ("constant_of_shape.onnx", r"computes 'big' of shape \[2500000000\], larger than allowed"),
    ("runtime_size.onnx", r"onnxruntime needs more memory for the ONNX file than allowed"),
    ("loop.onnx", r"onnxruntime did not finish the ONNX file in the time allowed"),
    ("custom_domain.onnx", r"operators outside the standard domain.*\['com\.example'\]"),
    ("declared_40gb.onnx", r"declares tensor 'big' larger than allowed"),
    ("external_outside.onnx", r"external data lies outside its folder"),
    ("fifo.onnx", r"The ONNX file is not a regular file.*a FIFO"),
    ("/dev/zero", r"The ONNX file is not a regular file.*a device or socket"),
    ("garbage.onnx", r"The ONNX file could not be read"),
    ("nchw_flag.onnx", r"onnxruntime could not run the ONNX file on the model's inputs"),
]


@pytest.mark.parametrize("name,pattern", VERIFY_REFUSALS, ids=[n for n, _ in VERIFY_REFUSALS])
def test_verify_refuses_a_hostile_or_mismatched_onnx_file(onnx_files, tmp_path, name, pattern):
    path = name if name.startswith("/") else onnx_files / name
    watched = [onnx_files, tmp_path, tempfile.gettempdir()]
    before = snapshot(*watched)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    start = time.perf_counter()
    try:
        run = cli_in_process(
            "verify",
            onnx_files / "model.keras",
            path,
            "--max-onnx-gib",
            "2",
            "--max-onnx-seconds",
            "8",
        )
    finally:
        os.chdir(cwd)
    elapsed = time.perf_counter() - start
    assert run.returncode == 2, run.stderr[-2000:]
    one_line_error(run, pattern)
    assert elapsed < 60, elapsed
    after = snapshot(*watched)
    # $TMPDIR is shared with other tests: only this test's own files must be unchanged.
    mine = {p: v for p, v in before.items() if p.startswith(str(onnx_files))}
    assert {p: v for p, v in after.items() if p.startswith(str(onnx_files))} == mine
    assert os.listdir(tmp_path) == []
    leftovers = [p for p in after if "keras-bn-ort-" in p and p not in before]
    assert leftovers == []


def test_verify_passes_the_true_export_and_matches_outputs_by_name(onnx_files):
    run = cli_in_process("verify", onnx_files / "model.keras", onnx_files / "model.onnx")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "verification passed" in run.stdout
    # The graph's outputs in the other order: still the same outputs, by name.
    proto = onnx.load(onnx_files / "model.onnx")
    outputs = list(proto.graph.output)
    del proto.graph.output[:]
    proto.graph.output.extend(reversed(outputs))
    model = keras.saving.load_model(onnx_files / "model.keras")
    swapped = onnx_files / "swapped.onnx"
    onnx.save(proto, swapped)
    try:
        report = export.verify(model, swapped)
    finally:
        swapped.unlink()
    assert report.passed
    assert {r.output for r in report.rows} == {"logits", "features"}


def test_a_float16_input_graph_is_judged_not_an_internal_error(onnx_files, tmp_path):
    from onnxruntime.transformers import float16

    proto = float16.convert_float_to_float16(onnx.load(onnx_files / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    onnx.save(proto, tmp_path / "half.onnx")
    run = cli_in_process("verify", onnx_files / "model.keras", tmp_path / "half.onnx")
    # float16 arithmetic misses float32's default tolerance (1e-5 relative): a true "failed".
    assert run.returncode == 1, run.stderr[-2000:]
    assert "verification FAILED" in run.stdout
    model = keras.saving.load_model(onnx_files / "model.keras")
    report = export.verify(model, tmp_path / "half.onnx", rtol=1e-2, atol=1e-2)
    assert report.passed, report


# ------------------------------------------------------------------------------------------------
# Arrays and .keras archives that declare more than they hold


def npy_header(shape, dtype="<f4"):
    """The bytes of a .npy header declaring `shape` (what numpy.save writes before the data)."""
    import io

    buffer = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bombs(onnx_files):
    """Hostile .npy/.npz samples and .keras archives, each a few kilobytes on disk."""
    import json
    import zipfile

    root = onnx_files / "bombs"
    root.mkdir()
    good = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    # .npy declaring 4 GB behind a few bytes.
    (root / "truncated.npy").write_bytes(npy_header((10**9,)) + b"\0" * 64)
    np.save(root / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    # .npz: a member declaring 4 GB; a bzip2 bomb of 64 MiB of zeros; a bad CRC.
    with zipfile.ZipFile(root / "declared.npz", "w") as z:
        z.writestr("image.npy", npy_header((10**9,)) + b"\0" * 64)
    with zipfile.ZipFile(root / "bz2.npz", "w", compression=zipfile.ZIP_BZIP2) as z:
        z.writestr("image.npy", npy_header((16 << 20,)) + bytes(64 << 20))
    np.savez(root / "crc.npz", image=good)
    data = bytearray((root / "crc.npz").read_bytes())
    data[200] ^= 0xFF  # inside the member's array data: its CRC no longer matches
    (root / "crc.npz").write_bytes(bytes(data))
    os.mkfifo(root / "fifo.npy")
    # .keras archives from the real model's config and metadata.
    with zipfile.ZipFile(onnx_files / "model.keras") as z:
        config = json.loads(z.read("config.json"))
        metadata = z.read("metadata.json")

    def archive(name, members, compression=zipfile.ZIP_STORED):
        with zipfile.ZipFile(root / name, "w", compression=compression) as z:
            z.writestr("metadata.json", metadata)
            for member, content in members.items():
                z.writestr(member, content)

    inner = root / "inner.npz"
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("0.npy", npy_header((10**9,)) + b"\0" * 64)
    archive(
        "npz_weights.keras",
        {"config.json": json.dumps(config), "model.weights.npz": inner.read_bytes()},
    )
    archive(
        "h5_bomb.keras",
        {"config.json": json.dumps(config), "model.weights.h5": bytes(80 << 20)},
        zipfile.ZIP_BZIP2,
    )
    dense = json.loads(json.dumps(config))
    for layer in dense["config"]["layers"]:
        if layer["class_name"] == "Dense":
            layer["config"]["units"] = 10**9  # 4e9 weights behind a few kilobytes
    with zipfile.ZipFile(onnx_files / "model.keras") as z:
        weights = z.read("model.weights.h5")
    archive("huge_dense.keras", {"config.json": json.dumps(dense), "model.weights.h5": weights})
    deep = "[" * 100_000 + "]" * 100_000
    archive("deep.keras", {"config.json": deep, "model.weights.h5": weights})
    many = json.loads(json.dumps(config))
    template = next(l for l in many["config"]["layers"] if l["class_name"] == "ReLU")
    many["config"]["layers"] += [{**template, "name": f"r{i}"} for i in range(30_000)]
    archive("many_layers.keras", {"config.json": json.dumps(many), "model.weights.h5": weights})
    os.symlink("/dev/zero", root / "zero.keras")
    os.mkfifo(root / "fifo.keras")
    return root


ARRAY_REFUSALS = [
    ("truncated.npy", r"The samples file is shorter than its header declares"),
    ("objects.npy", r"The samples file does not hold numbers.*dtype object"),
    ("declared.npz", r"Member 'image\.npy' of the samples file declares more data than it holds"),
    ("bz2.npz", r"compressed beyond any real data \(a zip bomb\)"),
    ("crc.npz", r"The samples file could not be read.*BadZipFile: Bad CRC-32"),
    ("fifo.npy", r"The samples file is not a regular file.*a FIFO"),
]


@pytest.mark.parametrize("name,pattern", ARRAY_REFUSALS, ids=[n for n, _ in ARRAY_REFUSALS])
def test_hostile_samples_are_refused_before_they_are_read(
    onnx_files, bombs, tmp_path, name, pattern
):
    run = cli_in_process(
        "fold", onnx_files / "model.keras", "-o", tmp_path / "o.keras", "--samples", bombs / name
    )
    assert run.returncode == 2, run.stderr[-2000:]
    one_line_error(run, pattern)
    assert os.listdir(tmp_path) == []


ARCHIVE_REFUSALS = [
    ("npz_weights.keras", r"Member '0\.npy' of the archive's model\.weights\.npz declares more"),
    ("h5_bomb.keras", r"member compressed beyond any real data.*'model\.weights\.h5'"),
    ("huge_dense.keras", r"config\.json declares layers larger than its weights"),
    ("deep.keras", r"config\.json is not JSON Keras can read.*RecursionError"),
    ("many_layers.keras", r"config\.json declares too many layers.*Received: 3000\d"),
    ("zero.keras", r"The model file is not a regular file.*a device or socket"),
    ("fifo.keras", r"The model file is not a regular file.*a FIFO"),
]


@pytest.mark.parametrize("name,pattern", ARCHIVE_REFUSALS, ids=[n for n, _ in ARCHIVE_REFUSALS])
def test_hostile_archives_are_refused_before_keras_reads_them(bombs, name, pattern):
    start = time.perf_counter()
    run = cli_in_process("inspect", bombs / name)
    assert run.returncode == 2, run.stderr[-2000:]
    one_line_error(run, pattern)
    assert time.perf_counter() - start < 30


# The same inputs in one process of their own, for its peak memory: TensorFlow and Keras take
# about 0.7 GB; each refusal must add next to nothing (a bomb read would add gigabytes).
# The peak is VmHWM, this process image's own high-water mark: getrusage's ru_maxrss keeps the
# peak of the process that forked it across exec (here an xdist worker of several GB).
PEAK_SCRIPT = """
import json, sys
from keras_bn.export import cli

def peak_mb():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

peaks = {"(import)": (0, peak_mb())}
for args in json.loads(sys.argv[1]):
    code = cli.main(args)
    peaks[args[-1]] = (code, peak_mb())
print(json.dumps(peaks))
"""


def test_refusals_take_no_memory(onnx_files, bombs, tmp_path):
    import json
    import subprocess
    import sys

    cases = [["inspect", str(bombs / name)] for name, _ in ARCHIVE_REFUSALS]
    cases += [
        ["fold", str(onnx_files / "model.keras"), "-o", str(tmp_path / "o.keras"), "--samples",
         str(bombs / name)]
        for name, _ in ARRAY_REFUSALS
    ]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    peaks = json.loads(run.stdout.strip().splitlines()[-1])
    _, imported = peaks.pop("(import)")
    assert {code for code, _ in peaks.values()} == {2}, peaks
    assert max(mb for _, mb in peaks.values()) < 1500, (imported, peaks)  # MB, the bound
    # And each refusal adds next to nothing to what importing TensorFlow and Keras took.
    assert max(mb for _, mb in peaks.values()) - imported < 300, (imported, peaks)


# ------------------------------------------------------------------------------------------------
# Census: every command, at least 50 malformed arguments and files each, never exit 70


def malformed_cases(onnx_files, bombs, out):
    """{command: [argv]}: each argv has one malformed argument or file, the rest valid."""
    d = onnx_files
    (out / "empty.keras").write_bytes(b"")
    (out / "empty.npy").write_bytes(b"")
    (out / "text.keras").write_text("not a model\n")
    (out / "garbage.npy").write_bytes(os.urandom(500))
    np.save(out / "scalar.npy", np.float32(1.0))
    np.save(out / "rows0.npy", np.zeros((0, 8, 8, 3), np.float32))
    np.save(out / "wrong.npy", np.zeros((3, 5), np.float32))
    np.save(out / "nan.npy", np.full((4, 8, 8, 3), np.nan, np.float32))
    if not os.path.lexists(out / "loop.keras"):
        os.symlink(out / "loop.keras", out / "loop.keras")
    (out / "ro").mkdir(exist_ok=True)
    os.chmod(out / "ro", 0o555)
    models = [
        "missing.keras", out, bombs / "fifo.keras", bombs / "zero.keras", out / "empty.keras",
        d / "garbage.onnx", out / "text.keras", d / "model.onnx", bombs / "objects.npy",
        out / "loop.keras", "x" * 300 + ".keras", bombs / "npz_weights.keras",
        bombs / "h5_bomb.keras", bombs / "huge_dense.keras", bombs / "deep.keras",
        bombs / "many_layers.keras",
    ]  # fmt: skip
    arrays = [
        "missing.npy", out, bombs / "fifo.npy", "/dev/zero", out / "empty.npy",
        out / "garbage.npy", bombs / "truncated.npy", bombs / "objects.npy",
        bombs / "declared.npz", bombs / "bz2.npz", bombs / "crc.npz", out / "scalar.npy",
        out / "rows0.npy", out / "wrong.npy", d / "model.keras",
    ]  # fmt: skip
    numbers = ["nan", "inf", "-1", "-inf", "abc", "1e999", ""]  # bad for every numeric flag
    shapes = ["", "a,b", "0,8,3", "-1", "x=8,8,3", "8,8", "99999999999,8,3"]
    m = str(d / "model.keras")
    cases = {
        c: [] for c in ("inspect", "fold", "export", "verify", "doctor", "recalibrate", "demo")
    }
    for bad in models:
        cases["inspect"].append(["inspect", bad])
        cases["fold"].append(["fold", bad, "-o", out / "o.keras"])
        cases["export"].append(["export", bad, "-o", out / "o.onnx"])
        cases["verify"].append(["verify", bad, d / "model.onnx"])
        cases["doctor"].append(["doctor", bad])
        cases["recalibrate"].append(
            ["recalibrate", bad, "--data", bombs / "crc.npz", "-o", out / "o.keras"]
        )
    for bad in arrays:
        cases["fold"].append(["fold", m, "-o", out / "o.keras", "--samples", bad])
        cases["export"].append(["export", m, "-o", out / "o.onnx", "--samples", bad])
        cases["export"].append(
            ["export", m, "-o", out / "o.onnx", "--precision", "int8", "--calibration", bad]
        )
        cases["verify"].append(["verify", m, d / "model.onnx", "--samples", bad])
        cases["verify"].append(["verify", m, bad])
        cases["doctor"].append(["doctor", m, "--data", bad])
        cases["recalibrate"].append(["recalibrate", m, "--data", bad, "-o", out / "o.keras"])
    for bad in numbers:
        cases["inspect"].append(["inspect", m, "--max-archive-gib", bad])
        for flag in ("--atol", "--rtol", "--max-samples-gib"):
            cases["fold"].append(["fold", m, "-o", out / "o.keras", flag, bad])
        for flag in ("--opset", "--min-agreement", "--min-cosine", "--max-archive-gib"):
            cases["export"].append(
                ["export", m, "-o", out / "o.onnx", "--precision", "float16", flag, bad]
            )
        for flag in ("--max-onnx-gib", "--max-onnx-seconds", "--atol"):
            cases["verify"].append(["verify", m, d / "model.onnx", flag, bad])
        cases["doctor"].append(["doctor", m, "--batch-size", bad])
        cases["doctor"].append(["doctor", m, "--max-archive-gib", bad])
        cases["recalibrate"].append(
            [
                "recalibrate",
                m,
                "--data",
                out / "nan.npy",
                "-o",
                out / "o.keras",
                "--batch-size",
                bad,
            ]
        )
    for bad in shapes:
        cases["fold"].append(["fold", m, "-o", out / "o.keras", "--input-shape", bad])
        cases["export"].append(["export", m, "-o", out / "o.onnx", "--input-shape", bad])
        cases["verify"].append(["verify", m, d / "model.onnx", "--input-shape", bad])
    outputs = [out / "missing" / "o", out, out / "o.txt", m, out / "ro" / "o", bombs / "fifo.keras"]
    for bad in outputs:
        cases["fold"].append(["fold", m, "-o", bad])
        cases["export"].append(["export", m, "-o", bad])
        cases["recalibrate"].append(["recalibrate", m, "--data", out / "nan.npy", "-o", bad])
    for command in ("inspect", "doctor"):
        cases[command] += [
            [command, m, "--frobnicate"],
            [command, m, "extra"],
            [command, bombs / "objects.npy", "--unsafe"],
        ]
    cases["export"] += [
        ["export", m, "-o", out / "o.onnx", "--precision", "bf16"],
        ["export", m, "-o", out / "o.onnx", "--keep-float", "nope"],
        ["export", m, "-o", out / "o.onnx", "--precision", "float16", "--keep-float", "nope"],
        ["export", m, "-o", out / "o.onnx", "--precision", "int8"],  # no calibration
        [
            "export",
            m,
            "-o",
            out / "o.onnx",
            "--precision",
            "int8",
            "--calibration",
            out / "nan.npy",
        ],
        [
            "export",
            m,
            "-o",
            out / "o.onnx",
            "--labels",
            out / "wrong.npy",
            "--precision",
            "float16",
        ],
        ["export", m, "-o", out / "o.onnx", "--calibrate-method", "magic"],
        ["export", m, "-o", out / "o.onnx", "--reduce-range", "maybe"],
    ]
    cases["doctor"] += [["doctor", m, "--data", out / "nan.npy"]]
    cases["inspect"] += [["inspect"], ["inspect", m, m], ["inspect", "--unsafe", d / "model.onnx"]]
    cases["demo"] += [  # an --out that is a file: refused before any training
        ["demo", "--out", bombs / "fifo.keras"],
        ["demo", "--out", m],
        ["demo", "positional"],
    ]
    epochs = [*numbers, "1.5", "0x10", "-0", " ", "1 2", "two", "+-1", "1e3"]
    for bad in epochs:  # argparse refuses each before any training
        for place in (out / "demo", m, out / "ro" / "demo", bombs / "fifo.keras"):
            cases["demo"].append(["demo", "--epochs", bad, "--out", place])
    for bad in models:  # the same files with --unsafe and --json
        cases["inspect"].append(["inspect", bad, "--unsafe", "--json"])
        cases["doctor"].append(["doctor", bad, "--unsafe"])
        cases["inspect"].append(["inspect", bad, "--json"])
    for bad in [*numbers, "population_mean", ""]:
        cases["recalibrate"].append(
            ["recalibrate", m, "--data", out / "nan.npy", "-o", out / "o.keras", "--estimator", bad]
        )
    return cases


@pytest.mark.slow
def test_census_no_command_exits_70_on_malformed_input(onnx_files, bombs, tmp_path):
    out = tmp_path / "census"
    out.mkdir()
    cases = malformed_cases(onnx_files, bombs, out)
    results = {}
    for command, argvs in cases.items():
        assert len(argvs) >= 50, (command, len(argvs))
        for argv in argvs:
            run = cli_in_process(*argv)
            results[" ".join(map(str, argv))] = (
                run.returncode,
                run.stderr.strip().splitlines()[-1:],
            )
    internal = {k: v for k, v in results.items() if v[0] == 70 or "internal error" in str(v[1])}
    assert internal == {}, internal
    unexpected = {k: v for k, v in results.items() if v[0] not in (1, 2)}
    assert unexpected == {}, list(unexpected)
    assert sum(len(v) for v in cases.values()) >= 350
    os.chmod(out / "ro", 0o755)
    # Nothing but the census's own inputs is in its folder: no output of a refused command.
    assert sorted(os.listdir(out)) == sorted(
        ["empty.keras", "empty.npy", "text.keras", "garbage.npy", "scalar.npy", "rows0.npy",
         "wrong.npy", "nan.npy", "loop.keras", "ro"]
    )  # fmt: skip
    assert os.listdir(out / "ro") == []


def test_a_write_the_filesystem_refuses_is_a_clear_error_and_leaves_nothing(onnx_files, tmp_path):
    # A file size limit stands in for a full disk: the kernel refuses the write (EFBIG, as
    # ENOSPC for a full disk) in the middle of the .keras archive.
    import resource
    import signal

    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        run = cli_in_process("fold", onnx_files / "model.keras", "-o", tmp_path / "o.keras")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert run.returncode == 2, run.stderr[-2000:]
    one_line_error(run, r"Could not write '.*o\.keras'; nothing was written.*File too large")
    assert os.listdir(tmp_path) == []


def test_a_model_that_takes_text_is_refused_with_the_way_out(tmp_path):
    inputs = keras.Input((1,), dtype="string", name="text")
    x = L.StringLookup(vocabulary=["a", "b"], output_mode="one_hot")(inputs)
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(L.Dense(4)(x)))
    model.save(tmp_path / "text.keras")
    for command in (["fold", "-o", tmp_path / "o.keras"], ["export", "-o", tmp_path / "o.onnx"]):
        run = cli_in_process(command[0], tmp_path / "text.keras", *command[1:])
        assert run.returncode == 2, run.stderr[-2000:]
        one_line_error(run, r"takes text \(input 'text'\).*Fold the numeric part")
    assert sorted(os.listdir(tmp_path)) == ["text.keras"]


def test_sparse_samples_and_data_are_refused_with_the_conversion_to_use():
    import scipy.sparse
    import tensorflow as tf

    import keras_bn

    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(L.Dense(3)(inputs)))
    before = [w.numpy().copy() for w in model.weights]
    dense = np.eye(8, 4, dtype="float32")
    for sparse, fix in (
        (tf.sparse.from_dense(dense), r"tf\.sparse\.to_dense"),
        (scipy.sparse.csr_matrix(dense), r"x\.toarray\(\)"),
    ):
        with pytest.raises(keras_bn.KerasBNError, match=rf"The samples are sparse.*{fix}"):
            keras_bn.fold_bn(model, samples=sparse)
        with pytest.raises(keras_bn.KerasBNError, match=rf"The data are sparse.*{fix}"):
            keras_bn.recalibrate(model, sparse, verbose=0)
        with pytest.raises(keras_bn.KerasBNError, match=r"The data are sparse"):
            keras_bn.recalibrate(model, (sparse, np.zeros(8)), verbose=0)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(before, model.weights))
    # Dense, the same values recalibrate (the negative case).
    new, _ = keras_bn.recalibrate(model, dense, verbose=0)
    assert np.all(np.isfinite(np.asarray(new.get_layer("bn").moving_variance)))


@pytest.mark.parametrize(
    "env,pattern",
    [
        ({"KERAS_BACKEND": "foo"}, r"Keras's backend 'foo' \(from KERAS_BACKEND\) is not one of"),
        ({"KERAS_BACKEND": "openvino"}, r"'openvino' \(from KERAS_BACKEND\) is not installed"),
        ({"KERAS_BACKEND": "", "KERAS_HOME": "{home}"}, r"'mxnet' \(from .*keras\.json\)"),
    ],
    ids=["unknown", "not-installed", "keras-json"],
)
def test_an_unusable_keras_backend_is_one_line_not_a_traceback(tmp_path, env, pattern):
    import importlib.util
    import subprocess
    import sys

    if "openvino" in env.values() and importlib.util.find_spec("openvino") is not None:
        pytest.skip("openvino is installed here")
    (tmp_path / "keras.json").write_text('{"backend": "mxnet"}')
    env = {k: v.format(home=tmp_path) for k, v in env.items()}
    exe = os.path.join(os.path.dirname(sys.executable), "keras-bn")
    for argv in (
        [exe, "inspect", "m.keras"],
        [sys.executable, "-m", "keras_bn.export.cli", "inspect", "m.keras"],
    ):
        run = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, env={**os.environ, **env}
        )
        assert run.returncode == 2, run.stderr[-2000:]
        one_line_error(run, pattern)
    # A library user gets the same message as an exception, raised before Keras is imported.
    run = subprocess.run(
        [sys.executable, "-c", "import keras_bn"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert run.returncode == 1 and "keras_bn.errors.KerasBNError" in run.stderr
    assert "Unable to import backend" not in run.stderr  # Keras's own import never started


def test_a_load_error_keeps_keras_s_whole_message(onnx_files, tmp_path):
    # Dense units changed in the config (5 instead of 3) but not in the weights: Keras builds
    # the model and then refuses the weights, with its reason at the end of a long message.
    import json
    import re
    import zipfile

    with zipfile.ZipFile(onnx_files / "model.keras") as z:
        members = {name: z.read(name) for name in z.namelist()}
    config = json.loads(members["config.json"])
    for layer in config["config"]["layers"]:
        if layer["class_name"] == "Dense":
            layer["config"]["units"] = 5
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(tmp_path / "mismatch.keras", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    try:  # Keras's own words, independently
        keras.saving.load_model(tmp_path / "mismatch.keras")
    except Exception as error:  # noqa: BLE001 - whatever Keras raises, its text is the oracle
        keras_text = " ".join(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(error)).split())
    else:
        pytest.fail("Keras loaded a model whose weights do not fit its config")
    assert len(keras_text) > 300  # the old cut would have dropped its end
    run = cli_in_process("inspect", tmp_path / "mismatch.keras")
    assert run.returncode == 2
    line = one_line_error(run, r"The model could not be loaded")
    # Its beginning and its end, which names the layer (the middle holds the values of a fresh,
    # randomly initialized variable).
    tail = keras_text.rsplit("]]>", 1)[-1].strip()
    assert "could not be loaded: [<Dense name=logits" in tail
    assert keras_text[:60] in line and tail in line, (keras_text, line)
