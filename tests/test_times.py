"""Times as data: output times `ts`, traced `t0`/`t1`/`ts`, gradients with respect to times.

Every exact strategy is compared with "direct" (float64, rtol 1e-10) and "direct" with central
finite differences; values are compared with the fixed-grid path of `odeint` (Python times).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from anode_jax import odeint
from anode_jax.ode.solvers import get_solver
from tests._ode_problems import conv_relu_field, conv_relu_problem, smooth_field, smooth_problem
from tests.conftest import FAST_COMPILE, tree_allclose

TS = (0.0, 0.3, 0.45, 1.0, 1.6)  # irregular
# (solver, adjoint) pairs of every exact strategy; reversible needs a reversible solver.
EXACT = [
    ("rk4", "anode"),
    ("rk4", "checkpointed:1"),
    ("rk4", "checkpointed:3"),
    ("reversible:rk4", "reversible"),
    ("reversible_heun", "reversible"),
    ("alf", "reversible"),
    ("reversible:rk4", "anode"),
]
RK_SOLVERS = ["euler", "rk4"]
REVERSIBLE_SOLVERS = ["reversible:rk4", "reversible_heun", "alf"]
SOLVERS = RK_SOLVERS + REVERSIBLE_SOLVERS


def _ts(values=TS):
    return jnp.asarray(values, jnp.float64)


def _sum_loss(ys):
    return sum(jnp.sum(jnp.sin(leaf) * leaf) for leaf in jax.tree.leaves(ys))


def _ts_loss(field, num_steps, solver, adjoint, unroll=None):
    def loss(ts, y0, args):
        ys = odeint(
            field, y0, args, ts=ts, num_steps=num_steps, solver=solver, adjoint=adjoint,
            unroll=unroll,
        )  # fmt: skip
        # Weight the outputs differently so every output time matters.
        w = jnp.linspace(1.0, 2.0, ts.shape[0], dtype=ts.dtype)
        return sum(
            jnp.sum(jnp.tensordot(w, jnp.sin(leaf) * leaf, axes=1)) for leaf in jax.tree.leaves(ys)
        )

    return loss


# --- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", RK_SOLVERS)
def test_ts_outputs_are_chained_fixed_grid_solves(x64, solver):
    """Runge–Kutta (no state besides y): entry 0 is y0; entry i+1 is the fixed-grid solve over
    [ts[i], ts[i+1]] from entry i."""
    y0, args = smooth_problem(jax.random.PRNGKey(0))
    ys = jax.jit(lambda ts: odeint(smooth_field, y0, args, ts=ts, num_steps=3, solver=solver))(
        _ts()
    )
    assert jax.tree.map(jnp.shape, ys) == jax.tree.map(lambda x: (len(TS), *x.shape), y0)
    tree_allclose(jax.tree.map(lambda x: x[0], ys), y0, rtol=0)
    for i in range(len(TS) - 1):
        start = jax.tree.map(lambda x: x[i], ys)
        want = odeint(smooth_field, start, args, t0=TS[i], t1=TS[i + 1], num_steps=3, solver=solver)
        tree_allclose(jax.tree.map(lambda x: x[i + 1], ys), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("solver", SOLVERS)
def test_uniform_ts_is_one_solve_on_the_union_grid(x64, solver):
    """Uniform ts with N steps per interval is the same trajectory as one solve with N·(n-1)
    steps (reversible solvers carry their auxiliary state through the output times)."""
    y0, args = smooth_problem(jax.random.PRNGKey(1))
    ys = odeint(smooth_field, y0, args, ts=jnp.linspace(0.0, 2.0, 6), num_steps=2, solver=solver)
    for i in range(1, 6):
        want = odeint(smooth_field, y0, args, t0=0.0, t1=0.4 * i, num_steps=2 * i, solver=solver)
        tree_allclose(jax.tree.map(lambda x: x[i], ys), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("unroll", [False, True])
@pytest.mark.parametrize("solver", REVERSIBLE_SOLVERS)
def test_reversible_ts_is_one_solve_through_every_output_time(x64, solver, unroll):
    """Reversible solvers carry their state, auxiliary variables included, across output times:
    the outputs are those of one fixed-grid solve in t whose step size is
    (ts[i+1] - ts[i]) / N on interval i, here written out with the solver's own step."""
    y0, args = smooth_problem(jax.random.PRNGKey(11))
    num_steps = 3
    method = get_solver(solver)
    state = method.init(smooth_field, jnp.float64(TS[0]), y0, args)
    want = [y0]
    for a, b in zip(TS[:-1], TS[1:]):
        dt = (b - a) / num_steps
        for n in range(num_steps):
            state = method.step(smooth_field, jnp.float64(a + n * dt), dt, state, args)
        want.append(method.output(state))
    want = jax.tree.map(lambda *leaves: jnp.stack(leaves), *want)
    ys = odeint(smooth_field, y0, args, ts=_ts(), num_steps=num_steps, solver=solver,
                unroll=unroll)  # fmt: skip
    tree_allclose(ys, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("span", [(0.2, 1.3), (1.0, -0.5)])
def test_traced_span_equals_static_span(x64, solver, span):
    """The time-normalised path (traced t0, t1) and the fixed-grid path (Python numbers)
    compute the same discrete map, up to the order of rounding."""
    y0, args = smooth_problem(jax.random.PRNGKey(2))
    solve = lambda t0, t1: odeint(smooth_field, y0, args, t0=t0, t1=t1, num_steps=5, solver=solver)
    tree_allclose(jax.jit(solve)(*span), solve(*span), rtol=1e-12, atol=1e-14)


def test_decreasing_ts_integrates_backwards(x64):
    y0, args = smooth_problem(jax.random.PRNGKey(3))
    ys = odeint(smooth_field, y0, args, ts=_ts(TS[::-1]), num_steps=4)
    want = odeint(smooth_field, y0, args, t0=TS[-1], t1=TS[0], num_steps=4 * (len(TS) - 1))
    # Not the same grid (irregular ts), so compare to the RK4 truncation error.
    tree_allclose(jax.tree.map(lambda x: x[-1], ys), want, rtol=1e-4, atol=1e-5)


def test_bfloat16_state_with_float32_times():
    y0 = jnp.ones((3,), jnp.bfloat16)
    ys = odeint(lambda t, y, a: -y, y0, None, ts=jnp.asarray([0.0, 0.5, 1.0]), num_steps=4)
    assert ys.dtype == jnp.bfloat16 and ys.shape == (3, 3)
    np.testing.assert_allclose(
        np.asarray(ys[:, 0], np.float32), np.exp([0.0, -0.5, -1.0]), rtol=2e-2
    )


# --- gradients ------------------------------------------------------------------------------

PROBLEMS = {
    "conv_relu": (conv_relu_field, conv_relu_problem),
    "smooth_pytree": (smooth_field, smooth_problem),
}


# Every exact strategy on the smooth pytree field, looped and unrolled; one per family on the
# conv field, looped (unrolled, its compiles took up to 160 s a case).
GRADIENT_CASES = [
    ("smooth_pytree", *pair, unroll) for pair in EXACT for unroll in (False, True)
] + [("conv_relu", *pair, False) for pair in [EXACT[0], EXACT[2], EXACT[3]]]


_DIRECT_TS_GRADIENTS = {}  # float64 only: every case below runs under the x64 fixture


@pytest.mark.parametrize("problem,solver,adjoint,unroll", GRADIENT_CASES)
def test_ts_gradients_of_exact_strategies_match_direct(x64, problem, unroll, solver, adjoint):
    field, make = PROBLEMS[problem]
    y0, args = make(jax.random.PRNGKey(4))
    # Compared values, not timed ones: XLA's backend optimization level does not change the
    # arithmetic (tests/conftest.py, FAST_COMPILE).
    grad = lambda adj: jax.jit(
        jax.grad(_ts_loss(field, 3, solver, adj, unroll=unroll), argnums=(0, 1, 2)),
        compiler_options=FAST_COMPILE,
    )(_ts(), y0, args)
    key = (problem, solver, unroll)  # one "direct" reference for the strategies of a case
    if key not in _DIRECT_TS_GRADIENTS:
        _DIRECT_TS_GRADIENTS[key] = grad("direct")
    got, want = grad(adjoint), _DIRECT_TS_GRADIENTS[key]
    assert np.all(np.abs(np.asarray(want[0])) > 1e-6)  # every output time gets a gradient
    tree_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("solver", ["rk4", "reversible:rk4"])
def test_direct_ts_gradients_match_finite_differences(x64, problem, solver):
    field, make = PROBLEMS[problem]
    y0, args = make(jax.random.PRNGKey(5))
    loss = _ts_loss(field, 2, solver, "direct", unroll=False)
    # Central differences in float64; ReLU kinks are measure-zero for random data at eps=1e-6.
    check_grads(loss, (_ts(), y0, args), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("solver,adjoint", [("rk4", "direct"), *EXACT[:4]])
def test_span_gradients_match_finite_differences(x64, solver, adjoint):
    """∂/∂t0 and ∂/∂t1 of the final-state form: the step size h = (t1 - t0)/N moves with
    them, so the gradient is that of the computed discrete map."""
    y0, args = smooth_problem(jax.random.PRNGKey(6))

    def loss(t0, t1):
        y1 = odeint(smooth_field, y0, args, t0=t0, t1=t1, num_steps=3, solver=solver,
                    adjoint=adjoint)  # fmt: skip
        return _sum_loss(y1)

    t0, t1 = jnp.float64(0.1), jnp.float64(1.7)
    check_grads(loss, (t0, t1), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)
    # The discrete map's step size depends on the span: with one RK4 step the derivative with
    # respect to t1 is not f(t1, y(t1)) (the continuous answer) but close to it.
    g_t1 = jax.grad(loss, argnums=1)(t0, t1)
    assert np.isfinite(g_t1) and g_t1 != 0.0


def test_backsolve_ts_gradients_converge_to_exact(x64):
    """Backsolve per interval restarts the adjoint at each forward output and adds that
    output's cotangent (Chen et al. 2018, Alg. 2; torchdiffeq's odeint_adjoint): approximate,
    converging to the exact gradient as the steps per interval grow (RK4: ~16x per halving)."""
    y0, args = smooth_problem(jax.random.PRNGKey(7))
    errors = []
    for n in (2, 4, 8):
        grad = lambda adj: jax.grad(_ts_loss(smooth_field, n, "rk4", adj), argnums=(0, 2))(
            _ts(), y0, args
        )
        got, want = grad("backsolve"), grad("direct")
        errors.append(max(float(jnp.max(jnp.abs(a - b))) for a, b in
                          zip(jax.tree.leaves(got), jax.tree.leaves(want))))  # fmt: skip
    assert errors[0] < 1e-2, errors
    assert errors[1] < errors[0] / 8 and errors[2] < errors[1] / 8, errors


@pytest.mark.parametrize("adjoint", ["anode", "checkpointed:2", "backsolve"])
def test_closed_over_tracers_get_gradients_with_ts(x64, adjoint):
    y0, args = smooth_problem(jax.random.PRNGKey(8))

    def loss(w, adj):
        field = lambda t, y, a: smooth_field(t, y, {"w": w, "b": a})
        ys = odeint(field, y0, args["b"], ts=_ts(), num_steps=32 if adj == "backsolve" else 3,
                    adjoint=adj)  # fmt: skip
        return _sum_loss(ys)

    # backsolve is approximate (at 32 RK4 steps per interval it agrees to ~3e-5 here); a
    # dropped closure gradient would miss by O(1).
    tol = 1e-4 if adjoint == "backsolve" else 1e-10
    np.testing.assert_allclose(jax.grad(loss)(args["w"], adjoint),
                               jax.grad(loss)(args["w"], "direct"), rtol=tol, atol=tol)  # fmt: skip


@pytest.mark.parametrize("solver,adjoint", [("rk4", "anode"), ("reversible_heun", "reversible")])
def test_grad_of_grad_with_ts_equals_direct(x64, solver, adjoint):
    # Hessian-vector products with respect to the times and the parameters (reverse over
    # reverse through the outputs-only backward pass, which anode and checkpointed share, and
    # through reversible's reconstruction across output times; grad of grad of each
    # strategy's own backward is tested in test_first_contact.py).
    y0, args = smooth_problem(jax.random.PRNGKey(12))
    vs = (jnp.linspace(0.5, 1.5, len(TS), dtype=jnp.float64),
          jax.tree.map(lambda x: jnp.cos(x), args))  # fmt: skip

    def hvp(adj):
        grad = jax.grad(lambda ts, a: _ts_loss(smooth_field, 2, solver, adj)(ts, y0, a), (0, 1))
        return jax.jit(jax.grad(lambda ts, a: sum(
            jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grad(ts, a)), jax.tree.leaves(vs))
        ), (0, 1)), compiler_options=FAST_COMPILE)(_ts(), args)  # fmt: skip

    tree_allclose(hvp(adjoint), hvp("direct"), rtol=1e-9, atol=1e-12)


