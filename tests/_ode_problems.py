"""Small vector fields shared by the core tests (float64 when the x64 fixture is active)."""

import jax
import jax.numpy as jnp

from anode_jax.nn import conv_general_dilated

_DIMS = ("NHWC", "HWIO", "NHWC")


def conv(z, w):
    # The loop-safe convolution: the solves loop (compile time flat in the number of steps);
    # plain_conv_relu_field keeps jax.lax's for the tests of the unrolling rule.
    return conv_general_dilated(z, w, (1, 1), "SAME", dimension_numbers=_DIMS)


def conv_relu_field(t, z, theta):
    """The ANODE paper's vector field without normalization: ReLU(conv(ReLU(conv(z))))."""
    return jax.nn.relu(conv(jax.nn.relu(conv(z, theta["w1"])), theta["w2"]))


def plain_conv_relu_field(t, z, theta):
    """`conv_relu_field` with `jax.lax.conv_general_dilated` (which odeint unrolls on CPU)."""

    def plain(z, w):
        return jax.lax.conv_general_dilated(z, w, (1, 1), "SAME", dimension_numbers=_DIMS)

    return jax.nn.relu(plain(jax.nn.relu(plain(z, theta["w1"])), theta["w2"]))


def conv_relu_problem(key, dtype=jnp.float64, batch=2, size=5, channels=3, scale=0.6):
    k1, k2, k3 = jax.random.split(key, 3)
    fan_in = 9 * channels
    theta = {
        "w1": (scale / fan_in**0.5) * jax.random.normal(k1, (3, 3, channels, channels), dtype),
        "w2": (scale / fan_in**0.5) * jax.random.normal(k2, (3, 3, channels, channels), dtype),
    }
    z0 = jax.random.normal(k3, (batch, size, size, channels), dtype)
    return z0, theta


def smooth_field(t, y, args):
    """A smooth, time-dependent field on a pytree state {"x": (n,), "v": (n,)}."""
    w, b = args["w"], args["b"]
    x, v = y["x"], y["v"]
    return {"x": jnp.tanh(w @ v + b) * jnp.cos(t), "v": -jnp.sin(x) + 0.1 * t * v}


def smooth_problem(key, dtype=jnp.float64, n=4):
    k1, k2, k3 = jax.random.split(key, 3)
    args = {"w": 0.5 * jax.random.normal(k1, (n, n), dtype), "b": 0.1 * jnp.ones(n, dtype)}
    y0 = {"x": jax.random.normal(k2, (n,), dtype), "v": jax.random.normal(k3, (n,), dtype)}
    return y0, args
