"""Tests of the optional oneDNN convolution custom calls (anode_jax.nn.onednn).

Skipped when the extension is not built (`scripts/build_onednn.sh`); the library never needs it.
Each pass (forward, input gradient, weight gradient) is compared in float32 with
`lax.conv_general_dilated` and its `jax.vjp` at 1e-4 relative to the largest entry of the
reference (both sum the same products in float32, in different orders). No timing here:
benchmarks/bench_onednn.py measures speed (docs/bench_onednn.md).
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from anode_jax.nn import conv_general_dilated, onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason=str(onednn.unavailable_reason()))

RTOL = 1e-4
NHWC = ("NHWC", "HWIO", "NHWC")

# (id, x shape NHWC, w shape HWIO, strides, padding)
CASES = [
    ("3x3-same", (2, 9, 8, 6), (3, 3, 6, 4), (1, 1), "SAME"),
    ("3x3-same-stride2", (2, 9, 8, 6), (3, 3, 6, 4), (2, 2), "SAME"),
    ("3x3-same-stride2-even", (3, 16, 16, 8), (3, 3, 8, 16), (2, 2), "SAME"),
    ("3x3-explicit-asymmetric", (2, 9, 7, 3), (3, 3, 3, 5), (2, 1), ((1, 0), (2, 1))),
    ("1x1-valid-stride2", (2, 8, 8, 4), (1, 1, 4, 6), (2, 2), "VALID"),
    ("3x1-valid", (2, 7, 8, 6), (3, 1, 6, 4), (1, 1), "VALID"),
    ("5x5-pad2", (2, 10, 10, 3), (5, 5, 3, 7), (1, 1), ((2, 2), (2, 2))),
]


def _operands(x_shape, w_shape, strides, padding, seed=0):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, x_shape, jnp.float32)
    w = jax.random.normal(kw, w_shape, jnp.float32)
    y = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
    g = jax.random.normal(kg, y.shape, jnp.float32)
    return x, w, g


def _close(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_pass_matches_lax(case):
    _, x_shape, w_shape, strides, padding = case
    x, w, g = _operands(x_shape, w_shape, strides, padding)

    def reference(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)

    y, vjp = jax.vjp(reference, x, w)
    dx, dw = vjp(g)
    _close(jax.jit(lambda x, w: onednn.conv_forward(x, w, strides, padding))(x, w), y)
    _close(onednn.conv_input_grad(g, w, x.shape, strides, padding), dx)
    _close(onednn.conv_weight_grad(x, g, w.shape, strides, padding), dw)
    # the differentiable wrapper: value and vjp
    y_1, vjp_1 = jax.vjp(lambda x, w: onednn.conv(x, w, strides, padding), x, w)
    _close(y_1, y)
    for got, want in zip(vjp_1(g), (dx, dw)):
        _close(got, want)


def _scan_loss(conv, ws, g):
    def loss(x, ws):
        h, _ = lax.scan(lambda h, w: (jnp.tanh(conv(h, w)), None), x, ws)
        return jnp.vdot(h, g)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def test_gradient_through_scan_matches_lax():
    """Inside a loop body (where XLA:CPU's own transposed convolutions are slow)."""
    x_shape, w_shape = (2, 8, 8, 4), (3, 3, 4, 4)
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(kx, x_shape, jnp.float32)
    ws = 0.3 * jax.random.normal(kw, (3, *w_shape), jnp.float32)
    g = jax.random.normal(kg, x_shape, jnp.float32)
    want = _scan_loss(
        lambda h, w: lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=NHWC), ws, g
    )(x, ws)
    got = _scan_loss(lambda h, w: onednn.conv(h, w, (1, 1), "SAME"), ws, g)(x, ws)
    for a, b in zip(got, want):
        _close(a, b)


def test_vmap_matches_lax():
    """vmap runs one custom call per mapped element (vmap_method="sequential")."""
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 2, 6, 6, 4), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(5), (3, 3, 3, 4, 5), jnp.float32)
    got = jax.vmap(lambda x, w: onednn.conv(x, w, (1, 1), "SAME"))(x, w)
    want = jax.vmap(
        lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    )(x, w)
    _close(got, want)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, w: onednn.conv_forward(x.astype(jnp.bfloat16), w, (1, 1), "SAME"), "float32"),
        (lambda x, w: onednn.conv_forward(x[0], w, (1, 1), "SAME"), "rank 4"),
        (lambda x, w: onednn.conv_forward(x, w[:, :, :2], (1, 1), "SAME"), "channels"),
        (lambda x, w: onednn.conv_forward(x, w, (1,), "SAME"), "window_strides"),
        (lambda x, w: onednn.conv_forward(x, w, (1, 1), "FULL"), "padding"),
        (lambda x, w: onednn.conv_forward(x, w, (1, 1), ((1, 1),)), "padding"),
    ],
)
def test_bad_inputs_raise(call, match):
    x = jnp.zeros((1, 5, 5, 3), jnp.float32)
    w = jnp.zeros((3, 3, 3, 2), jnp.float32)
    with pytest.raises(ValueError, match=match):
        call(x, w)


