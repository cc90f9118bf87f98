"""Executes every notebook (their cells assert what they claim, and every plotting cell must draw),
and checks that the committed notebooks are what notebooks/make_notebooks.py writes: the same
cells, executed, with their plots, and README's pictures taken from them."""

import base64
import pathlib
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"
NAMES = [
    "01_batchnorm_ten_years_on.ipynb",
    "02_training_with_batchnorm.ipynb",
    "03_fold_and_export.ipynb",
    "04_recalibration.ipynb",
]
# (notebook, index among its code cells, picture) as README.md shows them.
README_IMAGES = [
    ("02_training_with_batchnorm.ipynb", 2, "loss_curves.png"),
    ("04_recalibration.ipynb", 2, "recalibration.png"),
]


def pngs(cell):
    return [
        o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})
    ]


def assert_every_plot_drawn(notebook, name):
    code = [c for c in notebook.cells if c.cell_type == "code"]
    plotting = [c for c in code if "plt.show()" in c.source]
    assert plotting, f"{name} has no plot"  # each notebook draws at least one
    for cell in plotting:
        assert pngs(cell), f"{name}: a plotting cell produced no image/png:\n{cell.source[:200]}"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_and_draws(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in notebook.cells:  # run from the sources, not from the committed outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS.parent)}},
    ).execute()
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert code_cells and all(c.execution_count for c in code_cells)
    assert not any(o.get("output_type") == "error" for c in code_cells for o in c.outputs)
    assert_every_plot_drawn(notebook, name)


def test_committed_notebooks_are_generated_and_executed(tmp_path):
    subprocess.run(
        [
            sys.executable,
            str(NOTEBOOKS / "make_notebooks.py"),
            "--sources-only",
            "--out",
            str(tmp_path),
        ],
        check=True,
    )
    for name in NAMES:
        committed = nbformat.read(NOTEBOOKS / name, as_version=4)
        fresh = nbformat.read(tmp_path / name, as_version=4)
        assert [c.source for c in committed.cells] == [c.source for c in fresh.cells], name
        code = [c for c in committed.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code), f"{name} is committed unexecuted"
        assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
        assert_every_plot_drawn(committed, name)
    # Negative: a notebook whose plot did not render is caught.
    plain = nbformat.read(tmp_path / NAMES[0], as_version=4)
    with pytest.raises(AssertionError, match="produced no image/png"):
        assert_every_plot_drawn(plain, NAMES[0])


def test_readme_pictures_are_the_committed_plots():
    readme = (NOTEBOOKS.parent / "README.md").read_text()
    for name, index, image in README_IMAGES:
        cell = [
            c for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells if c.cell_type == "code"
        ][index]
        assert (NOTEBOOKS / "images" / image).read_bytes() == base64.b64decode(pngs(cell)[0])
        assert f"notebooks/images/{image}" in readme