def _mlp_field(t, y, params):
    w1, w2 = params
    return jnp.tanh(y @ w1) @ w2 * (1.0 + 0.1 * t)


@pytest.mark.parametrize(
    "adjoint,solver,loss_kind,sizes,states_per_output",
    [
        # The backward pass keeps about log2(n) states (checkpoints at the segment starts)
        # and recomputes the rest into the consumed slots of the outputs' cotangent. Its peak,
        # the cotangent plus one interval's working set (about 70 states here, the stages
        # rematerialised), is the gradient's peak below n ≈ 70; from there on the peak is the
        # loss's VJP, which holds the outputs and their cotangent (2 states per output, for
        # every strategy and for diffrax), so the growth is measured from n = 8 to 64.
        # Measured 1.05 (squared) and 1.42 (linear); keeping the outputs as residuals besides
        # their cotangent grows by 2 or more (reverse mode through a scan of per-interval
        # solves, from n = 64 to 256: 2.0 linear, 2.9 squared).
        ("anode", "rk4", "squared", (8, 64), 1.75),
        ("anode", "rk4", "linear", (8, 64), 1.75),
        ("checkpointed:2", "rk4", "squared", (8, 64), 1.75),
        ("checkpointed:2", "rk4", "linear", (8, 64), 1.75),
        ("backsolve", "rk4", "squared", (64, 256), 2.25),
        # The solver state is carried through the output times and reconstructed backwards:
        # no per-interval state (restarting the auxiliary state per interval kept one each:
        # 3.1 states per output). Measured 1.42 / 1.82 (squared), 1.00 (linear).
        ("reversible", "reversible:rk4", "squared", (64, 256), 2.25),
        ("reversible", "reversible_heun", "squared", (64, 256), 2.25),
        ("reversible", "reversible_heun", "linear", (64, 256), 1.25),
    ],
)
def test_memory_per_output_time(adjoint, solver, loss_kind, sizes, states_per_output):
    # Compiled temp bytes of the gradient at two numbers of output times: the growth per
    # output, in states.
    w = (jnp.ones((2, 64), jnp.float32) / 8, jnp.ones((64, 2), jnp.float32) / 64)
    y0 = jnp.ones((256, 2), jnp.float32)

    def temp_bytes(n):
        ts = jnp.linspace(0.0, 1.0, n, dtype=jnp.float32)

        def loss(w):
            ys = odeint(_mlp_field, y0, w, ts=ts, num_steps=2, solver=solver, adjoint=adjoint)
            if loss_kind == "squared":
                return jnp.mean(ys**2)
            return jnp.sum(ys * jnp.linspace(0.0, 1.0, n)[:, None, None])

        return jax.jit(jax.grad(loss)).lower(w).compile().memory_analysis().temp_size_in_bytes

    small, large = sizes
    growth = (temp_bytes(large) - temp_bytes(small)) / (large - small) / y0.nbytes
    assert growth <= states_per_output, growth


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 9, 17, 40])
def test_ts_gradients_equal_direct_for_every_number_of_outputs(x64, n):
    # anode and checkpointed keep the inputs of segments of 1, 2, 4, ... intervals from the
    # end and recompute the rest into the consumed slots of the outputs' cotangent: these n
    # give 1 to 6 segments, full and partial first segments. Irregular times, pytree state,
    # a loss weighting every output differently.
    y0, args = smooth_problem(jax.random.PRNGKey(n))
    ts = jnp.sort(jax.random.uniform(jax.random.PRNGKey(100 + n), (n,), jnp.float64)) * 2.0

    def loss(ts, y0, args, adjoint):
        ys = odeint(smooth_field, y0, args, ts=ts, num_steps=2, solver="rk4", adjoint=adjoint)
        weights = jnp.arange(1.0, n + 1.0)
        return sum(jnp.sum(jnp.sin(leaf) * weights.reshape((n,) + (1,) * (leaf.ndim - 1)))
                   for leaf in jax.tree.leaves(ys))  # fmt: skip

    grad = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)
    expected = grad(ts, y0, args, "direct")
    for adjoint in ("anode", "checkpointed:2"):
        tree_allclose(grad(ts, y0, args, adjoint), expected, rtol=1e-10, atol=1e-12)


