"""Shared helpers for the benchmark scripts: timing, compiled memory, machine description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax


def compiled_temp_bytes(fn, *args):
    """(temp bytes, compile seconds, compiled executable) for jax.jit(fn)(*args)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    return int(compiled.memory_analysis().temp_size_in_bytes), seconds, compiled


def median_seconds(compiled, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of a compiled function after warm-up (blocks on the result)."""
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    return info


def write_results(stem: str, payload: dict, markdown: str) -> None:
    docs = os.path.join(os.path.dirname(__file__), "..", "docs")
    os.makedirs(docs, exist_ok=True)
    with open(os.path.join(docs, f"{stem}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(docs, f"{stem}.md"), "w") as f:
        f.write(markdown)
