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


# Run in the slow run only: the notebook whose every call the tests make (conversion: from_hf
# and to_hf against transformers, tests/test_to_hf.py, test_convert_cli.py,
# test_from_hf_errors.py). The others run in CI; every notebook's committed outputs are checked
# in CI.
RUN_WHEN_SLOW = {"conversion.ipynb"}


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/*.ipynb"
    assert RUN_WHEN_SLOW <= {p.name for p in NOTEBOOKS}


def _committed_code_cells(path):
    committed = nbformat.read(path, as_version=4)
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), \
        f"{path.name}: run `python notebooks/execute.py {path.name}` and commit its outputs"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], path.name
    return code


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_with_outputs(path):
    _committed_code_cells(path)


@pytest.mark.parametrize("path", [
    pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in RUN_WHEN_SLOW else [])
    for p in NOTEBOOKS])
def test_notebook_is_committed_with_outputs_and_runs(path):
    code = _committed_code_cells(path)
    ran = _execute_module().execute(path)  # raises CellExecutionError on a failing cell
    assert sum(c.cell_type == "code" for c in ran.cells) == len(code)
