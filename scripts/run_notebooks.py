"""Execute the notebooks in a real Jupyter kernel, as a newcomer would, and store the outputs.

    .venv/bin/python scripts/run_notebooks.py              # regenerate all stored outputs
    .venv/bin/python scripts/run_notebooks.py quickstart   # one notebook (name or path)
    .venv/bin/python scripts/run_notebooks.py --check      # execute only, write nothing

Each notebook runs in a *fresh* virtual environment that does not have anode-jax: the
notebook's own set-up cell installs it (``pip install "anode-jax @ $ANODE_JAX_SOURCE"``,
pointed here at a wheel built from this checkout, with ``PIP_NO_INDEX=1``). The venv sees
the already installed third-party dependencies (jax, flax, ipykernel, ...) through a
``.pth`` line to this interpreter's site-packages, so nothing is downloaded; the
repository is not on ``sys.path`` (``PYTHONPATH`` is dropped, an editable install's
finder is not activated) and the kernel's working directory is a temporary folder
outside the checkout. A notebook that reads ``configs/`` or other repository files, or
imports anything the package does not ship, fails here.

``tests/test_notebooks.py`` uses the same functions (nbclient, real ipykernel kernel).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
KERNEL_NAME = "anode-jax-fresh-venv"
# Environment of the test run that must not leak into the notebook's kernel.
_DROP_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "MPLBACKEND", "PYTHONSTARTUP")


def notebooks() -> list[pathlib.Path]:
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def build_wheel(outdir: pathlib.Path) -> pathlib.Path:
    """A wheel of this checkout in ``outdir`` (built once; a file lock serializes builders)."""
    outdir.mkdir(parents=True, exist_ok=True)
    with open(outdir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wheels = sorted(outdir.glob("anode_jax-*.whl"))
        if not wheels:
            with tempfile.TemporaryDirectory() as src:
                # Build from a copy of the package sources: no build/ or egg-info in the checkout.
                for name in ("pyproject.toml", "README.md", "LICENSE"):
                    shutil.copy(REPO / name, src)
                shutil.copytree(
                    REPO / "anode_jax",
                    pathlib.Path(src) / "anode_jax",
                    ignore=shutil.ignore_patterns("__pycache__"),
                )
                subprocess.run(
                    [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"]
                    + ["--no-build-isolation", "-w", str(outdir), src],
                    check=True,
                    env={**os.environ, "PIP_NO_INDEX": "1"},
                )
            wheels = sorted(outdir.glob("anode_jax-*.whl"))
        return wheels[-1]


def make_fresh_venv(path: pathlib.Path) -> pathlib.Path:
    """A venv without anode-jax whose ``sys.path`` also holds this interpreter's packages."""
    venv.create(path, with_pip=False, symlinks=True)
    python = path / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    host = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # Plain path lines: the host's .pth files (e.g. an editable anode-jax) are not run.
    (pathlib.Path(site) / "_host_site_packages.pth").write_text("\n".join(sorted(host)) + "\n")
    return python


def kernel_env(python: pathlib.Path, wheel: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env.update(
        {
            "ANODE_JAX_SOURCE": wheel.as_uri(),
            "PIP_NO_INDEX": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            # Stored outputs must be reproducible: the convolutions' fixed formulation rule,
            # not a choice by this machine's timings (which changes the float rounding).
            "ANODE_JAX_AUTOTUNE": "off",
            "PATH": f"{python.parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


_CPU_PROBE = """import resource as _r
_u = _r.getrusage(_r.RUSAGE_SELF)
print("cpu_seconds", _u.ru_utime + _u.ru_stime)"""


@dataclasses.dataclass
class Executed:
    notebook: Any  # nbformat.NotebookNode, outputs filled in
    seconds: float  # wall time of the whole run, kernel start included
    cpu_seconds: float  # the kernel's CPU time (user + system, all threads)
    python: pathlib.Path  # the fresh venv's interpreter


def execute(
    path: pathlib.Path, workdir: pathlib.Path, wheel: pathlib.Path, *, timeout: int = 600
) -> Executed:
    """Run ``path`` top to bottom in a fresh venv under ``workdir`` (also the kernel's cwd).

    Raises ``nbclient.exceptions.CellExecutionError`` when a cell fails.
    """
    import nbclient
    import nbformat
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    python = make_fresh_venv(workdir / "venv")
    specs = workdir / "kernels"
    (specs / KERNEL_NAME).mkdir(parents=True)
    (specs / KERNEL_NAME / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (fresh venv)",
                "language": "python",
            }
        )
    )
    run_dir = workdir / "cwd"
    run_dir.mkdir()
    nb = nbformat.read(path, as_version=4)
    metadata = json.loads(json.dumps(nb.metadata))
    km = KernelManager(
        kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(specs)])
    )
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=timeout,
        record_timing=False,
        resources={"metadata": {"path": str(run_dir)}},
    )
    # A last cell, removed again, reports the kernel's CPU time (user + system, all threads):
    # wall time on this shared machine depends on the load, CPU time much less.
    nb.cells.append(nbformat.v4.new_code_cell(_CPU_PROBE))
    t = time.perf_counter()
    client.execute(env=kernel_env(python, wheel), cwd=str(run_dir))
    seconds = time.perf_counter() - t
    probe = nb.cells.pop()
    cpu = float("".join(o.get("text", "") for o in probe.outputs).split()[-1])
    nb.metadata = metadata
    nb.metadata["language_info"] = {"name": "python"}
    return Executed(nb, seconds, cpu, python)


def _select(names: list[str]) -> list[pathlib.Path]:
    if not names:
        return notebooks()
    out = []
    for name in names:
        p = pathlib.Path(name)
        cand = p if p.suffix == ".ipynb" else NOTEBOOK_DIR / f"{p.name}.ipynb"
        if not cand.is_file():
            raise SystemExit(f"no notebook {name!r}; have: {[q.stem for q in notebooks()]}")
        out.append(cand.resolve())
    return out


def main() -> None:
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook names or paths (default: all)")
    parser.add_argument("--check", action="store_true", help="execute only, do not write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="anode_notebooks_") as tmp:
        tmp = pathlib.Path(tmp)
        wheel = build_wheel(tmp / "wheel")
        for i, path in enumerate(_select(args.names)):
            work = tmp / f"run{i}"
            work.mkdir()
            run = execute(path, work, wheel)
            if not args.check:
                nbformat.write(run.notebook, str(path) + ".tmp")
                os.replace(str(path) + ".tmp", path)
            size = os.path.getsize(path) / 1024
            print(
                f"{path.name}: {run.seconds:.0f} s wall, {run.cpu_seconds:.0f} s kernel CPU, "
                f"{size:.0f} KiB",
                flush=True,
            )


if __name__ == "__main__":
    main()
