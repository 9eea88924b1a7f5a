""" "backsolve" pinned against independent implementations of the same algorithm.

The Neural ODE adjoint (Chen et al. 2018, Eq. 4-5, Alg. 1) integrates the augmented system
    dy/dt = f(t, y, θ),  da/dt = -aᵀ ∂f/∂y,  dg/dt = -aᵀ ∂f/∂θ
from (y(t1), ∂L/∂y(t1), 0) back to t0 with the forward's solver and step count. Its gradient
is not the gradient of the forward pass (tests/test_adjoint.py shows that), so the only honest
check of "is this backsolve right" is another implementation of the same discrete algorithm:
a hand-written float64 reverse-time Euler / RK4 here, and diffrax's `BacksolveAdjoint` with
the same constant steps. A reverse solve with a different step count or grid fails both.
"""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anode_jax import odeint
from tests._ode_problems import smooth_field, smooth_problem
from tests.conftest import tree_allclose

INTERVALS = [(0.0, 1.0), (0.3, 1.4), (1.0, -0.5)]


def _tree_axpy(alpha, x, y):
    return jax.tree.map(lambda a, b: alpha * a + b, x, y)


def _euler_step(f, t, h, z):
    return _tree_axpy(h, f(t, z), z)


def _rk4_step(f, t, h, z):
    # Classic RK4 (Kutta 1901), written out stage by stage.
    k1 = f(t, z)
    k2 = f(t + h / 2, _tree_axpy(h / 2, k1, z))
    k3 = f(t + h / 2, _tree_axpy(h / 2, k2, z))
    k4 = f(t + h, _tree_axpy(h, k3, z))
    incr = jax.tree.map(lambda a, b, c, d: (a + 2 * b + 2 * c + d) / 6, k1, k2, k3, k4)
    return _tree_axpy(h, incr, z)


STEPS = {"euler": _euler_step, "rk4": _rk4_step}


def reference_backsolve(field, y0, args, t0, t1, num_steps, solver):
    """(y(t1), gradient function) of the loss sum(sin(y1) y1): forward with `num_steps` fixed
    steps, then the augmented adjoint system integrated from t1 to t0 with the same number of
    fixed steps, each step written out by hand (Python loop, no anode_jax code)."""
    step = STEPS[solver]
    h = (t1 - t0) / num_steps
    y = y0
    for n in range(num_steps):
        y = step(lambda t, z: field(t, z, args), t0 + n * h, h, y)
    y1 = y
    ct_y1 = jax.tree.map(lambda v: jnp.sin(v) + v * jnp.cos(v), y1)

    def augmented(t, state):
        y, a, _ = state
        fy, vjp = jax.vjp(lambda y_, p_: field(t, y_, p_), y, args)
        a_y, a_p = vjp(a)
        return fy, jax.tree.map(jnp.negative, a_y), jax.tree.map(jnp.negative, a_p)

    state = (y1, ct_y1, jax.tree.map(jnp.zeros_like, args))
    for n in range(num_steps):  # t goes t1, t1 - h, ..., t0 + h
        state = step(augmented, t1 - n * h, -h, state)
    _, a0, g0 = state
    return a0, g0


def _loss(t0, t1, num_steps, solver, adjoint="backsolve"):
    def loss(y0, args):
        y1 = odeint(
            smooth_field, y0, args, t0=t0, t1=t1, num_steps=num_steps, solver=solver,
            adjoint=adjoint,
        )  # fmt: skip
        return sum(jnp.sum(jnp.sin(leaf) * leaf) for leaf in jax.tree.leaves(y1))

    return loss


@pytest.mark.parametrize("t0,t1", INTERVALS)
@pytest.mark.parametrize("solver,num_steps", [("euler", 6), ("rk4", 3), ("rk4", 7)])
def test_backsolve_matches_hand_written_reverse_adjoint(x64, solver, num_steps, t0, t1):
    y0, args = smooth_problem(jax.random.PRNGKey(4))
    grad = jax.jit(jax.grad(_loss(t0, t1, num_steps, solver), argnums=(0, 1)))(y0, args)
    expected = reference_backsolve(smooth_field, y0, args, t0, t1, num_steps, solver)
    tree_allclose(grad, expected, rtol=1e-12, atol=1e-14)
    # And it is a different algorithm from the exact gradient (else this pins nothing new).
    exact = jax.grad(_loss(t0, t1, num_steps, solver, "direct"), argnums=(0, 1))(y0, args)
    gap = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(exact))
    )
    assert gap > 1e-8, gap


@pytest.mark.parametrize("t0,t1", INTERVALS)
@pytest.mark.parametrize(
    "solver,diffrax_solver,num_steps",
    [
        ("euler", diffrax.Euler(), 6),
        ("midpoint", diffrax.Midpoint(), 4),
        ("heun", diffrax.Heun(), 5),
    ],
)
def test_backsolve_matches_diffrax_backsolve_adjoint(
    x64, solver, diffrax_solver, num_steps, t0, t1
):
    y0, args = smooth_problem(jax.random.PRNGKey(6))

    def diffrax_loss(y0, args):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(smooth_field),
            diffrax_solver,
            t0=t0,
            t1=t1,
            dt0=(t1 - t0) / num_steps,
            y0=y0,
            args=args,
            stepsize_controller=diffrax.ConstantStepSize(),
            adjoint=diffrax.BacksolveAdjoint(solver=diffrax_solver),
            saveat=diffrax.SaveAt(t1=True),
            max_steps=num_steps + 1,
        )
        y1 = jax.tree.map(lambda leaf: leaf[-1], sol.ys)
        return sum(jnp.sum(jnp.sin(leaf) * leaf) for leaf in jax.tree.leaves(y1))

    grad = jax.jit(jax.grad(_loss(t0, t1, num_steps, solver), argnums=(0, 1)))(y0, args)
    expected = jax.jit(jax.grad(diffrax_loss, argnums=(0, 1)))(y0, args)
    tree_allclose(grad, expected, rtol=1e-11, atol=1e-13)
