"""The looped reversals: schedule correctness, program size flat in Nt, memory, loop policy."""

import warnings

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from anode_jax import Anode, Checkpointed, Direct, odeint
from anode_jax.ode import DEFAULT_MAX_UNROLL, resolve_unroll, uses_plain_convolutions
from anode_jax.ode.adjoints.checkpointed import revolve_schedule
from tests._ode_problems import (
    conv_relu_field,
    conv_relu_problem,
    plain_conv_relu_field,
    smooth_field,
    smooth_problem,
)
from tests.conftest import tree_allclose


@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 16, 33, 100])
@pytest.mark.parametrize("num_checkpoints", [1, 2, 3, 4, 8, 200])
def test_revolve_schedule_reverses_every_step_once_within_budget(num_steps, num_checkpoints):
    slots = {0: 0}  # slot -> index n of the state y_n it holds; slot 0 holds the block input
    reversed_steps = []
    for action in revolve_schedule(num_steps, num_checkpoints):
        assert action.src in slots, action
        assert slots[action.src] == action.n0 <= action.n1 < num_steps, (action, slots)
        if action.vjp:
            reversed_steps.append(action.n1)
            # A state is no longer needed once the steps after it are reversed: free its slot.
            for slot, n in list(slots.items()):
                if slot != 0 and n >= action.n1:
                    del slots[slot]
        else:
            assert action.dst != 0 and 0 < action.dst < num_checkpoints, action
            slots[action.dst] = action.n1
        assert len(slots) <= num_checkpoints
    assert reversed_steps == list(range(num_steps - 1, -1, -1))


def _loss(adjoint, num_steps, unroll, num_blocks=2, solver="rk4"):
    z0, _ = conv_relu_problem(jax.random.PRNGKey(0), dtype=jnp.float32, batch=2, size=6, channels=4)
    thetas = [
        conv_relu_problem(jax.random.PRNGKey(i + 1), dtype=jnp.float32, channels=4)[1]
        for i in range(num_blocks)
    ]

    def loss(thetas):
        z = z0
        for theta in thetas:
            z = odeint(
                conv_relu_field,
                z,
                theta,
                num_steps=num_steps,
                solver=solver,
                adjoint=adjoint,
                unroll=unroll,
            )
        return jnp.mean(z**2)

    return loss, thetas


@pytest.mark.parametrize("adjoint", ["direct", "anode", "checkpointed:3", "backsolve"])
def test_looped_program_does_not_grow_with_num_steps(adjoint):
    """The lowered program of a looped solve's gradient has the same operations at Nt = 4 and
    Nt = 64 (only the revolve schedule's constant table grows, on one line)."""
    sizes = {}
    for num_steps in (4, 64):
        loss, thetas = _loss(adjoint, num_steps, unroll=False)
        sizes[num_steps] = len(jax.jit(jax.grad(loss)).lower(thetas).as_text().splitlines())
    assert sizes[64] == sizes[4], sizes


def _temp_states(adjoint, num_steps, num_blocks, solver="rk4"):
    loss, thetas = _loss(adjoint, num_steps, unroll=False, num_blocks=num_blocks, solver=solver)
    compiled = jax.jit(jax.grad(loss)).lower(thetas).compile()
    return compiled.memory_analysis().temp_size_in_bytes / (2 * 6 * 6 * 4 * 4)


def test_looped_anode_memory_is_inputs_plus_states_plus_one_step():
    # Looped anode holds L block inputs + Nt step inputs + one step's internals: going from
    # Nt = 8 to Nt = 40 adds the 32 stored states (a few states of slack for XLA's schedule),
    # not 32 steps of RK4 internals as direct does.
    small, large = _temp_states("anode", 8, 4), _temp_states("anode", 40, 4)
    assert 28 <= large - small <= 36, (small, large)
    direct = _temp_states("direct", 40, 4)
    assert large < 0.1 * direct, (large, direct)


def test_looped_checkpointed_memory_is_flat_in_num_steps_and_depth():
    base = _temp_states("checkpointed:4", 8, 2)
    assert _temp_states("checkpointed:4", 64, 2) <= base + 2
    # Four blocks more add their four inputs, not four budgets.
    assert _temp_states("checkpointed:4", 8, 6) <= base + 4 + 2


