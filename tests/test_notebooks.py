"""The tutorial notebooks run top to bottom (FAST mode) and match their sources.

Each notebook in ``notebooks/`` is executed in a fresh ``python3`` Jupyter kernel with
``BAYES_TRANSFER_FAST=1``; a cell that raises fails the test. The kernel's working
directory is a temporary folder, so what the notebooks write (``outputs/notebooks/...``)
stays out of the repository. Deselect with ``-m "not slow"``; about a minute per
notebook on 2 CPU cores.

Needs the ``[dev]`` extra (``nbclient``, ``nbformat``, ``jupytext``, and ``ipykernel``,
whose wheel installs the ``python3`` kernel spec).
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
#: Seconds one cell may run in FAST mode (the slowest takes well under a minute).
CELL_TIMEOUT = 300


def _generator():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOK_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_exist_and_are_generated():
    gen = _generator()
    built = gen.build()
    assert sorted(built) == [p.name for p in NOTEBOOKS], \
        "notebooks/*.ipynb and notebooks/src/*.py list different notebooks"
    for path in NOTEBOOKS:
        stored = nbformat.read(path, as_version=4)
        assert gen._normalised(stored) == gen._normalised(built[path.name]), \
            f"{path.name} is out of date: run python notebooks/build.py"


def test_colab_installs_the_package_with_one_pip_cell():
    """On Colab the package comes from pip (the demo prior inside it), not a checkout."""
    gen = _generator()
    for name, nb in gen.build().items():
        code = [c.source for c in nb.cells if c.cell_type == "code"]
        setup = [c for c in code if "google.colab" in c]
        assert len(setup) == 1, name
        assert (f'!pip install -q "bayes_transfer @ git+https://github.com/{gen.REPOSITORY}"'
                in setup[0]), name
        for checkout in ("git clone", "%cd", "sys.path", "/content/"):
            assert not any(checkout in c for c in code), (name, checkout)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, \
                f"{path.name}, cell {i} has outputs: strip them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path, tmp_path, monkeypatch):
    # The kernel inherits this environment.
    monkeypatch.setenv("BAYES_TRANSFER_FAST", "1")
    monkeypatch.setenv("BAYES_TRANSFER_OFFLINE", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell raised\n{e}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - start:.1f} s in FAST mode")
