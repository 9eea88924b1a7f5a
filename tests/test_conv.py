"""Tests of anode_jax.nn.conv_general_dilated (the loop-safe convolution) and its checker.

Tolerances: value, first and second reverse-mode derivatives are compared with
``lax.conv_general_dilated`` in float64 at 1e-12 relative to the largest entry of the
reference (the two differ only in summation order). Layout checks read the compiled CPU
program (``noncanonical_convs``) and run in float32, the dtype XLA:CPU's fast kernel takes.
No timing here: speed is measured in benchmarks/bench_conv.py (docs/bench_conv.md).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from anode_jax.nn import (
    INPUT_GRADIENT_METHODS,
    WEIGHT_GRADIENT_METHODS,
    conv_general_dilated,
    is_canonical_conv,
    noncanonical_convs,
    weight_gradient_method,
)
from tests.conftest import FAST_COMPILE

RTOL = 1e-12
NHWC = ("NHWC", "HWIO", "NHWC")

# (id, lhs shape, rhs shape, strides, padding, lhs_dilation, rhs_dilation, dnums, groups)
CASES = [
    ("3x3-same", (2, 9, 8, 6), (3, 3, 6, 4), (1, 1), "SAME", None, None, NHWC, 1),
    ("3x3-stride2", (2, 9, 8, 6), (3, 3, 6, 4), (2, 2), "SAME", None, None, NHWC, 1),
    ("1x3", (2, 7, 8, 6), (1, 3, 6, 4), (1, 1), "SAME", None, None, NHWC, 1),
    ("3x1", (2, 7, 8, 6), (3, 1, 6, 4), (1, 1), "SAME", None, None, NHWC, 1),
    ("1x1-stride2", (2, 7, 8, 6), (1, 1, 6, 5), (2, 2), "VALID", None, None, NHWC, 1),
    ("valid-stride12-grouped", (2, 9, 8, 6), (1, 3, 3, 4), (1, 2), "VALID", None, None, NHWC, 2),
    (
        "explicit-negative",
        (2, 9, 8, 6),
        (3, 1, 6, 6),
        (1, 1),
        ((1, 2), (0, -1)),
        None,
        (2, 1),
        NHWC,
        1,
    ),
    (
        "depthwise-dilated",
        (2, 9, 8, 6),
        (3, 3, 1, 6),
        (2, 1),
        ((1, 1), (2, 0)),
        (2, 1),
        (1, 2),
        NHWC,
        6,
    ),
    (
        "nchw-oihw",
        (2, 6, 9, 8),
        (4, 6, 3, 3),
        (2, 1),
        "SAME",
        None,
        None,
        ("NCHW", "OIHW", "NCHW"),
        1,
    ),
    (
        "mixed-layout",
        (9, 2, 8, 6),
        (3, 6, 3, 4),
        (1, 1),
        "SAME_LOWER",
        None,
        None,
        ("HNWC", "HIWO", "NCHW"),
        1,
    ),
    ("1d", (2, 11, 3), (3, 3, 4), (2,), "SAME", None, None, ("NWC", "WIO", "NWC"), 1),
    # windows with more taps than the map has pixels (XLA would swap the operands)
    ("3x3-on-1x1", (2, 1, 1, 4), (3, 3, 4, 5), (1, 1), "SAME", None, None, NHWC, 1),
    ("3x3-stride2-on-2x1", (2, 2, 1, 4), (3, 3, 4, 5), (2, 1), "SAME", None, None, NHWC, 1),
]


def _normal(seed, shape, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def _apply(conv, case, x, w, **kwargs):
    _, _, _, strides, padding, lhs_dil, rhs_dil, dnums, groups = case
    return conv(x, w, strides, padding, lhs_dil, rhs_dil, dnums, groups, **kwargs)


# The XLA formulations (any dtype); oneDNN's (float32 only, optional extension) are tested
# against lax in tests/test_onednn_conv.py.
XLA_INPUT_METHODS = tuple(m for m in INPUT_GRADIENT_METHODS if m != "onednn")
XLA_WEIGHT_METHODS = tuple(m for m in WEIGHT_GRADIENT_METHODS if m != "onednn")


@pytest.mark.parametrize("input_method", XLA_INPUT_METHODS)
@pytest.mark.parametrize("method", XLA_WEIGHT_METHODS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_value_and_gradients_match_lax(x64, case, method, input_method):
    # every XLA formulation of both gradients (candidates the autotuner chooses among)
    x, w = _normal(0, case[1]), _normal(1, case[2])
    y_ref, vjp_ref = jax.vjp(lambda x, w: _apply(lax.conv_general_dilated, case, x, w), x, w)
    kwargs = dict(weight_gradient=method, input_gradient=input_method)
    y, vjp = jax.vjp(lambda x, w: _apply(conv_general_dilated, case, x, w, **kwargs), x, w)
    _close(y, y_ref)
    ct = _normal(2, y_ref.shape)
    for got, want in zip(vjp(ct), vjp_ref(ct)):
        _close(got, want)


@pytest.mark.parametrize("method", ("conv", "taps", "gemm"))
@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[7]], ids=lambda c: c[0])
def test_second_order_reverse_mode_matches_lax(x64, case, method):
    input_method = "taps" if method == "gemm" else "conv"
    x, w = _normal(0, case[1]), _normal(1, case[2])

    def outer(conv, **kwargs):
        def inner(x, w):  # a scalar of the input gradient, differentiated again in (x, w)
            gx = jax.grad(lambda x: jnp.sum(jnp.sin(_apply(conv, case, x, w, **kwargs))))(x)
            return jnp.sum(gx**2)

        return jax.grad(inner, argnums=(0, 1))(x, w)

    for got, want in zip(
        outer(conv_general_dilated, weight_gradient=method, input_gradient=input_method),
        outer(lax.conv_general_dilated),
    ):
        _close(got, want)


def test_jit_and_vmap_match_lax(x64):
    case = CASES[1]
    xs, w = _normal(0, (3,) + case[1]), _normal(1, case[2])

    def loss(conv):
        return lambda w, x: jnp.sum(jnp.tanh(_apply(conv, case, x, w)))

    def batched(conv):
        return jax.jit(jax.vmap(jax.value_and_grad(loss(conv), argnums=(0, 1)), (None, 0)))

    (v, (gw, gx)), (v_ref, (gw_ref, gx_ref)) = (
        batched(conv_general_dilated)(w, xs),
        batched(lax.conv_general_dilated)(w, xs),
    )
    for got, want in ((v, v_ref), (gw, gw_ref), (gx, gx_ref)):
        _close(got, want)
    # vmap over the kernel too (lax batches it into feature groups)
    ws = _normal(3, (2,) + case[2])
    y = jax.vmap(lambda w: _apply(conv_general_dilated, case, xs[0], w))(ws)
    y_ref = jax.vmap(lambda w: _apply(lax.conv_general_dilated, case, xs[0], w))(ws)
    _close(y, y_ref)


def test_forward_mode_raises_a_clear_error():
    case = CASES[0]
    x, w = _normal(0, case[1], jnp.float32), _normal(1, case[2], jnp.float32)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: _apply(conv_general_dilated, case, x, w), (x,), (x,))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_group_count=2), "batch_group_count"),
        (dict(preferred_element_type=jnp.float32), "preferred_element_type"),
        (dict(weight_gradient="im2col"), r"weight_gradient must be one of \('auto'"),
        (dict(input_gradient="fft"), r"input_gradient must be one of \('auto', 'conv', 'taps'"),
        (dict(forward="mkl"), r"forward must be one of \('auto', 'xla', 'onednn'\)"),
        (dict(padding="SAM"), r"padding must be 'SAME', 'VALID', 'SAME_LOWER' or a sequence"),
        (dict(dimension_numbers=None), r"lhs has 8 input features but rhs expects 3 per group"),
        (dict(lhs_dilation=(2, 2)), "string padding"),
        (dict(window_strides=(1,)), "window_strides must have 2 entries"),
    ],
)
def test_unsupported_arguments_raise(kwargs, message):
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    arguments = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        conv_general_dilated(x, w, **arguments)


@pytest.mark.filterwarnings("ignore:ANODE_JAX_CONV_.*=onednn")  # once per process: asserted
# in tests/test_onednn_conv.py's subprocess
@pytest.mark.parametrize("option", ["forward", "input_gradient", "weight_gradient"])
def test_onednn_where_it_cannot_compute_raises_or_falls_back(x64, option, monkeypatch):
    # float64: oneDNN cannot (and without the optional build it cannot anywhere). Asked for
    # per call: a ValueError with the reason and the valid choices. Pinned for every call:
    # the default formulation, same values as lax.
    case = CASES[1]
    x, w = _normal(0, case[1]), _normal(1, case[2])
    with pytest.raises(ValueError, match=r"oneDNN cannot compute this convolution \(.+\); use"):
        _apply(conv_general_dilated, case, x, w, **{option: "onednn"})
    pins = {
        "forward": "ANODE_JAX_CONV_FORWARD",
        "input_gradient": "ANODE_JAX_CONV_INPUT_GRADIENT",
        "weight_gradient": "ANODE_JAX_CONV_WEIGHT_GRADIENT",
    }
    monkeypatch.setenv(pins[option], "onednn")  # pins apply in every autotune mode
    y, vjp = jax.vjp(lambda x, w: _apply(conv_general_dilated, case, x, w), x, w)
    y_ref, vjp_ref = jax.vjp(lambda x, w: _apply(lax.conv_general_dilated, case, x, w), x, w)
    _close(y, y_ref)
    for got, want in zip(vjp(y_ref), vjp_ref(y_ref)):
        _close(got, want)


def test_flax_conv_with_loop_safe_conv_matches_default(x64):
    x = _normal(0, (2, 8, 8, 3))
    plain = nn.Conv(5, (3, 3), strides=(2, 2), padding="SAME", param_dtype=jnp.float64)
    safe = nn.Conv(
        5,
        (3, 3),
        strides=(2, 2),
        padding="SAME",
        param_dtype=jnp.float64,
        conv_general_dilated=conv_general_dilated,
    )
    variables = plain.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(safe.init(jax.random.PRNGKey(0), x))
    _close(safe.apply(variables, x), plain.apply(variables, x))


# ------------------------------------------------------------------------------------------
# Layout of the compiled program inside loops.


def _scanned_gradient_hlo(conv, case):
    x, w = _normal(0, case[1], jnp.float32), _normal(1, case[2], jnp.float32)

    def loss(w, x):
        def body(scale, _):  # the convolution and its gradient live in the while body
            return scale * 0.5, jnp.sum(jnp.tanh(_apply(conv, case, x * scale, w)))

        return jnp.sum(lax.scan(body, jnp.float32(1.0), None, length=3)[1])

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, x).compile().as_text()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gradient_inside_scan_has_only_canonical_convs(case):
    text = _scanned_gradient_hlo(conv_general_dilated, case)
    assert " while(" in text and " convolution(" in text
    assert noncanonical_convs(text) == []


def test_checker_flags_lax_convs_in_loops_but_not_in_entry():
    case = CASES[1]
    looped = noncanonical_convs(_scanned_gradient_hlo(lax.conv_general_dilated, case))
    assert looped and all("dim_labels=" in line for line in looped)
    x, w = _normal(0, case[1], jnp.float32), _normal(1, case[2], jnp.float32)
    text = (
        jax.jit(jax.grad(lambda w: jnp.sum(_apply(lax.conv_general_dilated, case, x, w))))
        .lower(w)
        .compile()
        .as_text()
    )
    assert noncanonical_convs(text) == []  # no loop; XLA canonicalized the entry itself


def test_is_canonical_conv_reads_dim_labels_and_reversal():
    base = "%c = f32[2,8,8,4]{3,2,1,0} convolution(%a, %b), window={size=3x3 pad=1_1x1_1}, "
    assert is_canonical_conv(base + "dim_labels=b01f_01io->b01f")
    assert is_canonical_conv(base.replace("3x3", "3") + "dim_labels=b0f_0io->b0f")
    assert not is_canonical_conv(base + "dim_labels=b01f_01oi->b01f")
    assert not is_canonical_conv(base + "dim_labels=f01b_i01o->01bf")
    assert not is_canonical_conv(base + "dim_labels=b10f_01io->b01f")
    reversed_window = base.replace("pad=1_1x1_1", "pad=1_1x1_1 rhs_reversal=1x1")
    assert not is_canonical_conv(reversed_window + "dim_labels=b01f_01io->b01f")
    hlo = (
        "%body (p: f32[]) -> f32[] {\n  %y = " + base + "dim_labels=b01f_01oi->b01f\n}\n\n"
        "ENTRY %main (p: f32[]) -> f32[] {\n  %z = " + base + "dim_labels=f01b_i01o->01bf\n"
        "  %w = f32[] while(%p), condition=%cond, body=%body\n}\n"
    )
    assert len(noncanonical_convs(hlo)) == 1
    assert len(noncanonical_convs(hlo, include_entry=True)) == 2


def test_nn_package_imports_no_flax():
    import ast
    import pathlib

    import anode_jax.nn

    for path in pathlib.Path(anode_jax.nn.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n.split(".")[0] == "flax"], path


def test_weight_gradient_method_rule():
    # per-tap products for ≤ 3 taps or from 64·64 channels per group; one convolution else
    assert weight_gradient_method((128, 32, 32, 8), (1, 3, 8, 16), (128, 32, 32, 16)) == "taps"
    assert weight_gradient_method((128, 32, 32, 32), (1, 1, 32, 16), (128, 32, 32, 16)) == "taps"
    assert weight_gradient_method((128, 8, 8, 256), (1, 1, 256, 256), (128, 8, 8, 256)) == "taps"
    assert weight_gradient_method((128, 32, 32, 64), (3, 3, 64, 64), (128, 32, 32, 64)) == "taps"
    assert weight_gradient_method((128, 4, 4, 512), (3, 3, 512, 512), (128, 4, 4, 512)) == "taps"
    assert weight_gradient_method((128, 32, 32, 32), (3, 3, 32, 32), (128, 32, 32, 32)) == "conv"
    assert weight_gradient_method((128, 8, 8, 64), (3, 3, 16, 64), (128, 8, 8, 64), 4) == "conv"


# ------------------------------------------------------------------------------------------
# The models' switch (create_model(conv=...)).


def test_create_model_rejects_unknown_conv():
    from anode_jax.models import CONV_NAMES, create_model

    assert CONV_NAMES == ("loop_safe", "lax")
    with pytest.raises(ValueError, match=r"conv must be one of \('loop_safe', 'lax'\)"):
        create_model("small", conv="eigen")
    with pytest.raises(ValueError, match="unroll"):
        create_model("small", unroll="yes")


@pytest.mark.slow
@pytest.mark.parametrize("name", ("resnet", "sqnxt"))
def test_models_have_the_same_parameters_outputs_and_gradients_with_either_conv(x64, name):
    # float64 (parameters cast after init): the two convolutions differ only in summation
    # order, but batch-2 BatchNorm on 1×1 maps amplifies float32 round-off to ~1e-3 relative.
    import optax

    from anode_jax.models import create_model

    x = _normal(0, (2, 8, 8, 3))
    y = jnp.array([1, 3], jnp.int32)
    models = {
        conv: create_model(name, width=0.125, num_steps=2, adjoint="direct", conv=conv)
        for conv in ("loop_safe", "lax")
    }
    # One program per model, not an op-by-op eager init (measured on resnet: 40 s of CPU
    # eager, 6 s jitted); both draw their parameters with the same operations, so they must
    # still be bitwise equal.
    init = {
        c: jax.jit(m.init, compiler_options=FAST_COMPILE)(
            {"params": jax.random.PRNGKey(0)}, x.astype(jnp.float32)
        )
        for c, m in models.items()
    }
    assert jax.tree.structure(init["loop_safe"]) == jax.tree.structure(init["lax"])
    for a, b in zip(jax.tree.leaves(init["loop_safe"]), jax.tree.leaves(init["lax"])):
        np.testing.assert_array_equal(a, b)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), init["lax"])

    def loss(model):
        def f(params):
            logits, _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        return jax.jit(jax.grad(f, has_aux=True), compiler_options=FAST_COMPILE)

    (g_safe, out_safe), (g_lax, out_lax) = (
        loss(models["loop_safe"])(variables["params"]),
        loss(models["lax"])(variables["params"]),
    )
    _close(out_safe, out_lax, rtol=1e-10)
    # Relative to the model's largest gradient entry: some leaves (e.g. biases followed by
    # BatchNorm) are zero up to round-off (1e-17), where a per-leaf scale would demand bitwise
    # equality of the round-off.
    scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(g_lax))
    for a, b in zip(jax.tree.leaves(g_safe), jax.tree.leaves(g_lax)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-10 * scale)
