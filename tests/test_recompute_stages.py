"""Per-stage rematerialisation (`Anode(recompute_stages=True)`,
`Checkpointed(k, recompute_stages=True)`): the same exact gradients for less memory.

Gradients (float64) with the option equal "direct"'s (and the default's) to rtol 1e-10 for
anode and checkpointed:2, looped and unrolled, final-state and `ts` forms, on a smooth pytree
field and a conv field with a pytree state, and the default's on adaptive solves; the compiled temp memory of an
MLP field's gradient drops by at least two stages' activations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anode_jax import odeint
from anode_jax.ode.adjoints import Anode, Checkpointed, get_adjoint
from tests._ode_problems import conv_relu_field, conv_relu_problem, smooth_field, smooth_problem
from tests.conftest import FAST_COMPILE, tree_allclose

TS = (0.0, 0.3, 0.45, 1.0)  # irregular
STRATEGIES = {
    "anode": lambda recompute: Anode(recompute_stages=recompute),
    "checkpointed:2": lambda recompute: Checkpointed(2, recompute_stages=recompute),
}


def conv_pytree_field(t, y, theta):
    """The ANODE paper's conv block on y["z"] coupled both ways with a per-channel state
    y["s"] (a pytree state whose leaves have different shapes)."""
    dz = conv_relu_field(t, y["z"], theta) + 0.1 * y["s"][:, None, None, :]
    return {"z": dz, "s": -jnp.tanh(jnp.mean(y["z"], axis=(1, 2))) * (1.0 + t)}


def conv_pytree_problem(key):
    z0, theta = conv_relu_problem(key)
    s0 = jax.random.normal(jax.random.fold_in(key, 1), (z0.shape[0], z0.shape[-1]), z0.dtype)
    return {"z": z0, "s": s0}, theta


PROBLEMS = {
    "smooth_pytree": (smooth_field, smooth_problem),
    "conv_pytree": (conv_pytree_field, conv_pytree_problem),
}


def _loss(field, adjoint, form, unroll):
    def loss(y0, args):
        if form == "final":
            ys = odeint(field, y0, args, t0=0.1, t1=1.2, num_steps=3, adjoint=adjoint,
                        unroll=unroll)  # fmt: skip
        else:
            ys = odeint(field, y0, args, ts=jnp.asarray(TS, jnp.float64), num_steps=2,
                        adjoint=adjoint, unroll=unroll)  # fmt: skip
        return sum(jnp.sum(jnp.sin(leaf) * leaf) for leaf in jax.tree.leaves(ys))

    return loss


def _gradient(problem, adjoint, form, unroll):
    field, make = PROBLEMS[problem]
    y0, args = make(jax.random.PRNGKey(0))
    # Compared values, not timed ones: XLA's backend optimization level does not change the
    # arithmetic (tests/conftest.py, FAST_COMPILE).
    return jax.jit(
        jax.grad(_loss(field, adjoint, form, unroll), argnums=(0, 1)),
        compiler_options=FAST_COMPILE,
    )(y0, args)


_DIRECT = {}  # one "direct" reference per (problem, form, unroll); float64 only


# Every strategy, loop policy and form on the smooth pytree field; on the conv field the
# looped policy (the default for the loop-safe convolution) for both strategies and forms,
# and one unrolled case (anode's unrolled block is differentiated whole: a different path).
CASES = [
    ("smooth_pytree", name, form, unroll)
    for name in STRATEGIES
    for form in ("final", "ts")
    for unroll in (False, True)
] + [("conv_pytree", name, form, False) for name in STRATEGIES for form in ("final", "ts")]
CASES.append(("conv_pytree", "anode", "final", True))


@pytest.mark.parametrize("problem,strategy,form,unroll", CASES)
def test_recompute_stages_gradients_equal_direct_and_default(x64, problem, strategy, form, unroll):
    key = (problem, form, unroll)
    if key not in _DIRECT:
        _DIRECT[key] = _gradient(problem, "direct", form, unroll)
    make = STRATEGIES[strategy]
    got = _gradient(problem, make(True), form, unroll)
    tree_allclose(got, _DIRECT[key], rtol=1e-10, atol=1e-13)
    if problem == "smooth_pytree":
        # The conv programs are the slow ones to compile: there the default's equality with
        # "direct" (tests/test_adjoint.py, tests/test_times.py) carries this over.
        default = _gradient(problem, make(False), form, unroll)
        tree_allclose(got, default, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_recompute_stages_adaptive_gradients_equal_default(x64, strategy):
    """Adaptive solves (dopri5): each replayed step's VJP rematerialises its stages; the
    accepted steps are the same, so the gradient equals the default's (which
    tests/test_adaptive.py compares with "direct")."""
    y0, args = smooth_problem(jax.random.PRNGKey(1))

    def gradient(adjoint):
        def loss(y0, args):
            y1 = odeint(smooth_field, y0, args, t0=0.0, t1=1.5, solver="dopri5", rtol=1e-6,
                        atol=1e-8, max_steps=64, adjoint=adjoint)  # fmt: skip
            return sum(jnp.sum(jnp.sin(leaf) * leaf) for leaf in jax.tree.leaves(y1))

        grad = jax.grad(loss, argnums=(0, 1))
        return jax.jit(grad, compiler_options=FAST_COMPILE)(y0, args)

    make = STRATEGIES[strategy]
    tree_allclose(gradient(make(True)), gradient(make(False)), rtol=1e-10, atol=1e-13)


def test_recompute_stages_grad_of_grad_equals_direct(x64):
    """Reverse over reverse (a Hessian-vector product) through the looped reversal whose step
    VJPs differentiate `jax.checkpoint`-ed stages."""
    y0, args = smooth_problem(jax.random.PRNGKey(3))
    loss = lambda adjoint: _loss(smooth_field, adjoint, "final", False)

    def hvp(adjoint):
        grad = jax.grad(loss(adjoint), argnums=1)
        return jax.jit(
            jax.grad(lambda a: sum(jnp.vdot(g, jnp.cos(g)) for g in jax.tree.leaves(grad(y0, a)))),
            compiler_options=FAST_COMPILE,
        )(args)

    tree_allclose(hvp(Anode(recompute_stages=True)), hvp("direct"), rtol=1e-10, atol=1e-13)


# --- compiled memory ------------------------------------------------------------------------

BATCH, WIDTH = 256, 64


def _mlp_field(t, y, params):
    h = jnp.tanh(y @ params["w1"] + params["b1"])
    h = jnp.tanh(h @ params["w2"])
    return h @ params["w3"]


def _mlp_problem(seed):
    """(params, y0) of `_mlp_field`: a batch of BATCH 2-D states, hidden width WIDTH."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {
        "w1": jax.random.normal(keys[0], (2, WIDTH)),
        "b1": jnp.zeros(WIDTH),
        "w2": jax.random.normal(keys[1], (WIDTH, WIDTH)) / WIDTH**0.5,
        "w3": jax.random.normal(keys[2], (WIDTH, 2)) / WIDTH**0.5,
    }
    return params, jax.random.normal(keys[3], (BATCH, 2))


