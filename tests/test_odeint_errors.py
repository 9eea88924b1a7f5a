"""Every bad input to odeint raises a clear error naming the argument and the valid choices."""

import jax
import jax.numpy as jnp
import pytest

from anode_jax import Checkpointed, odeint

Y0 = jnp.ones(3)
FIELD = lambda t, y, a: -y


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(solver="rk5"),
            ValueError,
            r"Unknown solver 'rk5'; valid names are \['euler', 'heun', 'midpoint', 'rk4', "
            r"'reversible:euler', .*'alf', 'reversible_heun'\]",
        ),
        (dict(solver=4), TypeError, "solver must be a name"),
        (
            dict(adjoint="adjoint"),
            ValueError,
            "Unknown adjoint 'adjoint'; valid names are 'direct', 'anode', 'backsolve', 'reversible' "
            r"\(with a reversible solver\) and 'checkpointed:K'",
        ),
        (dict(adjoint="checkpointed:x"), ValueError, "Unknown adjoint"),
        (dict(adjoint=None), TypeError, "adjoint must be a name or an AbstractAdjoint"),
        (dict(num_steps=0), ValueError, "num_steps must be >= 1, got 0"),
        (dict(num_steps=2.5), TypeError, "num_steps must be a Python int"),
        (dict(num_steps=True), TypeError, "num_steps must be a Python int"),
        (dict(t0=1.0, t1=1.0), ValueError, "t1 must differ from t0"),
        (dict(t1=float("nan")), ValueError, "t1 must be finite"),
        (dict(t1=jnp.ones(2)), ValueError, "t1 must be a scalar"),
        (dict(t0="0"), TypeError, "t0 must be a real number"),
        (dict(unroll="yes"), TypeError, "unroll must be None, a bool or an int"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs = {"num_steps": 2, **kwargs}
    with pytest.raises(error, match=match):
        odeint(FIELD, Y0, None, **kwargs)


def test_checkpoint_budget_must_be_positive():
    with pytest.raises(ValueError, match="must be an int >= 1"):
        Checkpointed(num_checkpoints=0)
    with pytest.raises(ValueError, match="Unknown adjoint"):
        odeint(FIELD, Y0, None, num_steps=2, adjoint="checkpointed:0x")


def test_vector_field_must_be_callable():
    with pytest.raises(TypeError, match="vector_field must be callable"):
        odeint("f", Y0, None, num_steps=1)


def test_output_structure_mismatch():
    with pytest.raises(ValueError, match="must return a pytree with the structure of y"):
        odeint(lambda t, y, a: (y, y), Y0, None, num_steps=1)


def test_output_shape_mismatch():
    with pytest.raises(ValueError, match=r"returned shape \(2,\) for y, whose shape is \(3,\)"):
        odeint(lambda t, y, a: y[:2], Y0, None, num_steps=1)


def test_output_dtype_mismatch():
    with pytest.raises(
        TypeError, match="returned dtype bfloat16 for y\\['x'\\], whose dtype is float32"
    ):
        odeint(lambda t, y, a: {"x": y["x"].astype(jnp.bfloat16)}, {"x": Y0}, None, num_steps=1)


def test_integer_state_rejected():
    with pytest.raises(TypeError, match=r"y0\[1\] must be a floating-point array"):
        odeint(lambda t, y, a: y, (Y0, jnp.arange(3)), None, num_steps=1)


def test_empty_state_rejected():
    with pytest.raises(ValueError, match="at least one array"):
        odeint(lambda t, y, a: y, {}, None, num_steps=1)


def test_traced_time_is_accepted():
    # Traced times are solved by time normalisation (tests/test_times.py covers them).
    y1 = jax.jit(lambda t1: odeint(FIELD, Y0, None, t1=t1, num_steps=2))(1.0)
    assert y1.shape == Y0.shape


def test_no_retrace_on_second_call():
    traces = []

    def field(t, y, a):
        traces.append(1)
        return -a * y

    f = jax.jit(jax.grad(lambda a: jnp.sum(odeint(field, Y0, a, num_steps=2, solver="euler"))))
    f(1.0)
    count = len(traces)
    f(2.0)
    assert len(traces) == count > 0
