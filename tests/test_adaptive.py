"""Adaptive step sizes: embedded pairs, the PID controller, and exact gradients.

Gradients are of the computed discrete map with the accepted step sizes held constant; every
exact strategy is compared with "direct" (float64, rtol 1e-10), "direct" with central finite
differences where the step sequence is locally constant, values with closed-form solutions
and step counts with diffrax on the same problem and tolerances.
"""

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from anode_jax import odeint
from anode_jax.nn import conv_general_dilated
from anode_jax.ode import (
    BOSH3,
    DOPRI5,
    HEUN_EULER,
    TSIT5,
    EmbeddedTableau,
    PIDController,
    get_solver,
)
from anode_jax.ode.adaptive import anode_slots
from tests._ode_problems import smooth_field, smooth_problem
from tests.conftest import tree_allclose

PAIRS = [HEUN_EULER, BOSH3, DOPRI5, TSIT5]
EXACT = ["anode", "checkpointed:1"]


def mlp_field(t, y, p):
    return jnp.tanh(y @ p["w1"] + p["b1"] * jnp.cos(t)) @ p["w2"]


def mlp_problem(key, dtype=jnp.float64, dim=6, hidden=12):
    k1, k2, k3 = jax.random.split(key, 3)
    p = {
        "w1": jax.random.normal(k1, (dim, hidden), dtype) / dim**0.5,
        "b1": 0.1 * jnp.ones(hidden, dtype),
        "w2": jax.random.normal(k2, (hidden, dim), dtype) / hidden**0.5,
    }
    return jax.random.normal(k3, (3, dim), dtype), p


def linear_field(t, y, a):
    return y @ a.T


def stiffish_matrix(dtype=jnp.float64, n=5):
    """A symmetric negative-definite matrix with eigenvalues −1 … −1000 (log-spaced)."""
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(3), (n, n), dtype))
    lam = -jnp.logspace(0, 3, n, dtype=dtype)
    return (q * lam) @ q.T, q, lam


def conv_field(t, z, w):
    conv = lambda x, k: conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.nn.relu(conv(jax.nn.relu(conv(z, w[0])), w[1]))


def _loss(field, solver="tsit5", adjoint="direct", **kw):
    def loss(y0, args):
        y1 = odeint(field, y0, args, solver=solver, adjoint=adjoint, **kw)
        return sum(jnp.sum(jnp.sin(leaf) * leaf) for leaf in jax.tree.leaves(y1))

    return loss


# --- the pairs ---------------------------------------------------------------------------


def _pair_field(t, y, a):
    return jnp.stack([jnp.cos(t) * y[0] - y[1] ** 2, y[0] * y[1] + jnp.sin(3 * t)])


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.name)
def test_pair_orders_and_one_step_against_diffrax(pair, x64):
    """One step of a nonlinear, non-autonomous 2-D system: the solution equals diffrax's step
    of the same pair (same published tableau) to round-off, the error estimate too (dopri5:
    the paper's b̂, Dormand & Prince 1980 Table 2 as in Hairer's code, where diffrax and
    torchdiffeq use Shampine's (1986) alternative embedding: a different estimate); local
    error at least O(h^(p+1)), error estimate at least O(h^p) (observed slopes)."""
    y0 = jnp.asarray([0.5, -0.3])
    errs, ests = [], []
    for h in (0.2, 0.1):
        exact = odeint(_pair_field, y0, None, t0=0.0, t1=h, num_steps=2000, solver="rk4")
        y1, est, _ = pair.attempt(_pair_field, jnp.zeros(()), jnp.asarray(h), y0, None)
        errs.append(float(jnp.max(jnp.abs(y1 - exact))))
        ests.append(float(jnp.max(jnp.abs(est))))
    assert np.log2(errs[0] / errs[1]) > pair.order + 1 - 0.3, errs
    assert np.log2(ests[0] / ests[1]) > pair.order - 0.3, ests
    theirs = {"heun_euler": diffrax.Heun(), "bosh3": diffrax.Bosh3(), "dopri5": diffrax.Dopri5(),
              "tsit5": diffrax.Tsit5()}[pair.name]  # fmt: skip
    term = diffrax.ODETerm(_pair_field)
    state = theirs.init(term, 0.2, 0.5, y0, None)
    y_d, err_d, *_ = theirs.step(term, 0.2, 0.5, y0, None, state, False)
    y1, est, _ = pair.attempt(_pair_field, jnp.asarray(0.2), jnp.asarray(0.3), y0, None)
    np.testing.assert_allclose(y1, y_d, rtol=1e-14, atol=1e-15)
    if pair.name != "dopri5":
        np.testing.assert_allclose(jnp.abs(est), jnp.abs(err_d), rtol=1e-12, atol=1e-16)