def _temp_bytes(adjoint, form, unroll):
    params, y0 = _mlp_problem(2)

    def loss(params, y0):
        if form == "final":
            ys = odeint(_mlp_field, y0, params, num_steps=4, adjoint=adjoint, unroll=unroll)
        else:
            ys = odeint(_mlp_field, y0, params, ts=jnp.linspace(0.0, 1.0, 5), num_steps=2,
                        adjoint=adjoint, unroll=unroll)  # fmt: skip
        return jnp.mean(ys**2)

    # FAST_COMPILE sets LLVM's optimization only: buffer assignment works on the optimized
    # HLO, which it leaves the same (these temp sizes agree byte for byte with the default
    # level's), in a third of the compile time.
    compiled = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE).lower(params, y0).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    "strategy,form,unroll",
    [("anode", "ts", False), ("checkpointed:2", "final", True)],
)
def test_recompute_stages_lowers_compiled_memory(strategy, form, unroll):
    """One RK4 step's VJP holds the activations of all 4 stages by default (per stage the two
    tanh layers' outputs, 2·B·W floats), with the option the 4 stage inputs (B·2 floats each)
    and one stage's activations: 3 stages' activations (3·2·B·W·4 bytes = 384 KiB here) fewer
    at the peak. Measured (XLA:CPU, jax 0.12): 2.6 stages fewer in both cases (XLA overlaps
    some of the default's temporaries); the margin asked is 2 stages, so a regression that
    kept even one more stage's activations alive would fail."""
    make = STRATEGIES[strategy]
    default = _temp_bytes(make(False), form, unroll)
    ours = _temp_bytes(make(True), form, unroll)
    one_stage = 2 * BATCH * WIDTH * 4  # float32
    assert default - ours >= 2 * one_stage, (default, ours, (default - ours) / one_stage)


# --- the automatic choice (recompute_stages=None, the default) -------------------------------


