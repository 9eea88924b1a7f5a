"""What a new user tries first, as families: grad of grad, forward mode, huge step counts with a
checkpoint budget, eager calls, static `args` leaves (Flax fields: tests/test_first_contact_flax.py).

Every strategy, looped and unrolled; values against `"direct"` in float64 or analytic answers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anode_jax import odeint
from anode_jax.ode.adjoints.checkpointed import revolve_cost, revolve_schedule
from tests.conftest import tree_allclose

# (adjoint, solver): every exact strategy, the reversible one with a reversible solver.
EXACT = [
    ("direct", "rk4"),
    ("anode", "rk4"),
    ("checkpointed:1", "rk4"),
    ("checkpointed:3", "rk4"),
    ("reversible", "reversible:rk4"),
]
CUSTOM_VJP = [("anode", "rk4"), ("checkpointed:2", "rk4"), ("backsolve", "rk4")]
CUSTOM_VJP += [("reversible", "reversible_heun")]
UNROLL = pytest.mark.parametrize("unroll", [False, True], ids=["looped", "unrolled"])


def _ids(case):
    return "-".join(case) if isinstance(case, tuple) else str(case)


def _field(t, y, w):
    return jnp.tanh(w @ y) * (1.0 + 0.1 * jnp.sin(t))


def _problem(dtype=jnp.float64):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    w = 0.7 * jax.random.normal(k1, (3, 3), dtype)
    y0 = jax.random.normal(k2, (3,), dtype)
    v = jax.random.normal(k3, (3, 3), dtype)
    return w, y0, v


def _loss(adjoint, solver, num_steps, unroll):
    _, y0, _ = _problem()

    def loss(w):
        y1 = odeint(
            _field, y0, w, num_steps=num_steps, solver=solver, adjoint=adjoint, unroll=unroll
        )
        return jnp.sum(jnp.sin(y1)) + 0.5 * jnp.sum(y1**2)

    return loss


# ------------------------------------------------------------------------------------------
# Kind 2: reverse-over-reverse (Hessian-vector products, gradient penalties, MAML).


@pytest.mark.parametrize(
    "num_steps,unroll",
    [(1, False), (7, False), (3, True)],  # unrolled programs grow with the steps: 3 suffice
    ids=["1-looped", "7-looped", "3-unrolled"],
)
@pytest.mark.parametrize("case", EXACT, ids=_ids)
def test_grad_of_grad_equals_direct(x64, case, num_steps, unroll):
    """HVP = grad(<v, grad loss>) and the full jacrev(grad) Hessian agree with "direct"
    through the same solver to 1e-8 relative (float64)."""
    adjoint, solver = case
    w, _, v = _problem()

    def hvp(adjoint):
        grad = jax.grad(_loss(adjoint, solver, num_steps, unroll))
        return jax.grad(lambda w: jnp.vdot(v, grad(w)))(w)

    def hessian(adjoint):
        return jax.jacrev(jax.grad(_loss(adjoint, solver, num_steps, unroll)))(w)

    tree_allclose(jax.jit(lambda: hvp(adjoint))(), hvp("direct"), rtol=1e-8, atol=1e-12)
    tree_allclose(hessian(adjoint), hessian("direct"), rtol=1e-8, atol=1e-12)


@UNROLL
def test_grad_of_grad_of_backsolve_is_the_derivative_of_its_gradient(x64, unroll):
    """Backsolve's gradient is approximate, so its HVP is compared with central differences
    of that gradient (the adjoint ODE itself is differentiated)."""
    w, _, v = _problem()
    grad = jax.grad(_loss("backsolve", "rk4", 5, unroll))
    hvp = jax.grad(lambda w: jnp.vdot(v, grad(w)))(w)
    eps = 1e-5
    dw = jax.random.normal(jax.random.PRNGKey(5), w.shape, w.dtype)
    fd = (jnp.vdot(v, grad(w + eps * dw)) - jnp.vdot(v, grad(w - eps * dw))) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(hvp, dw)), float(fd), rtol=1e-7)


@pytest.mark.parametrize("num_checkpoints", [2, 4])
def test_grad_of_grad_through_long_checkpointed_schedule(x64, num_checkpoints):
    """Nt = 40 with K = 2 and 4: the looped schedule has stores, splits and reloads."""
    w, _, v = _problem()
    solve = lambda adjoint: jax.grad(_loss(adjoint, "euler", 40, False))
    hvp = lambda adjoint: jax.grad(lambda w: jnp.vdot(v, solve(adjoint)(w)))(w)
    tree_allclose(hvp(f"checkpointed:{num_checkpoints}"), hvp("direct"), rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Kind 3: forward mode.


@pytest.mark.parametrize("case", CUSTOM_VJP, ids=_ids)
def test_forward_mode_through_custom_vjp_strategy_names_the_way_out(case):
    adjoint, solver = case
    w, y0, _ = _problem(jnp.float32)
    solve = lambda w: odeint(_field, y0, w, num_steps=2, solver=solver, adjoint=adjoint)
    match = rf"adjoint='{adjoint.split(':')[0]}' .* forward mode .* use adjoint=\"direct\""
    with pytest.raises(TypeError, match=match):
        jax.jvp(solve, (w,), (w,))
    with pytest.raises(TypeError, match=match):
        jax.jacfwd(solve)(w)


@UNROLL
def test_forward_mode_through_direct_equals_reverse_mode(x64, unroll):
    w, y0, _ = _problem()
    solve = lambda w: odeint(_field, y0, w, num_steps=6, adjoint="direct", unroll=unroll)
    tree_allclose(jax.jacfwd(solve)(w), jax.jacrev(solve)(w), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", EXACT, ids=_ids)
def test_forward_over_reverse_works_with_every_strategy(x64, case):
    """jax.hessian (jacfwd of jacrev) through every strategy equals "direct"'s."""
    adjoint, solver = case
    w, _, _ = _problem()
    hessian = lambda adjoint: jax.hessian(_loss(adjoint, solver, 3, False))(w)
    tree_allclose(hessian(adjoint), hessian("direct"), rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Kind 4: a checkpoint budget at large step counts.


def _dp_minimum(num_steps, num_checkpoints):
    """Independent dynamic programme over every split (O(T² K)): the fewest recomputed steps."""
    cost = [[t * (t - 1) // 2 for t in range(num_steps + 1)]]
    for s in range(1, num_checkpoints):
        row = [0, 0]
        for t in range(2, num_steps + 1):
            row.append(min(m + cost[s - 1][t - m] + row[m] for m in range(1, t)))
        cost.append(row)
    return cost[min(num_checkpoints, num_steps) - 1][num_steps]


@pytest.mark.parametrize("num_checkpoints", [1, 2, 3, 5, 8])
def test_revolve_schedule_cost_is_the_binomial_minimum(num_checkpoints):
    for num_steps in (1, 2, 3, 9, 10, 37, 120):
        recomputed = sum(a.n1 - a.n0 for a in revolve_schedule(num_steps, num_checkpoints))
        minimum = _dp_minimum(num_steps, num_checkpoints)
        assert recomputed == minimum == revolve_cost(num_steps, num_checkpoints)


def test_revolve_schedule_plans_100k_steps():
    """Nt = 100,000, K = 8: every step reversed once, in order; the binomial minimum of
    recomputations (r = 12: C(20, 8) = 125,970 >= Nt; cost 12 Nt - C(20, 9))."""
    schedule = revolve_schedule(100_000, 8)
    assert schedule.num_recomputed_steps == 12 * 100_000 - 167_960 == revolve_cost(100_000, 8)
    vjp_steps = schedule.n1[schedule.vjp]
    np.testing.assert_array_equal(vjp_steps, np.arange(99_999, -1, -1))
    assert schedule.src.max() < 8 and schedule.dst.max() < 8


def test_checkpointed_gradient_at_many_steps_is_analytic(x64):
    """y' = -a y, Euler, Nt = 3,000, K = 4: y_N = (1 - a h)^N y0, so
    d y_N / d a = -N h (1 - a h)^(N-1) y0."""
    num_steps, a, y0 = 3000, 0.8, 1.5
    h = 1.0 / num_steps
    solve = lambda a: odeint(
        lambda t, y, a: -a * y,
        jnp.asarray(y0),
        a,
        num_steps=num_steps,
        solver="euler",
        adjoint="checkpointed:4",
    )
    exact = -num_steps * h * (1 - a * h) ** (num_steps - 1) * y0
    np.testing.assert_allclose(float(jax.grad(solve)(jnp.asarray(a))), exact, rtol=1e-10)


@pytest.mark.parametrize("adjoint", ["checkpointed:4", "anode"])
def test_program_does_not_grow_with_num_steps(adjoint):
    """The lowered gradient program has the same lines at Nt = 10 and Nt = 5,000 (the schedule
    is one constant array, scanned over)."""
    sizes = {}
    for num_steps in (10, 5000):
        loss = lambda a: jnp.sum(
            odeint(
                lambda t, y, a: -a * y,
                jnp.ones(3),
                a,
                num_steps=num_steps,
                solver="euler",
                adjoint=adjoint,
            )
        )
        sizes[num_steps] = len(jax.jit(jax.grad(loss)).lower(0.5).as_text().splitlines())
    assert sizes[10] == sizes[5000], sizes


# ------------------------------------------------------------------------------------------
# Kind 5: eager calls compile once.


def _decay(t, y, w):
    return -jnp.tanh(w @ y)


@pytest.mark.parametrize("case", EXACT + [("backsolve", "rk4")], ids=_ids)
@UNROLL
def test_eager_calls_compile_once(compilations, case, unroll):
    """Same field, same shapes, new values: the second and third eager odeint and eager
    jax.grad calls compile nothing."""
    adjoint, solver = case
    ws = [jnp.eye(3) * s for s in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    y0 = jnp.ones(3)
    kwargs = dict(num_steps=4, solver=solver, adjoint=adjoint, unroll=unroll)
    loss = lambda w: jnp.sum(odeint(_decay, y0, w, **kwargs))
    outs = []
    for i, w in enumerate(ws[:3]):
        before = compilations.count
        outs.append(odeint(_decay, y0, w, **kwargs))
        if i:
            assert compilations.count == before, f"eager call {i + 1} compiled"
    grads = []
    for i, w in enumerate(ws[3:]):
        before = compilations.count
        grads.append(jax.grad(loss)(w))
        if i:
            assert compilations.count == before, f"eager grad call {i + 1} compiled"
    # The cached programs compute with the new values.
    reference = jax.jit(lambda w: odeint(_decay, y0, w, **kwargs))
    np.testing.assert_allclose(outs[2], reference(ws[2]), rtol=1e-6)
    np.testing.assert_allclose(grads[2], jax.jit(jax.grad(loss))(ws[5]), rtol=1e-5)


def test_eager_cache_keys_on_configuration(compilations):
    y0, w = jnp.ones(3), 0.5 * jnp.eye(3)
    odeint(_decay, y0, w, num_steps=3)
    before = compilations.count
    odeint(_decay, y0, w, num_steps=5)  # another static configuration: compiles
    odeint(_decay, jnp.ones(4), 0.5 * jnp.eye(4), num_steps=3)  # other shapes: compiles
    assert compilations.count >= before + 2
    # And the values follow each configuration.
    np.testing.assert_allclose(
        odeint(_decay, y0, w, num_steps=5), jax.jit(lambda w: odeint(_decay, y0, w, num_steps=5))(w)
    )


# ------------------------------------------------------------------------------------------
# Kind 6: Python values in args are static.


def _shaped_field(t, y, args):
    pad = jnp.zeros(args["n"], y.dtype)  # a Python int used as a shape
    scale = args["scale"]  # a Python float
    return -scale * jnp.concatenate([y[: args["n"]] - pad, y[args["n"] :]]) * args["w"]


@UNROLL
@pytest.mark.parametrize("case", EXACT + [("backsolve", "rk4")], ids=_ids)
def test_python_scalars_in_args_are_static(x64, case, unroll):
    """y' = -scale w y: y(1) = y0 exp(-scale w); the gradient w.r.t. the array leaf w is
    analytic; n (a shape) and scale (a Python float) stay Python values in the field."""
    adjoint, solver = case
    y0, w = jnp.asarray([1.0, -2.0, 0.5]), jnp.asarray(0.7)
    exact = y0 * jnp.exp(-0.5 * w)

    def solve(w, n):
        args = {"n": n, "scale": 0.5, "w": w, "label": "decay"}
        return odeint(
            _shaped_field, y0, args, num_steps=8, solver=solver, adjoint=adjoint, unroll=unroll
        )

    # 8 RK4 steps of h = 1/8 on a decay rate of 0.35: values within 1e-7, gradients 2e-7; 8 steps
    # keep the unrolled checkpointed:1 program (36 recomputed steps) quick to compile.
    for n in (1, 2):
        np.testing.assert_allclose(solve(w, n), exact, rtol=1e-7)
    grad = jax.grad(lambda w: jnp.sum(solve(w, 2)))(w)
    rtol = 1e-6  # the derivative of the 8-step map differs from d/dw exp(-0.5 w) by ~1.5e-7
    np.testing.assert_allclose(grad, jnp.sum(-0.5 * exact), rtol=rtol)


def test_leak_check_makes_no_full_collection_when_nothing_leaks(monkeypatch):
    """odeint's leak check (a Flax submodule storing tracers, tests/test_first_contact_flax.py)
    searches only the field's outermost trace, and collects the whole heap only when that
    trace is referenced by tracers: a field with nested `jit`s and a `custom_vjp` (traces that
    reference cycles keep alive) costs no full collection, which is O(heap) each time."""
    import gc

    generations = []
    collect = gc.collect

    def recording_collect(generation=2):
        generations.append(generation)
        return collect(generation)

    monkeypatch.setattr(gc, "collect", recording_collect)

    @jax.custom_vjp
    def scaled(y):
        return 2.0 * y

    scaled.defvjp(lambda y: (2.0 * y, None), lambda _, g: (2.0 * g,))

    def field(t, y, w):
        return jax.jit(jnp.tanh)(scaled(jax.jit(lambda y: w @ y)(y)))

    w, y0, _ = _problem(jnp.float32)
    y1 = odeint(field, y0, w, num_steps=2)
    assert jnp.all(jnp.isfinite(y1))
    assert 2 not in generations, generations