def test_fsal_flags_and_custom_tableau(x64):
    assert [p.fsal for p in PAIRS] == [False, True, True, True]
    mine = EmbeddedTableau(
        a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0), b_error=(-0.5, 0.5), order=2, name="mine"
    )
    f = lambda t, y, a: -y
    y_mine = odeint(f, jnp.ones(2), None, solver=mine, rtol=1e-5, atol=1e-8)
    y_named = odeint(f, jnp.ones(2), None, solver="heun_euler", rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(y_mine, y_named)
    with pytest.raises(ValueError, match="b_error sums to"):
        EmbeddedTableau(a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0), b_error=(0.5, 0.5), order=2)
    with pytest.raises(ValueError, match="b_error has 1 entries for 2 stages"):
        EmbeddedTableau(a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0), b_error=(0.0,), order=2)
    assert get_solver("tsit5") is TSIT5


# --- values: convergence, landing on t1, statistics -------------------------------------


@pytest.mark.parametrize("solver", ["bosh3", "dopri5", "tsit5"])
def test_converges_as_tolerances_shrink(solver, x64):
    a, q, lam = stiffish_matrix()
    y0 = jnp.arange(1.0, 6.0)
    exact = q @ (jnp.exp(lam * 0.5) * (q.T @ y0))
    tols = (1e-4, 1e-6, 1e-8)
    solve = lambda tol: odeint(
        linear_field, y0, a, t0=0.0, t1=0.5, solver=solver, rtol=tol, atol=tol
    )
    ys = jax.jit(lambda: [solve(tol) for tol in tols])()  # one program for the three solves
    errors = [float(jnp.max(jnp.abs(y1 - exact))) for y1 in ys]
    for tol, error in zip(tols, errors):
        assert error < 50 * tol * float(jnp.max(jnp.abs(y0))), (tol, errors)
    assert errors[0] > errors[1] > errors[2], errors


def test_lands_exactly_on_t1_and_reverses(x64):
    y0, args = smooth_problem(jax.random.PRNGKey(1))
    spans = (1.0 / 3.0, -2.1)

    @jax.jit
    def there_and_back():  # one program for both spans
        out = []
        for t1 in spans:
            y1, stats = odeint(
                smooth_field, y0, args, t0=0.1, t1=t1, solver="tsit5", rtol=1e-7, atol=1e-9,
                return_stats=True,
            )  # fmt: skip
            back = odeint(
                smooth_field, y1, args, t0=t1, t1=0.1, solver="tsit5", rtol=1e-9, atol=1e-11
            )
            out.append((stats["t_final"], back))
        return out

    for t1, (t_final, back) in zip(spans, there_and_back()):
        assert float(t_final) == t1  # bitwise: the last step is clipped onto t1
        tree_allclose(back, y0, rtol=0, atol=1e-5)


def test_stats_and_step_bounds(x64):
    f = lambda t, y, a: -y
    _, stats = odeint(
        f, jnp.ones(3), None, solver="dopri5", rtol=1e-6, atol=1e-9, return_stats=True
    )
    n, r = int(stats["num_accepted_steps"]), int(stats["num_rejected_steps"])
    assert n >= 1 and int(stats["num_steps"]) == n + r
    # Hairer's initial step costs 2 evaluations, every attempt of the FSAL pair 6.
    assert int(stats["num_fevals"]) == 2 + 6 * (n + r)
    assert not bool(stats["max_steps_reached"])
    ctrl = PIDController(rtol=1e-3, atol=1e-6, dtmax=0.05, dt0=0.01)
    _, stats = odeint(f, jnp.ones(3), None, solver="tsit5", controller=ctrl, return_stats=True)
    assert int(stats["num_accepted_steps"]) >= 20  # 1 / dtmax
    assert int(stats["num_fevals"]) == 1 + 6 * int(stats["num_steps"])  # dt0 given: no probe


