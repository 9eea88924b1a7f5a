"""Flax Linen submodules inside a vector field (`anode_jax.models.odeint_linen`), every strategy.

Setup and compact forms, params and batch statistics created inside the field, init and apply,
first- and second-order gradients equal to "direct" (float64); the closure form that cannot
work gets a one-line error naming the supported spelling.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from anode_jax import odeint
from anode_jax.models import odeint_linen
from tests.conftest import tree_allclose


@pytest.fixture(autouse=True)
def standard_promotion():
    """Flax's BatchNorm keeps float32 running statistics and subtracts them from float64
    inputs, which the suite's strict promotion rejects; the library code is not involved."""
    with jax.numpy_dtype_promotion("standard"):
        yield


CASES = [
    ("direct", "rk4", None),
    ("anode", "rk4", False),
    ("anode", "rk4", True),
    ("checkpointed:2", "rk4", False),
    ("checkpointed:2", "rk4", True),
    ("backsolve", "rk4", None),
    ("reversible", "reversible:rk4", False),
    ("reversible", "reversible_heun", True),
]


def _ids(case):
    return "-".join(str(c) for c in case)


class SetupBlock(nn.Module):
    """Submodules in setup; the field calls them (and a BatchNorm in inference mode)."""

    adjoint: str = "anode"
    solver: str = "rk4"
    unroll: bool | None = None

    def setup(self):
        self.dense = nn.Dense(3, param_dtype=jnp.float64)
        self.norm = nn.BatchNorm(use_running_average=True, param_dtype=jnp.float64)

    def __call__(self, x):
        return odeint_linen(
            self,
            x,
            method=lambda m, t, y, args: jnp.tanh(m.norm(m.dense(y))),
            num_steps=3,
            solver=self.solver,
            adjoint=self.adjoint,
            unroll=self.unroll,
        )


class Field(nn.Module):
    """A vector field with its own compact layers (a BatchNorm in training mode included)."""

    train: bool = False

    @nn.compact
    def __call__(self, t, y, args):
        h = nn.Dense(4, param_dtype=jnp.float64)(y)
        h = nn.BatchNorm(use_running_average=not self.train, param_dtype=jnp.float64)(h)
        return jnp.tanh(nn.Dense(3, param_dtype=jnp.float64)(h)) * args


class CompactBlock(nn.Module):
    adjoint: str = "anode"
    solver: str = "rk4"
    unroll: bool | None = None
    train: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(3, param_dtype=jnp.float64)(x)
        kwargs = dict(num_steps=3, solver=self.solver, adjoint=self.adjoint, unroll=self.unroll)
        return odeint_linen(Field(train=self.train), x, jnp.asarray(0.5), **kwargs)


def _x():
    return jax.random.normal(jax.random.PRNGKey(1), (5, 3), jnp.float64)


def _outputs(block, variables, x, second_order):
    """y, the gradient and (if asked) a Hessian-vector product of sum(sin(y)) with respect to
    the params, in one compiled program (one compile per case, not one per transformation)."""

    def loss(params):
        return jnp.sum(jnp.sin(block.apply({**variables, "params": params}, x)))

    def run(params):
        grad = jax.grad(loss)
        if not second_order:
            return block.apply(variables, x), grad(params)
        v = jax.tree.map(jnp.ones_like, params)
        hvp = jax.grad(lambda p: sum(map(jnp.vdot, jax.tree.leaves(v), jax.tree.leaves(grad(p)))))
        return block.apply(variables, x), grad(params), hvp(params)

    return jax.jit(run)(variables["params"])


@functools.cache
def _reference(form, solver):
    """The "direct" strategy through the same solver: variables, y, gradient and (setup form)
    a Hessian-vector product."""
    x = _x()
    block = form(adjoint="direct", solver=solver)
    variables = block.init(jax.random.PRNGKey(0), x)
    outputs = _outputs(block, variables, x, second_order=form is SetupBlock)
    return variables, outputs + (None,) * (3 - len(outputs))


# Every strategy, looped and unrolled, with setup submodules; one case per strategy family with
# compact submodules created inside the field (their traces and compiles cost 2-3x more), whose
# interplay with the strategies is the same. Hessian-vector products for the setup form (every
# strategy's second order is tested on plain fields in tests/test_first_contact.py).
FORM_CASES = [(SetupBlock, case) for case in CASES] + [
    (CompactBlock, case) for case in (CASES[0], CASES[1], CASES[4], CASES[5], CASES[7])
]


