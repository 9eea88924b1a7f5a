"""The adaptive time loop: trial steps of an embedded pair under a `PIDController`.

One *attempt* advances (t, y) by a trial step h (clipped to land exactly on t1), estimates
its error, accepts or rejects it and proposes the next h. `max_steps` bounds the attempts
(accepted plus rejected, as diffrax counts them) and is static, so the compiled program does
not depend on the number of steps taken.

Gradient convention (discretize-then-optimize): the step sizes, the accept/reject decisions
and the output times are constants of the computed solve — every strategy differentiates the
map y0, args ↦ y_N = Φ_{N−1} ∘ … ∘ Φ_0 (y0), Φ_n the RK step of the *accepted* size h_n from
t_n. (diffrax does the same: its controller stops gradients through the error estimate, and
`RecursiveCheckpointAdjoint` differentiates the computed steps.)

- `forward_record`: a `lax.while_loop` that stops at t1 and records the accepted (t_n, h_n)
  in static buffers of length `max_steps` (the only per-step storage of the forward pass).
- `forward_differentiable`: the same attempts in a `lax.scan` of `max_steps` iterations
  (finished iterations skip their work in a `lax.cond`), reverse-mode differentiable: the
  "direct" strategy.
- `reverse_replay` ("anode") and `reverse_revolve` ("checkpointed:K"): backpropagate through
  exactly the recorded accepted steps, recomputing states from stored checkpoints (no
  rejected step is recomputed).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from anode_jax._typing import PyTree
from anode_jax.ode import _loop
from anode_jax.ode.solvers.controllers import PIDController
from anode_jax.ode.solvers.embedded import EmbeddedTableau

# Status codes of a solve.
SUCCESS, MAX_STEPS = 0, 1


@dataclasses.dataclass(frozen=True)
class AdaptiveSpec:
    """The static description of one adaptive solve (hashable)."""

    solver: EmbeddedTableau
    controller: PIDController
    t0: float
    t1: float
    max_steps: int
    throw: bool = True

    @property
    def direction(self) -> float:
        return 1.0 if self.t1 > self.t0 else -1.0

    def reversed(self) -> AdaptiveSpec:
        return dataclasses.replace(self, t0=self.t1, t1=self.t0)


class Record(NamedTuple):
    """What a forward solve records: the accepted steps and the statistics."""

    ts: jax.Array  # (max_steps,) start time t_n of accepted step n (entries >= n unused)
    hs: jax.Array  # (max_steps,) signed size of accepted step n
    num_accepted: jax.Array  # int32
    num_rejected: jax.Array  # int32
    num_fevals: jax.Array  # int32
    t_final: jax.Array  # the time reached (t1 unless max_steps was hit)
    failed: jax.Array  # bool: max_steps attempts without reaching t1
    nonfinite: jax.Array  # int32: trial steps whose error estimate was NaN/inf


class _Carry(NamedTuple):
    t: jax.Array
    h: jax.Array  # the next trial step size (a magnitude)
    y: PyTree
    k1: PyTree  # f(t, y) for FSAL pairs (else unused zeros)
    inv_errors: tuple  # δ of the last two accepted steps (PID history)
    at_dtmin: jax.Array
    ts: jax.Array
    hs: jax.Array
    accepted: jax.Array
    rejected: jax.Array
    fevals: jax.Array
    done: jax.Array
    nonfinite: jax.Array


def _cast(x, like):
    return jnp.asarray(x).astype(jnp.result_type(like))


def _init(vector_field, y0, args, spec: AdaptiveSpec) -> _Carry:
    solver, ctrl = spec.solver, spec.controller
    tdtype = _loop.time_dtype()
    t0 = jnp.asarray(spec.t0, tdtype)
    f0 = vector_field(t0, y0, args)
    fevals = 1
    if ctrl.dt0 is None:
        h = ctrl.initial_step(
            vector_field, t0, lax.stop_gradient(y0), lax.stop_gradient(f0), args,
            solver.order, spec.direction, tdtype,
        )  # fmt: skip
        fevals += 1
    else:
        h = jnp.asarray(ctrl.dt0, tdtype)
    h = lax.stop_gradient(h)
    if ctrl.dtmax is not None:
        h = jnp.minimum(h, ctrl.dtmax)
    if ctrl.dtmin is not None:
        h = jnp.maximum(h, ctrl.dtmin)
    one = jnp.ones((), tdtype)
    return _Carry(
        t=t0,
        h=h,
        y=y0,
        k1=f0 if solver.fsal else jax.tree.map(jnp.zeros_like, y0),
        inv_errors=(one, one),
        at_dtmin=jnp.zeros((), bool),
        ts=jnp.zeros((spec.max_steps,), tdtype),
        hs=jnp.zeros((spec.max_steps,), tdtype),
        accepted=jnp.zeros((), jnp.int32),
        rejected=jnp.zeros((), jnp.int32),
        fevals=jnp.asarray(fevals, jnp.int32),
        done=jnp.zeros((), bool),
        nonfinite=jnp.zeros((), jnp.int32),
    )


def _attempt(vector_field, args, spec: AdaptiveSpec, c: _Carry) -> _Carry:
    """One trial step: advance, estimate the error, accept or reject, propose the next h."""
    solver, ctrl = spec.solver, spec.controller
    tdtype = _loop.time_dtype()
    eps = float(jnp.finfo(tdtype).eps)
    t1 = jnp.asarray(spec.t1, tdtype)
    remaining = (t1 - c.t) * spec.direction
    # Land exactly on t1: a step reaching within 100 ulp of t1 (diffrax's rule) ends there.
    last = c.h >= remaining - 100 * eps * max(abs(spec.t0), abs(spec.t1), 1.0)
    h = lax.stop_gradient(jnp.where(last, remaining, c.h))
    dt = spec.direction * h
    y_next, err, k_last = solver.attempt(
        vector_field, c.t, dt, c.y, args, c.k1 if solver.fsal else None
    )
    fevals = c.fevals + (solver.num_stages - 1 if solver.fsal else solver.num_stages)
    error = ctrl.scaled_error(
        lax.stop_gradient(c.y), lax.stop_gradient(y_next), lax.stop_gradient(err), tdtype
    )
    finite = jnp.isfinite(error)
    accept = finite & ((error < 1) | c.at_dtmin)
    inv = 1 / error
    prev, prev_prev = c.inv_errors
    factor = ctrl.factor(inv, prev, prev_prev, accept, solver.order)
    h_new = h * factor.astype(tdtype)
    if ctrl.dtmax is not None:
        h_new = jnp.minimum(h_new, ctrl.dtmax)
    at_dtmin = c.at_dtmin
    if ctrl.dtmin is not None:
        at_dtmin = h_new <= ctrl.dtmin
        h_new = jnp.maximum(h_new, ctrl.dtmin)
    # The PID history holds δ of accepted steps; 0 or inf (an exact step) counts as 1.
    inv_hist = jnp.where((inv == 0) | ~jnp.isfinite(inv), 1.0, inv).astype(tdtype)
    inv_errors = (jnp.where(accept, inv_hist, prev), jnp.where(accept, prev, prev_prev))
    t_next = jnp.where(last, t1, c.t + dt)

    def record(buffer, value):
        slot = jnp.minimum(c.accepted, spec.max_steps - 1)
        kept = lax.dynamic_index_in_dim(buffer, slot, keepdims=False)
        return lax.dynamic_update_index_in_dim(buffer, jnp.where(accept, value, kept), slot, 0)

    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, old)
    return _Carry(
        t=jnp.where(accept, t_next, c.t),
        h=lax.stop_gradient(h_new),
        y=pick(y_next, c.y),
        k1=pick(k_last, c.k1) if solver.fsal else c.k1,
        inv_errors=inv_errors,
        at_dtmin=at_dtmin,
        ts=record(c.ts, c.t),
        hs=record(c.hs, dt),
        accepted=c.accepted + accept.astype(jnp.int32),
        rejected=c.rejected + (~accept).astype(jnp.int32),
        fevals=fevals,
        done=accept & last,
        nonfinite=c.nonfinite + (~finite).astype(jnp.int32),
    )


def _finish(c: _Carry, spec: AdaptiveSpec) -> tuple[PyTree, Record]:
    record = Record(
        ts=c.ts,
        hs=c.hs,
        num_accepted=c.accepted,
        num_rejected=c.rejected,
        num_fevals=c.fevals,
        t_final=c.t,
        failed=~c.done,
        nonfinite=c.nonfinite,
    )
    if spec.throw:
        # The host callback only on failure: an unconditional one cost ~5 ms per solve on
        # CPU (a device-to-host round trip), more than a short solve itself. Under vmap the
        # predicate is batched, the cond becomes a select and the callback always runs; it
        # then raises only for failed samples.
        report = functools.partial(_raise_if_failed, max_steps=spec.max_steps, t1=spec.t1)
        lax.cond(
            jnp.any(record.failed),
            lambda *x: jax.debug.callback(report, *x),
            lambda *x: None,
            record.failed, record.t_final, record.num_accepted, record.num_rejected,
            record.nonfinite,
        )  # fmt: skip
    return c.y, record


class MaxStepsError(RuntimeError):
    """An adaptive solve used `max_steps` attempts without reaching t1."""


def _raise_if_failed(failed, t, accepted, rejected, nonfinite, max_steps, t1):
    failed = np.asarray(failed)
    if not failed.any():
        return
    i = np.flatnonzero(failed.reshape(-1))[0]  # the first failing sample under vmap
    pick = lambda x: np.asarray(x).reshape(-1)[i] if np.ndim(x) else np.asarray(x)
    bad = int(pick(nonfinite))
    cause = (
        f"; {bad} error estimates were NaN/inf (the vector field produced non-finite values "
        "there; those steps were rejected)"
        if bad
        else ""
    )
    raise MaxStepsError(
        f"odeint: max_steps={max_steps} attempted steps ({int(pick(accepted))} accepted, "
        f"{int(pick(rejected))} rejected) reached t={float(pick(t))!r} before t1={t1!r}"
        f"{cause}. Raise max_steps, loosen rtol/atol, or pass throw=False with "
        "return_stats=True to get the flag instead of this error."
    )


def forward_record(vector_field, y0, args, spec: AdaptiveSpec) -> tuple[PyTree, Record]:
    """y at t1 (or where max_steps stopped) and the record, by a `lax.while_loop` (not
    reverse-differentiable; the custom-VJP strategies call it in their forward pass)."""
    carry = _init(vector_field, y0, args, spec)
    attempts = jnp.zeros((), jnp.int32)

    def cond(state):
        c, n = state
        return ~c.done & (n < spec.max_steps)

    def body(state):
        c, n = state
        return _attempt(vector_field, args, spec, c), n + 1

    carry, _ = lax.while_loop(cond, body, (carry, attempts))
    return _finish(carry, spec)


def forward_differentiable(vector_field, y0, args, spec: AdaptiveSpec) -> tuple[PyTree, Record]:
    """As `forward_record`, in a `lax.scan` of `max_steps` iterations whose finished
    iterations skip the step (`lax.cond`): differentiable in reverse mode through every
    attempt, memory O(max_steps) step internals ("direct")."""
    carry = _init(vector_field, y0, args, spec)

    def body(c, _):
        return lax.cond(
            c.done, lambda c: c, lambda c: _attempt(vector_field, args, spec, c), c
        ), None

    carry, _ = lax.scan(body, carry, None, length=spec.max_steps)
    return _finish(carry, spec)


def stats(record: Record) -> dict:
    """The user-facing statistics of a solve (see `odeint`'s `return_stats`)."""
    return {
        "num_accepted_steps": record.num_accepted,
        "num_rejected_steps": record.num_rejected,
        "num_steps": record.num_accepted + record.num_rejected,
        "num_fevals": record.num_fevals,
        "max_steps_reached": record.failed,
        "t_final": record.t_final,
    }


def anode_slots(max_steps: int) -> tuple[int, int]:
    """(checkpoint slots, segment slots) of "anode" for a `max_steps` bound: ⌈√max_steps⌉
    checkpoints and segments of at most ⌈max_steps / that⌉ states."""
    top = math.isqrt(max_steps - 1) + 1 if max_steps > 1 else 1
    return top, -(-max_steps // top)


def reverse_replay(solver, vector_field, args, y0, record: Record, ct_y1, top_slots, seg_slots):
    """(ct_y0, ct_args): ct_y1 backpropagated through the n recorded accepted steps.

    Two levels, with n known only at run time: a first recomputation stores the state at
    every m-th step in `top_slots` checkpoints (m = ⌈n / top_slots⌉, so m = 1 when n fits);
    then, last segment first, each segment of m steps is recomputed from its checkpoint into
    `seg_slots` states (requires seg_slots >= m: `anode_slots` guarantees it for n <=
    max_steps) and backpropagated step by step ("anode").
    """
    n = record.num_accepted
    ts, hs = record.ts, record.hs
    ct_args = jax.tree.map(_loop.zeros_like_cotangent, args)
    y0, ct, ct_args = _loop.tree_barrier(y0, ct_y1, ct_args)

    def step(i, y):
        return solver.step(vector_field, ts[i], hs[i], y, args)

    def buffer(slots):
        return jax.tree.map(lambda leaf: jnp.zeros((slots, *leaf.shape), leaf.dtype), y0)

    def write(buf, slot, y, when=True):
        def leaf(b, x):
            kept = lax.dynamic_index_in_dim(b, slot, keepdims=False)
            return lax.dynamic_update_index_in_dim(b, jnp.where(when, x, kept), slot, 0)

        return jax.tree.map(leaf, buf, y)

    def read(buf, slot):
        return jax.tree.map(lambda b: lax.dynamic_index_in_dim(b, slot, keepdims=False), buf)

    m = jnp.maximum(1, (n + top_slots - 1) // top_slots)

    def store_checkpoints(i, state):
        y, top = state
        top = write(top, jnp.minimum(i // m, top_slots - 1), y, i % m == 0)
        return step(i, y), top

    _, top = lax.fori_loop(0, n, store_checkpoints, (y0, buffer(top_slots)))

    def step_vjp(i, y, ct, ct_args):
        _, vjp = jax.vjp(lambda y_, a_: step(i, y_) if False else solver.step(
            vector_field, ts[i], hs[i], y_, a_), y, args)  # fmt: skip
        ct_y, ct_a = vjp(ct)
        return ct_y, jax.tree.map(
            lambda x, y: y if x.dtype == jax.dtypes.float0 else x + y, ct_args, ct_a
        )

    num_segments = (n + m - 1) // m

    def segment(j_rev, state):
        ct, ct_args = state
        j = num_segments - 1 - j_rev
        start = j * m
        end = jnp.minimum(n, start + m)
        y_start = read(top, j)

        def fill(i, carry):
            y, seg = carry
            y = step(i, y)
            return y, write(seg, i + 1 - start, y)

        seg = write(buffer(seg_slots), 0, y_start)
        _, seg = lax.fori_loop(start, end - 1, fill, (y_start, seg))

        def back(k, carry):
            ct, ct_args = carry
            i = end - 1 - k
            return step_vjp(i, read(seg, i - start), ct, ct_args)

        return lax.fori_loop(0, end - start, back, (ct, ct_args))

    return lax.fori_loop(0, num_segments, segment, (ct, ct_args))


def _binomial_columns(num_checkpoints: int, max_steps: int) -> np.ndarray:
    """beta[c, r] = C(c + r, c) for c = 0..K and r = 0..R, R the least r with
    beta[K, R] >= max_steps (Griewank's table; int64, saturated at 2^62)."""
    k = max(num_checkpoints, 1)
    if k == 1:  # no free slot ever: the split is never taken
        return np.ones((2, 2), np.int64)
    rows = [[1] for _ in range(k + 1)]
    while rows[k][-1] < max_steps:
        r = len(rows[0])
        rows[0].append(1)
        for c in range(1, k + 1):
            rows[c].append(min(rows[c][r - 1] + rows[c - 1][r], 2**62))
    for row in rows:  # one spare column keeps every lookup in range
        row.append(row[-1])
    return np.asarray(rows, np.int64)


def reverse_revolve(
    solver, vector_field, args, y0, record: Record, ct_y1, num_checkpoints: int, count=False
):
    """(ct_y0, ct_args[, recomputed steps]): ct_y1 backpropagated through the n recorded
    accepted steps with at most `num_checkpoints` states alive (slot 0 holds y0), by Griewank's
    binomial (revolve) splitting planned *online*: n is known only at run time, so the
    schedule is not a precomputed list but a `lax.while_loop` over a stack of segments.

    Reversing segment [s, e) whose first state sits in slot d with f = K − 1 − d free slots:
    with f = 0 (or one step left) the last step's input is recomputed from slot d and
    backpropagated, and the segment shrinks to [s, e − 1); otherwise the state at s + m is
    computed into slot d + 1, [s + m, e) is reversed with f − 1 free slots (pushed), then
    [s, s + m) with f (the split m in closed form from the binomial table, as
    `adjoints.checkpointed.revolve_schedule`: the same recomputations, the fewest possible,
    `revolve_cost(n, K)`). The binomial table's size depends on K and log max_steps only.
    """
    k = num_checkpoints
    n = record.num_accepted
    ts, hs = record.ts, record.hs
    table = _binomial_columns(k, ts.shape[0])
    table = jnp.asarray(np.minimum(table, np.iinfo(np.int32).max).astype(np.int32))
    ct_args = jax.tree.map(_loop.zeros_like_cotangent, args)
    y0, ct, ct_args = _loop.tree_barrier(y0, ct_y1, ct_args)

    def step(i, y):
        return solver.step(vector_field, ts[i], hs[i], y, args)

    slots = jax.tree.map(lambda leaf: jnp.zeros((k, *leaf.shape), leaf.dtype), y0)
    slots = jax.tree.map(lambda b, leaf: b.at[0].set(leaf), slots, y0)
    starts = jnp.zeros((k,), jnp.int32)
    ends = jnp.zeros((k,), jnp.int32).at[0].set(n)

    def split(t, free):
        # The binomial split of `_segment` in adjoints/checkpointed.py with c = free + 1.
        c = free + 1
        row = table[c]
        reps = jnp.searchsorted(row, t, side="left").astype(jnp.int32)
        low = jnp.where(reps >= 2, row[jnp.maximum(reps - 2, 0)], 0)
        m = jnp.maximum(jnp.maximum(1, low), t - table[c - 1][reps])
        return jnp.where(free >= t - 1, 1, m)

    def cond(carry):
        return carry[0] >= 0

    def body(carry):
        d, starts, ends, slots, ct, ct_args, recomputed = carry
        s, e = starts[d], ends[d]
        t = e - s
        free = k - 1 - d
        y_s = jax.tree.map(lambda b: lax.dynamic_index_in_dim(b, d, keepdims=False), slots)

        def pop(ops):
            starts, ends, slots, ct, ct_args = ops
            return d - 1, starts, ends, slots, ct, ct_args, recomputed

        def backpropagate(ops):
            starts, ends, slots, ct, ct_args = ops
            y = lax.fori_loop(s, e - 1, step, y_s)
            _, vjp = jax.vjp(
                lambda y_, a_: solver.step(vector_field, ts[e - 1], hs[e - 1], y_, a_), y, args
            )
            ct_y, ct_a = vjp(ct)
            ct_args = jax.tree.map(
                lambda x, z: z if x.dtype == jax.dtypes.float0 else x + z, ct_args, ct_a
            )
            return d, starts, ends.at[d].set(e - 1), slots, ct_y, ct_args, recomputed + t - 1

        def push(ops):
            starts, ends, slots, ct, ct_args = ops
            m = split(t, free)
            y = lax.fori_loop(s, s + m, step, y_s)
            slots = jax.tree.map(
                lambda b, leaf: lax.dynamic_update_index_in_dim(b, leaf, d + 1, 0), slots, y
            )
            starts = starts.at[d + 1].set(s + m)
            ends = ends.at[d + 1].set(e).at[d].set(s + m)
            return d + 1, starts, ends, slots, ct, ct_args, recomputed + m

        branch = jnp.where(t == 0, 0, jnp.where((free == 0) | (t == 1), 1, 2))
        return lax.switch(branch, (pop, backpropagate, push), (starts, ends, slots, ct, ct_args))

    zero = jnp.zeros((), jnp.int32)
    carry = (zero, starts, ends, slots, ct, ct_args, zero)
    *_, ct, ct_args, recomputed = lax.while_loop(cond, body, carry)
    return (ct, ct_args, recomputed) if count else (ct, ct_args)