def test_pytree_tolerances(x64):
    y0, args = smooth_problem(jax.random.PRNGKey(2))
    loose_x = {"x": 1e-2, "v": 1e-9}
    solve = lambda rtol: odeint(
        smooth_field, y0, args, solver="tsit5", rtol=rtol, atol=1e-12, return_stats=True
    )
    (y, stats), (tight, stats_tight) = jax.jit(lambda: (solve(loose_x), solve(1e-9)))()
    # The per-leaf rtol is used (fewer steps than the uniformly tight solve) and still
    # controls "v" tightly.
    assert int(stats["num_steps"]) < int(stats_tight["num_steps"])
    tree_allclose(y, tight, rtol=0, atol=1e-2)
    with pytest.raises(ValueError, match="rtol as a pytree must have y's structure"):
        odeint(smooth_field, y0, args, solver="tsit5", rtol={"x": 1e-3})


@pytest.mark.parametrize(
    "solver,problem",
    [("tsit5", "linear"), ("tsit5", "mlp"), ("dopri5", "mlp")],
)
def test_step_counts_match_diffrax(solver, problem, x64):
    """Same controller defaults (PIDController(rtol, atol), integral control), same initial
    step heuristic: accepted and rejected step counts within 20 % of diffrax's."""
    if problem == "linear":
        args, _, _ = stiffish_matrix()
        field, y0, t1 = linear_field, jnp.arange(1.0, 6.0), 0.3
    else:
        y0, args = mlp_problem(jax.random.PRNGKey(0))
        field, t1 = mlp_field, 3.0
    tol = dict(rtol=1e-6, atol=1e-6)
    d_solver = {"tsit5": diffrax.Tsit5(), "dopri5": diffrax.Dopri5()}[solver]

    @jax.jit
    def both(y0, args):  # one program
        ours = odeint(field, y0, args, t0=0.0, t1=t1, solver=solver, return_stats=True, **tol)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), d_solver, 0.0, t1, None, y0, args=args,
            stepsize_controller=diffrax.PIDController(**tol),
        )  # fmt: skip
        return ours, (sol.ys[-1], sol.stats["num_steps"])

    (y, stats), (y_theirs, theirs) = both(y0, args)
    ours, theirs = int(stats["num_steps"]), int(theirs)
    assert abs(ours - theirs) <= 0.2 * theirs, (ours, theirs)
    tree_allclose(y, y_theirs, rtol=0, atol=1e-4)


# --- gradients -----------------------------------------------------------------------------


def _gradients(field, adjoints, y0, args, **kw):
    """{adjoint: gradient of `_loss` w.r.t. (y0, args)} for each adjoint, in one compiled
    program (the strategies' forward solves are shared where they coincide)."""
    grad = lambda adjoint: jax.grad(_loss(field, adjoint=adjoint, **kw), (0, 1))
    return jax.jit(lambda y0, args: {a: grad(a)(y0, args) for a in adjoints})(y0, args)


def test_exact_strategies_equal_direct_mlp(x64):
    y0, p = mlp_problem(jax.random.PRNGKey(4))
    kw = dict(t0=0.0, t1=2.0, rtol=1e-6, atol=1e-8, max_steps=256)
    grads = _gradients(mlp_field, ["direct", *EXACT], y0, p, **kw)
    for adjoint in EXACT:
        tree_allclose(grads[adjoint], grads["direct"], rtol=1e-10, atol=1e-13)


