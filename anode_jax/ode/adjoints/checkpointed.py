"""Checkpointed: at most k states of a block alive; binomial (revolve) recomputation.

The backward pass follows a schedule planned once in Python (`revolve_schedule`, O(Nt) with
the split points in closed form from Griewank's binomial table, cached): a list of actions,
each "take the state held in slot `src` (the state y_n0), advance it to y_n1, then either store
it in slot `dst` or backpropagate through step n1". The looped policy runs the list in one
`lax.scan` of static length over a buffer of k slots (the schedule is an array it reads), so
the compiled program does not grow with Nt and can itself be differentiated in reverse mode;
the unrolled policy runs the same list in Python.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from anode_jax.ode import _loop, adaptive
from anode_jax.ode.adjoints.base import AbstractAdjoint, SolveSpec, forward, tree_add


def _binomial_table(num_checkpoints: int, num_steps: int) -> list[list[int]]:
    """beta[c][r] = C(c + r, c) for c = 0..K + 1 and r = 0..R, R the least r with
    beta[K][r] >= num_steps (K = num_checkpoints >= 2)."""
    beta = [[1] for _ in range(num_checkpoints + 2)]
    while beta[num_checkpoints][-1] < num_steps:
        r = len(beta[0])
        beta[0].append(1)
        for c in range(1, num_checkpoints + 2):
            beta[c].append(beta[c][r - 1] + beta[c - 1][r])  # Pascal's rule
    return beta


def revolve_cost(num_steps: int, num_checkpoints: int) -> int:
    """The fewest forward steps recomputed to reverse `num_steps` steps when the block input is
    held and at most `num_checkpoints` states (the input included) are alive (Griewank 1992;
    Griewank & Walther 2000, Prop. 1):

        cost = r·Nt − C(K + r, K + 1),   r the least integer with C(K + r, K) >= Nt.

    K = 1 gives Nt (Nt − 1) / 2; K >= Nt gives Nt − 1 (each state computed once). The step whose
    vector-Jacobian product is taken is not counted (each of the Nt VJPs evaluates its step).
    """
    k = min(num_checkpoints, num_steps)
    if k == 1:
        return num_steps * (num_steps - 1) // 2
    if k == num_steps:
        return num_steps - 1
    beta = _binomial_table(k, num_steps)
    reps = bisect.bisect_left(beta[k], num_steps)
    return reps * num_steps - (beta[k + 1][reps - 1] if reps >= 1 else 0)


class Action(NamedTuple):
    """Load slot `src` (holding y_n0), advance to y_n1; store in `dst`, or VJP step n1.

    An action with vjp=False recomputes n1 − n0 steps; one with vjp=True recomputes n1 − n0
    steps and then backpropagates through step n1 (evaluating it once more inside the VJP).
    """

    src: int
    dst: int  # -1 when the action backpropagates
    n0: int
    n1: int
    vjp: bool


class RevolveSchedule:
    """The actions of a revolve reversal as NumPy columns; iterates as `Action`s.

    Attributes:
      src, dst, n0, n1: int32 arrays, one entry per action (`Action`'s fields).
      vjp: bool array.
      num_checkpoints: the number of state slots the schedule uses (slot 0 holds y_0).
    """

    def __init__(self, src, dst, n0, n1, vjp, num_checkpoints):
        self.src = np.asarray(src, np.int32)
        self.dst = np.asarray(dst, np.int32)
        self.n0 = np.asarray(n0, np.int32)
        self.n1 = np.asarray(n1, np.int32)
        self.vjp = np.asarray(vjp, bool)
        self.num_checkpoints = num_checkpoints
        for column in (self.src, self.dst, self.n0, self.n1, self.vjp):
            column.setflags(write=False)

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i) -> Action:
        return Action(
            int(self.src[i]), int(self.dst[i]), int(self.n0[i]), int(self.n1[i]), bool(self.vjp[i])
        )

    def __iter__(self):
        columns = (self.src.tolist(), self.dst.tolist(), self.n0.tolist(), self.n1.tolist())
        for src, dst, n0, n1, vjp in zip(*columns, self.vjp.tolist()):
            yield Action(src, dst, n0, n1, vjp)

    @property
    def num_recomputed_steps(self) -> int:
        """Σ (n1 − n0) over the actions: forward steps recomputed, VJP steps not counted."""
        return int(np.sum(self.n1.astype(np.int64) - self.n0))


@functools.lru_cache(maxsize=64)
def revolve_schedule(num_steps: int, num_checkpoints: int) -> RevolveSchedule:
    """The backward schedule reversing `num_steps` steps with `num_checkpoints` slots.

    Slot 0 holds the block input y_0; at most `num_checkpoints` states are held at any time.
    Every step n = Nt-1, ..., 0 is backpropagated exactly once, in that order, and the number of
    recomputed steps is the binomial minimum `revolve_cost(num_steps, num_checkpoints)`.

    Recursion (Griewank's revolve): to reverse t steps from a held state with c slots, advance
    m steps and store that state, reverse the last t − m steps with c − 1 slots, then the first
    m with c. The first split is chosen in closed form from the binomial table: with r the
    repetition number of (t, c), any m with C(c + r − 2, c) <= m <= C(c + r − 1, c) and
    C(c − 1 + r − 1, c − 1) <= t − m <= C(c − 1 + r, c − 1) attains the minimum (both
    sub-costs then lie on the linear piece of slope r, resp. r − 1, and Pascal's rule sums
    them to `revolve_cost(t, c)`); the smallest such m is taken. Planning is O(Nt) integer work
    (each action is emitted once, each split costs a bisection in the table), cached per
    argument pair. Returns a `RevolveSchedule`, iterable as `Action`s.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}.")
    if isinstance(num_checkpoints, bool) or not isinstance(num_checkpoints, int):
        raise ValueError(f"num_checkpoints must be an int >= 1, got {num_checkpoints!r}.")
    if num_checkpoints < 1:
        raise ValueError(f"num_checkpoints must be an int >= 1, got {num_checkpoints!r}.")
    slots = min(num_checkpoints, num_steps)
    # With a slot per step no split is needed (and no table: it would have Nt rows).
    beta = _binomial_table(max(slots, 2), num_steps) if slots < num_steps else None
    src, dst, n0, n1, vjp = _segment(num_steps, slots - 1, beta, {})
    # Relative slot codes to slots: the block input is slot 0, free slot j is slot 1 + j.
    src = np.where(src == _SOURCE, 0, src + 1)
    dst = np.where(dst < 0, -1, dst + 1)
    return RevolveSchedule(src, dst, n0, n1, vjp, slots)


# Slot code of a segment's source state in `_segment`'s relative schedules.
_SOURCE = -2


def _segment(num_steps: int, free: int, beta, memo: dict):
    """The actions reversing `num_steps` steps from a held source state with `free` more slots,
    relative to the segment: step indices from 0, slots coded `_SOURCE` or j >= 0 (the j-th
    free slot), -1 for no slot. Memoized per (num_steps, free): segments of equal length and
    budget recur throughout a schedule. The head of each split is followed as a loop, the tail
    by recursion (depth <= K)."""
    key = (num_steps, free)
    if key in memo:
        return memo[key]
    parts = []
    t = num_steps
    while True:
        if free == 0 or t == 1:  # recompute every step's input from the segment start
            steps = np.arange(t - 1, -1, -1)
            parts.append((np.full(t, _SOURCE), np.full(t, -1), np.zeros(t, np.int64), steps, True))
            break
        if free >= t - 1:  # every state fits: store each once, then reverse
            held = np.concatenate([[_SOURCE], np.arange(t - 1)])
            steps = np.arange(t)
            parts.append((held[:-1], held[1:], steps[:-1], steps[1:], False))
            parts.append((held[::-1], np.full(t, -1), steps[::-1], steps[::-1], True))
            break
        c = free + 1
        reps = bisect.bisect_left(beta[c], t)
        m = max(1, beta[c][reps - 2] if reps >= 2 else 0, t - beta[c - 1][reps])
        parts.append((np.array([_SOURCE]), np.array([0]), np.array([0]), np.array([m]), False))
        src, dst, n0, n1, vjp = _segment(t - m, free - 1, beta, memo)
        # The tail's source is free slot 0 of this segment; its free slots are ours shifted by 1.
        parts.append(
            (
                np.where(src == _SOURCE, 0, src + 1),
                np.where(dst < 0, -1, dst + 1),
                n0 + m,
                n1 + m,
                vjp,
            )
        )
        t = m  # then reverse the head from the same source with the same slots
    columns = [
        np.concatenate([np.broadcast_to(p[i], np.shape(p[2])) for p in parts]) for i in range(5)
    ]
    memo[key] = tuple(columns)
    return memo[key]


def _step_vjp(step, spec: SolveSpec, n, y_n, args, ct_next, ct_args):
    """Backpropagates ct_next through step n at y_n (recomputing its internals)."""
    _, vjp = jax.vjp(lambda y, a: step(spec.time(n), y, a), y_n, args)
    ct_y, ct_a = vjp(ct_next)
    return ct_y, tree_add(ct_args, ct_a)


def _reverse_unrolled(step, vjp_step, spec, args, y0, ct, ct_args, schedule):
    slots = {0: y0}
    for a in schedule:
        # The barrier ties each recomputation to the running cotangent: it then happens in the
        # backward pass, action by action, and XLA cannot merge it with the forward pass.
        y, ct, ct_args = _loop.tree_barrier(slots[a.src], ct, ct_args)
        y = _loop.integrate(
            step, y, args, t0=spec.t0, dt=spec.dt, first=a.n0, last=a.n1, unroll=False
        )
        if a.vjp:
            ct, ct_args = _step_vjp(vjp_step, spec, a.n1, y, args, ct, ct_args)
        else:
            slots[a.dst] = y
    return ct, ct_args


def _reverse_looped(step, vjp_step, spec, args, y0, ct, ct_args, schedule):
    """Runs `schedule` in one `lax.scan` of static length: one iteration per step evaluation
    (each recomputed step and each VJP), reading its action from the schedule's columns by a
    carried (action, offset) counter. Static trip counts keep the reversal differentiable in
    reverse mode (grad of grad); the schedule enters the program as O(actions) int32 arrays,
    so the program does not grow with Nt."""
    columns = jnp.asarray(
        np.stack([schedule.src, schedule.dst, schedule.n0, schedule.n1, schedule.vjp], axis=1),
        jnp.int32,
    )
    num_slots = schedule.num_checkpoints
    buffer = jax.tree.map(lambda leaf: jnp.zeros((num_slots, *leaf.shape), leaf.dtype), y0)
    buffer = jax.tree.map(lambda b, leaf: b.at[0].set(leaf), buffer, y0)
    num_rows = schedule.num_recomputed_steps + int(schedule.vjp.sum())

    def body(carry, _):
        buffer, y, ct, ct_args, action, offset = carry
        src, dst, n0, n1, is_vjp = columns[action]
        advances = n1 - n0
        rows = advances + is_vjp
        n = n0 + offset
        loaded = jax.tree.map(lambda b: lax.dynamic_index_in_dim(b, src, keepdims=False), buffer)
        y = jax.tree.map(lambda a, b: jnp.where(offset == 0, a, b), loaded, y)

        def backpropagate(operands):
            y, ct, ct_args = operands
            return (y, *_step_vjp(vjp_step, spec, n, y, args, ct, ct_args))

        def advance(operands):
            y, ct, ct_args = operands
            return step(spec.time(n), y, args), ct, ct_args

        y, ct, ct_args = lax.cond(offset == advances, backpropagate, advance, (y, ct, ct_args))
        store = (is_vjp == 0) & (offset == rows - 1)
        slot = jnp.maximum(dst, 0)

        def write(b, leaf):
            kept = lax.dynamic_index_in_dim(b, slot, keepdims=False)
            return lax.dynamic_update_index_in_dim(b, jnp.where(store, leaf, kept), slot, 0)

        buffer = jax.tree.map(write, buffer, y)
        done = offset == rows - 1
        action = jnp.where(done, action + 1, action)
        offset = jnp.where(done, 0, offset + 1)
        return (buffer, y, ct, ct_args, action, offset), None

    zero = jnp.zeros((), jnp.int32)
    carry = (buffer, y0, ct, ct_args, zero, zero)
    (_, _, ct, ct_args, _, _), _ = lax.scan(body, carry, None, length=num_rows)
    return ct, ct_args


# recompute_stages=None (the default): rematerialise each stage when one evaluation of the
# field keeps more than this many states' worth of residuals for reverse mode. The fields
# measured sit far on either side: MLP 2→64→64→2 on a 2-D state 128 states (stages pay:
# one RK4 step's VJP 611 → 220 KB), the ANODE paper's ReLU-conv-ReLU-conv block 4.6
# (stages saved nothing, docs/core.md), the models' blocks (resnet, sqnxt, alexnet; ODE
# and coupled ANODEv2) 3.0–10.7, so their programs stay those of recompute_stages=False.
AUTO_RECOMPUTE_RATIO = 16


class _StageRecomputed:
    """`jax.checkpoint(f)` for a step's VJP: each stage keeps its inputs only and recomputes
    its internals when its cotangent arrives; `sequential_args` makes the solvers thread args
    stage to stage (`solvers.runge_kutta.stage_inputs`), so the parameter cotangent is summed
    stage by stage."""

    sequential_args = True

    def __init__(self, vector_field):
        self._checkpointed = jax.checkpoint(vector_field)

    def __call__(self, t, y, args):
        return self._checkpointed(t, y, args)


def residual_ratio(vector_field, t, y, args) -> float:
    """The bytes reverse mode keeps for one evaluation f(t, y, args) (the residuals of its VJP
    with respect to y and args, not counting t, y and args themselves, which are held anyway)
    over the bytes of y. Traced abstractly (`jax.eval_shape`): nothing runs."""

    def residuals(t, y, args):
        _, vjp = jax.vjp(lambda y, a: vector_field(t, y, a), y, args)
        inputs = [id(leaf) for leaf in jax.tree.leaves((t, y, args))]
        return [leaf for leaf in jax.tree.leaves(vjp) if id(leaf) not in inputs]

    def nbytes(leaves):
        return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in leaves)

    kept = nbytes(jax.eval_shape(residuals, t, y, args))
    return kept / max(nbytes(jax.tree.leaves(y)), 1)


