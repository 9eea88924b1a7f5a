"""Reversible solvers and adjoint="reversible": inverses, exact gradients, order, errors, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anode_jax.ode import (
    ALF,
    HEUN,
    RK4,
    Reversible,
    ReversibleHeun,
    get_solver,
    odeint,
    reversible_solver_names,
    solver_names,
)
from tests._ode_problems import conv_relu_field, conv_relu_problem, smooth_field, smooth_problem
from tests.conftest import tree_allclose
from tests.test_solvers import fitted_order

REVERSIBLE = [
    "reversible:euler",
    "reversible:heun",
    "reversible:rk4",
    Reversible(RK4, coupling=0.5),
    Reversible(RK4, coupling=1.0),
    "reversible_heun",
    "alf",
    ALF(eta=0.8),
]


def _id(solver):
    return solver if isinstance(solver, str) else f"{solver.name}-{getattr(solver, 'coupling', '')}"


# ------------------------------------------------------------------------------------------
# The inverse step undoes the step.


@pytest.mark.parametrize("solver", REVERSIBLE, ids=_id)
def test_inverse_step_inverts_step(x64, solver):
    """float64, smooth pytree field: inverse_step(step(s)) == s to 1e-13 (relative)."""
    solver = get_solver(solver)
    y0, args = smooth_problem(jax.random.PRNGKey(0))
    t, dt = jnp.asarray(0.3), 0.1
    state = solver.init(smooth_field, t, y0, args)
    state = solver.step(smooth_field, t, dt, state, args)  # a generic state, not y == z
    nxt = solver.step(smooth_field, t + dt, dt, state, args)
    back = solver.inverse_step(smooth_field, t + dt, dt, nxt, args)
    tree_allclose(back, state, rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------------------------------
# Gradients: adjoint="reversible" equals "direct" through the same solver (float64).


@pytest.mark.parametrize("unroll", [False, True], ids=["looped", "unrolled"])
@pytest.mark.parametrize("solver", REVERSIBLE, ids=_id)
def test_gradient_equals_direct_conv_relu(x64, solver, unroll):
    """conv-ReLU field (non-smooth), Nt = 5: d loss/d(z0, θ) agree to 1e-10 relative."""
    z0, theta = conv_relu_problem(jax.random.PRNGKey(1))

    def loss(z0, theta, adjoint):
        out = odeint(
            conv_relu_field, z0, theta, num_steps=5, solver=solver, adjoint=adjoint, unroll=unroll
        )
        return jnp.sum(jnp.sin(out))

    grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
    tree_allclose(grad(z0, theta, "reversible"), grad(z0, theta, "direct"), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("solver", REVERSIBLE, ids=_id)
def test_gradient_equals_direct_smooth_pytree_vmap(x64, solver):
    """Smooth time-dependent field on a dict state, vmapped over 3 initial values, t in [0.2,
    1.7], Nt = 6: per-example gradients w.r.t. (y0, args) agree to 1e-10 relative."""
    y0, args = smooth_problem(jax.random.PRNGKey(2))
    y0s = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x, -x]), y0)

    def loss(y0, args, adjoint):
        out = odeint(
            smooth_field, y0, args, t0=0.2, t1=1.7, num_steps=6, solver=solver, adjoint=adjoint
        )
        return jnp.sum(out["x"] ** 2) + jnp.sum(jnp.cos(out["v"]))

    def per_example(adjoint):
        g = jax.vmap(jax.grad(loss, (0, 1)), in_axes=(0, None, None))
        return jax.jit(g, static_argnums=2)(y0s, args, adjoint)

    tree_allclose(per_example("reversible"), per_example("direct"), rtol=1e-10, atol=1e-13)


def test_gradient_of_closed_over_parameters(x64):
    """Parameters captured by closure (not passed in args) get their gradient too."""
    y0, args = smooth_problem(jax.random.PRNGKey(3))

    def loss(args, adjoint):
        field = lambda t, y, _: smooth_field(t, y, args)
        out = odeint(field, y0, None, num_steps=4, solver="alf", adjoint=adjoint)
        return jnp.sum(out["x"] * out["v"])

    tree_allclose(
        jax.grad(loss)(args, "reversible"), jax.grad(loss)(args, "direct"), rtol=1e-10, atol=1e-13
    )


def test_forward_pass_is_the_direct_computation(x64):
    z0, theta = conv_relu_problem(jax.random.PRNGKey(4))
    outs = [
        odeint(conv_relu_field, z0, theta, num_steps=4, solver="reversible:rk4", adjoint=a)
        for a in ("reversible", "direct", "anode")
    ]
    for out in outs[1:]:
        np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(out), rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------------------------
# Convergence order (same problem and fit as tests/test_solvers.py).

ORDERS = [
    ("reversible:euler", 1),
    ("reversible:midpoint", 2),
    ("reversible:heun", 2),
    ("reversible:rk4", 4),
    ("reversible_heun", 2),
    ("alf", 2),
]


@pytest.mark.parametrize("solver,order", ORDERS, ids=[s for s, _ in ORDERS])
def test_convergence_order(x64, solver, order):
    """y_i' = a_i cos(t) y_i on [0, 2], Nt in {16, 32, 64, 128}: fitted order within 0.25 of the
    method's order (float64)."""
    slope, errors = fitted_order(solver)
    assert abs(slope - order) < 0.25, (slope, errors)


