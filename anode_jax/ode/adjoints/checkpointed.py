"""Checkpointed: at most k states of a block alive; binomial (revolve) recomputation.

The backward pass follows a schedule computed once in Python (`revolve_schedule`): a list of
actions, each "take the state held in slot `src` (the state y_n0), advance it to y_n1, then
either store it in slot `dst` or backpropagate through step n1". The looped policy runs the
list in one `lax.scan` over a buffer of k slots, so the compiled program does not grow with Nt;
the unrolled policy runs the same list in Python.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import numpy as np
from jax import lax

from anode_jax.ode import _loop
from anode_jax.ode.adjoints.base import AbstractAdjoint, SolveSpec, forward, tree_add


@functools.cache
def _revolve_table(num_steps: int, free_slots: int) -> tuple[tuple[int, ...], ...]:
    """best_split[s][t]: the first split that reverses t steps with s free slots cheapest.

    The state at the segment start is held; `free_slots` more states may be stored. Splitting
    at m: advance m steps and store that state, reverse the last t - m steps with one slot
    fewer, then reverse the first m with the slots freed again:
        cost(t, s) = min_m  m + cost(t - m, s - 1) + cost(m, s),   cost(1, s) = 0,
        cost(t, 0) = t (t - 1) / 2   (no slot: recompute every step's input from the start).
    This recursion generates Griewank's (1992) binomial "revolve" schedules; the dynamic
    programme makes the split optimal for it. Table built bottom-up: O(T² S) integer work.
    """
    cost = [[t * (t - 1) // 2 for t in range(num_steps + 1)]]
    split = [[0] * (num_steps + 1)]
    for s in range(1, free_slots + 1):
        cost_s, split_s = [0, 0], [0, 0]
        for t in range(2, num_steps + 1):
            best_m = min(range(1, t), key=lambda m: m + cost[s - 1][t - m] + cost_s[m])
            cost_s.append(best_m + cost[s - 1][t - best_m] + cost_s[best_m])
            split_s.append(best_m)
        cost.append(cost_s)
        split.append(split_s)
    return tuple(tuple(row) for row in split)


class Action(NamedTuple):
    """Load slot `src` (holding y_n0), advance to y_n1; store in `dst`, or VJP step n1."""

    src: int
    dst: int  # -1 when the action backpropagates
    n0: int
    n1: int
    vjp: bool


@functools.cache
def revolve_schedule(num_steps: int, num_checkpoints: int) -> tuple[Action, ...]:
    """The backward schedule reversing `num_steps` steps with `num_checkpoints` slots.

    Slot 0 holds the block input y_0; at most `num_checkpoints` states are held at any time.
    Every step n = Nt-1, ..., 0 is backpropagated exactly once, in that order.
    """
    actions: list[Action] = []
    slots = min(num_checkpoints, num_steps)

    def reverse(first, last, src, free):
        t = last - first
        if t == 1:
            actions.append(Action(src, -1, first, first, True))
        elif not free:  # recompute every step's input from the segment start
            for n in range(last - 1, first - 1, -1):
                actions.append(Action(src, -1, first, n, True))
        elif len(free) >= t - 1:  # every state fits: store each once, iteratively
            held = [src, *free[: t - 1]]
            for i in range(1, t):
                actions.append(Action(held[i - 1], held[i], first + i - 1, first + i, False))
            for i in range(t - 1, -1, -1):
                actions.append(Action(held[i], -1, first + i, first + i, True))
        else:
            mid = first + _revolve_table(t, len(free))[len(free)][t]
            actions.append(Action(src, free[0], first, mid, False))
            reverse(mid, last, free[0], free[1:])
            reverse(first, mid, src, free)

    reverse(0, num_steps, 0, list(range(1, slots)))
    return tuple(actions)


def _step_vjp(step, spec: SolveSpec, n, y_n, args, ct_next, ct_args):
    """Backpropagates ct_next through step n at y_n (recomputing its internals)."""
    _, vjp = jax.vjp(lambda y, a: step(spec.time(n), y, a), y_n, args)
    ct_y, ct_a = vjp(ct_next)
    return ct_y, tree_add(ct_args, ct_a)


def _reverse_unrolled(step, spec, args, y0, ct, ct_args, schedule):
    slots = {0: y0}
    for a in schedule:
        # The barrier ties each recomputation to the running cotangent: it then happens in the
        # backward pass, action by action, and XLA cannot merge it with the forward pass.
        y, ct, ct_args = _loop.tree_barrier(slots[a.src], ct, ct_args)
        y = _loop.integrate(
            step, y, args, t0=spec.t0, dt=spec.dt, first=a.n0, last=a.n1, unroll=False
        )
        if a.vjp:
            ct, ct_args = _step_vjp(step, spec, a.n1, y, args, ct, ct_args)
        else:
            slots[a.dst] = y
    return ct, ct_args


def _reverse_looped(step, spec, args, y0, ct, ct_args, schedule, num_slots):
    columns = [np.asarray(c, np.int32) for c in zip(*schedule)]
    buffer = jax.tree.map(lambda leaf: jax.numpy.zeros((num_slots, *leaf.shape), leaf.dtype), y0)
    buffer = jax.tree.map(lambda b, leaf: b.at[0].set(leaf), buffer, y0)

    def advance(n, y):
        return step(spec.time(n), y, args)

    def body(carry, action):
        buffer, ct, ct_args = carry
        src, dst, n0, n1, is_vjp = action
        y = jax.tree.map(lambda b: lax.dynamic_index_in_dim(b, src, keepdims=False), buffer)
        y = lax.fori_loop(n0, n1, advance, y)

        def backpropagate(operands):
            buffer, y, ct, ct_args = operands
            return (buffer, *_step_vjp(step, spec, n1, y, args, ct, ct_args))

        def store(operands):
            buffer, y, ct, ct_args = operands
            buffer = jax.tree.map(
                lambda b, leaf: lax.dynamic_update_index_in_dim(b, leaf, dst, 0), buffer, y
            )
            return buffer, ct, ct_args

        return lax.cond(is_vjp != 0, backpropagate, store, (buffer, y, ct, ct_args)), None

    (_, ct, ct_args), _ = lax.scan(body, (buffer, ct, ct_args), columns)
    return ct, ct_args


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _checkpointed_solve(vector_field, y0, args, spec, num_checkpoints):
    return forward(vector_field, y0, args, spec, unroll=False)


def _checkpointed_fwd(vector_field, y0, args, spec, num_checkpoints):
    # A forward-only solve always loops: forward convolutions ran as fast in lax.scan as
    # unrolled on XLA:CPU, and the loop compiles in time independent of Nt.
    return forward(vector_field, y0, args, spec, unroll=False), (y0, args)


def reverse_solve(vector_field, spec, y0, args, ct_y1, num_checkpoints):
    """(ct_y0, ct_args): ct_y1 backpropagated through the solve from y0 by the revolve
    schedule with `num_checkpoints` slots (looped or unrolled as `spec` says)."""
    step = spec.step_fn(vector_field)
    ct_args = jax.tree.map(_loop.zeros_like_cotangent, args)
    schedule = revolve_schedule(spec.num_steps, num_checkpoints)
    # Tie the whole reversal to the incoming cotangent, so it runs in the backward pass, one
    # block at a time, and XLA cannot merge it with (or hoist it into) the forward pass.
    y0, ct, ct_args = _loop.tree_barrier(y0, ct_y1, ct_args)
    if spec.unroll:
        return _reverse_unrolled(step, spec, args, y0, ct, ct_args, schedule)
    num_slots = min(num_checkpoints, spec.num_steps)
    return _reverse_looped(step, spec, args, y0, ct, ct_args, schedule, num_slots)


def _checkpointed_bwd(vector_field, spec, num_checkpoints, residuals, ct_y1):
    y0, args = residuals
    return reverse_solve(vector_field, spec, y0, args, ct_y1, num_checkpoints)


_checkpointed_solve.defvjp(_checkpointed_fwd, _checkpointed_bwd)


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
    """

    num_checkpoints: int = 4
    name = "checkpointed"

    def __post_init__(self):
        k = self.num_checkpoints
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Checkpointed(num_checkpoints=...) must be an int >= 1, got {k!r}.")

    def solve(self, vector_field, state0, args, spec):
        return _checkpointed_solve(vector_field, state0, args, spec, self.num_checkpoints)
