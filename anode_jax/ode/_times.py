"""Times as data: the solution at many output times `ts`, and traced `t0`, `t1`, `ts`.

Built on the fixed-interval engine by *time normalisation*. The interval [a, b] is solved on
s ∈ [0, 1] for the field

    g(s, y, (args, a, b)) = (b − a) · f(a + s (b − a), y, args),

with the static step 1/N. One Runge–Kutta step of size 1/N on g is the step of size
h = (b − a)/N on f (y + (1/N) Σ b_i (b − a) k_i = y + h Σ b_i k_i, stage times
a + (n + c_i) h), so y is the same discrete map up to the order of rounding. Because a and b
travel in `args`, every gradient strategy differentiates with respect to them exactly (backsolve
approximately) without knowing about times, and the compiled program does not depend on their
values.

Many output times: one `lax.scan` over the intervals [ts[i], ts[i+1]], whose body is the solve
of one interval with the chosen strategy and `num_steps` steps. For Runge–Kutta methods each
interval is one `odeint` call started from the previous output. Solvers that carry an auxiliary
state (the reversible ones) carry it across output times instead, its rates rescaled from one
interval's normalised time to the next (`solve_carried`): one solve through every output time.

Compilation: `odeint` compiles `solve_times` once per vector field, configuration, static
`args` leaves and shapes/dtypes, with the times as arguments of the compiled program, so eager
calls with new times (or eager `jax.grad`s with respect to them) reuse it.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from anode_jax._typing import PyTree, VectorField
from anode_jax.ode import _loop, _policy
from anode_jax.ode.adjoints import ReversibleAdjoint, SolveSpec, get_adjoint
from anode_jax.ode.adjoints.base import forward, tree_add
from anode_jax.ode.adjoints.reversible import reverse_steps
from anode_jax.ode.solvers import EmbeddedTableau, get_solver


def is_traced(value) -> bool:
    """Whether a time argument is a JAX tracer (under `jit`, `vmap`, `grad`)."""
    return isinstance(value, jax.core.Tracer)


class _Normalised:
    """g(s, y, (args, a, b)) = (b − a) f(a + s (b − a), y, args): [a, b] mapped onto [0, 1]."""

    def __init__(self, vector_field: VectorField):
        self.vector_field = vector_field
        # Warnings that name the vector field (the loop policy's) name the user's field.
        self.__qualname__ = getattr(vector_field, "__qualname__", type(vector_field).__name__)

    def __call__(self, s, y, packed):
        args, a, b = packed
        span = b - a
        dy = self.vector_field(a + s * span, y, args)
        # The scale takes each output leaf's dtype (bfloat16 states stay bfloat16 under strict
        # promotion; a wrong output dtype still reaches odeint's own check).
        return jax.tree.map(lambda leaf: leaf * span.astype(jnp.result_type(leaf)), dy)


class WithConsts:
    """f(t, y, (args, consts)) for a closure-converted f(t, y, args, *consts): closed over no
    tracers, so custom VJPs may take it as a static argument."""

    def __init__(self, closed_field):
        self.closed_field = closed_field

    def __call__(self, t, y, args_and_consts):
        args, consts = args_and_consts
        return self.closed_field(t, y, args, *consts)


def _interval(solve, vector_field, y, args, a, b, options) -> PyTree:
    """y(b) from y(a) = y: one normalised solve over [0, 1] by the fixed-interval `solve`."""
    return solve(_Normalised(vector_field), y, (args, a, b), t0=0.0, t1=1.0, **options)


def _scalar_time(name: str, value):
    """A traced or concrete scalar time as a time-dtype array; errors name the argument."""
    if isinstance(value, bool) or not (hasattr(value, "dtype") or isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real scalar, got {type(value).__name__}.")
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}.")
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point scalar, got dtype {dtype}; an integer time "
            "has no gradient (cast it, e.g. jnp.float32)."
        )
    return jnp.asarray(value).astype(_loop.time_dtype())


def check_ts(ts):
    """ts as a 1-D time-dtype array of static length >= 2; concrete values must be finite and
    strictly monotone (traced values cannot be inspected at trace time and are not checked)."""
    if isinstance(ts, (list, tuple)):
        ts = np.asarray(ts, dtype=np.float64)
    dtype = getattr(ts, "dtype", None)
    if dtype is None:
        raise TypeError(
            f"ts must be a 1-D floating-point array of output times, got {type(ts).__name__}."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"ts must be a floating-point array, got dtype {dtype}; cast it, e.g. "
            "jnp.asarray(ts, jnp.float32)."
        )
    shape = np.shape(ts)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(
            f"ts must be a 1-D array of at least 2 times (ts[0] is the initial time), got shape "
            f"{shape}; for per-sample grids of shape (batch, n) use jax.vmap over samples."
        )
    if not is_traced(ts):
        values = np.asarray(ts, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"ts must be finite, got {values}.")
        steps = np.diff(values)
        if not (np.all(steps > 0) or np.all(steps < 0)):
            bad = int(np.flatnonzero(steps * np.sign(steps[0]) <= 0)[0]) if steps[0] else 0
            shown = np.asarray(ts)  # printed in ts's own dtype (0.3, not 0.30000001192…)
            raise ValueError(
                f"ts must be strictly increasing or strictly decreasing; ts[{bad}] = "
                f"{shown[bad]!s} and ts[{bad + 1}] = {shown[bad + 1]!s} break the order."
            )
    return jnp.asarray(ts).astype(_loop.time_dtype())


def _known_solver(solver):
    """The solver object for a name or instance, or None when it is not one (odeint raises
    the clear error for it later)."""
    try:
        return get_solver(solver)
    except (TypeError, ValueError):
        return None


def _is_adaptive(solver) -> bool:
    return isinstance(_known_solver(solver), EmbeddedTableau)


def prepare_times(
    vector_field: VectorField,
    *,
    t0,
    t1,
    ts,
    num_steps: int,
    solver,
    adjoint,
    unroll,
    **adaptive_options,
) -> tuple[tuple, dict]:
    """Checks the arguments of `odeint` for traced `t0`/`t1` or output times `ts`; returns
    (times, options): times is (t0, t1) as time-dtype scalars, or (ts,) as a 1-D time-dtype
    array; options are the keyword arguments of every per-interval solve (the ones not given
    left out). Times stay arrays so that a compiled solve takes them as data (one program for
    every value)."""
    if not callable(vector_field):
        raise TypeError(
            f"vector_field must be callable f(t, y, args), got {type(vector_field).__name__}."
        )
    options = dict(num_steps=num_steps, solver=solver, adjoint=adjoint, unroll=unroll)
    # Adaptive solvers: each interval is solved on [0, 1] by the normalised field, whose
    # error estimates equal those on [a, b] (a step σ on g is the step (b − a)σ on f), so
    # the controller accepts the same steps; it restarts (Hairer's initial step) at every
    # output time. Step sizes given in units of t cannot be normalised here.
    given = [name for name in ("dt0", "controller") if adaptive_options.get(name) is not None]
    if given and _is_adaptive(solver):
        raise ValueError(
            f"odeint: {given[0]} (step sizes in units of t) is not supported with ts or traced "
            "t0/t1; pass rtol/atol/max_steps only."
        )
    # With a fixed-step solver every adaptive option passes on, and the fixed-step check
    # names it as an option of adaptive solvers only.
    options.update({k: v for k, v in adaptive_options.items() if v is not None})
    if ts is None:
        a = _scalar_time("t0", 0.0 if t0 is None else t0)
        b = _scalar_time("t1", 1.0 if t1 is None else t1)
        return (a, b), options
    if t0 is not None or t1 is not None:
        raise TypeError(
            "odeint takes either t0=/t1= (returns y(t1)) or ts= (returns y at every entry of "
            "ts, with ts[0] the initial time), not both."
        )
    return (check_ts(ts),), options


def solve_times(solve, vector_field: VectorField, y0: PyTree, args: PyTree, times, options):
    """y(t1) for times = (t0, t1), or y at every entry of ts for times = (ts,) (stacked on a
    new leading axis; entry 0 is y0), from `prepare_times`'s (times, options). `solve` is
    `odeint` itself, called with static times [0, 1] on the normalised field (passed in, not
    imported, so the two modules do not import each other)."""
    if len(times) == 2:
        return _interval(solve, vector_field, y0, args, *times, options)
    (ts,) = times
    if _checkpoints_interval_inputs(options):
        return _checkpointed_outputs_solve(solve, vector_field, y0, args, ts, options)
    return_stats = options.get("return_stats", False)

    def body(y, interval):
        out = _interval(solve, vector_field, y, args, interval[0], interval[1], options)
        y_next, stats = out if return_stats else (out, None)
        return y_next, (y_next, stats)

    _, (ys, stats) = lax.scan(body, y0, (ts[:-1], ts[1:]))
    ys = jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), y0, ys)
    if not return_stats:
        return ys
    # Per-interval statistics combined: counts summed, the flag any, the last time reached.
    combined = {k: jnp.sum(v) for k, v in stats.items()}
    combined["max_steps_reached"] = jnp.any(stats["max_steps_reached"])
    combined["t_final"] = stats["t_final"][-1]
    return ys, combined


def _checkpoints_interval_inputs(options) -> bool:
    """Whether a solve at many times can keep a few interval inputs as its only residuals
    (`_checkpointed_outputs_solve`): a fixed-step solve whose strategy's backward pass needs
    only each interval's input (anode, checkpointed), each interval's input being the
    previous output."""
    try:
        adjoint = get_adjoint(options["adjoint"])
    except (TypeError, ValueError):
        return False  # the per-interval odeint raises the clear error
    solver = _known_solver(options["solver"])
    return (
        adjoint.backward_needs_input_only
        and solver is not None
        and not isinstance(solver, EmbeddedTableau)
    )


def _checkpointed_outputs_solve(solve, vector_field, y0, args, ts, options):
    """y at every entry of ts, differentiated with O(log n) states as residuals.

    Reverse-mode through a `lax.scan` of interval solves would stack each interval's input as
    a residual: a second copy of the n outputs. Here the forward pass keeps the inputs of the
    first intervals of `output_segments(n - 1)` (segments of 1, 2, 4, ... intervals counted
    from the end, about log₂ n states). The backward pass walks the segments in reverse:
    it recomputes a segment's interval inputs from its checkpoint, writing them into the
    slots of the output cotangent that the later segments have already consumed (a segment
    is never longer than those slots), then takes each interval's VJP by the interval's own
    strategy (which recomputes the interval from its input), adding the cotangent of ys[i]
    as it passes it. Memory: the outputs' cotangent, about log₂ n states and one interval's
    working set; compute: one more forward pass of the intervals than keeping every output.
    Values captured by closure (tracers of an enclosing trace) are hoisted into the
    differentiated inputs first."""

    def interval(y, args, a, b):
        return _interval(solve, vector_field, y, args, a, b, options)

    closed, consts = jax.closure_convert(interval, y0, args, ts[0], ts[1])
    return _checkpointed_outputs(closed, y0, args, ts, tuple(consts))


def output_segments(num_intervals: int) -> tuple[tuple[int, int], ...]:
    """(first interval, length) of each segment, last segment first: lengths 1, 2, 4, ...
    from the end (the first segment takes the rest), so a segment's length never exceeds
    1 + the number of intervals after it, the output-cotangent slots free when it is
    reversed."""
    segments, remaining = [], num_intervals
    while remaining > 0:
        length = min(num_intervals - remaining + 1, remaining)
        remaining -= length
        segments.append((remaining, length))
    return tuple(segments)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _checkpointed_outputs(interval, y0, args, ts, consts):
    return _forward_outputs(interval, y0, args, ts, consts)


def _forward_outputs(interval, y0, args, ts, consts):
    """The n outputs written into one (n, ...) buffer per leaf (entry 0 is y0)."""
    n = ts.shape[0]
    buffer = jax.tree.map(lambda leaf: jnp.zeros((n, *leaf.shape), leaf.dtype).at[0].set(leaf), y0)

    def body(carry, i):
        y, buffer = carry
        y = interval(y, args, ts[i], ts[i + 1], *consts)
        return (y, _write(buffer, i + 1, y)), None

    (_, ys), _ = lax.scan(body, (y0, buffer), jnp.arange(n - 1, dtype=jnp.int32))
    return ys


def _checkpointed_outputs_fwd(interval, y0, args, ts, consts):
    ys = _forward_outputs(interval, y0, args, ts, consts)
    firsts = np.array([first for first, _ in output_segments(ts.shape[0] - 1)], np.int32)
    checkpoints = jax.tree.map(lambda b: b[firsts], ys)
    return ys, (checkpoints, args, ts, consts)


def _read(buffer, index):
    return jax.tree.map(lambda b: lax.dynamic_index_in_dim(b, index, keepdims=False), buffer)


def _write(buffer, index, value):
    return jax.tree.map(
        lambda b, v: lax.dynamic_update_index_in_dim(b, v.astype(b.dtype), index, 0),
        buffer,
        value,
    )


def _checkpointed_outputs_bwd(interval, residuals, ct_ys):
    checkpoints, args, ts, consts = residuals
    n = ts.shape[0]
    segments = output_segments(n - 1)
    longest = max(length for _, length in segments)
    zeros = functools.partial(jax.tree.map, _loop.zeros_like_cotangent)

    def segment_body(carry, segment):
        first, length, start = segment
        free = first + length  # slots free + 0, ..., free + length - 1 hold the inputs

        def recompute(state, j):  # the input of interval first + j + 1, if in the segment
            def step(state):
                y, buffer = state
                i = first + j
                y = interval(y, args, ts[i], ts[i + 1], *consts)
                return y, _write(buffer, free + j + 1, y)

            return lax.cond(j + 1 < length, step, _same, state), None

        ct_y, ct_args, ct_consts, ct_ts, buffer = carry
        buffer = _write(buffer, free, start)
        (_, buffer), _ = lax.scan(
            recompute, (start, buffer), jnp.arange(longest - 1, dtype=jnp.int32)
        )

        def reverse(carry, j):  # the interval [ts[i], ts[i + 1]], i = first + j
            def step(carry):
                ct_y, ct_args, ct_consts, ct_ts, buffer = carry
                i = first + j
                # Only the VJP is used: the interval's primal output is dead code (each
                # strategy's backward recomputes from its input), and XLA removes it.
                _, vjp = jax.vjp(
                    lambda y, a, ta, tb, c: interval(y, a, ta, tb, *c),
                    _read(buffer, free + j),
                    args,
                    ts[i],
                    ts[i + 1],
                    consts,
                )
                ct_in, ct_a, ct_ta, ct_tb, ct_c = vjp(ct_y)
                ct_y = jax.tree.map(jnp.add, ct_in, _read(buffer, i))
                ct_ts = ct_ts.at[i].add(ct_ta).at[i + 1].add(ct_tb)
                return ct_y, tree_add(ct_args, ct_a), tree_add(ct_consts, ct_c), ct_ts, buffer

            return lax.cond(j < length, step, _same, carry), None

        carry = (ct_y, ct_args, ct_consts, ct_ts, buffer)
        carry, _ = lax.scan(reverse, carry, jnp.arange(longest, dtype=jnp.int32), reverse=True)
        return carry, None

    # The cotangent buffer is carried and overwritten slot by slot: ct_ys[i] is read when
    # interval i is reversed, after which its slot holds recomputed states.
    carry = (_read(ct_ys, n - 1), zeros(args), zeros(consts), jnp.zeros_like(ts), ct_ys)
    xs = (
        jnp.array([first for first, _ in segments], jnp.int32),
        jnp.array([length for _, length in segments], jnp.int32),
        checkpoints,
    )
    (ct_y0, ct_args, ct_consts, ct_ts, _), _ = lax.scan(segment_body, carry, xs)
    return ct_y0, ct_args, ct_ts, ct_consts


def _same(value):
    return value


_checkpointed_outputs.defvjp(_checkpointed_outputs_fwd, _checkpointed_outputs_bwd)


# --- solvers with an auxiliary state: one solve carried through every output time ----------


def carries_solver_state(options) -> bool:
    """Whether a solve at many output times carries the solver state across them: solvers
    with an auxiliary state (the reversible ones), whose state at an output time is more than
    the output itself."""
    return bool(getattr(_known_solver(options["solver"]), "reversible", False))


def _packed(args, consts, ts, i):
    """The normalised field's args for the interval [ts[i], ts[i+1]]."""
    return (args, ts[i], ts[i + 1]), consts