def _conv_temp_bytes(adjoint):
    z0, theta = conv_relu_problem(jax.random.PRNGKey(4), jnp.float32, batch=4, size=8, channels=8)

    def loss(theta, z0):
        z1 = odeint(conv_relu_field, z0, theta, num_steps=3, solver="rk4", adjoint=adjoint)
        return jnp.sum(z1**2)

    compiled = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE).lower(theta, z0).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_automatic_choice_follows_the_fields_residuals(strategy):
    """The default compiles the same program as recompute_stages=True for the MLP field (one
    evaluation keeps 2·W = 128 states' worth of activations for reverse mode: above the
    threshold of 16) and as recompute_stages=False for the ANODE paper's conv block (about
    4.6 states: below). Compared by compiled temp bytes, which differ between the two
    settings in both cases (checked here, so that the test can tell them apart)."""
    make = STRATEGIES[strategy]
    mlp = {setting: _temp_bytes(make(setting), "ts", False) for setting in (None, True, False)}
    assert mlp[None] == mlp[True] != mlp[False], mlp
    conv = {setting: _conv_temp_bytes(make(setting)) for setting in (None, True, False)}
    assert conv[None] == conv[False] != conv[True], conv


@pytest.mark.parametrize("steps", [1, 4])
def test_default_anode_memory_at_most_diffrax_at_100_output_times(steps):
    """Issue 19's memory floor as a test: the default `"anode"`'s gradient at 100 output times
    (MLP 2→64→64→2 field, batch 256, RK4 with `steps` steps per interval, float32) compiles to
    no more temp memory than diffrax's default (`RecursiveCheckpointAdjoint`, `SaveAt(ts)` +
    `StepTo` on the same grid). Measured (XLA:CPU, jax 0.12): 0.96× at 1 step, 0.93× at 4;
    without the automatic per-stage rematerialisation 1.7×, and 1.02× at 1 step without the
    stage-by-stage parameter-cotangent sum (`solvers.runge_kutta.stage_inputs`)."""
    diffrax = pytest.importorskip("diffrax")
    from tests.test_adjoint import _diffrax_rk4

    n = 100
    ts = np.linspace(0.0, 1.0, n).astype(np.float32)
    grid = np.concatenate([np.linspace(a, b, steps + 1)[:-1] for a, b in zip(ts[:-1], ts[1:])])
    grid = np.append(grid, ts[-1]).astype(np.float32)
    params, y0 = _mlp_problem(5)
    target = jnp.zeros((n, BATCH, 2))

    def ours(params, y0):
        return odeint(_mlp_field, y0, params, ts=jnp.asarray(ts), num_steps=steps, solver="rk4")

    def theirs(params, y0):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(_mlp_field), _diffrax_rk4(), t0=float(ts[0]), t1=float(ts[-1]),
            dt0=None, y0=y0, args=params, stepsize_controller=diffrax.StepTo(ts=jnp.asarray(grid)),
            saveat=diffrax.SaveAt(ts=jnp.asarray(ts)), max_steps=len(grid) - 1,
        ).ys  # fmt: skip

    def temp_bytes(solve):
        grad = jax.grad(lambda p, y: jnp.mean((solve(p, y) - target) ** 2))
        compiled = jax.jit(grad, compiler_options=FAST_COMPILE).lower(params, y0).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ours_bytes, theirs_bytes = temp_bytes(ours), temp_bytes(theirs)
    assert ours_bytes <= theirs_bytes, (ours_bytes, theirs_bytes, ours_bytes / theirs_bytes)


# --- the option as a static configuration -----------------------------------------------------


def test_recompute_stages_is_part_of_the_static_configuration():
    # Frozen dataclasses: equal and hashed by value (odeint's compile cache keys on them), the
    # default (None: automatic) equal to the name's strategy, each setting a different key.
    assert Anode() == Anode(recompute_stages=None) == get_adjoint("anode")
    assert (
        Checkpointed(2) == Checkpointed(2, recompute_stages=None) == get_adjoint("checkpointed:2")
    )
    assert hash(Anode(recompute_stages=True)) == hash(Anode(recompute_stages=True))
    assert len({Anode(), Anode(recompute_stages=True), Anode(recompute_stages=False)}) == 3
    assert Checkpointed(2, recompute_stages=True) != Checkpointed(2)
    assert Checkpointed(2, recompute_stages=False) != Checkpointed(2)


@pytest.mark.parametrize(
    "make,owner",
    [
        (lambda: Anode(recompute_stages=1), "Anode"),
        (lambda: Checkpointed(2, recompute_stages="yes"), "Checkpointed"),
    ],
)
def test_recompute_stages_must_be_a_bool(make, owner):
    with pytest.raises(
        ValueError,
        match=rf"{owner}\(recompute_stages=\.\.\.\) must be None \(automatic\), True or False",
    ):
        make()


def test_numpy_bool_is_a_bool():
    # np.True_ (e.g. read from a config array) is accepted and stored as Python's True, so
    # the strategy compares and hashes equal to the one built with True.
    for make in (Anode, lambda recompute_stages: Checkpointed(2, recompute_stages)):
        strategy = make(recompute_stages=np.True_)
        assert strategy.recompute_stages is True
        assert strategy == make(recompute_stages=True)
        assert hash(strategy) == hash(make(recompute_stages=True))
