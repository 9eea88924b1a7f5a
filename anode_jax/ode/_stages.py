"""Where a fixed-step solve evaluates its vector field, and the quadrature weight of each time.

A fixed-step solve of `dy/dt = f(t, y)` over `[t0, t1]` evaluates `f` at a known, finite
set of times (Euler: `t_n`; midpoint: `t_n` and `t_n + h/2`; RK4: `t_n`, `t_n + h/2`
twice and `t_{n+1}`). Integrating a state-independent field `g(t)` with the same solver
gives `Σ_k w_k g(t_k)`: the weights `w_k` are what the solve "sees" of each time (midpoint's
first stage has weight 0). Layers that keep per-time state for a solve — e.g. the running
statistics of a BatchNorm inside a vector field (`anode_jax.models`) — key it by these times
and interpolate between them with `knot_weights`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from anode_jax.ode.solvers import AbstractSolver, get_solver

_Array = jax.Array


def stage_times(
    solver: str | AbstractSolver, num_steps: int, t0: float = 0.0, t1: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """`(times, weights)` of a fixed-step solve: the distinct times at which `solver`
    evaluates the vector field in `num_steps` steps over `[t0, t1]`, ascending, and the total
    quadrature weight the solve gives each (they sum to `t1 - t0`). Times whose weight is zero
    (e.g. midpoint's first stage, which only feeds the second) are left out: no integral over
    the solve can observe them.

    Found by running the solver once on scalar probes (no tracing of the user's field), so it
    holds for any `AbstractSolver`, reversible ones included. Cached per argument tuple.
    Returns two float64 NumPy arrays of equal length ≥ 1.
    """
    solver = get_solver(solver)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    return _stage_times(solver, num_steps, float(t0), float(t1))


@functools.lru_cache(maxsize=256)
def _stage_times(solver, num_steps, t0, t1):
    # Concrete even when called while tracing (a model's init under jit or eval_shape): the
    # probes' arrays must not become tracers of the enclosing computation.
    with jax.ensure_compile_time_eval():
        return _probe(solver, num_steps, t0, t1)


def _probe(solver, num_steps, t0, t1):
    dt = (t1 - t0) / num_steps
    tol = 1e-6 * abs(t1 - t0)

    def run(field, y0):
        state = solver.init(field, t0, y0, None)
        for n in range(num_steps):
            state = solver.step(field, t0 + n * dt, dt, state, None)
        return solver.output(state)

    seen = []  # pass 1: every evaluation time

    def record(t, y, args):
        seen.append(float(t))
        return jnp.zeros_like(y)

    run(record, jnp.zeros(()))
    times = []
    for t in sorted(seen):
        if not times or t - times[-1] > tol:
            times.append(t)
    grid = np.asarray(times)

    def indicator(t, y, args):  # pass 2: ∫ one-hot(time of the evaluation) dt
        return jnp.asarray(np.abs(grid - float(t)) <= tol, y.dtype)

    weights = np.asarray(run(indicator, jnp.zeros(len(grid))), np.float64)
    keep = np.abs(weights) > 1e-6 * abs(dt)
    return grid[keep], weights[keep]


def knot_weights(knots: np.ndarray | _Array, t: _Array) -> _Array:
    """The piecewise-linear ("hat") basis over `knots` at time `t`: a `(K,)` vector of
    weights summing to 1, one-hot when `t` is a knot, linear in between, constant (the end
    knot) outside `[knots[0], knots[-1]]`. `knots`: ascending `(K,)` array (NumPy or
    traced); `t`: a scalar, traced or not. The result has `t`'s floating dtype.
    """
    t = jnp.asarray(t)
    dtype = t.dtype if jnp.issubdtype(t.dtype, jnp.floating) else jnp.result_type(float)
    num = jnp.shape(knots)[0]
    if num == 1:
        return jnp.ones((1,), dtype)
    k = jnp.asarray(knots).astype(dtype)
    t = jnp.clip(t.astype(dtype), k[0], k[-1])
    i = jnp.clip(jnp.searchsorted(k, t, side="right") - 1, 0, num - 2)
    width = k[i + 1] - k[i]
    frac = jnp.where(width > 0, (t - k[i]) / jnp.where(width > 0, width, 1), 0)
    eye = jnp.eye(num, dtype=dtype)
    return (1 - frac) * eye[i] + frac * eye[i + 1]
