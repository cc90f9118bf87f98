"""The gallery (tests/gallery.py): real trained models nobody here wrote, through everything a
user runs on them. Per model: it loads with its BatchNorms; `diagnose` runs; `fold_bn` folds with
verification on inputs of the shape the model needs, and its outputs match the original's on real
inputs; `to_onnx` float32 verifies with no BatchNorm left, float16 and int8 reach their
agreement bounds or are refused with the reason; the command line exits 0, 1 or 2 on the file and
never 70, leaving the working directory as it was. `docs/gallery.md` holds the table these tests
measure; each test fails when the columns it measures that do not depend on the machine are
stale there (KERAS_BN_UPDATE_GALLERY=1 rewrites the row, without pytest-xdist).
"""

import os
import time

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import export
from tests import gallery
from tests.test_cli import cli_in_process

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Keras 2 input-structure notes

# What folding must do, read off each model's layer list by hand: fer's 14 BatchNorms each follow
# a Conv2D or SeparableConv2D with a linear activation and one consumer; SpliceAI is a
# pre-activation residual network: 16 BatchNorms follow a Conv1D, 16 follow an Add (no kernel)
# and go on to a ReLU (no kernel), so they become a per-channel affine.
# (folded backward, folded forward, replaced by affine)
EXPECTED_FOLD = {
    "fer": (14, 0, 0),
    "spliceai": (16, 0, 16),
    # MMSplice: each BatchNorm follows a Dense or a Conv1D with a linear activation.
    "mmsplice_donor": (2, 0, 0),
    "mmsplice_exon": (1, 0, 0),
}
# Real-looking inputs per model: fer's 64x64 faces and MMSplice's sequences in batches of 32,
# SpliceAI's 10,100 positions of DNA in a batch of 2 (a run of a batch of 32 takes seconds).
BATCH = {"fer": 32, "spliceai": 2, "mmsplice_donor": 32, "mmsplice_exon": 32}
# float32 parity of the fold, relative to each output's largest value (float32 reorders sums).
FOLD_RTOL = 1e-5
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


@pytest.fixture(
    scope="module",
    params=[
        # SpliceAI: 16384 positions per input, 14 to 24 s a test here.
        pytest.param(name, marks=pytest.mark.slow) if name == "spliceai" else name
        for name in sorted(gallery.ENTRIES)
    ],
)
def entry(request):
    return gallery.ENTRIES[request.param]


@pytest.fixture(scope="module")
def model(entry):
    return gallery.load(entry)