def stage_field(vector_field, recompute_stages: bool | None, solver, state, args):
    """The vector field whose steps a backward pass differentiates, from the solver state
    `state` of `solver` with `args`: rematerialised stage by stage (`_StageRecomputed`) when
    `recompute_stages` is True, or None and `residual_ratio` at y = `solver.output(state)`
    exceeds AUTO_RECOMPUTE_RATIO; else `vector_field` itself. A forward-only call of a
    checkpointed function is the function itself (it is rematerialised only where
    differentiated)."""
    if recompute_stages is None:
        t = jnp.zeros((), _loop.time_dtype())
        y = solver.output(state)
        recompute_stages = residual_ratio(vector_field, t, y, args) > AUTO_RECOMPUTE_RATIO
    return _StageRecomputed(vector_field) if recompute_stages else vector_field


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def _checkpointed_solve(vector_field, y0, args, spec, num_checkpoints, recompute_stages):
    return forward(vector_field, y0, args, spec, unroll=False)


def _checkpointed_fwd(vector_field, y0, args, spec, num_checkpoints, recompute_stages):
    # A forward-only solve always loops: forward convolutions ran as fast in lax.scan as
    # unrolled on XLA:CPU, and the loop compiles in time independent of Nt.
    return forward(vector_field, y0, args, spec, unroll=False), (y0, args)