def test_direct_with_remat_policy_matches_direct(x64):
    y0, args = smooth_problem(jax.random.PRNGKey(3))
    policy = jax.checkpoint_policies.nothing_saveable

    def grad(adjoint, unroll):
        loss = lambda a: jnp.sum(
            odeint(smooth_field, y0, a, num_steps=5, adjoint=adjoint, unroll=unroll)["x"] ** 2
        )
        return jax.grad(loss)(args)

    for unroll in (True, False):
        tree_allclose(grad(Direct(policy), unroll), grad(Direct(), unroll), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("num_steps", [17, 40])
def test_looped_exact_strategies_match_direct_above_old_unroll_threshold(x64, num_steps):
    z0, theta = conv_relu_problem(jax.random.PRNGKey(4))
    grad = lambda adjoint: jax.grad(
        lambda th: jnp.sum(
            odeint(conv_relu_field, z0, th, num_steps=num_steps, adjoint=adjoint, unroll=False) ** 2
        )
    )(theta)
    reference = grad("direct")
    for adjoint in (Anode(), Checkpointed(1), Checkpointed(3)):
        tree_allclose(grad(adjoint), reference, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# The default loop policy.


def _plain_conv(z, w):
    return lax.conv_general_dilated(
        z, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@jax.custom_vjp
def _owned_conv(z, w):
    """A convolution with a user-written VJP (as anode_jax.nn's loop-safe conv has)."""
    return _plain_conv(z, w)


_owned_conv.defvjp(
    lambda z, w: (_plain_conv(z, w), (z, w)),
    lambda res, ct: jax.vjp(_plain_conv, *res)[1](ct),
)


def _owned_field(t, z, theta):
    return jax.nn.relu(_owned_conv(jax.nn.relu(_owned_conv(z, theta["w1"])), theta["w2"]))


def _nested_plain_field(t, z, theta):
    # A plain convolution hidden inside jit and a cond still counts.
    inner = jax.jit(
        lambda z: lax.cond(t > 2.0, lambda: z, lambda: plain_conv_relu_field(t, z, theta))
    )
    return inner(z)


def test_plain_convolutions_are_detected_through_nested_calls():
    z0, theta = conv_relu_problem(jax.random.PRNGKey(0), dtype=jnp.float32)
    t = jnp.zeros((), jnp.float32)
    assert uses_plain_convolutions(plain_conv_relu_field, t, z0, theta)
    assert uses_plain_convolutions(_nested_plain_field, t, z0, theta)
    assert not uses_plain_convolutions(_owned_field, t, z0, theta)
    y0, args = smooth_problem(jax.random.PRNGKey(0), dtype=jnp.float32)
    assert not uses_plain_convolutions(smooth_field, t, y0, args)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU policy")
def test_default_policy_loops_unless_plain_convolutions_on_cpu():
    z0, theta = conv_relu_problem(jax.random.PRNGKey(0), dtype=jnp.float32)
    t = jnp.zeros((), jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loop-safe and smooth fields never warn
        assert resolve_unroll(None, 40, _owned_field, t, z0, theta) is False
        assert resolve_unroll(None, 4, _owned_field, t, z0, theta) is False
    with pytest.warns(UserWarning, match="anode_jax.nn.conv_general_dilated"):
        # Warned once per vector field; a fresh function object keeps the test independent.
        fresh_field = lambda t, z, th: plain_conv_relu_field(t, z, th)
        assert resolve_unroll(None, 4, fresh_field, t, z0, theta) is True
    # Unrolled at every Nt, as before loops were the default: not slower than it was.
    assert resolve_unroll(None, 4 * DEFAULT_MAX_UNROLL, plain_conv_relu_field, t, z0, theta) is True
    # Explicit choices are taken as given.
    assert resolve_unroll(True, 100, _owned_field, t, z0, theta) is True
    assert resolve_unroll(False, 2, plain_conv_relu_field, t, z0, theta) is False
    assert resolve_unroll(8, 8, _owned_field, t, z0, theta) is True
    assert resolve_unroll(8, 9, plain_conv_relu_field, t, z0, theta) is False