# --- vmap: per-sample times -----------------------------------------------------------------


@pytest.mark.parametrize(
    "solver,adjoint", [("rk4", "anode"), ("rk4", "checkpointed:2"), ("alf", "reversible")]
)
def test_vmap_over_per_sample_ts_equals_a_loop(x64, solver, adjoint):
    y0, args = smooth_problem(jax.random.PRNGKey(9))
    grids = jnp.stack([_ts(), _ts(TS) * 0.5 + 0.1, _ts(TS[::-1])])
    starts = jax.tree.map(lambda x: jnp.stack([x, -x, 0.5 * x]), y0)
    value_and_grad = jax.value_and_grad(_ts_loss(smooth_field, 2, solver, adjoint), argnums=(0, 2))
    batched = jax.jit(jax.vmap(value_and_grad, in_axes=(0, 0, None)))(grids, starts, args)
    for i in range(3):
        one = value_and_grad(grids[i], jax.tree.map(lambda x: x[i], starts), args)
        tree_allclose(jax.tree.map(lambda x: x[i], batched), one, rtol=1e-12, atol=1e-14)


def test_vmap_over_per_sample_spans_equals_a_loop(x64):
    y0, args = smooth_problem(jax.random.PRNGKey(10))
    t1s = jnp.asarray([0.5, 1.0, -0.7])

    def loss(t1):
        return _sum_loss(odeint(smooth_field, y0, args, t0=0.1, t1=t1, num_steps=3))

    batched = jax.vmap(jax.value_and_grad(loss))(t1s)
    for i, t1 in enumerate(t1s):
        tree_allclose(jax.tree.map(lambda x: x[i], batched), jax.value_and_grad(loss)(t1),
                      rtol=1e-12, atol=1e-14)  # fmt: skip


