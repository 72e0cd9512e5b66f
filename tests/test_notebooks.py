"""Execute the notebooks in `notebooks/` headless, top to bottom, as CI does on a CPU-only machine.

nbclient (the engine under `pytest --nbmake`) runs each notebook in a fresh `python3` kernel with the notebook's
folder as working directory; the first failing cell raises `CellExecutionError` and fails the test, with the
cell's traceback in the report. Notebooks must be committed with their outputs cleared.
"""

from __future__ import annotations

import importlib.util
import json
import os
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


def _nb_utils():
    spec = importlib.util.spec_from_file_location("_nb_utils", NOTEBOOK_DIR / "_nb_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebook_03_picks_the_newest_results_file_by_recorded_date(tmp_path):
    """Notebook 03 charts `vsa_benchmarks()[0]`: it must be the newest by the date inside the JSON, whatever the
    file times (equal after a clone) and names say."""
    utils = _nb_utils()
    older = tmp_path / "vsa_bench_z_older.json"  # sorts last by name
    newer = tmp_path / "vsa_bench_a_newer.json"
    undated = tmp_path / "vsa_bench_m_undated.json"
    older.write_text(json.dumps({"meta": {"card": "X", "date": "2026-11-27T07:04:23+00:00"}, "rows": []}))
    newer.write_text(json.dumps({"meta": {"card": "X", "date": "2026-11-27T08:37:51+00:00"}, "rows": []}))
    undated.write_text(json.dumps({"meta": {"card": "X"}, "rows": []}))
    for stamp in (1_000_000_000, 2_000_000_000):  # equal file times, then the older file touched last
        for path in (older, newer, undated):
            os.utime(path, (stamp, stamp))
        assert utils.vsa_benchmarks(tmp_path) == [newer, older, undated]
        os.utime(older, (stamp + 10, stamp + 10))
        assert utils.vsa_benchmarks(tmp_path)[0] == newer
    assert utils.load_vsa_benchmark(utils.vsa_benchmarks(tmp_path)[0])["date"] == "2026-11-27T08:37:51+00:00"
    # the repository's own results: the first file is the newest recorded date among them
    files = utils.vsa_benchmarks()
    dated = [utils.recorded_date(f) for f in files if utils.recorded_date(f) is not None]
    if dated:
        assert utils.recorded_date(files[0]) == max(dated)


def test_load_vsa_benchmark_reads_the_real_grid_layout(tmp_path):
    """`bench_vsa_layer.py` rows (case / grid / heads / input, a sparsity on the dense row too): one panel per grid
    and input, the dense row without a sparsity, the forward speed-up over cuDNN computed per panel."""
    utils = _nb_utils()
    common = {"case": "wan480", "grid": [21, 30, 52], "heads": 12, "sparsity": 0.875, "fwdbwd_ms": 1.0}
    rows = [{**common, "input": "random", "method": "cudnn_dense", "fwd_ms": 12.0},
            {**common, "input": "random", "method": "layer_triton", "fwd_ms": 3.0},
            {**common, "input": "smooth", "method": "cudnn_dense", "fwd_ms": 10.0},
            {**common, "input": "smooth", "method": "layer_triton", "fwd_ms": 4.0}]
    path = tmp_path / "vsa_layer_x.json"
    path.write_text(json.dumps({"meta": {"card": "X", "date": "2026-12-01T16:36:13+00:00"}, "rows": rows}))
    bench = utils.load_vsa_benchmark(path)
    assert [r["shape"] for r in bench["rows"]] == ["wan480 21x30x52 H12, random"] * 2 + ["wan480 21x30x52 H12, smooth"] * 2
    assert [r["label"] for r in bench["rows"]] == ["cudnn_dense", "layer_triton s=0.875"] * 2
    assert [r["x_cudnn"] for r in bench["rows"]] == [1.0, 4.0, 1.0, 2.5]


def test_save_figure_only_when_asked(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    utils = _nb_utils()
    fig = plt.figure(figsize=(1, 1))
    monkeypatch.delenv("DDA_SAVE_FIGURES", raising=False)
    assert utils.save_figure(fig, "x") is None
    monkeypatch.setenv("DDA_SAVE_FIGURES", str(tmp_path / "figs"))
    assert utils.save_figure(fig, "x") == tmp_path / "figs" / "x.png" and (tmp_path / "figs" / "x.png").stat().st_size
    plt.close(fig)


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
def test_notebook_runs(name, monkeypatch):
    monkeypatch.delenv("DDA_SAVE_FIGURES", raising=False)  # the kernel inherits it: never rewrite docs/ from a test
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
