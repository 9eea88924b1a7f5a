"""The fixed-step time loop: `lax.scan` (program size independent of Nt) or Python-unrolled.

The default policy (`_policy.resolve_unroll`) loops; unrolling remains for vector fields with
plain `lax` convolutions on CPU, whose gradients are slow inside a loop there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from anode_jax._typing import PyTree, StepFn

# Unrolled `anode` solves of more steps than this reverse step by step (storing Nt states)
# instead of differentiating the recomputed block as a whole (Nt steps of internals).
DEFAULT_MAX_UNROLL = 16


def time_dtype():
    """The float dtype of t handed to vector fields: float64 under jax_enable_x64, else float32."""
    return jnp.result_type(float)


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
