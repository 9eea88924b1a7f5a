"""The notebooks, run as a newcomer runs them, and the outputs stored with them.

Executed (``slow``): a real Jupyter kernel (nbclient + ipykernel) in a *fresh* virtual
environment that does not have anode-jax, working directory outside the checkout, no
checkout on ``sys.path``; the notebook's own set-up cell installs the package (from a wheel of
this checkout, offline). Any cell error fails the test. The same code
(``scripts/run_notebooks.py``) regenerates the stored outputs.

Stored (fast): every notebook is committed executed, top to bottom, with its figures, a Colab
badge and the common set-up cell.
"""

import importlib.util
import json
import os
import pathlib
import re
import sys

import pytest

from tests._notebook_numbers import assert_same_key_numbers

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "run_notebooks", REPO / "scripts" / "run_notebooks.py"
)
run_notebooks = importlib.util.module_from_spec(_spec)
sys.modules["run_notebooks"] = run_notebooks  # dataclasses look their module up
_spec.loader.exec_module(run_notebooks)

NOTEBOOKS = run_notebooks.notebooks()
EXPECTED = {
    "quickstart",
    "core_gradients",
    "backsolve_vs_anode",
    "anodev2_kernels",
    "nnx_quickstart",
    "spiral_irregular_times",
    "cnf_two_moons",
}
SOURCE_LINE = re.compile(
    r'^ANODE_JAX_SOURCE = os\.environ\.get\(\s*"ANODE_JAX_SOURCE", "([^"]+)"\)', re.M
)
# A quoted relative path into a checkout, or loading a module from a file.
REPO_PATH = re.compile(r"""["'](\.\.?/|configs/|notebooks/|anode_jax/)|spec_from_file_location""")
# Kernel CPU seconds (user + system, all threads) a notebook may use: <= 2 min on 2 cores.
CPU_BUDGET_S = 240


def _load(path):
    with open(path) as f:
        return json.load(f)


def _code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell):
    return "".join(cell["source"])


def _has_image(cell):
    return any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def test_the_notebooks_are_there():
    assert {p.stem for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_notebook_is_executed_with_figures_badge_and_setup(path):
    nb = _load(path)
    assert os.path.getsize(path) < 1_000_000, "keep figures small (figsize, dpi 72)"
    first = _source(nb["cells"][0])
    assert nb["cells"][0]["cell_type"] == "markdown"
    badge = f"https://colab.research.google.com/github/anode-jax/anode-jax/blob/main/notebooks/{path.name}"
    assert badge in first, "the first cell carries the 'Open in Colab' badge of this notebook"

    cells = _code_cells(nb)
    setup = _source(cells[0])
    assert SOURCE_LINE.search(setup), "the first code cell is the common set-up cell"
    assert setup == _source(_code_cells(_load(REPO / "notebooks" / "quickstart.ipynb"))[0])
    for cell in cells:
        assert not REPO_PATH.search(_source(cell)), (
            "notebooks must not read files of the repository checkout"
        )
    # Executed top to bottom in one kernel, every cell with its outputs, no errors.
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1))
    assert all(c["outputs"] for c in cells[:1])
    errors = [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, errors
    stderr = [o for c in cells for o in c["outputs"] if o.get("name") == "stderr"]
    assert not stderr, f"stored warnings: {stderr}"
    assert _has_image(cells[-1]), "each notebook ends in a figure"


def test_one_source_url_everywhere():
    urls = {SOURCE_LINE.search(_source(_code_cells(_load(p))[0])).group(1) for p in NOTEBOOKS}
    assert len(urls) == 1
    (url,) = urls
    readme = (REPO / "README.md").read_text()
    assert url in readme, "README documents the install URL of the set-up cell"
    base = url.removeprefix("git+").removesuffix(".git")
    assert base.startswith("https://github.com/")
    repo = base.removeprefix("https://github.com/")
    assert f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/" in readme


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    # xdist workers share their session's parent folder: one wheel build per test session.
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    return run_notebooks.build_wheel(root / "anode_jax_wheel")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_a_fresh_venv_outside_the_checkout(path, tmp_path, wheel):
    assert REPO not in tmp_path.parents
    run = run_notebooks.execute(path, tmp_path, wheel)  # raises if a cell fails
    cells = _code_cells(run.notebook)
    setup_out = "".join(o.get("text", "") for o in cells[0]["outputs"])
    assert setup_out.startswith("installed anode-jax"), setup_out  # the install really ran
    site = list((tmp_path / "venv" / "lib").glob("python3*/site-packages/anode_jax"))
    assert len(site) == 1, "anode_jax was installed into the fresh venv"
    assert _has_image(cells[-1]), "each notebook ends in a figure"
    assert_same_key_numbers(_load(path), run.notebook)  # stored outputs = a fresh run's
    print(f"{path.name}: {run.seconds:.0f} s wall, {run.cpu_seconds:.0f} s kernel CPU")
    assert run.cpu_seconds < CPU_BUDGET_S, (
        f"{path.name} used {run.cpu_seconds:.0f} s of CPU (budget {CPU_BUDGET_S} s: 2 min on 2 cores)"
    )
