"""Every notebook's code cells run top to bottom (notebooks are documentation that must not rot)."""

import glob
import json
import os

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
    # Jupyter runs a notebook in its own folder; notebooks write only to temporary folders.
    monkeypatch.chdir(os.path.dirname(os.path.abspath(path)))
    with open(path) as f:
        notebook = json.load(f)
    namespace = {"__name__": "__notebook__"}
    for i, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        # Shell lines (e.g. "!pip install") are Colab set-up, not part of the tested code.
        source = "\n".join(
            line for line in source.splitlines() if not line.lstrip().startswith(("!", "%"))
        )
        exec(compile(source, f"{os.path.basename(path)}[cell {i}]", "exec"), namespace)