# --- eager calls compile once ---------------------------------------------------------------

# Every strategy with a fixed-step solver, and adaptive solvers.
EAGER_FIXED = [
    ("rk4", "direct"),
    ("rk4", "anode"),
    ("rk4", "checkpointed:1"),
    ("rk4", "checkpointed:3"),
    ("reversible:rk4", "reversible"),
    ("rk4", "backsolve"),
]
# Every strategy, looped or unrolled in turn: both loop forms are covered, and each case
# compiles three programs (all 12 pairs took minutes).
EAGER_CASES = [(solver, adjoint, i % 2 == 1) for i, (solver, adjoint) in enumerate(EAGER_FIXED)]
EAGER_CASES += [("dopri5", "anode", None), ("bosh3", "checkpointed:2", None)]


def _decay(t, y, w):
    return -jnp.tanh(w @ y) * (1.0 + 0.1 * jnp.sin(t))


def _assert_compiles_once(compilations, what, calls):
    """Runs the calls in order; from the second on, none may compile."""
    outs = []
    for i, call in enumerate(calls):
        before = compilations.count
        outs.append(call())
        if i:
            assert compilations.count == before, f"eager {what} call {i + 1} compiled"
    return outs


@pytest.mark.parametrize(
    "solver,adjoint,unroll", EAGER_CASES, ids=lambda v: "default" if v is None else str(v)
)
def test_eager_ts_and_traced_span_calls_compile_once(compilations, solver, adjoint, unroll):
    """Same field, shapes and configuration, new parameter and time values: the second and third
    eager `ts=` calls, eager `jax.grad`s with respect to (w, ts), and eager `jax.grad`s with
    respect to (w, t0, t1) (traced span) compile nothing; the times are data of the compiled
    program (its results follow the new times and equal a jitted call's)."""
    if solver in ("dopri5", "bosh3"):
        kwargs = dict(solver=solver, adjoint=adjoint, rtol=1e-4, atol=1e-6)
    else:
        kwargs = dict(num_steps=2, solver=solver, adjoint=adjoint, unroll=unroll)
    y0 = jnp.asarray([1.0, -0.5, 0.25])
    ws = [jnp.eye(3) * s for s in (0.5, 0.6, 0.7)]
    grids = [
        jnp.asarray(g, jnp.float32) for g in ([0.0, 0.3, 1.0], [0.1, 0.5, 0.8], [0.0, 0.7, 1.4])
    ]
    spans = [(jnp.float32(a), jnp.float32(b)) for a, b in ((0.0, 1.0), (0.2, 0.9), (-0.3, 1.2))]

    solve_ts = lambda w, ts: odeint(_decay, y0, w, ts=ts, **kwargs)
    loss_ts = lambda w, ts: jnp.sum(jnp.sin(solve_ts(w, ts)))
    loss_span = lambda w, t0, t1: jnp.sum(jnp.sin(odeint(_decay, y0, w, t0=t0, t1=t1, **kwargs)))
    grad_ts = jax.grad(loss_ts, argnums=(0, 1))
    grad_span = jax.grad(loss_span, argnums=(0, 1, 2))

    outs = _assert_compiles_once(
        compilations, "ts=", [lambda w=w, g=g: solve_ts(w, g) for w, g in zip(ws, grids)]
    )
    grads = _assert_compiles_once(
        compilations, "jax.grad ts=", [lambda w=w, g=g: grad_ts(w, g) for w, g in zip(ws, grids)]
    )
    span_grads = _assert_compiles_once(
        compilations,
        "jax.grad traced-span",
        [lambda w=w, s=s: grad_span(w, *s) for w, s in zip(ws, spans)],
    )
    # The cached programs compute with the new values: equal to jitted calls, and different
    # from the first call's (the times were not baked in).
    for i in (1, 2):
        tree_allclose(outs[i], jax.jit(solve_ts)(ws[i], grids[i]), rtol=1e-6, atol=1e-7)
        tree_allclose(grads[i], jax.jit(grad_ts)(ws[i], grids[i]), rtol=1e-5, atol=1e-6)
        tree_allclose(span_grads[i], jax.jit(grad_span)(ws[i], *spans[i]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(outs[1], outs[0]) and not np.allclose(grads[2][1], grads[1][1])


# --- errors ---------------------------------------------------------------------------------

FIELD = lambda t, y, a: -y
Y0 = jnp.ones((2,), jnp.float32)


def test_ts_with_t0_or_t1_is_an_error():
    with pytest.raises(TypeError, match=r"either t0=/t1= .* or ts="):
        odeint(FIELD, Y0, None, t0=0.0, ts=jnp.asarray([0.0, 1.0]), num_steps=1)
    with pytest.raises(TypeError, match=r"either t0=/t1= .* or ts="):
        odeint(FIELD, Y0, None, t1=1.0, ts=jnp.asarray([0.0, 1.0]), num_steps=1)


@pytest.mark.parametrize(
    "ts,error,match",
    [
        (jnp.zeros((2, 3)), ValueError, "1-D array of at least 2 times"),
        (jnp.zeros((1,)), ValueError, "1-D array of at least 2 times"),
        (jnp.arange(3), TypeError, "floating-point array"),
        ("0 1", TypeError, "1-D floating-point array"),
        (jnp.asarray([0.0, 1.0, 1.0]), ValueError, r"strictly .* ts\[1\] = 1.0 and ts\[2\]"),
        (jnp.asarray([0.0, 1.0, 0.5]), ValueError, r"ts\[1\] = 1.0 and ts\[2\] = 0.5"),
        (jnp.asarray([0.0, jnp.nan]), ValueError, "finite"),
        # Printed in ts's own dtype (float32 0.3, not 0.30000001192092896).
        (jnp.asarray([0.0, 0.5, 0.3], jnp.float32), ValueError, r"ts\[2\] = 0.3 break"),
    ],
)
def test_bad_ts_rejected(ts, error, match):
    with pytest.raises(error, match=match):
        odeint(FIELD, Y0, None, ts=ts, num_steps=1)


@pytest.mark.parametrize("solver", ["rk4", "alf"])
@pytest.mark.parametrize(
    "options,match",
    [
        (dict(dt0=0.1), r"dt0 applies to adaptive solvers only; .* or drop dt0\."),
        (dict(rtol=1e-5, atol=1e-6), r"rtol, atol apply to adaptive solvers .* drop rtol, atol\."),
    ],
)
def test_adaptive_options_with_ts_and_a_fixed_step_solver_rejected(solver, options, match):
    """With `ts` and a fixed-step solver (Runge–Kutta, or a reversible one, whose solve is
    carried through the output times) adaptive options get the fixed-step error, which names
    every one given and the adaptive solvers."""
    with pytest.raises(ValueError, match=match):
        odeint(FIELD, Y0, None, ts=jnp.asarray([0.0, 0.5, 1.0]), num_steps=2, solver=solver,
               adjoint="reversible" if solver == "alf" else "anode", **options)  # fmt: skip


def test_traced_integer_time_rejected():
    with pytest.raises(TypeError, match="t1 must be a floating-point scalar"):
        jax.jit(lambda t1: odeint(FIELD, Y0, None, t1=t1, num_steps=1))(jnp.int32(1))


def test_traced_non_scalar_time_rejected():
    with pytest.raises(ValueError, match="t0 must be a scalar"):
        jax.jit(lambda t0: odeint(FIELD, Y0, None, t0=t0, num_steps=1))(jnp.zeros(2))


def test_traced_ts_of_any_order_runs_unchecked():
    """Traced ts values cannot be inspected at trace time: a non-monotone grid then runs as the
    chained solves it describes (each interval in its own direction), as documented."""
    ts = jnp.asarray([0.0, 1.0, 0.5])
    ys = jax.jit(lambda ts: odeint(FIELD, Y0, None, ts=ts, num_steps=8))(ts)
    np.testing.assert_allclose(ys[:, 0], np.exp([0.0, -1.0, -0.5]), rtol=1e-4)


# --- oracle ---------------------------------------------------------------------------------


def test_diffrax_saveat_stepto_oracle(x64):
    """diffrax's SaveAt(ts) with StepTo on the grid splitting every interval into N steps is
    the same trajectory, and gives the same parameter gradient."""
    diffrax = pytest.importorskip("diffrax")
    from tests.test_adjoint import _diffrax_rk4

    y0, args = smooth_problem(jax.random.PRNGKey(11))
    ts, n = np.asarray(TS), 3
    grid = np.concatenate(
        [np.linspace(a, b, n + 1)[:-1] for a, b in zip(ts[:-1], ts[1:])] + [ts[-1:]]
    )

    def theirs(args):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(smooth_field), _diffrax_rk4(), t0=ts[0], t1=ts[-1], dt0=None, y0=y0,
            args=args, stepsize_controller=diffrax.StepTo(ts=jnp.asarray(grid)),
            saveat=diffrax.SaveAt(ts=jnp.asarray(ts)), max_steps=len(grid) - 1,
        )  # fmt: skip
        return sol.ys

    ours = lambda args: odeint(smooth_field, y0, args, ts=_ts(), num_steps=n)
    tree_allclose(ours(args), theirs(args), rtol=1e-12, atol=1e-14)
    grad = lambda solve: jax.grad(lambda a: _sum_loss(solve(a)))(args)
    tree_allclose(grad(ours), grad(theirs), rtol=1e-10, atol=1e-13)
