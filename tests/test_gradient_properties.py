"""Gradient properties every exact strategy must have away from the easy case t0 = 0, t1 > t0.

Each exact strategy ("direct", "anode", "checkpointed:K" for several K, "reversible" with each
reversible solver), looped and unrolled, on a time-dependent field in float64, on intervals that
start away from zero and that run backwards in time (t1 < t0). The gradient is compared with
"direct" (to round-off) and with central finite differences of the forward solve (to the
truncation error of the difference quotient). A strategy that evaluates the vector field at the
wrong times in its backward pass (e.g. t_n - t0 instead of t_n) fails both.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anode_jax import odeint
from tests._ode_problems import smooth_field, smooth_problem
from tests.conftest import tree_allclose

# (t0, t1): forwards from a non-zero start, backwards across zero.
INTERVALS = [(0.2, 1.3), (1.0, -0.5)]
RUNGE_KUTTA_STRATEGIES = [
    "anode",
    "checkpointed:1",
    "checkpointed:2",
    "checkpointed:3",
    "checkpointed:8",
]
REVERSIBLE_SOLVERS = ["reversible:rk4", "reversible_heun", "alf"]
NUM_STEPS = 4


def _loss(t0, t1, num_steps, solver, adjoint, unroll):
    def loss(y0, args):
        y1 = odeint(
            smooth_field,
            y0,
            args,
            t0=t0,
            t1=t1,
            num_steps=num_steps,
            solver=solver,
            adjoint=adjoint,
            unroll=unroll,
        )
        return sum(jnp.sum(jnp.sin(leaf) * leaf) for leaf in jax.tree.leaves(y1))

    return loss


@functools.cache  # "direct" is the reference of many tests: compile it once per problem
def _grad(t0, t1, num_steps, solver, adjoint, unroll):
    y0, args = smooth_problem(jax.random.PRNGKey(11))
    loss = _loss(t0, t1, num_steps, solver, adjoint, unroll)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(y0, args)


@functools.cache
def _finite_difference_directional(t0, t1, num_steps, solver, num_directions=3, eps=1e-5):
    """[(direction, central difference of the loss along it)]: strategy-independent (the
    forward solve is the same for every strategy), computed once per problem."""
    with jax.enable_x64(True):
        y0, args = smooth_problem(jax.random.PRNGKey(11))
        loss = jax.jit(_loss(t0, t1, num_steps, solver, "direct", False))
        leaves, treedef = jax.tree.flatten((y0, args))
        out = []
        for i in range(num_directions):
            keys = jax.random.split(jax.random.PRNGKey(100 + i), len(leaves))
            direction = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
            shifted = lambda s: jax.tree.unflatten(
                treedef, [x + s * d for x, d in zip(leaves, direction)]
            )
            plus, minus = loss(*shifted(eps)), loss(*shifted(-eps))
            out.append((direction, float((plus - minus) / (2 * eps))))
        return tuple(out)


def _check(t0, t1, num_steps, solver, adjoint, unroll):
    grad = _grad(t0, t1, num_steps, solver, adjoint, unroll)
    expected = _grad(t0, t1, num_steps, solver, "direct", unroll)
    tree_allclose(grad, expected, rtol=1e-9, atol=1e-12)
    # Central differences, eps = 1e-5: truncation error O(eps²) ~ 1e-10 relative, round-off
    # ~ 1e-16 / 1e-5; a gradient off by a time shift differs at the percent level.
    for direction, fd in _finite_difference_directional(t0, t1, num_steps, solver):
        projected = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), direction))
        np.testing.assert_allclose(projected, fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("unroll", [False, True], ids=["looped", "unrolled"])
@pytest.mark.parametrize("t0,t1", INTERVALS)
@pytest.mark.parametrize("adjoint", ["direct", *RUNGE_KUTTA_STRATEGIES])
def test_runge_kutta_strategies_away_from_zero_and_backwards(x64, adjoint, t0, t1, unroll):
    _check(t0, t1, NUM_STEPS, "rk4", adjoint, unroll)


@pytest.mark.parametrize("unroll", [False, True], ids=["looped", "unrolled"])
@pytest.mark.parametrize("t0,t1", INTERVALS)
@pytest.mark.parametrize("adjoint", ["anode", "checkpointed:3"])
def test_long_solves_away_from_zero_and_backwards(x64, adjoint, t0, t1, unroll):
    # Above DEFAULT_MAX_UNROLL (16) steps the unrolled "anode" reverses step by step instead of
    # differentiating the recomputed block: a second code path with its own time bookkeeping.
    _check(t0, t1, 17, "euler", adjoint, unroll)


@pytest.mark.parametrize("unroll", [False, True], ids=["looped", "unrolled"])
@pytest.mark.parametrize("t0,t1", INTERVALS)
@pytest.mark.parametrize("solver", REVERSIBLE_SOLVERS)
def test_reversible_strategy_away_from_zero_and_backwards(x64, solver, t0, t1, unroll):
    _check(t0, t1, 3, solver, "reversible", unroll)  # 3 steps: unrolled RK4 pairs compile slowly


@pytest.mark.parametrize("t0,t1", INTERVALS)
def test_time_dependence_is_seen_by_the_gradient(x64, t0, t1):
    """The field is time-dependent enough that shifting the start time moves the gradient
    far beyond the tolerances above (else the tests above could not see a time bug)."""
    grad = _grad(t0, t1, NUM_STEPS, "rk4", "direct", False)
    shifted = _grad(0.0, t1 - t0, NUM_STEPS, "rk4", "direct", False)
    diffs = [
        np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b)))
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(shifted))
    ]
    assert max(diffs) > 1e-2, diffs