def test_concurrent_calls_match_lax():
    """Many calls dispatched without waiting (XLA may run them on several threads: each thread
    has its own oneDNN scratchpad) and every cached primitive called again (4 times per case:
    the 1×1 stride-2 weight gradient once went wrong from its second call on)."""
    cases = CASES * 4
    operands = [_operands(*case[1:], seed=i) for i, case in enumerate(cases)]
    results = [
        (
            onednn.conv_forward(x, w, st, pad),
            onednn.conv_input_grad(g, w, x.shape, st, pad),
            onednn.conv_weight_grad(x, g, w.shape, st, pad),
        )
        for (_, _, _, st, pad), (x, w, g) in zip(cases, operands)
    ]
    for (_, _, _, st, pad), (x, w, g), got in zip(cases, operands, results):
        y, vjp = jax.vjp(
            lambda x, w: lax.conv_general_dilated(x, w, st, pad, dimension_numbers=NHWC), x, w
        )
        for a, b in zip(got, (y, *vjp(g))):
            _close(a, b)


# ------------------------------------------------------------------------------------------
# As a formulation of the loop-safe convolution (what the models use): forward, input and
# weight gradient each on oneDNN or on XLA, first and second reverse-mode derivatives, in a
# loop, and chosen by the autotuner.

ROUTES = {
    "all-onednn": dict(forward="onednn", input_gradient="onednn", weight_gradient="onednn"),
    "forward-only": dict(forward="onednn", input_gradient="conv", weight_gradient="taps"),
    "gradients-only": dict(forward="xla", input_gradient="onednn", weight_gradient="onednn"),
}
# (id, x shape, w shape, strides, padding, dimension numbers)
LOOP_SAFE_CASES = [
    ("3x3-same-stride2", (2, 9, 8, 6), (3, 3, 6, 4), (2, 2), "SAME", NHWC),
    ("1x1-valid-stride2", (2, 8, 8, 4), (1, 1, 4, 6), (2, 2), "VALID", NHWC),
    ("3x3-on-2x2", (2, 2, 2, 4), (3, 3, 4, 5), (1, 1), "SAME", NHWC),
    ("nchw-oihw", (2, 6, 9, 8), (4, 6, 3, 3), (2, 1), "SAME", ("NCHW", "OIHW", "NCHW")),
]


def _loop_safe(case, **kwargs):
    _, _, _, strides, padding, dnums = case

    def conv(x, w):
        return conv_general_dilated(x, w, strides, padding, dimension_numbers=dnums, **kwargs)

    return conv


def _lax(case):
    _, _, _, strides, padding, dnums = case
    return lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dnums)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", LOOP_SAFE_CASES, ids=[c[0] for c in LOOP_SAFE_CASES])
def test_loop_safe_conv_on_onednn_matches_lax_to_second_order(case, route):
    kx, kw = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(kx, case[1], jnp.float32)
    w = jax.random.normal(kw, case[2], jnp.float32)

    def first(conv):
        return jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1))

    def second(conv):  # the input gradient's norm, differentiated again in (x, w)
        def inner(x, w):
            return jnp.sum(jax.grad(lambda x: jnp.sum(jnp.sin(conv(x, w))))(x) ** 2)

        return jax.grad(inner, argnums=(0, 1))

    conv, reference = _loop_safe(case, **ROUTES[route]), _lax(case)
    (value, grads), (value_ref, grads_ref) = jax.jit(first(conv))(x, w), first(reference)(x, w)
    _close(value, value_ref)
    for got, want in zip(grads, grads_ref):
        _close(got, want)
    for got, want in zip(jax.jit(second(conv))(x, w), second(reference)(x, w)):
        _close(got, want)