def test_exact_strategies_equal_direct_stiffish(x64):
    """Eigenvalues −1…−1000: ~60 accepted steps and rejections at the stability boundary;
    with max_steps=400 "anode" stores every 4th state in 20 slots (two levels).

    (With bosh3 at rtol 1e-5 the controller accepts steps whose stability function has norm
    up to 17 on the stiff mode, harmless in the forward pass where that mode is below the
    tolerance, but the product of the step norms is 2.6e12: every way of computing the
    gradient of that map, a Python-unrolled one included, then differs at 1e-6 from round-off
    alone. The comparison here is on a well-conditioned stiff-ish solve.)"""
    a, _, _ = stiffish_matrix()
    y0 = jnp.arange(1.0, 6.0)
    kw = dict(t0=0.0, t1=0.2, solver="tsit5", rtol=1e-3, atol=1e-7, max_steps=400)
    _, stats = odeint(linear_field, y0, a, return_stats=True, **{k: v for k, v in kw.items()})
    top, _ = anode_slots(400)
    assert int(stats["num_accepted_steps"]) > top  # the two-level replay is exercised
    assert int(stats["num_rejected_steps"]) > 0  # and rejected steps are skipped by it
    grads = _gradients(linear_field, ["direct", "anode", "checkpointed:3"], y0, a, **kw)
    for adjoint in ("anode", "checkpointed:3"):
        tree_allclose(grads[adjoint], grads["direct"], rtol=1e-10, atol=1e-12)


def test_exact_strategies_equal_direct_conv_relu(x64):
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    w = tuple(0.3 * jax.random.normal(k, (3, 3, 2, 2), jnp.float64) for k in keys[:2])
    z0 = jax.random.normal(keys[2], (1, 4, 4, 2), jnp.float64)
    kw = dict(solver="bosh3", rtol=1e-4, atol=1e-6, max_steps=32)
    grads = _gradients(conv_field, ["direct", "anode"], z0, w, **kw)
    tree_allclose(grads["anode"], grads["direct"], rtol=1e-10, atol=1e-12)


def test_finite_differences_and_backsolve(x64):
    """Central differences of the adaptive solve itself, at tolerances where the accepted
    step sequence is locally constant (same counts at ±eps; the step sizes' own dependence
    on the input is of the tolerance's order); "backsolve" (its own backward steps) is close
    to the exact gradient at these tolerances, not equal."""
    y0, p = mlp_problem(jax.random.PRNGKey(6), dim=3, hidden=5)
    kw = dict(t0=0.0, t1=1.0, rtol=1e-10, atol=1e-12)
    direction = jax.random.normal(jax.random.PRNGKey(7), y0.shape, jnp.float64)
    eps = 1e-5

    @jax.jit
    def gradients_and_points(y0, p):  # one program
        loss = lambda adjoint: _loss(mlp_field, adjoint=adjoint, **kw)
        grads = {a: jax.grad(loss(a), (0, 1))(y0, p) for a in ("anode", "backsolve")}
        points = []
        for sign in (-1.0, 1.0):
            y = y0 + sign * eps * direction
            _, stats = odeint(mlp_field, y, p, solver="tsit5", return_stats=True, **kw)
            points.append((loss("anode")(y, p), stats["num_steps"]))
        return grads, points

    grads, ((minus, n_minus), (plus, n_plus)) = gradients_and_points(y0, p)
    exact, approx = grads["anode"], grads["backsolve"]
    assert int(n_minus) == int(n_plus)
    fd = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(exact[0], direction)), float(fd), rtol=1e-7)
    tree_allclose(approx, exact, rtol=1e-6, atol=1e-8)
    assert not all(
        bool(jnp.all(a == e)) for a, e in zip(jax.tree.leaves(approx), jax.tree.leaves(exact))
    )


