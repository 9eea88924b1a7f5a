"""Strict settings for the whole suite.

- dtype promotion is strict: an accidental float32 × float64 mix raises instead of silently
  promoting (bfloat16 states must stay bfloat16).
- float64 only where a test compares gradients to round-off: request the `x64` fixture.
- Never the network: tensorflow-datasets is told to stay offline.
- The loop-safe convolution's autotuner neither measures nor touches the user's cache
  (`ANODE_JAX_AUTOTUNE=off`: its deterministic default rule); tests/test_autotune.py turns
  it on against a temporary cache directory.
"""

import os

os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), ".tfds_offline"))
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("MPLBACKEND", "Agg")  # headless: notebooks and plots never open windows
os.environ["ANODE_JAX_AUTOTUNE"] = "off"
os.environ.pop("ANODE_JAX_CONV_WEIGHT_GRADIENT", None)
os.environ.pop("ANODE_JAX_CONV_INPUT_GRADIENT", None)
os.environ.pop("ANODE_JAX_CONV_FORWARD", None)

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")

# `jax.jit(..., compiler_options=FAST_COMPILE)` for the large float64 programs whose test
# compares numbers (gradients vs "direct", two implementations of one model): XLA:CPU's
# compile time of such a program is mostly LLVM optimizing its machine code (2.5-3x less
# at level 0, measured on the NNX float64 strategy family). The level only sets LLVM's
# optimization: the optimized HLO is the same (checked on a sqnxt training step) and so is
# the IEEE arithmetic (no fast-math either way), so the compared values agree to round-off
# far below the tests' tolerances. Not for tests that time the program, and the layout
# guard (tests/test_loop_layout.py) compiles exactly as the trainer does.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture
def x64():
    """Runs the test with jax_enable_x64 (float64 arrays and time)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


class CompileCounter:
    """Counts XLA compilations (jax.monitoring's backend-compile event)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name, duration, **kwargs):
        if name == self.EVENT:
            self.count += 1

    def close(self):
        jax.monitoring.unregister_event_duration_listener(self._listen)


@pytest.fixture
def compilations():
    """A `CompileCounter` listening for the test's duration."""
    counter = CompileCounter()
    yield counter
    counter.close()


def tree_allclose(actual, expected, *, rtol, atol=0.0):
    """Asserts two pytrees have the same structure and allclose leaves."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), (
        jax.tree.structure(actual),
        jax.tree.structure(expected),
    )
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


@pytest.fixture
def measured_candidates(tmp_path, monkeypatch):
    """Autotuning on against a cache in `tmp_path`; yields the list of candidate-name tuples of
    every measurement made (each measured for real, one timed round)."""
    from anode_jax.nn import autotune

    monkeypatch.setenv("ANODE_JAX_AUTOTUNE", "on")
    monkeypatch.setenv("ANODE_JAX_AUTOTUNE_CACHE", str(tmp_path))
    autotune.clear_memory()
    real_measure, measured = autotune.measure, []

    def counting_measure(candidates, args):
        measured.append(tuple(candidates))
        return real_measure(candidates, args, rounds=1)

    monkeypatch.setattr(autotune, "measure", counting_measure)
    yield measured
    autotune.clear_memory()