def reverse_solve(vector_field, spec, y0, args, ct_y1, num_checkpoints, recompute_stages=None):
    """(ct_y0, ct_args): ct_y1 backpropagated through the solve from y0 by the revolve
    schedule with `num_checkpoints` slots (looped or unrolled as `spec` says). With
    `recompute_stages` (True, or None and decided by the field's residuals) each step's VJP
    rematerialises its stages one at a time (`stage_field`); the recomputed forward steps are
    the same either way."""
    step = spec.step_fn(vector_field)
    vjp_step = spec.step_fn(stage_field(vector_field, recompute_stages, spec.solver, y0, args))
    ct_args = jax.tree.map(_loop.zeros_like_cotangent, args)
    schedule = revolve_schedule(spec.num_steps, num_checkpoints)
    # Tie the whole reversal to the incoming cotangent, so it runs in the backward pass, one
    # block at a time, and XLA cannot merge it with (or hoist it into) the forward pass.
    y0, ct, ct_args = _loop.tree_barrier(y0, ct_y1, ct_args)
    if spec.unroll:
        return _reverse_unrolled(step, vjp_step, spec, args, y0, ct, ct_args, schedule)
    return _reverse_looped(step, vjp_step, spec, args, y0, ct, ct_args, schedule)


def _checkpointed_bwd(vector_field, spec, num_checkpoints, recompute_stages, residuals, ct_y1):
    y0, args = residuals
    return reverse_solve(vector_field, spec, y0, args, ct_y1, num_checkpoints, recompute_stages)


