"""Gradient strategies: exactness against "direct" and finite differences, jit/vmap, closures,
dtypes, the diffrax oracle, the inconsistency of "backsolve", and compiled memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from anode_jax import Anode, Checkpointed, Direct, odeint
from tests._ode_problems import (
    conv_relu_field,
    conv_relu_problem,
    plain_conv_relu_field,
    smooth_field,
    smooth_problem,
)
from tests.conftest import FAST_COMPILE, tree_allclose

EXACT = ["anode", "checkpointed:1", "checkpointed:2", "checkpointed:3", "checkpointed:100"]
PROBLEMS = {
    "conv_relu": (conv_relu_field, conv_relu_problem),
    "smooth_pytree": (smooth_field, smooth_problem),
}


def _loss(field, num_steps, solver, adjoint, unroll=None):
    def loss(y0, args):
        y1 = odeint(
            field, y0, args, num_steps=num_steps, solver=solver, adjoint=adjoint, unroll=unroll
        )
        return sum(jnp.sum(jnp.sin(leaf) * leaf) for leaf in jax.tree.leaves(y1))

    return loss


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("adjoint", EXACT)
def test_exact_strategies_match_direct(x64, problem, adjoint):
    _check_matches_direct(problem, "rk4", 5, adjoint)


@pytest.mark.parametrize("solver,num_steps", [("euler", 7), ("midpoint", 3), ("heun", 4)])
@pytest.mark.parametrize("adjoint", ["anode", "checkpointed:2"])
def test_exact_strategies_match_direct_for_every_solver(x64, solver, num_steps, adjoint):
    _check_matches_direct("conv_relu", solver, num_steps, adjoint)


def _direct_gradient(problem, solver, num_steps):
    """The "direct" reference gradient, computed once per (problem, solver, Nt) and float
    width (every strategy of a case compares with the same one)."""
    key = (problem, solver, num_steps, jax.config.jax_enable_x64)
    if key not in _DIRECT:
        _DIRECT[key] = _gradient(problem, solver, num_steps, "direct")
    return _DIRECT[key]


_DIRECT = {}


def _gradient(problem, solver, num_steps, adjoint):
    field, make = PROBLEMS[problem]
    y0, args = make(jax.random.PRNGKey(0))
    loss = _loss(field, num_steps, solver, adjoint)
    # A compared value, not a timed one: XLA's backend optimization level does not change
    # the arithmetic (tests/conftest.py, FAST_COMPILE).
    return jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=FAST_COMPILE)(y0, args)


def _check_matches_direct(problem, solver, num_steps, adjoint):
    want = _direct_gradient(problem, solver, num_steps)
    tree_allclose(_gradient(problem, solver, num_steps, adjoint), want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("adjoint", ["direct", "anode", "checkpointed:2"])
def test_gradients_match_finite_differences(x64, problem, adjoint):
    field, make = PROBLEMS[problem]
    y0, args = make(jax.random.PRNGKey(3))
    loss = _loss(field, 4, "rk4", adjoint)
    # Central differences in float64; ReLU kinks are measure-zero for random data at eps=1e-6.
    check_grads(loss, (y0, args), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("adjoint", EXACT[:3])
def test_vmap_of_grad_matches_direct(x64, adjoint):
    y0, args = smooth_problem(jax.random.PRNGKey(5))
    batch_y0 = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x, -x]), y0)
    grad = lambda adj: jax.jit(
        jax.vmap(jax.grad(_loss(smooth_field, 6, "rk4", adj), argnums=(0, 1)), in_axes=(0, None))
    )(batch_y0, args)
    tree_allclose(grad(adjoint), grad("direct"), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("adjoint", ["direct", "anode", "checkpointed:2"])
def test_scan_and_unrolled_loops_agree(x64, adjoint):
    z0, theta = conv_relu_problem(jax.random.PRNGKey(2))
    values = {}
    for unroll in (True, False):
        loss = _loss(conv_relu_field, 6, "rk4", adjoint, unroll=unroll)
        values[unroll] = jax.value_and_grad(loss, argnums=(0, 1))(z0, theta)
    tree_allclose(values[False], values[True], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("adjoint", ["anode", "checkpointed:2", "backsolve"])
def test_closed_over_tracers_get_gradients(x64, adjoint):
    """A vector field capturing a traced parameter (e.g. a Flax module method) still
    differentiates it: odeint hoists it into the differentiated inputs."""
    y0, args = smooth_problem(jax.random.PRNGKey(7))

    def loss(w, adj):
        field = lambda t, y, a: smooth_field(t, y, {"w": w, "b": a})
        y1 = odeint(
            field, y0, args["b"], num_steps=64 if adjoint == "backsolve" else 4, adjoint=adj
        )
        return jnp.sum(y1["x"] ** 2) + jnp.sum(y1["v"])

    got = jax.grad(loss)(args["w"], adjoint)
    want = jax.grad(loss)(args["w"], "direct")
    # backsolve is approximate; at 64 RK4 steps on this smooth field it agrees to ~1e-8.
    tol = 1e-6 if adjoint == "backsolve" else 1e-10
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_integer_leaves_in_args_are_allowed(x64):
    y0, args = smooth_problem(jax.random.PRNGKey(8))
    args = dict(args, power=jnp.asarray(2, jnp.int32))

    def field(t, y, a):
        out = smooth_field(t, y, a)
        return {"x": out["x"] * (a["power"] - 1).astype(y["x"].dtype), "v": out["v"]}

    for adjoint in ("anode", "checkpointed:2", "backsolve"):
        grads = jax.grad(
            lambda a: jnp.sum(odeint(field, y0, a, num_steps=3, adjoint=adjoint)["x"]),
            allow_int=True,
        )(args)
        assert grads["power"].dtype == jax.dtypes.float0
        ref = jax.grad(
            lambda a: jnp.sum(odeint(field, y0, a, num_steps=3, adjoint="direct")["x"]),
            allow_int=True,
        )(args)
        if adjoint != "backsolve":
            np.testing.assert_allclose(grads["w"], ref["w"], rtol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("adjoint", ["direct", "anode", "checkpointed:2", "backsolve"])
def test_low_precision_states(x64, dtype, adjoint):
    # The reference is the same strategy on the same problem in float64: the test measures what
    # the low-precision state costs, not a function compared with itself.
    z0, theta = conv_relu_problem(jax.random.PRNGKey(4), dtype=jnp.float64)
    z0_low = z0.astype(dtype)
    theta_low = jax.tree.map(lambda w: w.astype(dtype), theta)
    loss = lambda z, th: jnp.mean(
        odeint(conv_relu_field, z, th, num_steps=2, adjoint=adjoint).astype(jnp.float64) ** 2
    )
    out = jax.jit(lambda z, th: odeint(conv_relu_field, z, th, num_steps=2, adjoint=adjoint))(
        z0_low, theta_low
    )
    assert out.dtype == dtype
    g_low = jax.jit(jax.grad(loss, argnums=1))(z0_low, theta_low)
    g_ref = jax.jit(jax.grad(loss, argnums=1))(z0, theta)
    assert all(g.dtype == dtype for g in jax.tree.leaves(g_low))
    # float32 round-off (24-bit mantissa) over two RK4 steps and their reversal: 1e-5 of the
    # gradient scale; bfloat16 (8-bit mantissa): a few percent.
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    for a, b in zip(jax.tree.leaves(g_low), jax.tree.leaves(g_ref)):
        scale = float(jnp.max(jnp.abs(b)))
        error = float(jnp.max(jnp.abs(a.astype(jnp.float64) - b)))
        assert error <= tol * scale
        # ... and not identical: the low-precision path really computed in low precision.
        assert error > 0


# ------------------------------------------------------------------------------------------
# An independent oracle: diffrax's fixed-step solve of the same problem.


def _diffrax_rk4():
    import diffrax

    class RK4(diffrax.AbstractERK):
        tableau = diffrax.ButcherTableau(
            c=np.array([0.5, 0.5, 1.0]),
            b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
            b_error=np.zeros(4),
            a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
        )
        interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

        def order(self, terms):
            return 4

    return RK4()


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "rk4"])
def test_diffrax_oracle(x64, solver):
    diffrax = pytest.importorskip("diffrax")
    diffrax_solver = {
        "euler": diffrax.Euler(),
        "heun": diffrax.Heun(),
        "midpoint": diffrax.Midpoint(),
        "rk4": _diffrax_rk4(),
    }[solver]
    y0, args = smooth_problem(jax.random.PRNGKey(11))
    num_steps = 6

    def theirs(y0, args):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(smooth_field),
            diffrax_solver,
            t0=0.0,
            t1=1.0,
            dt0=1.0 / num_steps,
            y0=y0,
            args=args,
            stepsize_controller=diffrax.ConstantStepSize(),
            saveat=diffrax.SaveAt(t1=True),
        )
        return jax.tree.map(lambda y: y[0], sol.ys)

    def ours(y0, args):
        return odeint(smooth_field, y0, args, num_steps=num_steps, solver=solver, adjoint="anode")

    tree_allclose(ours(y0, args), theirs(y0, args), rtol=1e-12, atol=1e-14)
    scalar = lambda f: lambda y, a: jnp.sum(f(y, a)["x"] * f(y, a)["v"])
    tree_allclose(
        jax.grad(scalar(ours), argnums=(0, 1))(y0, args),
        jax.grad(scalar(theirs), argnums=(0, 1))(y0, args),
        rtol=1e-10,
        atol=1e-13,
    )


# ------------------------------------------------------------------------------------------
# "backsolve": consistent only in the limit, and wrong for a ReLU conv block at small Nt.


def _rel_err(got, want):
    num = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    )
    return num / max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(want))


def test_backsolve_converges_on_smooth_problem(x64):
    y0, args = smooth_problem(jax.random.PRNGKey(12))
    # The true gradient of the exact flow, approximated by a fine direct solve.
    truth = jax.grad(_loss(smooth_field, 512, "rk4", "direct"), argnums=(0, 1))(y0, args)
    errors = [
        _rel_err(
            jax.grad(_loss(smooth_field, n, "rk4", "backsolve"), argnums=(0, 1))(y0, args), truth
        )
        for n in (2, 4, 8, 16)
    ]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    # RK4: halving dt should cut the error roughly 16x; require at least 8x per halving at the end.
    assert errors[-2] / errors[-1] > 8, errors
    assert errors[-1] < 1e-5, errors


@pytest.mark.parametrize("num_steps", [1, 2])
def test_backsolve_is_inconsistent_on_relu_conv_block(x64, num_steps):
    z0, theta = conv_relu_problem(jax.random.PRNGKey(13), scale=1.5)
    loss = lambda adj: _loss(conv_relu_field, num_steps, "euler", adj)
    exact = jax.grad(loss("direct"), argnums=(0, 1))(z0, theta)
    adjoint = jax.grad(loss("backsolve"), argnums=(0, 1))(z0, theta)
    # The paper's point: the reverse solve does not reconstruct the forward trajectory, so the
    # gradient is not the gradient of the computed forward pass.
    assert _rel_err(adjoint, exact) > 0.01


# ------------------------------------------------------------------------------------------
# Memory: compiled temp bytes of the gradient.


def _temp_bytes(adjoint, num_blocks, num_steps, solver="rk4"):
    # jax.lax's convolution, as these bounds were set with: odeint unrolls it (the loop-safe
    # conv's looped "direct" baseline holds less, and checkpointed:4 at Nt=16 is then 6.6 %).
    z0, _ = conv_relu_problem(jax.random.PRNGKey(0), dtype=jnp.float32, batch=4, size=8, channels=8)
    thetas = [
        conv_relu_problem(jax.random.PRNGKey(i + 1), dtype=jnp.float32, channels=8)[1]
        for i in range(num_blocks)
    ]

    def loss(thetas):
        z = z0
        for theta in thetas:
            z = odeint(
                plain_conv_relu_field, z, theta, num_steps=num_steps, solver=solver, adjoint=adjoint
            )
        return jnp.mean(z**2)

    compiled = jax.jit(jax.grad(loss)).lower(thetas).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    "adjoint,num_steps,solver,max_ratio",
    [
        # L block inputs + one block's Nt RK4 steps of internals: about 1/L of direct (L = 8).
        ("anode", 4, "rk4", 0.15),
        # k states + one step's internals: the budget strategy's target at L = 8 (Euler: the same
        # memory structure as RK4 with a quarter of the program to compile).
        ("checkpointed:4", 16, "euler", 0.05),
    ],
)
def test_compiled_memory_below_direct(adjoint, num_steps, solver, max_ratio):
    direct = _temp_bytes("direct", 8, num_steps, solver)
    ours = _temp_bytes(adjoint, 8, num_steps, solver)
    assert ours <= max_ratio * direct, (ours, direct, ours / direct)


def test_anode_memory_grows_slowly_with_depth():
    # Only the block inputs are stored across blocks: L = 2 -> 8 adds 6 states, not 6 blocks.
    assert _temp_bytes("anode", 8, 4) <= 1.3 * _temp_bytes("anode", 2, 4)


def test_checkpointed_memory_is_flat_in_num_steps():
    # Six times the steps, no more memory (XLA's schedule varies by a few states between
    # step counts: 10-15 states for Nt = 4..48 here, never growing with Nt).
    small = _temp_bytes("checkpointed:3", 2, 8, "euler")
    large = _temp_bytes("checkpointed:3", 2, 48, "euler")  # > DEFAULT_MAX_UNROLL
    direct_large = _temp_bytes("direct", 2, 48, "euler")
    assert large <= 1.1 * small, (small, large)
    assert large < 0.1 * direct_large


def test_strategy_objects_equal_names(x64):
    y0, args = smooth_problem(jax.random.PRNGKey(9))
    for obj, name in [
        (Direct(), "direct"),
        (Anode(), "anode"),
        (Checkpointed(2), "checkpointed:2"),
    ]:
        a = jax.grad(_loss(smooth_field, 3, "rk4", obj), argnums=1)(y0, args)
        b = jax.grad(_loss(smooth_field, 3, "rk4", name), argnums=1)(y0, args)
        tree_allclose(a, b, rtol=0, atol=0)
