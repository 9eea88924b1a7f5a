"""Tests of the choice by measurement (anode_jax.nn.autotune) behind the loop-safe conv.

No timed assertions: the choice logic is tested with `measure` replaced by fixed timings;
the real `measure` is only checked to return a time per candidate that runs. Every cache
lives in pytest's temporary directory (never the user's cache). That every formulation gives
the same gradient as lax (float64, 1e-12) is tested in tests/test_conv.py
(`test_value_and_gradients_match_lax`, all weight- and input-gradient formulations).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from anode_jax.nn import autotune, conv_general_dilated

NHWC = ("NHWC", "HWIO", "NHWC")
ARGS = (jax.ShapeDtypeStruct((4,), jnp.float32),)
CANDIDATES = {"a": lambda x: x + 1, "b": lambda x: x * 2, "c": lambda x: x - 1}
FIELDS = {"shape": [4], "dtype": "float32"}


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    """Autotuning on, cache in a temporary directory, `measure` replaced by fixed timings."""
    monkeypatch.setenv("ANODE_JAX_AUTOTUNE", "on")
    monkeypatch.setenv("ANODE_JAX_AUTOTUNE_CACHE", str(tmp_path))
    calls = []

    def fake_measure(candidates, args):
        calls.append(tuple(candidates))
        return {k: v for k, v in {"a": 3e-3, "b": 1e-3, "c": 2e-3}.items() if k in candidates}

    monkeypatch.setattr(autotune, "measure", fake_measure)
    autotune.clear_memory()
    yield calls
    autotune.clear_memory()


def _choose(**kwargs):
    return autotune.choose("test_op", FIELDS, CANDIDATES, ARGS, default="c", **kwargs)


def test_miss_measures_picks_the_fastest_and_writes_the_cache(tuner, tmp_path):
    assert _choose() == "b"
    assert tuner == [("a", "b", "c")]
    files = list(tmp_path.glob("autotune-*.json"))
    assert [f.name for f in files] == [os.path.basename(autotune.cache_path())]
    data = json.loads(files[0].read_text())
    assert data["machine"] == json.loads(json.dumps(autotune.machine_key()))
    (entry,) = data["entries"].values()
    assert entry["choice"] == "b" and entry["seconds"] == {"a": 3e-3, "b": 1e-3, "c": 2e-3}


def test_hits_in_memory_then_on_disk_do_not_measure(tuner):
    assert _choose() == "b"
    assert _choose() == "b"  # memory
    autotune.clear_memory()
    assert _choose() == "b"  # disk
    assert len(tuner) == 1


def test_different_fields_are_different_entries(tuner):
    _choose()
    autotune.choose("test_op", {**FIELDS, "dtype": "float64"}, CANDIDATES, ARGS, default="c")
    autotune.choose("other_op", FIELDS, CANDIDATES, ARGS, default="c")
    assert len(tuner) == 3


def test_machine_key_decides_the_file(tuner, monkeypatch):
    path = autotune.cache_path()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
    assert autotune.cache_path() != path
    key = autotune.machine_key()
    for field in ("cpu_model", "cpu_flags", "avx512", "cpu_cores", "backend", "jax", "jaxlib"):
        assert field in key
    assert key["xla_flags"] == "--xla_cpu_use_thunk_runtime=true"


@pytest.mark.parametrize(
    "content", ["{not json", '{"entries": [1, 2]}', '{"machine": {}}', '{"entries": {"k": 3}}']
)
def test_corrupt_cache_file_warns_is_ignored_and_rewritten(tuner, content):
    path = autotune.cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content)
    if content == '{"entries": {"k": 3}}':  # well-formed file, malformed entry: dropped
        assert _choose() == "b"
    else:
        with pytest.warns(RuntimeWarning, match="unreadable"):
            assert _choose() == "b"
    assert len(tuner) == 1
    with open(path) as f:
        assert list(json.load(f)["entries"].values())[0]["choice"] == "b"


def test_cached_choice_that_is_no_longer_a_candidate_is_measured_again(tuner):
    _choose()
    autotune.clear_memory()
    fewer = {"a": CANDIDATES["a"], "c": CANDIDATES["c"]}
    assert autotune.choose("test_op", FIELDS, fewer, ARGS, default="c") == "c"
    assert len(tuner) == 2


def test_off_uses_the_default_without_measuring_or_touching_the_cache(tuner, tmp_path, monkeypatch):
    monkeypatch.setenv("ANODE_JAX_AUTOTUNE", "off")
    assert _choose() == "c"
    assert tuner == [] and list(tmp_path.iterdir()) == []


def test_cache_mode_reads_but_never_measures(tuner, monkeypatch):
    monkeypatch.setenv("ANODE_JAX_AUTOTUNE", "cache")
    assert _choose() == "c"  # miss: the default
    assert tuner == []
    monkeypatch.setenv("ANODE_JAX_AUTOTUNE", "on")
    assert _choose() == "b"
    autotune.clear_memory()
    monkeypatch.setenv("ANODE_JAX_AUTOTUNE", "cache")
    assert _choose() == "b"  # hit on disk
    assert len(tuner) == 1


def test_invalid_mode_and_pin_raise_naming_the_choices(tuner, monkeypatch):
    monkeypatch.setenv("ANODE_JAX_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match=r"ANODE_JAX_AUTOTUNE must be one of \('on', 'off'"):
        _choose()
    monkeypatch.setenv("ANODE_JAX_AUTOTUNE", "on")
    monkeypatch.setenv("TEST_PIN", "z")
    with pytest.raises(ValueError, match=r"TEST_PIN must be one of \('a', 'b', 'c'\)"):
        _choose(pin_env="TEST_PIN")


def test_pin_wins_without_measuring(tuner, monkeypatch):
    monkeypatch.setenv("TEST_PIN", "a")
    assert _choose(pin_env="TEST_PIN") == "a"
    assert tuner == []


def test_nothing_measurable_falls_back_to_the_default(tuner, monkeypatch):
    monkeypatch.setattr(autotune, "measure", lambda candidates, args: {})
    with pytest.warns(RuntimeWarning, match="no candidate"):
        assert _choose() == "c"


def test_real_measure_times_each_runnable_candidate_and_skips_a_failing_one():
    def broken(x):
        raise RuntimeError("cannot run here")

    with pytest.warns(RuntimeWarning, match="'broken' failed"):
        seconds = autotune.measure({**CANDIDATES, "broken": broken}, ARGS, rounds=2)
    assert set(seconds) == {"a", "b", "c"}
    assert all(s > 0 for s in seconds.values())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_real_measure_feeds_inputs_of_the_given_dtype(dtype, recwarn):
    args = (jax.ShapeDtypeStruct((3, 4), dtype),)
    seen = []

    def record(x):
        seen.append(x.dtype)
        return x * 2

    seconds = autotune.measure({"a": record, "b": lambda x: x + 1}, args, rounds=1)
    assert set(seconds) == {"a", "b"}  # neither failed on a dtype mismatch
    assert seen == [jnp.dtype(dtype)]
    assert not [w for w in recwarn if "failed" in str(w.message)]


def test_real_measure_runs_a_clearly_slower_candidate_only_once():
    # the callback sleeps 0.2 s: far beyond PRUNE_FACTOR × an add's microseconds
    import time

    calls = []

    def slow(x):
        def wait(a):
            calls.append(1)
            time.sleep(0.2)
            return a

        return jax.pure_callback(wait, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    seconds = autotune.measure({"a": CANDIDATES["a"], "slow": slow}, ARGS, rounds=3)
    assert len(calls) == 2  # the untimed warm-up and the one timed run
    assert seconds["slow"] >= 0.2 > autotune.PRUNE_FACTOR * seconds["a"]
    assert seconds.pruned == ("slow",)


def test_real_measure_does_not_hold_one_time_work_against_a_candidate():
    # slow on its first call only (as a library that builds its kernel on first use): the
    # untimed warm-up absorbs it, so the candidate is timed in every round, not pruned
    import time

    calls = []

    def first_call_slow(x):
        def work(a):
            calls.append(1)
            if len(calls) == 1:
                time.sleep(0.2)
            return a

        return jax.pure_callback(work, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    def plain(x):  # the same host callback without the one-time work, for a like comparison
        return jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    seconds = autotune.measure({"plain": plain, "once": first_call_slow}, ARGS, rounds=3)
    assert seconds.pruned == () and len(calls) == 2 + 3
    assert seconds["once"] < 0.2


def test_pruned_candidates_are_recorded_and_auto_is_no_pin(tuner, monkeypatch):
    def pruning_measure(candidates, args):
        timings = autotune.Timings({"a": 3e-3, "b": 1e-3, "c": 9e-3})
        timings.pruned = ("c",)
        return timings

    monkeypatch.setattr(autotune, "measure", pruning_measure)
    monkeypatch.setenv("TEST_PIN", "auto")
    assert _choose(pin_env="TEST_PIN") == "b"
    with open(autotune.cache_path()) as f:
        (entry,) = json.load(f)["entries"].values()
    assert entry["pruned"] == ["c"] and entry["seconds"]["c"] == 9e-3


# ------------------------------------------------------------------------------------------
# Through the convolution: measuring at trace time, under jit and inside scan.


def _conv(x, w, **kwargs):
    return conv_general_dilated(x, w, (1, 1), "SAME", None, None, NHWC, **kwargs)


def test_conv_measures_once_per_shape_at_trace_time_under_jit_and_scan(
    tmp_path, measured_candidates, x64
):
    measured = measured_candidates
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 5, 3)))
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)))

    def loss(conv, w, x):
        def body(total, s):
            return total + jnp.sum(jnp.tanh(conv(x * s, w))), None

        return lax.scan(body, jnp.zeros(()), jnp.linspace(1.0, 0.5, 3))[0]

    grads = jax.jit(jax.grad(lambda w, x: loss(_conv, w, x), argnums=(0, 1)))(w, x)
    assert sorted(measured) == [("conv", "taps"), ("conv", "taps", "gemm")]
    expected = jax.grad(
        lambda w, x: loss(
            lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", None, None, NHWC), w, x
        ),
        argnums=(0, 1),
    )(w, x)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-12 * float(jnp.max(jnp.abs(e))))
    # a new trace of the same shape (another function, another process) measures nothing
    autotune.clear_memory()
    jax.jit(jax.grad(lambda w, x: jnp.sum(_conv(x, w) ** 2)))(w, x)
    assert len(measured) == 2
    (path,) = tmp_path.glob("autotune-*.json")
    kinds = sorted(json.loads(k)["kind"] for k in json.loads(path.read_text())["entries"])
    assert kinds == ["conv_input_gradient", "conv_weight_gradient"]


def test_conv_pins_from_the_environment_and_rejects_unknown_ones(monkeypatch, x64):
    monkeypatch.setenv("ANODE_JAX_AUTOTUNE", "on")
    monkeypatch.setenv("ANODE_JAX_CONV_WEIGHT_GRADIENT", "gemm")
    monkeypatch.setenv("ANODE_JAX_CONV_INPUT_GRADIENT", "taps")
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured"))
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    jax.grad(lambda w: jnp.sum(_conv(x, w) ** 2))(w)
    monkeypatch.setenv("ANODE_JAX_CONV_WEIGHT_GRADIENT", "im2col")
    with pytest.raises(ValueError, match=r"ANODE_JAX_CONV_WEIGHT_GRADIENT must be one of"):
        jax.grad(lambda w: jnp.sum(_conv(x, w) ** 2))(w)
