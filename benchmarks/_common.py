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
    """The machine a result was measured on; stored in every benchmark's JSON.

    CPU model, the ISA flags that decide XLA's kernels (AVX-512 or not, BF16, VNNI, AMX),
    usable cores, backend and device kind, Python/jax/jaxlib versions, `XLA_FLAGS`, the
    1-minute load average when measuring started (`write_results` adds the one at the end)
    and the date. Figures from machines with different headers must never share a ratio.
    """
    import jaxlib

    from anode_jax.nn.autotune import cpu_description

    info = {
        **cpu_description(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "load_average_start": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    return info


def machine_header(m: dict) -> str:
    """One Markdown paragraph describing `machine()`'s record (older records: what they hold)."""
    if "cpu_model" in m:
        flags = ", ".join(m["cpu_flags"]) or "none of interest"
        cpu = (
            f"CPU **{m['cpu_model']}**, {m['cpu_cores']} usable cores, AVX-512 "
            f"**{'yes' if m['avx512'] else 'no'}** (flags: {flags})"
        )
    else:
        cpu = f"CPU model not recorded ({m.get('cpu_count', '?')} CPUs; an earlier machine)"
    load = ""
    if "load_average_start" in m:
        load = f"; load average (1 min) {m['load_average_start']:.1f} at the start"
        if "load_average_end" in m:
            load += f", {m['load_average_end']:.1f} at the end"
    flags = m.get("xla_flags")
    return (
        f"Machine: {cpu}; {m.get('platform', '?')}, backend {m.get('backend', '?')}; Python "
        f"{m.get('python', '?')}, jax {m.get('jax', '?')}, jaxlib {m.get('jaxlib', 'not recorded')}"
        f"; XLA_FLAGS {'`' + flags + '`' if flags else '(empty)' if flags is not None else 'not recorded'}"
        f"{load}; {m.get('date', '?')}."
    )


def _docs_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")


def read_results(stem: str) -> dict:
    """The payload stored in docs/<stem>.json by `write_results` (to re-render or extend it)."""
    with open(os.path.join(_docs_dir(), f"{stem}.json")) as f:
        return json.load(f)


def write_results(stem: str, payload: dict, markdown) -> None:
    """Writes docs/<stem>.json and docs/<stem>.md.

    `markdown`: the text, or a function of the payload rendering it (called after the load
    average at the end of the run is added to the payload's machine record).
    """
    if isinstance(payload.get("machine"), dict) and "load_average_start" in payload["machine"]:
        payload["machine"].setdefault("load_average_end", round(os.getloadavg()[0], 2))
    if callable(markdown):
        markdown = markdown(payload)
    docs = _docs_dir()
    os.makedirs(docs, exist_ok=True)
    with open(os.path.join(docs, f"{stem}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(docs, f"{stem}.md"), "w") as f:
        f.write(markdown)
