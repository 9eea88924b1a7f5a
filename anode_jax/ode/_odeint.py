"""`odeint`: integrate y' = f(t, y, args) from t0 to t1 with a fixed-step explicit solver."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from anode_jax._typing import PyTree, VectorField
from anode_jax.ode import _loop, _policy, _times
from anode_jax.ode._registry import get_solver
from anode_jax.ode._solvers import AbstractSolver
from anode_jax.ode.adjoints import AbstractAdjoint, SolveSpec, get_adjoint


def odeint(
    vector_field: VectorField,
    y0: PyTree,
    args: PyTree = None,
    *,
    t0: float | jax.Array | None = None,
    t1: float | jax.Array | None = None,
    ts: jax.Array | None = None,
    num_steps: int,
    solver: str | AbstractSolver = "rk4",
    adjoint: str | AbstractAdjoint = "anode",
    unroll: bool | int | None = None,
) -> PyTree:
    """Solves y' = vector_field(t, y, args), y(t0) = y0; returns y(t1), or y at every entry of `ts`.

    A neural ODE block z(1) = z(0) + ∫₀¹ f(z(t), θ) dt (Gholami et al. 2019, Eq. 1; Chen et al.
    2018, Eq. 1) is `odeint(f, z0, theta, num_steps=Nt)`. With solver="euler" and num_steps=1
    it is exactly the residual block z0 + f(0, z0, θ).

    Args:
      vector_field: f(t, y, args) -> dy/dt with y's pytree structure, shapes and dtypes. t is a
        scalar array (float64 under jax_enable_x64, else float32).
      y0: initial state, a pytree of floating-point arrays (float32, float64 or bfloat16).
      args: parameters, any pytree of arrays; gradients flow to its floating-point leaves.
        Traced values that `vector_field` captures by closure are supported too: they are hoisted
        into the differentiated inputs (closure conversion), so every strategy sees them.
      t0, t1: the interval (defaults 0 and 1; t1 < t0 integrates backwards). Python numbers
        (t1 != t0) take the fixed-grid path; traced scalars (under `jit`, `vmap`, `grad`) are
        solved on [0, 1] by time normalisation (docs/core.md, "Many output times and times as
        data"): the same discrete map up to rounding, differentiable with respect to t0 and t1.
      ts: output times instead of t0/t1: a 1-D floating array of static length n >= 2,
        strictly increasing or decreasing (checked when concrete; traced values are not
        checked), values possibly traced; ts[0] is the initial time. Each interval
        [ts[i], ts[i+1]] takes `num_steps` steps, so steps land on every output time (as
        diffrax's `SaveAt(ts=ts)` with `StepTo` on that grid; torchdiffeq's fixed-grid
        solvers take one step per interval of its time vector by default, num_steps=1 here).
      num_steps: Nt >= 1 fixed steps of size (t1 - t0) / Nt (per interval of `ts`).
      solver: "euler", "midpoint" (RK2), "heun", "rk4", any explicit ButcherTableau, or
        another AbstractSolver.
      adjoint: gradient strategy: "anode" (default: exact, O(L)+O(Nt) memory), "direct",
        "checkpointed:K" / Checkpointed(K) (exact, at most K states of a block), or "backsolve"
        (Neural ODE adjoint; approximate, baseline only). With `ts`, every strategy runs per
        interval inside one `lax.scan` and also stores the n outputs.
      unroll: unroll the time loop (True), loop with `lax.scan` (False: program size and compile
        time independent of Nt), unroll up to n steps (int), or None (default): loop, except
        for vector fields with plain `lax.conv_general_dilated` on CPU, which unroll up to 16
        steps with a one-time warning (their gradient is slow in a loop there; use
        `anode_jax.nn.conv_general_dilated`). See docs/core.md, "Loop policy". The intervals of
        `ts` always loop (compile time independent of n).

    Returns:
      y(t1), with y0's structure; with `ts`, y0's structure with a leading axis of length n on
      every leaf (entry 0 is y0).

    Raises:
      TypeError: `ts` together with `t0`/`t1`; `ts` not a floating array; a non-floating
        traced time.
      ValueError: `ts` not 1-D with n >= 2, not finite or not strictly monotone (concrete);
        static t1 == t0; plus the errors listed in docs/core.md, "Errors".
    """
    if ts is not None or _times.is_traced(t0) or _times.is_traced(t1):
        return _times.odeint_times(
            odeint, vector_field, y0, args, t0=t0, t1=t1, ts=ts, num_steps=num_steps,
            solver=solver, adjoint=adjoint, unroll=unroll,
        )  # fmt: skip
    if not callable(vector_field):
        raise TypeError(
            f"vector_field must be callable f(t, y, args), got {type(vector_field).__name__}."
        )
    solver = get_solver(solver)
    strategy = get_adjoint(adjoint)
    strategy.check_solver(solver)
    num_steps = _check_num_steps(num_steps)
    t0 = _check_time("t0", 0.0 if t0 is None else t0)
    t1 = _check_time("t1", 1.0 if t1 is None else t1)
    if t1 == t0:
        raise ValueError(f"t1 must differ from t0 (both are {t0}); nothing would be integrated.")
    if unroll is not None and not isinstance(unroll, (bool, int)):
        raise TypeError(f"unroll must be None, a bool or an int, got {type(unroll).__name__}.")
    _check_state(y0)

    t_example = jnp.zeros((), _loop.time_dtype())
    _check_output(vector_field, t_example, y0, args)

    spec = SolveSpec(
        solver,
        t0,
        t1,
        num_steps,
        _policy.resolve_unroll(unroll, num_steps, vector_field, t_example, y0, args),
    )
    t_start = jnp.asarray(t0, _loop.time_dtype())
    state0 = solver.init(vector_field, t_start, y0, args)
    if not strategy.needs_closure_conversion:
        return solver.output(strategy.solve(vector_field, state0, args, spec))
    # custom_vjp cannot differentiate values a function captures by closure; hoist them into
    # the differentiated inputs instead of silently dropping their gradient.
    closed_field, consts = jax.closure_convert(vector_field, t_example, y0, args)
    if consts:
        vector_field, args = _WithConsts(closed_field), (args, tuple(consts))
    return solver.output(strategy.solve(vector_field, state0, args, spec))


class _WithConsts:
    """f(t, y, (args, consts)) for a closure-converted f(t, y, args, *consts)."""

    def __init__(self, closed_field):
        self.closed_field = closed_field

    def __call__(self, t, y, args_and_consts):
        args, consts = args_and_consts
        return self.closed_field(t, y, args, *consts)


def _check_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(
            f"num_steps must be a Python int >= 1 (the number of fixed solver steps), got "
            f"{num_steps!r} of type {type(num_steps).__name__}."
        )
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    return int(num_steps)


def _check_time(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray, jax.Array)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}.")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    return value


def _check_state(y0) -> None:
    leaves = jax.tree.leaves(y0)
    if not leaves:
        raise ValueError("y0 must contain at least one array; got an empty pytree.")
    for path, leaf in jax.tree_util.tree_leaves_with_path(y0):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"y0{jax.tree_util.keystr(path)} must be a floating-point array (float32, float64 or "
                f"bfloat16), got {type(leaf).__name__}"
                + (f" of dtype {dtype}" if dtype is not None else "")
                + "; convert it, e.g. jnp.asarray(x, jnp.float32)."
            )


def _check_output(vector_field, t, y0, args) -> None:
    out = jax.eval_shape(vector_field, t, y0, args)
    y_struct = jax.tree.structure(y0)
    out_struct = jax.tree.structure(out)
    if out_struct != y_struct:
        raise ValueError(
            "vector_field(t, y, args) must return a pytree with the structure of y; "
            f"y0 is {y_struct} but the vector field returned {out_struct}."
        )
    for (path, y_leaf), out_leaf in zip(
        jax.tree_util.tree_leaves_with_path(y0), jax.tree.leaves(out)
    ):
        where = f"y{jax.tree_util.keystr(path)}"
        if tuple(out_leaf.shape) != tuple(np.shape(y_leaf)):
            raise ValueError(
                f"vector_field returned shape {tuple(out_leaf.shape)} for {where}, whose shape is "
                f"{tuple(np.shape(y_leaf))}; dy/dt must have the shape of y."
            )
        if out_leaf.dtype != y_leaf.dtype:
            raise TypeError(
                f"vector_field returned dtype {out_leaf.dtype} for {where}, whose dtype is "
                f"{y_leaf.dtype}; dy/dt must have the dtype of y (cast inside the vector field)."
            )