def test_direct_supports_grad_of_grad(x64):
    """Reverse-over-reverse through "direct" (a scan of attempts) equals central differences
    of its gradient (step sequence locally constant at rtol 1e-8)."""
    field = lambda t, y, a: jnp.tanh(a * y)
    loss = _loss(field, rtol=1e-8, atol=1e-10, max_steps=64)
    y0, a = jnp.ones(3), jnp.asarray(0.7)
    eps = 1e-4
    first = jax.grad(loss, 1)
    second, plus, minus = jax.jit(  # one program
        lambda y0, a: (jax.grad(first, 1)(y0, a), first(y0, a + eps), first(y0, a - eps))
    )(y0, a)
    np.testing.assert_allclose(second, (plus - minus) / (2 * eps), rtol=1e-6)


def test_times_and_vmap_with_adaptive_solver(x64):
    """`ts` and traced spans reuse the normalised solve; gradients with respect to t1 agree
    between strategies; vmap over per-sample spans equals a loop."""
    y0, args = smooth_problem(jax.random.PRNGKey(9))
    # 9–12 accepted steps per solve: max_steps=32 bounds them ("direct" runs all its max_steps
    # iterations forward and backward, whatever the number of steps taken).
    kw = dict(solver="tsit5", rtol=1e-8, atol=1e-10, max_steps=32)
    ts = jnp.asarray([0.0, 0.4, 1.1])

    def end(t1, adjoint="anode"):
        y1 = odeint(smooth_field, y0, args, t0=0.0, t1=t1, adjoint=adjoint, **kw)
        return jnp.sum(y1["x"] ** 2)

    @jax.jit
    def everything(t1, spans):  # one program
        ys, stats = odeint(smooth_field, y0, args, ts=ts, return_stats=True, **kw)
        y_end = odeint(smooth_field, y0, args, t0=0.0, t1=1.1, **kw)
        grads = [jax.grad(end)(t1, adjoint) for adjoint in ("anode", "direct")]
        batched = jax.vmap(end)(spans)
        looped = lax.map(end, spans)  # one sample at a time
        return ys, stats, y_end, grads, batched, looped

    ys, stats, y_end, grads, batched, looped = everything(jnp.asarray(0.8), jnp.asarray([0.5, 0.9]))
    tree_allclose(jax.tree.map(lambda leaf: leaf[-1], ys), y_end, rtol=0, atol=1e-7)
    assert int(stats["num_accepted_steps"]) > 2
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-10)
    # Each sample takes its own steps; batched kernels round differently from unbatched ones.
    np.testing.assert_allclose(batched, looped, rtol=1e-9)


# --- failures and bad inputs ---------------------------------------------------------------


def test_max_steps_raises_at_run_time():
    f = lambda t, y, a: -y
    with pytest.raises(
        Exception, match=r"max_steps=3 attempted steps .* reached t=.* before t1=1.0"
    ):
        jax.block_until_ready(odeint(f, jnp.ones(2), None, solver="tsit5", rtol=1e-8, max_steps=3))
    y, stats = odeint(
        f, jnp.ones(2), None, solver="tsit5", rtol=1e-8, max_steps=3, throw=False,
        return_stats=True,
    )  # fmt: skip
    assert bool(stats["max_steps_reached"]) and float(stats["t_final"]) < 1.0


def test_max_steps_error_under_vmap_names_the_failing_sample():
    # The failure report runs only when a solve failed; under vmap its condition is batched:
    # solves where no sample fails run through, one failing sample raises with its figures.
    solve = jax.jit(jax.vmap(lambda y, a: odeint(
        lambda t, y, a: a * y, y, a, solver="tsit5", rtol=1e-6, atol=1e-6, max_steps=20
    )))  # fmt: skip
    ys = jnp.ones((3, 4))
    assert jnp.all(jnp.isfinite(solve(ys, jnp.array([0.1, 0.2, 0.3]))))
    with pytest.raises(Exception, match=r"max_steps=20 attempted steps \(20 accepted"):
        jax.block_until_ready(solve(ys, jnp.array([0.1, 40.0, 0.3])))