def _boundary(solver, i, state, ts, inverse=False):
    """The state at ts[i] carried from interval i-1's normalised time into interval i's (the
    rates scaled by span_i / span_{i-1}), or back with `inverse`; the identity at i = 0."""
    j = jnp.maximum(i, 1)  # at i = 0 a finite dummy ratio, not selected below
    span, previous_span = ts[j + 1] - ts[j], ts[j] - ts[j - 1]
    ratio = previous_span / span if inverse else span / previous_span
    scaled = solver.rescale_time(state, ratio)
    return jax.tree.map(lambda new, old: jnp.where(i > 0, new, old), scaled, state)


def solve_carried(vector_field, y0, args, ts, solver, strategy, num_steps: int, unroll):
    """y at every entry of ts (entry 0 is y0) by one solve whose solver state, auxiliary
    variables included, is carried from each output time to the next.

    Each interval is still integrated in its own normalised time (so the program does not
    depend on the values of ts and every strategy differentiates with respect to them); at
    each output time the state's rates are rescaled to the next interval's time unit
    (`solver.rescale_time`). This is the fixed-grid solve in t with step sizes
    (ts[i+1] - ts[i]) / N, up to the order of rounding.

    Strategies: "reversible" takes one custom VJP over the whole solve, which keeps only y0,
    the final state and the inputs, and reconstructs every state backwards through the
    intervals, adding each output's cotangent as it passes it (O(1) states besides the
    outputs' cotangent). The others differentiate the `lax.scan` over intervals, each interval
    by the strategy's own custom VJP."""
    field = _Normalised(vector_field)
    t_example = jnp.zeros((), _loop.time_dtype())
    packed0 = (args, ts[0], ts[1])
    closed, consts = jax.closure_convert(field, t_example, y0, packed0)
    field, consts = WithConsts(closed), tuple(consts)
    spec = SolveSpec(
        solver,
        0.0,
        1.0,
        num_steps,
        _policy.resolve_unroll(unroll, num_steps, field, t_example, y0, (packed0, consts)),
    )
    if isinstance(strategy, ReversibleAdjoint):
        return _reversible_outputs(field, spec, y0, args, ts, consts)
    interval = functools.partial(strategy.solve, field, spec=spec)
    return _carried_forward(interval, field, spec, y0, args, ts, consts)[0]