@pytest.mark.parametrize(
    "form,case",
    FORM_CASES,
    ids=[f"{'setup' if f is SetupBlock else 'compact'}-{_ids(c)}" for f, c in FORM_CASES],
)
def test_init_apply_and_gradients_equal_direct(x64, form, case):
    adjoint, solver, unroll = case
    x = _x()
    block = form(adjoint=adjoint, solver=solver, unroll=unroll)
    variables = block.init(jax.random.PRNGKey(0), x)
    ref_variables, (ref_y, ref_grad, ref_hvp) = _reference(form, solver)
    # The same variables whatever the strategy: params and batch statistics of the submodules.
    tree_allclose(variables, ref_variables, rtol=0)
    assert "batch_stats" in variables and len(jax.tree.leaves(variables["params"])) >= 4
    second_order = adjoint != "backsolve" and form is SetupBlock
    y, grad, *hvp = _outputs(block, variables, x, second_order)
    tree_allclose(y, ref_y, rtol=1e-12, atol=1e-14)
    # backsolve is approximate (the adjoint ODE, not the discrete steps): O(h^4) apart at RK4.
    tree_allclose(grad, ref_grad, rtol=1e-8 if adjoint != "backsolve" else 1e-3, atol=1e-12)
    if second_order:
        tree_allclose(hvp[0], ref_hvp, rtol=1e-8, atol=1e-12)


def test_matches_the_hand_lifted_pure_field(x64):
    """odeint_linen's solve equals odeint over the explicit pure function of the variables
    (the same solve written by hand: y W + b, normalized by the running statistics)."""
    x = _x()
    block = SetupBlock(adjoint="checkpointed:2")
    variables = block.init(jax.random.PRNGKey(0), x)
    params = variables["params"]
    stats = variables["batch_stats"]

    def field(t, y, p):
        h = y @ p["dense"]["kernel"] + p["dense"]["bias"]
        h = (h - stats["norm"]["mean"]) / jnp.sqrt(stats["norm"]["var"] + 1e-5)
        return jnp.tanh(h * p["norm"]["scale"] + p["norm"]["bias"])

    expected = odeint(field, x, params, num_steps=3, adjoint="direct")
    # 1e-9: Flax normalizes with its float32 statistics (rsqrt(var + eps) rounded differently).
    tree_allclose(block.apply(variables, x), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("adjoint", ["direct", "anode", "checkpointed:2"])
def test_training_mode_batch_statistics_update(x64, adjoint):
    """BatchNorm in training mode inside the field: apply with mutable batch_stats returns
    updated running averages (from the evaluation at (t0, y0)), the solve itself is pure."""
    x = _x()
    block = CompactBlock(adjoint=adjoint, train=True)
    variables = block.init(jax.random.PRNGKey(0), x)
    y, updates = block.apply(variables, x, mutable=["batch_stats"])
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert any(float(jnp.max(jnp.abs(a - b))) > 1e-6 for a, b in zip(after, before))
    reference = CompactBlock(adjoint="direct", train=True)
    y_direct, _ = reference.apply(variables, x, mutable=["batch_stats"])
    tree_allclose(y, y_direct, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("unroll", [False, True], ids=["looped", "unrolled"])
@pytest.mark.parametrize("adjoint", ["direct", "anode", "checkpointed:2"])
def test_closure_over_submodules_gets_a_one_line_error(adjoint, unroll):
    """The issue's spellings (a closure over setup submodules, a compact layer created inside
    the field) cannot work with a pure core: one line naming the supported spelling."""

    class ClosureBlock(nn.Module):
        def setup(self):
            self.dense = nn.Dense(3)

        def __call__(self, x):
            field = lambda t, y, _: jnp.tanh(self.dense(y))
            return odeint(field, x, None, num_steps=4, adjoint=adjoint, unroll=unroll)

    class CompactClosureBlock(nn.Module):
        @nn.compact
        def __call__(self, x):
            field = lambda t, y, _: jnp.tanh(nn.Dense(3)(y))
            return odeint(field, x, None, num_steps=4, adjoint=adjoint, unroll=unroll)

    x = jnp.ones((2, 3))
    for block in (ClosureBlock(), CompactClosureBlock()):
        with pytest.raises(TypeError, match=r"odeint_linen\(self, y0, method=") as info:
            block.init(jax.random.PRNGKey(0), x)
        assert "\n" not in str(info.value)


def test_unbound_module_is_rejected():
    with pytest.raises(TypeError, match="needs a bound Flax Linen module"):
        odeint_linen(Field(), jnp.ones(3), 1.0, num_steps=2)
