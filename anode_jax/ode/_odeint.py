"""`odeint`: integrate y' = f(t, y, args) from t0 to t1 with a fixed-step explicit solver or an
adaptive embedded pair."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import numbers
import types
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anode_jax._typing import PyTree, VectorField
from anode_jax.ode import _loop, _policy, _times, adaptive
from anode_jax.ode.adjoints import AbstractAdjoint, SolveSpec, get_adjoint
from anode_jax.ode.solvers import (
    AbstractSolver,
    EmbeddedTableau,
    PIDController,
    adaptive_solver_names,
    get_solver,
)


def odeint(
    vector_field: VectorField,
    y0: PyTree,
    args: PyTree = None,
    *,
    t0: float | jax.Array | None = None,
    t1: float | jax.Array | None = None,
    ts: jax.Array | None = None,
    num_steps: int | None = None,
    solver: str | AbstractSolver = "rk4",
    adjoint: str | AbstractAdjoint = "anode",
    unroll: bool | int | None = None,
    rtol: Any = None,
    atol: Any = None,
    max_steps: int | None = None,
    dt0: float | None = None,
    controller: PIDController | None = None,
    return_stats: bool = False,
    throw: bool = True,
) -> PyTree:
    """Solves y' = vector_field(t, y, args), y(t0) = y0; returns y(t1), or y at every entry of `ts`.

    A neural ODE block z(1) = z(0) + ∫₀¹ f(z(t), θ) dt (Gholami et al. 2019, Eq. 1; Chen et al.
    2018, Eq. 1) is `odeint(f, z0, theta, num_steps=Nt)`. With solver="euler" and num_steps=1
    it is exactly the residual block z0 + f(0, z0, θ).

    Args:
      vector_field: f(t, y, args) -> dy/dt with y's pytree structure, shapes and dtypes. t is a
        scalar array (float64 under jax_enable_x64, else float32).
      y0: initial state, a pytree of floating-point arrays (float32, float64 or bfloat16).
      args: parameters, any pytree. Array leaves (JAX or NumPy arrays, NumPy scalars) are
        traced and gradients flow to the floating-point ones; every other leaf (a Python int,
        float, bool or string, e.g. a size used as a shape) is static: the vector field sees it
        as the Python value, and a new value compiles a new solve. Traced values that
        `vector_field` captures by closure are supported too: they are hoisted into the
        differentiated inputs (closure conversion), so every strategy sees them.
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
        Solvers with an auxiliary state (the reversible ones) carry it through the output
        times: the outputs are one solve's, with step (ts[i+1] - ts[i]) / num_steps.
      num_steps: Nt >= 1 fixed steps of size (t1 - t0) / Nt (per interval of `ts`); required
        by fixed-step solvers, refused by adaptive ones.
      solver: "euler", "midpoint" (RK2), "heun", "rk4", any explicit ButcherTableau, or
        another AbstractSolver (see `anode_jax.ode.solvers`); or an embedded pair for adaptive
        step sizes: "heun_euler", "bosh3", "dopri5", "tsit5" or an EmbeddedTableau (docs/core.md,
        "Adaptive step sizes").
      adjoint: gradient strategy: "anode" (default: exact, O(L)+O(Nt) memory), "direct",
        "checkpointed:K" / Checkpointed(K) (exact, at most K states of a block), "reversible"
        (with a reversible solver) or "backsolve" (Neural ODE adjoint; approximate, baseline
        only). With `ts`, every strategy runs per interval inside one `lax.scan`; "anode"
        and "checkpointed:K" keep about log2(n) interval inputs as checkpoints (their
        backward pass recomputes the rest into the consumed slots of the outputs' cotangent,
        one more forward pass), "reversible" nothing per interval (it reconstructs backwards
        through every output time), "backsolve" the outputs, "direct" every step. Every
        exact strategy supports reverse-over-reverse differentiation (grad of grad,
        Hessian-vector products). Forward mode (`jax.jvp`, `jax.jacfwd`,
        `jax.linearize` on the solve) needs adjoint="direct": the other
        strategies define a custom VJP and raise a TypeError naming it; forward-over-reverse
        (`jax.jvp` of `jax.grad`, `jax.hessian`) works with every strategy.
      unroll: unroll the time loop (True), loop with `lax.scan` (False: program size and compile
        time independent of Nt), unroll up to n steps (int), or None (default): loop, except
        for vector fields with plain `lax.conv_general_dilated` on CPU, which unroll up to 16
        steps with a one-time warning (their gradient is slow in a loop there; use
        `anode_jax.nn.conv_general_dilated`). See docs/core.md, "Loop policy". The intervals of
        `ts` always loop (compile time independent of n). Fixed-step solvers only.
      rtol, atol: adaptive solvers only: tolerances of the error control (numbers, or pytrees
        like y with a number per leaf; default 1e-3 and 1e-6). The error norm is the RMS over
        every element of err / (atol + rtol·max(|y_n|, |y_n+1|)), as diffrax and torchdiffeq.
      max_steps: adaptive solvers only: the static bound on attempted steps (accepted plus
        rejected; default 4096, as diffrax). Compile time does not depend on it; "direct"
        memory grows with it, "anode" as √max_steps states, "checkpointed:K" not at all.
      dt0: adaptive solvers only: the first step size (default: Hairer's heuristic).
      controller: adaptive solvers only: a `PIDController` for every other setting (PID
        coefficients, safety, factormin/factormax, dtmin/dtmax); then pass rtol/atol/dt0 in it.
      return_stats: adaptive solvers only: return (y, stats) with stats a dict of int32/bool
        arrays: "num_accepted_steps", "num_rejected_steps", "num_steps" (their sum),
        "num_fevals" (vector-field evaluations of the forward solve), "max_steps_reached",
        "t_final" (summed / any / last over the intervals of `ts`).
      throw: adaptive solvers only: True (default) raises `MaxStepsError` at run time, naming
        max_steps and the time reached, when max_steps attempts do not reach t1 (y would be
        the state at that time, not at t1); False returns that y silently: use it with
        return_stats=True and check stats["max_steps_reached"].

    Returns:
      y(t1), with y0's structure; with `ts`, y0's structure with a leading axis of length n on
      every leaf (entry 0 is y0).

    Raises:
      TypeError: `ts` together with `t0`/`t1`; `ts` not a floating array; a non-floating
        traced time; forward-mode differentiation through a strategy other than "direct".
      ValueError: `ts` not 1-D with n >= 2, not finite or not strictly monotone (concrete);
        static t1 == t0; plus the errors listed in docs/core.md, "Errors" (a bad argument is
        named in the message with the valid choices; a vector field whose output does not
        match y); adaptive: num_steps or unroll with an embedded pair, rtol/atol/max_steps/
        dt0/controller/return_stats/throw with a fixed-step solver, a missing num_steps with
        a fixed-step solver, adjoint="reversible" with an embedded pair, bad tolerances.
      MaxStepsError (a RuntimeError, at run time): an adaptive solve used max_steps attempts
        before reaching t1 (unless throw=False). Under `jit` it surfaces where the result
        is read (JAX wraps it in its runtime error with this message).

    Compilation: the solve is compiled once per vector-field object, static configuration,
    static `args` leaves and argument shapes/dtypes, and reused by later calls, also eager
    ones and eager `jax.grad`s (as under `jax.jit`, values the vector field reads by closure
    from Python objects are fixed at the first call; pass changing values in `args`). `ts` and
    traced `t0`/`t1` are arguments of that program (new values reuse it); concrete `t0`/`t1`
    are part of the configuration (a new value compiles). Flax modules: call submodules inside
    a solve through `anode_jax.models.odeint_linen`.
    """
    adaptive_options = dict(
        rtol=rtol, atol=atol, max_steps=max_steps, dt0=dt0, controller=controller,
        return_stats=return_stats, throw=throw,
    )  # fmt: skip
    if ts is not None or _times.is_traced(t0) or _times.is_traced(t1):
        return _odeint_times(
            vector_field, y0, args, t0=t0, t1=t1, ts=ts, num_steps=num_steps,
            solver=solver, adjoint=adjoint, unroll=unroll, **adaptive_options,
        )  # fmt: skip
    if not callable(vector_field):
        raise TypeError(
            f"vector_field must be callable f(t, y, args), got {type(vector_field).__name__}."
        )
    solver = get_solver(solver)
    strategy = get_adjoint(adjoint)
    if isinstance(solver, EmbeddedTableau):
        return _odeint_adaptive(
            vector_field, y0, args, t0, t1, num_steps, solver, strategy, unroll,
            **adaptive_options,
        )  # fmt: skip
    num_steps = _check_fixed_solve(solver, strategy, num_steps, unroll, y0, adaptive_options)
    t0 = _check_time("t0", 0.0 if t0 is None else t0)
    t1 = _check_time("t1", 1.0 if t1 is None else t1)
    if t1 == t0:
        raise ValueError(f"t1 must differ from t0 (both are {t0}); nothing would be integrated.")
    config = _Config(solver, strategy, t0, t1, num_steps, unroll)
    dynamic, static = _partition_args(args)
    return _run_cached(vector_field, y0, dynamic, static, config, strategy.name)


def _run_cached(vector_field, y0, dynamic, static, config, adjoint_name, *times):
    """The cached compiled solve for this configuration (or the plain one when uncacheable),
    with the errors of the solve translated into odeint's."""
    solve = _solve_times if isinstance(config, _TimesConfig) else _solve
    try:
        compiled = _cached_solve(vector_field, config, static, solve)
        if compiled is not None:
            return compiled(y0, dynamic, *times)
        return solve(vector_field, y0, dynamic, static, config, *times)
    except jax.errors.UnexpectedTracerError as err:
        raise TypeError(_LEAK_MESSAGE) from err
    except TypeError as err:
        if _FORWARD_MODE_ERROR not in str(err):
            raise
        raise TypeError(
            f"odeint: adjoint={adjoint_name!r} defines a custom VJP and cannot be "
            'differentiated in forward mode (jax.jvp, jax.jacfwd, jax.linearize); use adjoint="direct" '
            "for forward mode (forward-over-reverse, e.g. jax.hessian, works with every adjoint)."
        ) from None


def _odeint_times(vector_field, y0, args, **kwargs) -> PyTree:
    """odeint for output times `ts` or traced t0/t1: one compiled program per configuration
    that takes the times as arguments (new time values reuse it, eager calls included)."""
    times, options = _times.prepare_times(vector_field, **kwargs)
    # Types in the key: True and 1 (unroll), 1 and 1.0 are equal but act differently.
    config = _TimesConfig(tuple((k, type(v), v) for k, v in sorted(options.items())))
    dynamic, static = _partition_args(args)
    adjoint = options["adjoint"]
    name = adjoint if isinstance(adjoint, str) else getattr(adjoint, "name", adjoint)
    return _run_cached(vector_field, y0, dynamic, static, config, name, times)


@dataclasses.dataclass(frozen=True)
class _TimesConfig:
    """The static configuration of a solve with output times or traced t0/t1: the options of
    every per-interval solve, as sorted (name, type, value) triples (hashable when the values
    are)."""

    options: tuple[tuple[str, type, Any], ...]


def _solve_times(vector_field, y0, dynamic, static: _StaticArgs, config: _TimesConfig, times):
    options = {name: value for name, _, value in config.options}
    if len(times) == 1 and _times.carries_solver_state(options):
        return _solve_times_carried(vector_field, y0, dynamic, static, options, times[0])
    args = static.merge(dynamic)
    return _times.solve_times(odeint, vector_field, y0, args, times, options)


def _solve_times_carried(vector_field, y0, dynamic, static: _StaticArgs, options, ts):
    """Output times with a solver that carries an auxiliary state (the reversible ones): one
    solve through every output time, its state carried across them (`_times.solve_carried`)."""
    options = dict(options)
    solver, strategy = get_solver(options.pop("solver")), get_adjoint(options.pop("adjoint"))
    num_steps, unroll = options.pop("num_steps"), options.pop("unroll")
    adaptive_options = {**_ADAPTIVE_DEFAULTS, **options}
    num_steps = _check_fixed_solve(solver, strategy, num_steps, unroll, y0, adaptive_options)
    vector_field, args = _bind_static(vector_field, dynamic, static)
    _check_output(vector_field, jnp.zeros((), _loop.time_dtype()), y0, args)
    return _times.solve_carried(vector_field, y0, args, ts, solver, strategy, num_steps, unroll)


def _check_fixed_solve(solver, strategy, num_steps, unroll, y0, adaptive_options) -> int:
    """Checks a fixed-step solve's options and y0; returns num_steps as an int."""
    _check_fixed_step_options(solver, num_steps, adaptive_options)
    strategy.check_solver(solver)
    num_steps = _check_count("num_steps", num_steps, "the number of fixed solver steps")
    if unroll is not None and not isinstance(unroll, (bool, int)):
        raise TypeError(f"unroll must be None, a bool or an int, got {type(unroll).__name__}.")
    _check_state(y0)
    return num_steps


_ADAPTIVE_DEFAULTS = dict(
    rtol=None, atol=None, max_steps=None, dt0=None, controller=None, return_stats=False,
    throw=True,
)  # fmt: skip


def _check_fixed_step_options(solver, num_steps, adaptive_options) -> None:
    given = [k for k, v in adaptive_options.items() if v is not _ADAPTIVE_DEFAULTS[k]]
    if given:
        names = ", ".join(given)
        raise ValueError(
            f"odeint: {names} {'apply' if len(given) > 1 else 'applies'} to adaptive solvers "
            f"only; solver {solver.name!r} takes fixed steps (num_steps). Use an adaptive "
            f"solver ({adaptive_solver_names()}) or drop {names}."
        )
    if num_steps is None:
        raise TypeError(
            f"odeint: solver {solver.name!r} takes fixed steps and needs num_steps (an int >= 1); "
            f"for adaptive step sizes pick one of {adaptive_solver_names()}."
        )


def _odeint_adaptive(
    vector_field, y0, args, t0, t1, num_steps, solver, strategy, unroll, *, rtol, atol,
    max_steps, dt0, controller, return_stats, throw,
):  # fmt: skip
    """odeint with an embedded pair: validation, then the cached adaptive solve."""
    if num_steps is not None:
        raise ValueError(
            f"odeint: solver {solver.name!r} chooses its own steps and takes no num_steps; "
            "set rtol/atol (and max_steps), or use a fixed-step solver such as 'rk4'."
        )
    if unroll is not None:
        raise ValueError(
            f"odeint: unroll applies to fixed-step solvers; the adaptive solver {solver.name!r} "
            "always loops (compile time independent of max_steps)."
        )
    if getattr(strategy, "name", None) == "reversible":
        raise ValueError(
            "odeint: adjoint='reversible' has no adaptive form yet (no reversible embedded "
            "pair); use 'anode', 'checkpointed:K', 'direct' or 'backsolve' with "
            f"{solver.name!r}, or a reversible fixed-step solver."
        )
    if controller is None:
        controller = PIDController(
            rtol=1e-3 if rtol is None else rtol, atol=1e-6 if atol is None else atol, dt0=dt0
        )
    elif not isinstance(controller, PIDController):
        raise TypeError(f"controller must be a PIDController, got {type(controller).__name__}.")
    elif rtol is not None or atol is not None or dt0 is not None:
        raise ValueError(
            "odeint: pass rtol, atol and dt0 inside controller=PIDController(...), not both."
        )
    if max_steps is None:
        max_steps = 4096
    max_steps = _check_count("max_steps", max_steps, "the static bound on attempted steps")
    if not isinstance(return_stats, bool) or not isinstance(throw, bool):
        raise TypeError("return_stats and throw must be bools.")
    t0 = _check_time("t0", 0.0 if t0 is None else t0)
    t1 = _check_time("t1", 1.0 if t1 is None else t1)
    if t1 == t0:
        raise ValueError(f"t1 must differ from t0 (both are {t0}); nothing would be integrated.")
    _check_state(y0)
    for name, tol in (("rtol", controller.rtol), ("atol", controller.atol)):
        tol.per_leaf(name, y0)  # a pytree tolerance must have y's structure
    spec = adaptive.AdaptiveSpec(solver, controller, t0, t1, max_steps, throw)
    config = _AdaptiveConfig(strategy, spec, return_stats)
    dynamic, static = _partition_args(args)
    return _run_cached(vector_field, y0, dynamic, static, config, strategy.name)


@dataclasses.dataclass(frozen=True)
class _AdaptiveConfig:
    """The static configuration of one adaptive solve (hashable: a cache key)."""

    strategy: AbstractAdjoint
    spec: adaptive.AdaptiveSpec
    return_stats: bool


_LEAK_MESSAGE = (
    "odeint: the vector field leaked a traced value out of the solve (it stored an intermediate "
    "outside its return value); a Flax submodule called by closure does this when it creates "
    "its variables inside the solve: call it through "
    "anode_jax.models.odeint_linen(self, y0, method=lambda m, t, y, args: ...)."
)

# JAX's message for jvp of a custom_vjp function (jax._src.custom_derivatives).
_FORWARD_MODE_ERROR = "can't apply forward-mode autodiff (jvp) to a custom_vjp function"


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static configuration of one solve (hashable: a cache key)."""

    solver: AbstractSolver
    strategy: AbstractAdjoint
    t0: float
    t1: float
    num_steps: int
    unroll: bool | int | None


@dataclasses.dataclass(frozen=True)
class _StaticArgs:
    """The non-array leaves of `args` and where they go (hashable when the leaves are)."""

    treedef: Any
    is_array: tuple[bool, ...]
    values: tuple[Any, ...]
    kinds: tuple[type, ...]  # in the key too: 1, 1.0 and True are equal but act differently

    def merge(self, dynamic: list) -> PyTree:
        arrays, values = iter(dynamic), iter(self.values)
        return jax.tree.unflatten(
            self.treedef, [next(arrays) if a else next(values) for a in self.is_array]
        )


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _partition_args(args) -> tuple[list, _StaticArgs]:
    """(array leaves of args, the static rest): Python scalars and other objects are static."""
    leaves, treedef = jax.tree.flatten(args)
    is_array = tuple(_is_array(leaf) for leaf in leaves)
    dynamic = [leaf for leaf, a in zip(leaves, is_array) if a]
    static = tuple(leaf for leaf, a in zip(leaves, is_array) if not a)
    return dynamic, _StaticArgs(treedef, is_array, static, tuple(map(type, static)))


def _bind_static(vector_field, dynamic: list, static: _StaticArgs):
    """(field, args) for a solve: with static leaves in args, the field fills them in and
    takes only the array leaves; otherwise the field itself and the merged args."""
    if any(not a for a in static.is_array):
        return _WithStaticArgs(vector_field, static), dynamic
    return vector_field, static.merge(dynamic)


class _WithStaticArgs:
    """f(t, y, array leaves of args) for f(t, y, args) with the static leaves filled in."""

    def __init__(self, vector_field, static: _StaticArgs):
        self.vector_field, self.static = vector_field, static

    def __call__(self, t, y, dynamic):
        return self.vector_field(t, y, self.static.merge(dynamic))


# Compiled solves per vector field, weakly keyed: an entry lives as long as its field (for a
# bound method, its instance), so fields created per call do not accumulate.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE_MISSES = [0]


def _cached_solve(vector_field, config, static: _StaticArgs, solve_fn=None):
    """jax.jit(solve_fn) for this field and static configuration, or None when uncacheable
    (a field, option or static leaf that cannot be hashed or weakly referenced). solve_fn
    (default `_solve`) is called as solve_fn(field, y0, dynamic, static, config, *rest); the
    compiled program takes (y0, dynamic, *rest), all traced."""
    solve_fn = _solve if solve_fn is None else solve_fn
    if isinstance(vector_field, types.MethodType):
        owner, func = vector_field.__self__, vector_field.__func__
    else:
        owner, func = vector_field, None
    try:
        per_field = _COMPILED.get(owner)
        key = (func, solve_fn, config, static)
        hash(key)
        if per_field is None:
            per_field = _COMPILED[owner] = {}
    except TypeError:
        return None
    compiled = per_field.get(key)
    if compiled is None:
        _CACHE_MISSES[0] += 1
        owner_ref = weakref.ref(owner)

        def solve(y0, dynamic, *rest):
            owner = owner_ref()
            field = owner if func is None else types.MethodType(func, owner)
            return solve_fn(field, y0, dynamic, static, config, *rest)

        compiled = per_field[key] = jax.jit(solve)
    return compiled


def _solve(vector_field, y0, dynamic, static: _StaticArgs, config: _Config) -> PyTree:
    """The solve itself: output check, loop policy, closure conversion, strategy."""
    vector_field, args = _bind_static(vector_field, dynamic, static)
    t_example = jnp.zeros((), _loop.time_dtype())
    _check_output(vector_field, t_example, y0, args)
    if isinstance(config, _AdaptiveConfig):
        return _solve_adaptive(vector_field, y0, args, config, t_example)
    solver, strategy = config.solver, config.strategy
    spec = SolveSpec(
        solver,
        config.t0,
        config.t1,
        config.num_steps,
        _policy.resolve_unroll(config.unroll, config.num_steps, vector_field, t_example, y0, args),
    )
    t_start = jnp.asarray(config.t0, _loop.time_dtype())
    state0 = solver.init(vector_field, t_start, y0, args)
    if strategy.needs_closure_conversion:
        vector_field, args = _hoist_closure(vector_field, t_example, y0, args)
    return solver.output(strategy.solve(vector_field, state0, args, spec))


def _hoist_closure(vector_field, t_example, y0, args):
    """custom_vjp cannot differentiate values a function captures by closure: hoist them into
    the differentiated inputs (`args` becomes (args, consts)) instead of silently dropping
    their gradient."""
    closed_field, consts = jax.closure_convert(vector_field, t_example, y0, args)
    if consts:
        return _times.WithConsts(closed_field), (args, tuple(consts))
    return vector_field, args


def _solve_adaptive(vector_field, y0, args, config: _AdaptiveConfig, t_example) -> PyTree:
    strategy = config.strategy
    if strategy.needs_closure_conversion:
        vector_field, args = _hoist_closure(vector_field, t_example, y0, args)
    y1, record = strategy.solve_adaptive(vector_field, y0, args, config.spec)
    if config.return_stats:
        return y1, adaptive.stats(record)
    return y1


def _check_count(name: str, value, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{name} must be a Python int >= 1 ({meaning}), got "
            f"{value!r} of type {type(value).__name__}."
        )
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return int(value)


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


@contextlib.contextmanager
def _leak_search_of_outer_trace(outer: list):
    """Confine JAX's leak search to the one trace odeint checks, and make it cheap.

    Under `jax.checking_leaks()` JAX searches, for every trace that outlives its tracing (the
    field's own traces, each nested `jit`, `custom_vjp` and loop, are kept alive by reference
    cycles), the whole heap: a full `gc.collect()` and `gc.get_referrers`, then, on a leak, the
    referrer graph and the live frames (`_why_alive`, `_held_in_frame_locals`). In a process
    with a large heap (a notebook, a long test run) that made every Flax model's first trace
    several times slower (ResNet10 with coupled blocks, 3M live objects: 22.5 s against 5.5 s).
    The leak this check exists for, a Flax submodule storing its new variables in its scope,
    holds tracers of the field's outermost trace, so only that trace (`outer[0]`, a weakref)
    is searched: young generations first, a full collection only when tracers are found, and
    odeint replaces JAX's report with its own line, so the referrer chains are not built.
    A JAX without these hooks runs its own, full search."""
    from jax._src import core as jax_core

    def find_leaked_tracers(trace):
        if not outer or outer[0]() is not trace:
            return []
        gc.collect(1)  # the cycles made while tracing are young
        tracers = [r for r in gc.get_referrers(trace) if isinstance(r, jax_core.Tracer)]
        if tracers:
            del tracers
            gc.collect()
            tracers = [r for r in gc.get_referrers(trace) if isinstance(r, jax_core.Tracer)]
        return tracers

    stubs = {
        "maybe_find_leaked_tracers": find_leaked_tracers,
        "_why_alive": lambda ignore_ids, x: "",
        "_held_in_frame_locals": lambda x, ids: [],
    }
    if not all(hasattr(jax_core, name) for name in stubs):  # another JAX: its own search
        stubs = {}
    saved = {name: getattr(jax_core, name) for name in stubs}
    for name in saved:
        setattr(jax_core, name, stubs[name])
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(jax_core, name, original)


def _check_output(vector_field, t, y0, args) -> None:
    # Leak checking turns a vector field that stores a traced value outside its output (a Flax
    # submodule creating its variables inside the solve) into an error here, at its first
    # trace, instead of leaked tracers in the caller's variables.
    outer: list = []

    def probe(t, y, args):
        trace = getattr(jax.tree.leaves(y)[0], "_trace", None)
        if trace is not None:
            outer.append(weakref.ref(trace))
        return vector_field(t, y, args)

    try:
        with jax.checking_leaks(), _leak_search_of_outer_trace(outer):
            out = jax.eval_shape(probe, t, y0, args)
    except Exception as err:  # JAX's leak checker raises a plain Exception
        if "Leaked trace" not in str(err):
            raise
        raise TypeError(_LEAK_MESSAGE) from err
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
