"""Choice by measurement: time the correct formulations of an operation once per machine.

The loop-safe convolution owns the formulations of its backward pass (the weight gradient as
one canonical convolution, as per-tap products, ...; the input gradient as a convolution or as
per-tap products). Which is fastest depends on the shape, the dtype, the CPU (AVX2 or
AVX-512, core count), the jax/jaxlib version and the XLA flags, so a rule tuned on one machine
is the wrong rule on the next (docs/bench_conv.md). Like cuDNN's autotuner, `choose`
times every candidate once, on first use, and remembers the fastest:

* **When.** Shapes and dtypes are static in JAX: they are known when the backward is *traced*
  (under `jit`, `grad`, `scan`, `vmap` alike). The measurement runs at that moment, outside the
  trace (`jax.ensure_compile_time_eval`), on concrete random inputs of the same shape and dtype
  on the default device: each candidate is compiled alone, run once to warm up, then the
  candidates are timed in interleaved rounds and the least time of each decides (the least
  time is the one least disturbed by other processes on a shared machine). The program being traced
  only receives the name of the winner, so a jitted step is measured once per new shape at
  its first compilation and never while it runs.
* **Where it is kept.** In memory for the process, and on disk in a JSON file per machine:
  `$ANODE_JAX_AUTOTUNE_CACHE/autotune-<key>.json`, by default
  `$XDG_CACHE_HOME/anode_jax/` (`~/.cache/anode_jax/`). `<key>` hashes
  `machine_key` (CPU model and ISA flags, core count, backend and device kind,
  jax/jaxlib versions, `XLA_FLAGS`), so files from different machines or flag settings never
  mix. A corrupt or unreadable file is ignored with a warning and rewritten.
* **What is measured.** For each convolution shape: its forward pass (XLA's convolution, or
  oneDNN's when the optional extension `anode_jax.nn.onednn` is built), its input gradient and
  its weight gradient (the formulations listed in `anode_jax.nn.INPUT_GRADIENT_METHODS` /
  `WEIGHT_GRADIENT_METHODS`, oneDNN's among them when built and applicable). An entry's key
  holds the candidate names (and the extension's build digest), so building or rebuilding the
  extension leads to a new measurement.
* **Switches.** `ANODE_JAX_AUTOTUNE=off` (or `0`): never measure, never read or write the
  cache; use the deterministic default rule (XLA's forward convolution,
  `anode_jax.nn.weight_gradient_method` for the weight gradient, a convolution for the input
  gradient; never oneDNN). `ANODE_JAX_AUTOTUNE=cache`: use cached choices, on a miss the
  default rule without measuring. `on` (default): measure on a miss. Pin one formulation for
  every call with `ANODE_JAX_CONV_FORWARD=xla|onednn`,
  `ANODE_JAX_CONV_WEIGHT_GRADIENT=<name>` / `ANODE_JAX_CONV_INPUT_GRADIENT=<name>` (a pinned
  `onednn` falls back to the default rule, with a warning once, where oneDNN cannot compute a
  convolution; `auto` is no pin), or per call with `forward=`, `weight_gradient=` /
  `input_gradient=` of `anode_jax.nn.conv_general_dilated`. Precedence: a per-call choice,
  then a pin, then the mode — pins apply in every mode, `off` included.
* **Pruning and warm-up.** Each candidate runs once untimed first (one-time work such as
  oneDNN's kernel generation is not held against it); one that is then over `PRUNE_FACTOR`×
  the fastest is timed no further, and the entry lists it under `"pruned"`.
* **Timed in a loop.** The convolution times each candidate inside a short `fori_loop`
  (`anode_jax.nn._conv._in_loop`: 4 iterations, data-dependent so nothing is hoisted or
  unrolled), since its calls run mostly in ODE solver loops, where a candidate can cost more
  than alone (measured: oneDNN's calls at small shapes).
* **When measuring fails** (a candidate does not compile or runs out of memory), that
  candidate is skipped; if none can be timed, the default rule is used with a warning.

Different machines may pick different formulations; they compute the same gradient up to
float rounding (tests/test_autotune.py compares them in float64).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

#: Values of `ANODE_JAX_AUTOTUNE`.
AUTOTUNE_MODES = ("on", "off", "cache")
_MODE_ALIASES = {"1": "on", "true": "on", "0": "off", "false": "off", "": "on"}

#: Candidates whose first timed run (after an untimed warm-up) is this many times slower than
#: the fastest one's are not timed again (see `measure`).
PRUNE_FACTOR = 3.0

#: CPU flags that decide which kernels XLA and its libraries can use.
_ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_tile",
)

_lock = threading.Lock()
_warned_pins: set[str] = set()
_memory: dict[str, dict[str, Any]] = {}
_loaded_files: set[str] = set()


def mode() -> str:
    """The autotuning mode from `ANODE_JAX_AUTOTUNE`: "on" (default), "off" or "cache".

    Raises:
      ValueError: for any other value, naming the valid ones.
    """
    raw = os.environ.get("ANODE_JAX_AUTOTUNE", "on").strip().lower()
    value = _MODE_ALIASES.get(raw, raw)
    if value not in AUTOTUNE_MODES:
        raise ValueError(f"ANODE_JAX_AUTOTUNE must be one of {AUTOTUNE_MODES}, got {raw!r}.")
    return value


def cpu_description() -> dict[str, Any]:
    """CPU model name, the ISA flags of interest present, and whether AVX-512 is there."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                if flags and model:
                    break
    except OSError:
        pass
    present = [f for f in _ISA_FLAGS if f in flags]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "cpu_model": model,
        "cpu_flags": present,
        "avx512": "avx512f" in flags,
        "cpu_cores": cores,
        "arch": platform.machine(),
    }


