"""Hostile and careless inputs: every one is refused with a clear message (exit 2), or judged
truly (exit 0/1), within a bound of memory and time, and nothing in the output directory, the
current directory or $TMPDIR is created, changed or removed."""

import os
import tempfile
import time

import keras
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
    ("declared_40gb.onnx", r"declares initializer 'big' larger than allowed"),
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
