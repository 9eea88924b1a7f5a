"""Helpers shared by the trainer tests: tiny configs and launching ``train.py``."""

from __future__ import annotations

import importlib.util
import json
import os
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


def records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


DETERMINISTIC = ("step", "epoch", "split", "loss", "accuracy", "lr", "num_steps")