def machine_key() -> dict[str, Any]:
    """What a measured choice depends on besides the operation: CPU, backend, versions, flags."""
    import jaxlib

    device = jax.devices()[0]
    return {
        **cpu_description(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def cache_dir() -> str:
    """`$ANODE_JAX_AUTOTUNE_CACHE`, else `$XDG_CACHE_HOME/anode_jax`, else `~/.cache/anode_jax`."""
    explicit = os.environ.get("ANODE_JAX_AUTOTUNE_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "anode_jax")


def cache_path() -> str:
    """The JSON file holding this machine's measured choices (see the module docstring)."""
    digest = hashlib.sha256(json.dumps(machine_key(), sort_keys=True).encode()).hexdigest()
    return os.path.join(cache_dir(), f"autotune-{digest[:16]}.json")


def clear_memory() -> None:
    """Forgets the choices held in memory (the disk cache is left alone)."""
    with _lock:
        _memory.clear()
        _loaded_files.clear()


def _read(path: str, quiet: bool = False) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise TypeError("entries is not an object")
        return {k: v for k, v in entries.items() if isinstance(v, dict) and "choice" in v}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as error:
        if quiet:
            return {}
        warnings.warn(
            f"anode_jax autotune cache {path} is unreadable ({error}); ignoring it, it will "
            "be rewritten.",
            RuntimeWarning,
            stacklevel=3,
        )
        return {}


def _write(path: str, key: str, entry: dict[str, Any]) -> None:
    """Adds one entry to the file (re-read first: another process may have added others)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # quiet: an unreadable file was reported when it was first read
        entries = _read(path, quiet=True) if os.path.exists(path) else {}
        entries[key] = entry
        payload = {"machine": machine_key(), "entries": entries}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: readers see the old or the new file, never half
    except OSError as error:
        warnings.warn(
            f"anode_jax autotune could not write {path} ({error}); the choice is kept in "
            "memory only.",
            RuntimeWarning,
            stacklevel=3,
        )


def lookup(key: str) -> dict[str, Any] | None:
    """The cached entry for `key` (memory, then this machine's file), or None."""
    with _lock:
        if key in _memory:
            return _memory[key]
        path = cache_path()
        if path not in _loaded_files:
            _loaded_files.add(path)
            for k, v in _read(path).items():
                _memory.setdefault(k, v)
        return _memory.get(key)


class Timings(dict):
    """Least seconds per candidate (a dict), with `pruned`: the candidates timed once only."""

    pruned: tuple[str, ...] = ()


def measure(
    candidates: Mapping[str, Callable[..., Any]],
    args: Sequence[jax.ShapeDtypeStruct],
    *,
    rounds: int = 5,
    budget_s: float = 10.0,
) -> Timings:
    """Least seconds of each candidate on random inputs shaped like `args` (failed: absent).

    Each candidate is jitted and compiled alone and run once untimed (a first call also pays
    for one-time work: buffer allocation, a library's kernel generation — oneDNN builds its
    kernel on the first call of a shape). Then each runs once timed: a candidate whose time
    is over `PRUNE_FACTOR`× the fastest one's keeps that time and is not run again (listed in
    the result's `pruned`). The others run in interleaved rounds (so a change of machine load
    touches all of them alike) until `rounds` rounds are done or `budget_s` seconds are spent.
    Runs outside any surrounding trace.
    """
    with jax.ensure_compile_time_eval():
        rng = np.random.default_rng(0)
        # scale first, then cast: numpy promotes a bfloat16 array times a float to float32
        inputs = [
            jax.device_put((0.1 * rng.standard_normal(a.shape)).astype(a.dtype)) for a in args
        ]
        compiled = {}
        for name, fn in candidates.items():
            try:
                exe = jax.jit(fn).lower(*args).compile()
                jax.block_until_ready(exe(*inputs))  # untimed warm-up
                compiled[name] = exe
            except Exception as error:  # a formulation that cannot run here is not a choice
                warnings.warn(
                    f"anode_jax autotune: candidate {name!r} failed ({type(error).__name__}: "
                    f"{error}); skipped.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        times: dict[str, list[float]] = {}
        for name, exe in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(exe(*inputs))
            times[name] = [time.perf_counter() - t]
        # A candidate over PRUNE_FACTOR× the fastest is not timed again (that run stands as
        # its time): it cannot win, and slow formulations of large layers take seconds per run.
        fastest = min((ts[0] for ts in times.values()), default=0.0)
        pruned = tuple(name for name, ts in times.items() if ts[0] > PRUNE_FACTOR * fastest)
        start = time.perf_counter()
        for _ in range(max(rounds, 1)):
            for name, exe in compiled.items():
                if name in pruned:
                    continue
                t = time.perf_counter()
                jax.block_until_ready(exe(*inputs))
                times[name].append(time.perf_counter() - t)
            if time.perf_counter() - start > budget_s:
                break
    result = Timings({name: min(ts) for name, ts in times.items()})
    result.pruned = pruned
    return result


def choose(
    kind: str,
    fields: Mapping[str, Any],
    candidates: Mapping[str, Callable[..., Any]],
    args: Sequence[jax.ShapeDtypeStruct],
    default: str,
    pin_env: str | None = None,
    inapplicable: Mapping[str, str] | None = None,
) -> str:
    """The formulation to use for one operation: pinned, cached, measured, or `default`.

    Args:
      kind: the operation's name (e.g. "conv_weight_gradient"), part of the cache key.
      fields: everything else the choice depends on (shapes, strides, dtype, precision, ...);
        must be JSON-serialisable. The backend and machine are added by the cache file.
      candidates: name -> function of `args` (concrete arrays) computing the operation; all
        must give the same result up to rounding.
      args: shapes and dtypes of the candidates' inputs.
      default: the choice when measuring is off or impossible (deterministic).
      pin_env: environment variable that, when set, pins the choice for every call (`auto`:
        no pin).
      inapplicable: formulations that exist but cannot compute this case, name -> why: a pin
        naming one falls back to `default`, with a RuntimeWarning (`"{pin_env}={name}: {why};
        ..."`) once per variable and process.

    Raises:
      ValueError: if the pin names no formulation, or `ANODE_JAX_AUTOTUNE` is invalid.
    """
    if pin_env:
        pinned = os.environ.get(pin_env, "").strip()
        inapplicable = inapplicable or {}
        if pinned in inapplicable:
            if pin_env not in _warned_pins:
                _warned_pins.add(pin_env)
                warnings.warn(
                    f"{pin_env}={pinned}: {inapplicable[pinned]}; they use the default "
                    f"formulation (this warning is shown once per variable).",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return default
        if pinned and pinned != "auto":  # "auto": no pin
            if pinned not in candidates:
                names = tuple(candidates) + tuple(inapplicable)
                raise ValueError(f"{pin_env} must be one of {names}, got {pinned!r}.")
            return pinned
    if len(candidates) == 1:
        return next(iter(candidates))
    current = mode()
    if current == "off":
        return default
    # the candidates are part of the key: a formulation that becomes available (an optional
    # extension built) is measured against the others, not ignored in favour of an old entry
    key = json.dumps(
        {"kind": kind, "candidates": sorted(candidates), **fields}, sort_keys=True, default=str
    )
    entry = lookup(key)
    if entry is not None and entry["choice"] in candidates:
        return entry["choice"]
    if current == "cache":
        return default
    seconds = measure(candidates, args)
    if not seconds:
        warnings.warn(
            f"anode_jax autotune: no candidate of {kind} could be timed; using {default!r}.",
            RuntimeWarning,
            stacklevel=2,
        )
        return default
    choice = min(seconds, key=seconds.get)
    entry = {
        "choice": choice,
        "seconds": dict(seconds),
        # timed once, after a warm-up: over PRUNE_FACTOR× the fastest (see `measure`)
        "pruned": sorted(getattr(seconds, "pruned", ())),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    with _lock:
        _memory[key] = entry
    _write(cache_path(), key, entry)
    return choice