def test_loop_safe_conv_on_onednn_inside_scan_and_checkpointed_solver_matches_lax():
    from anode_jax.ode import odeint

    case = LOOP_SAFE_CASES[0][:1] + ((2, 8, 8, 4), (3, 3, 4, 4), (1, 1), "SAME", NHWC)
    kx, kw = jax.random.split(jax.random.PRNGKey(2))
    x = jax.random.normal(kx, case[1], jnp.float32)
    w = 0.2 * jax.random.normal(kw, case[2], jnp.float32)

    def loss(conv, adjoint, unroll=None):
        def field(t, y, w):
            return jnp.tanh(conv(y, w))

        def solve(w, x):
            return odeint(field, x, w, num_steps=6, adjoint=adjoint, unroll=unroll)

        return lambda w, x: jnp.sum(solve(w, x) ** 2)

    reference = jax.grad(loss(_lax(case), "direct", unroll=True), argnums=(0, 1))(w, x)
    for adjoint in ("anode", "checkpointed:2"):
        grads = jax.jit(jax.grad(loss(_loop_safe(case, **ROUTES["all-onednn"]), adjoint), (0, 1)))(
            w, x
        )
        for got, want in zip(grads, reference):
            _close(got, want)


def test_autotuner_measures_onednn_and_keys_the_cache_by_the_build(tmp_path, measured_candidates):
    measured = measured_candidates
    case = LOOP_SAFE_CASES[0]
    x, w = jnp.ones(case[1], jnp.float32), jnp.ones(case[2], jnp.float32)
    conv = _loop_safe(case)
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))(x, w)
    grads_ref = jax.grad(lambda x, w: jnp.sum(_lax(case)(x, w) ** 2), argnums=(0, 1))(x, w)
    for got, want in zip(grads, grads_ref):
        _close(got, want)
    assert sorted(measured) == sorted(
        [("xla", "onednn"), ("conv", "taps", "onednn"), ("conv", "taps", "gemm", "onednn")]
    )
    (path,) = tmp_path.glob("autotune-*.json")
    keys = [json.loads(k) for k in json.loads(path.read_text())["entries"]]
    assert sorted(k["kind"] for k in keys) == [
        "conv_forward",
        "conv_input_gradient",
        "conv_weight_gradient",
    ]
    assert all(k["onednn"] == onednn.build_id() and "onednn" in k["candidates"] for k in keys)


def test_not_offered_when_several_devices_are_visible(tmp_path):
    # The custom calls have no partitioning rule: under a sharded jit XLA would gather their
    # operands onto every device. With several devices oneDNN is no candidate: asked for, a
    # ValueError with the reason; pinned, the XLA formulations (same values as lax).
    script = tmp_path / "devices.py"
    script.write_text(
        "import os\n"
        "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'\n"
        "os.environ['ANODE_JAX_AUTOTUNE'] = 'off'\n"
        "os.environ['ANODE_JAX_CONV_FORWARD'] = 'onednn'\n"
        "import jax, jax.numpy as jnp, numpy as np\n"
        "from jax import lax\n"
        "from anode_jax.nn import conv_general_dilated\n"
        "dn = ('NHWC', 'HWIO', 'NHWC')\n"
        "x, w = jnp.ones((4, 6, 6, 3)), jnp.ones((3, 3, 3, 2))\n"
        "try:\n"
        "    conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=dn, forward='onednn')\n"
        "except ValueError as e:\n"
        "    print('raised:', e)\n"
        "y = jax.jit(lambda x, w: conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=dn))\n"
        "text = y.lower(x, w).compile().as_text()\n"
        "print('custom calls:', text.count('anode_onednn_conv'))\n"
        "ref = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=dn)\n"
        "print('max diff:', float(jnp.max(jnp.abs(y(x, w) - ref))))\n"
    )
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True
    )
    out = run.stdout
    # the pin's fallback is announced once
    assert run.stderr.count("ANODE_JAX_CONV_FORWARD=onednn: oneDNN cannot compute") == 1
    assert "raised: forward='onednn': oneDNN cannot compute this convolution" in out
    assert "4 devices are visible" in out
    assert "custom calls: 0" in out
    assert "max diff: 0.0" in out


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "True PASSIVE"),  # spinning OpenMP threads took XLA's cores: passive by default
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "True ACTIVE"),  # a value the user set is kept
        ({"ANODE_JAX_ONEDNN": "0"}, "False the oneDNN extension is switched off"),
    ],
)
def test_loading_sets_a_passive_openmp_wait_policy_and_can_be_switched_off(env, expected):
    import os

    code = (
        "import os\n"
        "from anode_jax.nn import onednn\n"
        "ok = onednn.available()\n"
        "print(ok, os.environ.get('OMP_WAIT_POLICY') if ok else onednn.unavailable_reason())\n"
    )
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY",)}
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True
    ).stdout
    assert out.startswith(expected)
