"""Tests of the optional oneDNN convolution custom calls (anode_jax.nn.onednn).

Skipped when the extension is not built (`scripts/build_onednn.sh`); the library never needs it.
Each pass (forward, input gradient, weight gradient) is compared in float32 with
`lax.conv_general_dilated` and its `jax.vjp` at 1e-4 relative to the largest entry of the
reference (both sum the same products in float32, in different orders). No timing here:
benchmarks/bench_onednn.py measures speed (docs/bench_onednn.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from anode_jax.nn import onednn

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