# ------------------------------------------------------------------------------------------
# Stability of the McCallum-Foster step on y' = μ y (the docstring's claims).


def _step_matrix(solver, mu_h):
    """The Jacobian of one step (h = 1) on y' = μ y: real μ h on R, imaginary μ h = iω as the
    rotation y' = ω J y on R²; state (y, z) flattened."""
    if isinstance(mu_h, complex):
        w = mu_h.imag
        field = lambda t, y, _: w * jnp.stack([-y[1], y[0]])
        n = 2
    else:
        field = lambda t, y, _: mu_h * y
        n = 1

    def step(s):
        y1, z1 = solver.step(field, 0.0, 1.0, (s[:n], s[n:]), None)
        return jnp.concatenate([y1, z1])

    return np.asarray(jax.jacobian(step)(jnp.ones(2 * n)))


def _rk4_stability(x):
    return 1 + x + x**2 / 2 + x**3 / 6 + x**4 / 24


@pytest.mark.parametrize("lam", [0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("mu_h", [-0.2, 0.1, 0.3j], ids=str)
def test_linear_step_eigenvalues(x64, lam, mu_h):
    """On y' = μ y the step is linear with eigenvalues R(hμ) and λ / R(hμ) (R: RK4's stability
    function; conjugates too for imaginary hμ), up to RK4's defect R(hμ)R(-hμ) - 1 = O((hμ)^6)
    (tolerance 1e-5); its determinant is λ per mode."""
    m = _step_matrix(Reversible(RK4, coupling=lam), mu_h)
    roots = [_rk4_stability(mu_h), lam / _rk4_stability(mu_h)]
    if isinstance(mu_h, complex):
        roots += [np.conj(r) for r in roots]
    eig = np.linalg.eigvals(m)
    for r in roots:
        assert np.min(np.abs(eig - r)) < 1e-5, (r, eig)
    np.testing.assert_allclose(abs(np.linalg.det(m)), lam ** len(roots[::2]), rtol=1e-12)


def test_parasitic_mode_grows_when_lambda_exceeds_the_amplification_factor(x64):
    """Stiff decay y' = -10 y, h = 0.1 (R(-1) = 0.375 for RK4): λ = 0.999 > R lets the parasitic
    mode λ/R grow (|y(T)| > 1 after 200 steps); λ = 0.3 < R damps it (|y(T)| < 1e-6)."""
    field = lambda t, y, mu: mu * y
    y0 = jnp.ones(1)
    grow = odeint(field, y0, -10.0, t1=20.0, num_steps=200, solver=Reversible(RK4, 0.999))
    damp = odeint(field, y0, -10.0, t1=20.0, num_steps=200, solver=Reversible(RK4, 0.3))
    assert float(jnp.abs(grow[0])) > 1.0
    assert float(jnp.abs(damp[0])) < 1e-6


# ------------------------------------------------------------------------------------------
# Memory: flat in Nt.


def test_compiled_memory_is_flat_in_num_steps():
    """float32 conv-ReLU gradient: compiled temp bytes at Nt = 64 are at most 1.1× those at
    Nt = 8 (direct grows with Nt)."""
    z0, theta = conv_relu_problem(jax.random.PRNGKey(5), dtype=jnp.float32, batch=4, size=8)

    def temp(num_steps, adjoint):
        def loss(z0, theta):
            out = odeint(
                conv_relu_field,
                z0,
                theta,
                num_steps=num_steps,
                solver="reversible:rk4",
                adjoint=adjoint,
                unroll=False,
            )
            return jnp.sum(out**2)

        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(z0, theta).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp(64, "reversible") <= 1.1 * temp(8, "reversible")
    assert temp(64, "direct") > 4 * temp(8, "reversible")


# ------------------------------------------------------------------------------------------
# Names, validation and errors.


def test_names_resolve():
    assert get_solver("reversible:rk4") == Reversible(RK4)
    assert get_solver("reversible:rk4").coupling == 0.999
    assert get_solver("reversible:heun") == Reversible(HEUN)
    assert isinstance(get_solver("reversible_heun"), ReversibleHeun)
    assert get_solver("alf") == ALF(eta=1.0)
    names = solver_names()
    for name in ("rk4", "reversible:rk4", "reversible:euler", "reversible_heun", "alf"):
        assert name in names
    assert "rk4" not in reversible_solver_names()
    assert "reversible:rk4" in reversible_solver_names()


def test_reversible_adjoint_rejects_non_reversible_solver():
    y0, args = smooth_problem(jax.random.PRNGKey(0), dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"reversible solver.*'rk4'.*reversible:rk4"):
        odeint(smooth_field, y0, args, num_steps=2, solver="rk4", adjoint="reversible")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Reversible(RK4, coupling=0.0), r"coupling λ must be a number in \(0, 1\]"),
        (lambda: Reversible(RK4, coupling=1.5), r"coupling λ must be a number in \(0, 1\]"),
        (lambda: Reversible("rk4"), "wraps an explicit ButcherTableau"),
        (lambda: ALF(eta=0.5), "non-invertible"),
        (lambda: ALF(eta=0.0), r"eta must be a number in \(0, 1\]"),
        (lambda: get_solver("reversible:rk5"), "valid names are.*reversible:rk4.*alf"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_other_strategies_accept_reversible_solvers(x64):
    """anode and checkpointed differentiate the reversible solvers' states like any other."""
    z0, theta = conv_relu_problem(jax.random.PRNGKey(6))

    def grads(adjoint):
        loss = lambda th: jnp.sum(
            odeint(conv_relu_field, z0, th, num_steps=4, solver="alf", adjoint=adjoint) ** 2
        )
        return jax.grad(loss)(theta)

    reference = grads("direct")
    for adjoint in ("anode", "checkpointed:2", "reversible"):
        tree_allclose(grads(adjoint), reference, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------------------------------
# Models and trainer: BatchNorm statistics ride in the solver state and are reconstructed too.


@pytest.mark.parametrize("solver", ["reversible:euler", "alf"])
def test_model_with_batch_norm_gradients_and_statistics_match_direct(x64, solver):
    """`small` (two ODE blocks, BatchNorm in training mode, Nt = 3) with a reversible solver:
    the batch-statistics accumulator is part of the ODE state, so the reversible backward pass
    reconstructs it with z. Gradients (params, x) and batch_stats updates equal those of
    "direct" through the same solver (rtol 1e-9)."""
    from anode_jax.models import create_model

    x = jax.random.normal(jax.random.PRNGKey(7), (2, 8, 8, 1), jnp.float32)
    kwargs = dict(width=0.125, num_steps=3, solver=solver)
    variables = create_model("small", **kwargs).init(jax.random.PRNGKey(0), x, train=False)
    variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables)
    x = x.astype(jnp.float64)

    def grads(adjoint):
        model = create_model("small", adjoint=adjoint, **kwargs)

        def loss(p, x):
            logits, upd = model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(logits)), upd

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)

    tree_allclose(grads("reversible"), grads("direct"), rtol=1e-9, atol=1e-12)


def test_create_model_and_config_accept_reversible():
    from anode_jax.models import create_model
    from anode_jax.training.config_validation import ConfigError, validate_config
    from tests.test_training import load_config

    create_model("small", solver="reversible:rk4", adjoint="reversible", width=0.125)
    with pytest.raises(ValueError, match="reversible:rk4"):
        create_model("small", solver="rk5")
    c = load_config("default")
    c.model.solver, c.model.adjoint = "reversible:rk4", "reversible"
    validate_config(c, num_devices=1)
    c.model.solver = "rk4"
    with pytest.raises(ConfigError, match=r"adjoint='reversible' needs.*reversible:rk4"):
        validate_config(c, num_devices=1)
