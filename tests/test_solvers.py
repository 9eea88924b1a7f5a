"""Solvers: convergence order, the residual-block equivalence, tableau validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anode_jax
from anode_jax import ButcherTableau, odeint

# Kutta's third-order method: a user-supplied tableau that no built-in name covers.
KUTTA3 = ButcherTableau(
    a=((), (0.5,), (-1.0, 2.0)), b=(1 / 6, 2 / 3, 1 / 6), c=(0.0, 0.5, 1.0), order=3, name="kutta3"
)

SOLVER_ORDERS = [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4), (KUTTA3, 3)]


def _exact_problem():
    # y' = cos(t) * y + sin(t) * [0, 1]·… kept scalar-per-component: y_i' = a_i cos(t) y_i,
    # exact solution y_i(t) = y_i(0) exp(a_i sin t).
    a = jnp.array([1.0, -0.5, 0.3])
    y0 = jnp.array([1.0, 2.0, -1.0])

    def field(t, y, a):
        return a * jnp.cos(t) * y

    exact = lambda t: y0 * jnp.exp(a * jnp.sin(t))
    return field, y0, a, exact


@pytest.mark.parametrize("solver,order", SOLVER_ORDERS, ids=lambda s: getattr(s, "name", str(s)))
def test_convergence_order(x64, solver, order):
    field, y0, a, exact = _exact_problem()
    t1 = 2.0
    steps = np.array([16, 32, 64, 128])
    errors = [
        float(
            jnp.max(
                jnp.abs(odeint(field, y0, a, t1=t1, num_steps=int(n), solver=solver) - exact(t1))
            )
        )
        for n in steps
    ]
    slope = np.polyfit(np.log(t1 / steps), np.log(errors), 1)[0]
    # Observed order within 0.2 of the theoretical one (asymptotic regime, float64).
    assert abs(slope - order) < 0.2, (slope, errors)


@pytest.mark.parametrize("adjoint", ["direct", "anode", "checkpointed:1", "backsolve"])
def test_euler_one_step_is_residual_block(x64, adjoint):
    from tests._ode_problems import conv_relu_field, conv_relu_problem

    z0, theta = conv_relu_problem(jax.random.PRNGKey(1))
    out = odeint(conv_relu_field, z0, theta, num_steps=1, solver="euler", adjoint=adjoint)
    residual = z0 + conv_relu_field(0.0, z0, theta)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(residual))


def test_backward_in_time_inverts_forward_for_smooth_field(x64):
    field, y0, a, exact = _exact_problem()
    y1 = odeint(field, y0, a, t0=0.0, t1=1.0, num_steps=64)
    back = odeint(field, y1, a, t0=1.0, t1=0.0, num_steps=64)
    np.testing.assert_allclose(np.asarray(back), np.asarray(y0), rtol=1e-8)


def test_solver_registry_names():
    assert set(anode_jax.SOLVERS) == {"euler", "midpoint", "heun", "rk4"}
    assert anode_jax.get_solver("rk4").order == 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(a=((), (0.5,)), b=(0.5, 0.6), c=(0.0, 0.5), order=2), "b sums to"),
        (dict(a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.4), order=2), "row 1 of a sums"),
        (dict(a=((1.0,), ()), b=(0.5, 0.5), c=(0.0, 1.0), order=2), "strictly lower-triangular"),
        (dict(a=((),), b=(1.0,), c=(0.0, 1.0), order=1), "number of stages"),
        (dict(a=((),), b=(1.0,), c=(0.0,), order=0), "order must be"),
    ],
)
def test_bad_tableau_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ButcherTableau(**kwargs)