def _batchnorms(model):
    return [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def test_loads_with_its_batchnorms(entry, model):
    assert len(_batchnorms(model)) == entry.batchnorms
    stats = [np.asarray(b.moving_variance) for b in _batchnorms(model)]
    assert all(np.all(np.isfinite(v)) for v in stats)
    assert not all(np.all(v == 1.0) for v in stats)  # trained, not initial statistics


def test_diagnose_runs(entry, model):
    report = keras_bn.diagnose(model)
    assert len(report.rows) == entry.batchnorms
    assert {row.name for row in report.rows} == {b.name for b in _batchnorms(model)}
    assert all(row.problem is None for row in report.rows)


def test_fold_verifies_on_shapes_the_model_needs(entry, model):
    samples = entry.samples(BATCH[entry.name])
    start = time.perf_counter()
    folded, report = keras_bn.fold_bn(model)  # shapes from the model alone
    seconds = time.perf_counter() - start
    counts = report.counts
    Action = keras_bn.fold.Action
    got = (counts[Action.BACKWARD], counts[Action.FORWARD], counts[Action.AFFINE])
    assert got == EXPECTED_FOLD[entry.name]
    assert counts[Action.KEPT] == 0
    assert not _batchnorms(folded)
    # The same call with real inputs verifies on them and on synthetic inputs of their shape.
    _, with_samples = keras_bn.fold_bn(model, samples=samples)
    labels = {v["inputs"] for v in with_samples.verification}
    assert labels == {"samples", "synthetic inputs (batch 4, seed 0)"}
    # Independently of the fold's own check: the folded model against the original on the samples.
    reference = np.asarray(model.predict(samples, verbose=0), np.float64)
    candidate = np.asarray(folded.predict(samples, verbose=0), np.float64)
    error = float(np.max(np.abs(candidate - reference)))
    assert error <= FOLD_RTOL * np.max(np.abs(reference)), error
    assert len(_batchnorms(model)) == entry.batchnorms  # the caller's model is unchanged
    _document(
        entry.name,
        BatchNorms=str(report.batchnorms),
        folded=str(counts[Action.BACKWARD] + counts[Action.FORWARD]),
        affine=str(counts[Action.AFFINE]),
        **{"fold error (rel.)": f"{error / np.max(np.abs(reference)):.1e} ({seconds:.1f} s)"},
    )


def test_synthetic_inputs_take_a_length_the_model_accepts(entry, model):
    # SpliceAI crops 5,000 positions from each side of its open length: 16 cannot work, and the
    # first power of two past 10,000 does. MMSplice's exon module takes any length (its conv pads
    # 'same'): the first tried. The others' inputs are fixed.
    expected = {
        "spliceai": [(16384, 4)],
        "mmsplice_exon": [(16, 4)],
        "mmsplice_donor": [(18, 4)],
        "fer": [(64, 64, 1)],
    }
    assert keras_bn.verification.input_shapes(model) == expected[entry.name]


def exported_or_refused(to_file, entry, model, precision, path, column):
    """`(report, seconds)` of `to_file` (`export.to_onnx` or `export.to_litert`) on the entry's
    samples, or None when a reduced-precision file is refused: then with the measure that
    failed, nothing written, and the measured value documented in `column`."""
    samples = entry.samples(BATCH[entry.name])
    calibration = entry.samples(BATCH[entry.name], seed=1) if precision == "int8" else None
    start = time.perf_counter()
    try:
        report = to_file(model, path, samples=samples, precision=precision, calibration=calibration)
    except keras_bn.VerificationError as error:
        assert precision != "float32", str(error)
        assert "agreement" in str(error) or "cosine" in str(error)
        assert not path.exists()
        _document(entry.name, **{column: "refused: " + str(error).split("Received: ")[1][:8]})
        return None
    return report, time.perf_counter() - start


def skip_spliceai_reduced_precision(entry, precision):
    """SpliceAI's float16 and int8 exports take about 45 s of CI's 12 minutes, on paths fer and
    MMSplice also take. The gallery's own run (KERAS_BN_UPDATE_GALLERY=1) includes them."""
    if entry.name == "spliceai" and precision != "float32":
        if not os.environ.get("KERAS_BN_UPDATE_GALLERY"):
            pytest.skip("SpliceAI's reduced precisions run with KERAS_BN_UPDATE_GALLERY=1")


@pytest.mark.parametrize("precision", ["float32", "float16", "int8"])
def test_onnx_export(entry, model, precision, tmp_path):
    skip_spliceai_reduced_precision(entry, precision)
    path = tmp_path / f"{entry.name}.onnx"
    done = exported_or_refused(export.to_onnx, entry, model, precision, path, precision)
    if done is None:
        return
    report, seconds = done
    assert report.verification.passed and path.exists()
    assert "BatchNormalization" not in report.op_counts
    if precision == "float32":
        # Each Conv1D/Conv2D, dilated or not, is one ONNX Conv; nothing is lowered around them.
        assert not {"SpaceToDepth", "DepthToSpace", "Concat"} & set(report.op_counts)
        unfolded = export.to_onnx(model, tmp_path / "unfolded.onnx", fold=False)
        nodes = f"{sum(unfolded.op_counts.values())} -> {sum(report.op_counts.values())}"
        _document(
            entry.name,
            **{
                "ONNX nodes unfolded -> folded": nodes,
                "Mul left": str(report.op_counts.get("Mul", 0)),
            },
        )
    else:
        agreement = next(iter(report.quantization.agreement.values()))
        bounds = keras_bn.verification.AGREEMENT[precision]
        assert agreement.cosine >= bounds["min_cosine"]
        assert agreement.top1 is None or agreement.top1 >= bounds["min_agreement"]
        _document(entry.name, **{precision: f"cosine {agreement.cosine:.6f} ({seconds:.0f} s)"})


def test_command_line_never_exits_70(entry, model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a user's working directory holds afterwards is checked
    source = tmp_path / "model.keras"
    model.save(source)
    samples = tmp_path / "samples.npy"
    np.save(samples, entry.samples(BATCH[entry.name]))
    before = sorted(os.listdir(tmp_path))
    runs = {
        "inspect .h5": ("inspect", "--unsafe", gallery.fetch(entry)),
        "inspect": ("inspect", source),
        "doctor": ("doctor", source),
        "fold": ("fold", source, "-o", tmp_path / "folded.keras"),
        "export": ("export", source, "-o", tmp_path / "model.onnx", "--samples", samples),
        # A shape the model refuses is a clear bad-input error (exit 2): for SpliceAI a length
        # its Cropping1D cannot crop, for fer another image size.
        "export, bad shape": (
            "export", source, "-o", tmp_path / "short.onnx", "--input-shape",
            {"spliceai": "100,4", "fer": "32,32,1"}.get(entry.name, "16,5"),
        ),
    }  # fmt: skip
    if entry.name == "spliceai" and not os.environ.get("KERAS_BN_UPDATE_GALLERY"):
        # Its ONNX export with real samples is test_onnx_export[spliceai-float32] again (15 s of
        # CI); the command line's export path runs here for the other models.
        del runs["export"]
    codes = {}
    for label, args in runs.items():
        run = cli_in_process(*args)
        code, err = run.returncode, run.stderr
        codes[label] = code
        assert code in (0, 1, 2), f"{label}: exit {code}: {err[-1500:]}"
        assert "\x1b[" not in err, f"{label}: escape codes in {err[-500:]}"
        if code == 2:
            assert "keras-bn: error:" in err and "internal error" not in err
    assert codes["inspect"] == codes["inspect .h5"] == codes["fold"] == codes.get("export", 0) == 0
    assert codes["doctor"] in (0, 1)
    assert codes["export, bad shape"] == 2
    # The outputs and nothing else: no temporary file of ours or onnxruntime's.
    outputs = ["folded.keras", *(["model.onnx"] if "export" in runs else [])]
    assert sorted(os.listdir(tmp_path)) == sorted([*before, *outputs])


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_litert_export(entry, model, precision, tmp_path):
    skip_spliceai_reduced_precision(entry, precision)
    path = tmp_path / f"{entry.name}.tflite"
    done = exported_or_refused(export.to_litert, entry, model, precision, path, "LiteRT int8")
    if done is None:
        return
    report, seconds = done
    assert path.exists() and path.stat().st_size == report.size_bytes
    # The ops a BatchNorm leaves are exactly those of the BatchNorms the fold could only turn
    # into a multiply-add (SpliceAI's pre-activation residual ones); folded ones leave none.
    affine = {r.name for r in report.fold.rows if r.action is keras_bn.fold.Action.AFFINE}
    assert set(report.residue) == affine, (report.residue, affine)
    if precision == "float32":
        assert report.passed
        _document(entry.name, **{"LiteRT BatchNorm residue": str(len(report.residue))})
    else:
        agreement = next(iter(report.agreement.values()))
        assert agreement.cosine >= 0.99 and (agreement.top1 is None or agreement.top1 >= 0.98)
        _document(entry.name, **{"LiteRT int8": f"cosine {agreement.cosine:.6f} ({seconds:.0f} s)"})


COLUMNS = ["model", "BatchNorms", "folded", "affine", "fold error (rel.)",
           "ONNX nodes unfolded -> folded", "Mul left", "float16", "int8",
           "LiteRT BatchNorm residue", "LiteRT int8"]  # fmt: skip
# Columns that do not depend on the machine; the others are rewritten, not checked.
STRUCTURAL = {
    "BatchNorms", "folded", "affine", "ONNX nodes unfolded -> folded", "Mul left",
    "LiteRT BatchNorm residue",
}  # fmt: skip
DOCS_PATH = os.path.join(DOCS, "gallery.md")


def _rows():
    with open(DOCS_PATH, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    rows = {}
    for index, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == len(COLUMNS) and cells[0] in gallery.ENTRIES:
            rows[cells[0]] = (index, dict(zip(COLUMNS, cells)))
    return lines, rows


def _document(name, **cells):
    """Checks `cells` (column -> text) against the model's row of docs/gallery.md, the columns in
    STRUCTURAL only; with KERAS_BN_UPDATE_GALLERY=1 writes them all first."""
    if os.environ.get("KERAS_BN_UPDATE_GALLERY"):
        lines, rows = _rows()
        index, row = rows[name]
        row.update(cells)
        lines[index] = "| " + " | ".join(row[c] for c in COLUMNS) + " |"
        with open(DOCS_PATH, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    _, rows = _rows()
    assert name in rows, f"docs/gallery.md has no row for {name}"
    documented = rows[name][1]
    stale = {
        c: (documented[c], v) for c, v in cells.items() if c in STRUCTURAL and documented[c] != v
    }
    assert not stale, (
        f"docs/gallery.md is stale for {name} (documented, measured): {stale}; rerun with KERAS_BN_UPDATE_GALLERY=1"
    )


def test_a_file_keras_cannot_load_is_a_clear_error(tmp_path, monkeypatch):
    # MMSplice's acceptor module names a custom layer (ConvDNA) the file does not hold: Keras
    # cannot build it. That is the file's problem: exit 2 naming the layer, never 70.
    path = gallery.fetch(gallery.UNLOADABLE["mmsplice_acceptor"])
    monkeypatch.chdir(tmp_path)
    for command in ("inspect", "doctor"):
        run = cli_in_process(command, "--unsafe", path)
        assert run.returncode == 2, run.stderr[-1500:]
        assert "could not be loaded" in run.stderr and "ConvDNA" in run.stderr
    assert os.listdir(tmp_path) == []