def test_nonfinite_error_estimate_rejects_then_fails():
    # Finite at t = 0 (the initial-step probe), NaN beyond t = 0.3.
    f = lambda t, y, a: jnp.where(t > 0.3, jnp.nan, -y)
    with pytest.raises(Exception, match="error estimates were NaN/inf"):
        jax.block_until_ready(odeint(f, jnp.ones(2), None, solver="tsit5", max_steps=40))
    _, stats = odeint(
        f, jnp.ones(2), None, solver="tsit5", max_steps=40, throw=False, return_stats=True
    )
    assert int(stats["num_rejected_steps"]) > 0 and float(stats["t_final"]) <= 0.3


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(solver="tsit5", num_steps=8), ValueError, "takes no num_steps"),
        (dict(solver="rk4", num_steps=8, rtol=1e-3), ValueError, "rtol applies to adaptive"),
        (dict(solver="rk4", max_steps=10), ValueError, "max_steps applies to adaptive"),
        (dict(solver="rk4"), TypeError, "needs num_steps"),
        (dict(solver="tsit5", adjoint="reversible"), ValueError, "'reversible' has no adaptive"),
        (dict(solver="tsit5", unroll=True), ValueError, "unroll applies to fixed-step"),
        (dict(solver="tsit5", rtol=-1.0), ValueError, "rtol must be finite and >= 0"),
        (dict(solver="tsit5", rtol=0.0, atol=0.0), ValueError, "both 0"),
        (dict(solver="tsit5", max_steps=0), ValueError, "max_steps must be >= 1"),
        (dict(solver="tsit5", max_steps=2.0), TypeError, "max_steps must be a Python int"),
        (
            dict(solver="tsit5", rtol=1e-3, controller=PIDController()),
            ValueError,
            "inside controller",
        ),
        (dict(solver="tsit5", dt0=-0.1), ValueError, "dt0 must be a positive"),
        (dict(solver="tsit5", ts=jnp.asarray([0.0, 1.0]), dt0=0.1), ValueError, "dt0"),
        (dict(solver="dopri6"), ValueError, r"\['heun_euler', 'bosh3', 'dopri5', 'tsit5'\]"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        odeint(lambda t, y, a: -y, jnp.ones(2), None, **kwargs)


def test_controller_validation():
    with pytest.raises(ValueError, match="factormin <= 1 <= factormax"):
        PIDController(factormin=2.0)
    with pytest.raises(ValueError, match="dtmin=1.0 exceeds dtmax=0.5"):
        PIDController(dtmin=1.0, dtmax=0.5)
    with pytest.raises(TypeError, match="traced tolerances are not supported"):
        PIDController(rtol=jnp.ones(()))


def _forced_decay(t, y, a):
    return -a * y + jnp.sin(3 * t)


REVOLVE_BUDGETS = (1, 2, 3, 6)


@functools.cache
def _online_revolve_counts():
    """(n, {k: steps recomputed by `reverse_revolve` with k slots}) for one tsit5 solve of
    `_forced_decay`, every budget in one compiled program (float64: called under the x64
    fixture only)."""
    from anode_jax.ode.adaptive import AdaptiveSpec, forward_record, reverse_revolve

    spec = AdaptiveSpec(TSIT5, PIDController(rtol=1e-8, atol=1e-10), 0.0, 4.0, 200)

    @jax.jit
    def counts(y0, a):
        _, record = forward_record(_forced_decay, y0, a, spec)
        recomputed = {
            k: reverse_revolve(TSIT5, _forced_decay, a, y0, record, jnp.ones(2), k, count=True)[2]
            for k in REVOLVE_BUDGETS
        }
        return record.num_accepted, recomputed

    n, recomputed = counts(jnp.ones(2), jnp.asarray([1.0, 2.0]))
    return int(n), {k: int(v) for k, v in recomputed.items()}


@pytest.mark.parametrize("k", REVOLVE_BUDGETS)
def test_online_revolve_recomputes_the_fewest_steps(k, x64):
    """ "checkpointed:K" plans Griewank's binomial splitting at run time for the n accepted
    steps: it recomputes exactly as many steps as the offline schedule for Nt = n."""
    from anode_jax.ode.adjoints.checkpointed import revolve_schedule

    n, recomputed = _online_revolve_counts()
    assert n > 20
    assert recomputed[k] == revolve_schedule(n, k).num_recomputed_steps
