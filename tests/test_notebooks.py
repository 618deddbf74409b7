"""Every notebook runs top to bottom in a fresh kernel, and is committed with its outputs."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def _execute_module():
    path = NOTEBOOKS[0].parent / "execute.py"
    spec = importlib.util.spec_from_file_location("notebooks_execute", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/*.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_with_outputs_and_runs(path):
    committed = nbformat.read(path, as_version=4)
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), \
        f"{path.name}: run `python notebooks/execute.py {path.name}` and commit its outputs"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], path.name
    ran = _execute_module().execute(path)  # raises CellExecutionError on a failing cell
    assert sum(c.cell_type == "code" for c in ran.cells) == len(code)