def _carried_forward(interval, field, spec, y0, args, ts, consts):
    """(ys, final solver state): the intervals in one `lax.scan`, the state carried."""
    solver = spec.solver
    t0 = jnp.zeros((), _loop.time_dtype())
    state0 = solver.init(field, t0, y0, _packed(args, consts, ts, 0))

    def body(state, i):
        state = _boundary(solver, i, state, ts)
        state = interval(state, args=_packed(args, consts, ts, i))
        return state, solver.output(state)

    state, ys = lax.scan(body, state0, jnp.arange(ts.shape[0] - 1, dtype=jnp.int32))
    ys = jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), y0, ys)
    return ys, state


def _plain_solve(field, state, args, spec):
    return forward(field, state, args, spec, unroll=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _reversible_outputs(field, spec, y0, args, ts, consts):
    interval = functools.partial(_plain_solve, field, spec=spec)
    return _carried_forward(interval, field, spec, y0, args, ts, consts)[0]


def _reversible_outputs_fwd(field, spec, y0, args, ts, consts):
    interval = functools.partial(_plain_solve, field, spec=spec)
    ys, state = _carried_forward(interval, field, spec, y0, args, ts, consts)
    return ys, (y0, state, args, ts, consts)


def _reversible_outputs_bwd(field, spec, residuals, ct_ys):
    y0, state, args, ts, consts = residuals
    solver, n = spec.solver, ts.shape[0]
    zeros = functools.partial(jax.tree.map, _loop.zeros_like_cotangent)
    _, output_vjp = jax.vjp(solver.output, state)  # linear: the same map at every state

    def add_output_ct(ct_state, ct_y):
        return tree_add(ct_state, output_vjp(ct_y)[0])

    ct_state = add_output_ct(zeros(state), jax.tree.map(lambda c: c[n - 1], ct_ys))
    carry = (state, ct_state, (zeros(args), zeros(consts)), jnp.zeros_like(ts))
    # Ties the reconstruction to the cotangent so XLA cannot hoist it into the forward pass.
    carry = _loop.tree_barrier(*carry)

    def body(k, carry):  # the interval [ts[i], ts[i + 1]], i = n - 2, ..., 0
        state, ct_state, ct_args_consts, ct_ts = carry
        i = n - 2 - k
        (args_i, consts_i) = _packed(args, consts, ts, i)
        state, ct_state, ((ct_a, ct_ta, ct_tb), ct_c) = reverse_steps(
            field, spec, (args_i, consts_i), state, ct_state, zeros((args_i, consts_i))
        )
        ct_args_consts = tree_add(ct_args_consts, (ct_a, ct_c))
        ct_ts = ct_ts.at[i].add(ct_ta).at[i + 1].add(ct_tb)
        # Undo the boundary into interval i (the identity at i = 0), then add the cotangent
        # of output i, the y of the state there (output 0 is y0 itself: added below).
        previous = _boundary(solver, i, state, ts, inverse=True)
        _, boundary_vjp = jax.vjp(lambda s, t: _boundary(solver, i, s, t), previous, ts)
        ct_state, ct_t = boundary_vjp(ct_state)
        ct_here = jax.tree.map(lambda c: jnp.where(i > 0, c, 0), _read(ct_ys, i))
        return previous, add_output_ct(ct_state, ct_here), ct_args_consts, ct_ts + ct_t

    _, ct_state, (ct_args, ct_consts), ct_ts = lax.fori_loop(0, n - 1, body, carry)
    # The initial state was solver.init(y0) (e.g. a vector-field evaluation at y0).
    t0 = jnp.zeros((), _loop.time_dtype())
    _, init_vjp = jax.vjp(
        lambda y, a, c, t: solver.init(field, t0, y, _packed(a, c, t, 0)), y0, args, consts, ts
    )
    ct_y0, ct_a, ct_c, ct_t = init_vjp(ct_state)
    ct_y0 = tree_add(ct_y0, jax.tree.map(lambda c: c[0], ct_ys))
    return ct_y0, tree_add(ct_args, ct_a), ct_ts + ct_t, tree_add(ct_consts, ct_c)


_reversible_outputs.defvjp(_reversible_outputs_fwd, _reversible_outputs_bwd)
