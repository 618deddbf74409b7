"""Run notebooks top to bottom and save them with their outputs (what is committed).

    .venv/bin/python notebooks/execute.py                 # every notebooks/*.ipynb
    .venv/bin/python notebooks/execute.py quickstart.ipynb

Each runs in a fresh Python kernel from this environment, in the notebooks/ directory, on the
CPU; a cell that raises stops the run and leaves the file as it was.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def execute(path: Path, timeout: int = 600):
    """The notebook at ``path`` run top to bottom (nbformat node); raises on a failing cell."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def main(names: list[str]) -> None:
    import nbformat

    paths = [HERE / n for n in names] if names else sorted(HERE.glob("*.ipynb"))
    for path in paths:
        nb = execute(path)
        nbformat.write(nb, path)
        print(f"{path.name}: {sum(c.cell_type == 'code' for c in nb.cells)} code cells run")


if __name__ == "__main__":
    main(sys.argv[1:])
