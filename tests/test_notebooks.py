"""Executes every notebook (their cells assert what they claim) and checks that the committed
notebooks are exactly what notebooks/make_notebooks.py writes, without outputs."""

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
]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS.parent)}},
    ).execute()
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert code_cells and all(c.execution_count for c in code_cells)
    assert not any(o.get("output_type") == "error" for c in code_cells for o in c.outputs)


def test_committed_notebooks_are_generated_and_clean(tmp_path):
    script = NOTEBOOKS / "make_notebooks.py"
    copy = tmp_path / "make_notebooks.py"
    copy.write_text(script.read_text())
    subprocess.run([sys.executable, str(copy)], check=True)
    for name in NAMES:
        committed = nbformat.read(NOTEBOOKS / name, as_version=4)
        fresh = nbformat.read(tmp_path / name, as_version=4)
        assert [c.source for c in committed.cells] == [c.source for c in fresh.cells]
        assert all(not c.get("outputs") for c in committed.cells if c.cell_type == "code")
