"""The fixed-step time loop: Python-unrolled for short solves, `lax.scan` for long ones.

Why both: on XLA:CPU, reverse-mode through convolutions inside a `lax.scan` ran 15–20× slower
than the same steps unrolled (measured here: 8 conv-ReLU Euler steps, 209 ms vs 11 ms), while a
loop bounds compile time and program size. Short solves are unrolled; long ones loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from anode_jax._typing import PyTree, StepFn

# Solves with at most this many steps are unrolled when `unroll=None` (see module docstring and
# docs/benchmarks.md for the measurement behind it).
DEFAULT_MAX_UNROLL = 16


def time_dtype():
    """The float dtype of t handed to vector fields: float64 under jax_enable_x64, else float32."""
    return jnp.result_type(float)


def resolve_unroll(unroll: bool | int | None, num_steps: int) -> bool:
    """Whether a loop of `num_steps` steps is unrolled.

    `unroll`: True/False force it; an int n unrolls solves of at most n steps; None uses
    DEFAULT_MAX_UNROLL.
    """
    if unroll is None:
        return num_steps <= DEFAULT_MAX_UNROLL
    if isinstance(unroll, bool):
        return unroll
    return num_steps <= unroll


def integrate(
    step: StepFn,
    y0: PyTree,
    args: PyTree,
    *,
    t0: float,
    dt: float,
    first: int,
    last: int,
    unroll: bool,
) -> PyTree:
    """Applies steps first..last-1 (step n starts at t0 + n*dt) to y0; returns y_last."""
    tdtype = time_dtype()
    n = last - first
    if n <= 0:
        return y0
    if unroll or n == 1:
        y = y0
        for i in range(first, last):
            y = step(jnp.asarray(t0 + i * dt, tdtype), y, args)
        return y

    def body(y, i):
        t = jnp.asarray(t0, tdtype) + i.astype(tdtype) * jnp.asarray(dt, tdtype)
        return step(t, y, args), None

    y, _ = lax.scan(body, y0, jnp.arange(first, last, dtype=jnp.int32))
    return y


def step_inputs(
    step: StepFn, y0: PyTree, args: PyTree, *, t0: float, dt: float, first: int, last: int
) -> PyTree:
    """The inputs y_first..y_{last-1} of steps first..last-1, stacked on a new leading axis."""
    tdtype = time_dtype()

    def body(y, i):
        t = jnp.asarray(t0, tdtype) + i.astype(tdtype) * jnp.asarray(dt, tdtype)
        return step(t, y, args), y

    _, inputs = lax.scan(body, y0, jnp.arange(first, last, dtype=jnp.int32))
    return inputs


def tree_barrier(*trees):
    """`lax.optimization_barrier` over pytrees.

    Used in hand-written backward passes so that XLA neither merges a recomputation with the
    identical forward computation (common-subexpression elimination would keep the forward's
    activations alive and undo the memory saving) nor hoists it before the cotangent it is tied to
    exists.
    """
    return lax.optimization_barrier(trees)


def zeros_like_cotangent(x):
    """A zero cotangent for a primal leaf: float0 for integer/bool leaves, zeros otherwise."""
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)  # float0 cotangents are NumPy arrays
