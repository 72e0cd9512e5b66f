"""Execute the notebooks in `notebooks/` headless, top to bottom, as CI does on a CPU-only machine.

nbclient (the engine under `pytest --nbmake`) runs each notebook in a fresh `python3` kernel with the notebook's
folder as working directory; the first failing cell raises `CellExecutionError` and fails the test, with the
cell's traceback in the report. Notebooks must be committed with their outputs cleared.
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = ("01_quickstart.ipynb", "02_sequence_parallel.ipynb", "03_video_sparse_attention.ipynb")
CELL_TIMEOUT_S = 300  # one cell; a hang fails instead of blocking CI


def execute(nb: nbformat.NotebookNode, cwd: Path) -> float:
    """Run every cell in a fresh kernel; returns the wall time. Raises `CellExecutionError` on a failing cell."""
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    start = time.perf_counter()
    client.execute()
    return time.perf_counter() - start


def test_all_notebooks_present():
    missing = [name for name in EXPECTED if not (NOTEBOOK_DIR / name).is_file()]
    assert not missing, f"missing notebooks: {missing}"


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs(name):
    path = NOTEBOOK_DIR / name
    nb = nbformat.read(path, as_version=4)
    seconds = execute(nb, path.parent)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: error outputs {[(e.ename, e.evalue) for e in errors]}"
    print(f"{name}: {seconds:.1f} s")


@pytest.mark.slow
def test_failing_cell_fails(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise RuntimeError('cell 2 fails')")]
    with pytest.raises(CellExecutionError, match="cell 2 fails"):
        execute(nb, tmp_path)