_checkpointed_solve.defvjp(_checkpointed_fwd, _checkpointed_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def _checkpointed_adaptive(vector_field, y0, args, spec, num_checkpoints, recompute_stages):
    return adaptive.forward_record(vector_field, y0, args, spec)


def _checkpointed_adaptive_fwd(vector_field, y0, args, spec, num_checkpoints, recompute_stages):
    y1, record = adaptive.forward_record(vector_field, y0, args, spec)
    return (y1, record), (y0, args, record)


def _checkpointed_adaptive_bwd(vector_field, spec, num_checkpoints, recompute_stages, residuals,
                               cts):  # fmt: skip
    y0, args, record = residuals
    field = stage_field(vector_field, recompute_stages, spec.solver, y0, args)
    return adaptive.reverse_revolve(spec.solver, field, args, y0, record, cts[0], num_checkpoints)


_checkpointed_adaptive.defvjp(_checkpointed_adaptive_fwd, _checkpointed_adaptive_bwd)


@dataclasses.dataclass(frozen=True)
class Checkpointed(AbstractAdjoint):
    """ANODE with a checkpoint budget: at most `num_checkpoints` states of a block alive.

    The paper's "further memory reduction at extra compute" (Gholami et al. 2019, Sec. 3.2):
    the forward keeps only the block input; the backward reverses the discrete solver step by
    step, storing at most `num_checkpoints` states (the block input counts as one) and
    recomputing the others on a binomial schedule (Griewank's revolve). Memory is flat in Nt:
    k states plus one step's internals. Exact: equals Direct to round-off.

    With k >= Nt every state is recomputed once (one extra forward plus one extra step per
    step); with k = 1 recomputation is quadratic in Nt.

    Adaptive solves (embedded solvers): the forward records the accepted (t_n, h_n); the
    backward reverses exactly those n steps with the same binomial splitting, planned online
    because n is known only at run time (`adaptive.reverse_revolve`: a `lax.while_loop` over
    a stack of at most k segments): at most k states whatever n and max_steps, and the
    fewest recomputations, `revolve_cost(n, k)` — the cost depends on n, not on max_steps.

    `recompute_stages` also rematerialises inside each step (Griewank's multi-level
    checkpointing; diffrax's `RecursiveCheckpointAdjoint` does so by default): the VJP of a
    step then holds its s stage inputs and one stage's internals (the activations of one
    vector-field evaluation) instead of all s stages' internals, and pays s more vector-field
    evaluations (one per stage) in every backward step, one more forward pass of the solve in
    all. The default, None, turns it on when one evaluation of the field keeps more than
    `AUTO_RECOMPUTE_RATIO` (16) times the state's bytes as residuals (as `Anode`). Fixed-step
    solves looped and unrolled, at many output times, and adaptive solves.

    Attributes:
      num_checkpoints: k >= 1, the states alive at once in a block's backward pass.
      recompute_stages: None (default: automatic), True or False (the stages of a step are
        differentiated together).

    Raises:
      ValueError: `num_checkpoints` not an int >= 1, or `recompute_stages` not None or a
        bool.
    """

    num_checkpoints: int = 4
    recompute_stages: bool | None = None
    name = "checkpointed"
    backward_needs_input_only = True

    def solve_adaptive(self, vector_field, y0, args, spec):
        return _checkpointed_adaptive(
            vector_field, y0, args, spec, self.num_checkpoints, self.recompute_stages
        )

    def __post_init__(self):
        k = self.num_checkpoints
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Checkpointed(num_checkpoints=...) must be an int >= 1, got {k!r}.")
        stages = check_recompute_stages("Checkpointed", self.recompute_stages)
        object.__setattr__(self, "recompute_stages", stages)

    def solve(self, vector_field, state0, args, spec):
        return _checkpointed_solve(
            vector_field, state0, args, spec, self.num_checkpoints, self.recompute_stages
        )


def check_recompute_stages(owner: str, value) -> bool | None:
    """`value` as a Python bool, or None (automatic); a ValueError naming `owner` unless it is
    None or a bool (Python's or NumPy's)."""
    if value is None:
        return None
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"{owner}(recompute_stages=...) must be None (automatic), True or False, got {value!r}."
        )
    return bool(value)
