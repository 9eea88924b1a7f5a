"""Helpers shared by the trainer tests: tiny configs and launching ``train.py``."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


# A tiny digits run: 256 train images, batch 32 -> 8 steps per epoch.
TINY_DIGITS = {
    "data.train_size": 256,
    "batch_size": 32,
    "eval_batch_size": 120,
    "model.width": 0.5,
    "progress_bar": False,
    "plots": False,
    "checkpoint_every_steps": 5,
    "log_every_steps": 4,
}


def tiny_digits(**overrides):
    c = load_config("default")
    for k, v in {**TINY_DIGITS, **overrides}.items():
        node = c
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = v
    return c


def cli_args(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def subprocess_env(cache_dir: Path | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **extra)
    if cache_dir is not None:  # share compiled executables between the runs of one test
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
        )
    return env


def session_root(tmp_path_factory, name: str) -> Path:
    """A folder shared by the whole test session: under pytest-xdist each worker has its own
    basetemp inside the session's folder, so runs made there are made once, by one worker."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


# The resume tests' run: 512 images, batch 32 -> 16 steps per epoch, 4 epochs (64 steps),
# a checkpoint every 5 steps. Its uninterrupted run is the reference every interrupted one
# (tests/test_fault_tolerance.py, tests/test_training.py) must equal exactly.
RESUME_OVERRIDES = {**TINY_DIGITS, "data.train_size": 512, "num_epochs": 4}
RESUME_STEPS = 64
RESUME_CMD = [PY, str(REPO / "train.py"), "--config=configs/default.py"]
RESUME_CMD += cli_args(RESUME_OVERRIDES)


def resume_env(tmp_path_factory) -> dict:
    """`subprocess_env` with the session's compilation cache of the resume runs."""
    return subprocess_env(cache_dir=session_root(tmp_path_factory, "faults") / "jax_cache")


def resume_reference(tmp_path_factory) -> Path:
    """Workdir of the uninterrupted `RESUME_CMD` run, made once per session (another module
    or xdist worker waits for it, then reuses it). Read-only: copy it before changing it."""
    root = session_root(tmp_path_factory, "faults")
    root.mkdir(parents=True, exist_ok=True)
    ref = root / "reference"
    with open(root / "reference.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if not (ref / "summary.json").exists():
            shutil.rmtree(ref, ignore_errors=True)
            r = subprocess.run(
                [*RESUME_CMD, f"--workdir={ref}"],
                cwd=REPO,
                env=resume_env(tmp_path_factory),
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert r.returncode == 0, r.stderr[-3000:]
    return ref


def records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


DETERMINISTIC = ("step", "epoch", "split", "loss", "accuracy", "lr", "num_steps")
