"""Solvers: convergence order, the residual-block equivalence, tableau validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anode_jax
from anode_jax import ButcherTableau, odeint
from anode_jax.ode import knot_weights, stage_times

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


def fitted_order(solver, steps=(16, 32, 64, 128), t1=2.0):
    """(slope of log error vs log h, errors) of `solver` on `_exact_problem` over [0, t1]."""
    field, y0, a, exact = _exact_problem()
    steps = np.asarray(steps)
    errors = [
        float(
            jnp.max(
                jnp.abs(odeint(field, y0, a, t1=t1, num_steps=int(n), solver=solver) - exact(t1))
            )
        )
        for n in steps
    ]
    return np.polyfit(np.log(t1 / steps), np.log(errors), 1)[0], errors


@pytest.mark.parametrize("solver,order", SOLVER_ORDERS, ids=lambda s: getattr(s, "name", str(s)))
def test_convergence_order(x64, solver, order):
    slope, errors = fitted_order(solver)
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


# ------------------------------------------------------------------------------------------
# Where a solve evaluates its vector field (stage_times) and the hat basis over those times.


@pytest.mark.parametrize(
    "solver, num_steps, times, weights",
    [
        ("euler", 2, [0.0, 0.5], [0.5, 0.5]),
        ("midpoint", 2, [0.25, 0.75], [0.5, 0.5]),  # the first stage has weight 0: left out
        ("heun", 2, [0.0, 0.5, 1.0], [0.25, 0.5, 0.25]),
        ("rk4", 1, [0.0, 0.5, 1.0], [1 / 6, 2 / 3, 1 / 6]),
        ("reversible_heun", 2, [0.0, 0.5, 1.0], [0.25, 0.5, 0.25]),
        ("alf", 2, [0.25, 0.75], [0.5, 0.5]),  # init's f(t0) feeds v only: weight 0
        ("reversible:rk4", 1, [0.0, 0.5, 1.0], [1 / 6, 2 / 3, 1 / 6]),
    ],
)
def test_stage_times_are_the_evaluation_times_with_their_quadrature_weights(
    solver, num_steps, times, weights
):
    """By hand from each method's update: e.g. RK4 evaluates at t, t + h/2 (twice, weights
    ⅓ + ⅓) and t + h; Heun's end-point stage of step n and the first stage of step n + 1
    share the time t_{n+1} (¼ + ¼)."""
    got_times, got_weights = stage_times(solver, num_steps)
    np.testing.assert_allclose(got_times, times, atol=1e-7)
    np.testing.assert_allclose(got_weights, weights, atol=1e-6)


def test_stage_times_scale_with_the_interval_and_reject_bad_steps():
    times, weights = stage_times("euler", 4, t0=1.0, t1=3.0)
    np.testing.assert_allclose(times, [1.0, 1.5, 2.0, 2.5])
    np.testing.assert_allclose(weights, [0.5] * 4, atol=1e-6)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_steps must be a positive int"):
            stage_times("euler", bad)
    with pytest.raises(ValueError, match="Unknown solver"):
        stage_times("rk5", 2)


def test_knot_weights_is_the_hat_basis():
    knots = np.array([0.0, 0.25, 0.5, 1.0])
    eye = np.eye(4)
    for i, k in enumerate(knots):  # one-hot at every knot, exactly
        np.testing.assert_array_equal(knot_weights(knots, jnp.float32(k)), eye[i])
    np.testing.assert_allclose(knot_weights(knots, 0.75), [0, 0, 0.5, 0.5])  # linear between
    np.testing.assert_allclose(knot_weights(knots, 0.3), [0, 0.8, 0.2, 0], atol=1e-6)
    np.testing.assert_array_equal(knot_weights(knots, -1.0), eye[0])  # constant outside
    np.testing.assert_array_equal(knot_weights(knots, 2.0), eye[3])
    np.testing.assert_array_equal(knot_weights(np.array([0.5]), 0.1), [1.0])
    # Traced knots and time (as the models read them from batch_stats under jit).
    traced = jax.jit(knot_weights)(jnp.asarray(knots), 0.75)
    np.testing.assert_allclose(traced, [0, 0, 0.5, 0.5])
