"""Gradient strategies: how reverse-mode differentiates a fixed-step solve.

All strategies compute y(t1) identically in the forward pass; they differ in what the forward
stores and how the backward pass obtains the vector-Jacobian product.

| strategy          | stores in the forward       | backward                                   | exact? |
|-------------------|-----------------------------|--------------------------------------------|--------|
| Direct            | every step's internals      | plain reverse-mode                         | yes    |
| Anode             | the block input y0          | recompute the block, reverse the discrete  | yes    |
|                   |                             | solver (Gholami et al. 2019, Alg. 1)       |        |
| Checkpointed(k)   | the block input y0          | binomial (revolve) schedule: ≤ k states    | yes    |
|                   |                             | alive, recompute the rest                  |        |
| Backsolve         | the block output y1         | integrate the adjoint ODE backwards in     | no     |
|                   |                             | time (Chen et al. 2018, Eq. 4–5)           |        |

Each custom_vjp keeps its primal, forward and backward together below. Parameters reach the
vector field through `args`; closed-over traced values are hoisted into `args` by `odeint`
(closure conversion) before any strategy sees them.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp

from anode_jax._typing import PyTree, StepFn, VectorField
from anode_jax.ode import _loop
from anode_jax.ode._solvers import ButcherTableau, make_step


@dataclasses.dataclass(frozen=True)
class SolveSpec:
    """Static description of one fixed-step solve (hashable, no arrays)."""

    tableau: ButcherTableau
    t0: float
    t1: float
    num_steps: int
    unroll: bool

    @property
    def dt(self) -> float:
        return (self.t1 - self.t0) / self.num_steps


class AbstractAdjoint(abc.ABC):
    """Interface of a gradient strategy.

    `solve(vector_field, y0, args, spec)` returns y(t1). `vector_field` closes over no traced
    values (odeint guarantees it), so strategies may wrap it in custom_vjp freely.
    """

    name: str = "abstract"

    @abc.abstractmethod
    def solve(
        self, vector_field: VectorField, y0: PyTree, args: PyTree, spec: SolveSpec
    ) -> PyTree: ...

    # Whether odeint must closure-convert the vector field before calling `solve`.
    needs_closure_conversion: bool = True


def _forward(vector_field: VectorField, y0, args, spec: SolveSpec, *, differentiated=True):
    """y(t1). A solve that reverse-mode will differentiate follows spec.unroll; a forward-only
    one (the primal pass of a custom-VJP strategy) always loops: forward convolutions ran as fast
    in `lax.scan` as unrolled here (81.7 vs 79.4 ms) and the loop compiles faster."""
    step = make_step(spec.tableau, vector_field, spec.dt)
    return _loop.integrate(
        step,
        y0,
        args,
        t0=spec.t0,
        dt=spec.dt,
        first=0,
        last=spec.num_steps,
        unroll=spec.unroll if differentiated else False,
    )


# --------------------------------------------------------------------------------------------
# Direct: reverse-mode through every step.


@dataclasses.dataclass(frozen=True)
class Direct(AbstractAdjoint):
    """Backpropagate through every solver step (the reference).

    Memory O(L·Nt·s) activations for L blocks, Nt steps and s stages; no recomputation.
    """

    name = "direct"
    needs_closure_conversion = False

    def solve(self, vector_field, y0, args, spec):
        return _forward(vector_field, y0, args, spec)


# --------------------------------------------------------------------------------------------
# Anode: store the block input, recompute the block in the backward pass.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _anode_solve(vector_field, y0, args, spec):
    return _forward(vector_field, y0, args, spec, differentiated=False)


def _anode_fwd(vector_field, y0, args, spec):
    return _forward(vector_field, y0, args, spec, differentiated=False), (y0, args)


def _anode_bwd(vector_field, spec, residuals, ct_y1):
    if not spec.unroll:
        # Above the unroll threshold, reverse-mode through a looped solve is slow on XLA:CPU
        # (22x for conv gradients, docs/bench_core.md). Store the Nt step inputs with a forward
        # loop instead and reverse the steps one by one: the same exact gradient, Nt states
        # instead of Nt steps of internals, one extra step of compute per step.
        return _checkpointed_bwd(vector_field, spec, spec.num_steps, residuals, ct_y1)
    # Tie the recomputation to the incoming cotangent: it then runs in the backward pass, one
    # block at a time, and XLA cannot merge it with the forward pass (see tree_barrier).
    y0, args, ct_y1 = _loop.tree_barrier(*residuals, ct_y1)
    _, vjp = jax.vjp(lambda y, a: _forward(vector_field, y, a, spec), y0, args)
    return vjp(ct_y1)


_anode_solve.defvjp(_anode_fwd, _anode_bwd)


@dataclasses.dataclass(frozen=True)
class Anode(AbstractAdjoint):
    """ANODE (Gholami, Keutzer & Biros 2019, arXiv:1902.10298, Sec. 3 and Alg. 1).

    The forward pass keeps only the block input y0. The backward pass recomputes the block's
    forward solve and backpropagates through the *discrete* solver (discretize-then-optimize), so
    the gradient is the exact gradient of the computed forward pass. Memory: O(L) block inputs
    plus one block's O(Nt) step activations; compute: one extra forward pass.
    """

    name = "anode"

    def solve(self, vector_field, y0, args, spec):
        return _anode_solve(vector_field, y0, args, spec)


# --------------------------------------------------------------------------------------------
# Checkpointed: at most k states of a block alive; binomial recomputation schedule.


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


def _revolve_split(num_steps: int, free_slots: int) -> int:
    if free_slots >= num_steps - 1:
        return 1  # every state fits: store each one (skips the O(T² S) table)
    return _revolve_table(num_steps, free_slots)[free_slots][num_steps]


def _tree_add(a, b):
    return jax.tree.map(lambda x, y: y if x.dtype == jax.dtypes.float0 else x + y, a, b)


def _step_vjp(step: StepFn, spec: SolveSpec, n: int, y_n, args, ct_next, ct_args):
    """Backpropagates ct_next through step n (recomputing its internals); accumulates ct_args.

    The barrier also carries the running parameter cotangent: the weight-gradient half of a
    step's VJP is off the critical path of the state cotangent, and without this tie XLA
    postpones it and keeps every step's activations alive (memory then grows with Nt).
    """
    y_n, args, ct_next, ct_args = _loop.tree_barrier(y_n, args, ct_next, ct_args)
    t_n = jnp.asarray(spec.t0 + n * spec.dt, _loop.time_dtype())
    _, vjp = jax.vjp(lambda y, a: step(t_n, y, a), y_n, args)
    ct_y, ct_a = vjp(ct_next)
    return ct_y, _tree_add(ct_args, ct_a)


_MAX_RECURSIVE_STORE = 256


def _reverse_segment(step, spec, args, first, last, y_first, ct_last, free_slots, ct_args):
    """Backpropagates ct_last through steps first..last-1 holding at most free_slots+1 states."""
    if last - first == 1:
        return _step_vjp(step, spec, first, y_first, args, ct_last, ct_args)
    if free_slots >= last - first - 1 and last - first > _MAX_RECURSIVE_STORE:
        # Very long solves: one looped forward stores every input (the recursion below would be
        # Nt Python frames deep). Otherwise the recursion advances one step at a time into
        # separate buffers: XLA reused those across blocks but not a loop's stacked output
        # (L=8, Nt=4, k=4: 28 vs 58 states; anode at L=8, Nt=64: 538 states with the loop).
        return _reverse_storing_all(step, spec, args, first, last, y_first, ct_last, ct_args)
    if free_slots == 0:
        # No slot: every step's input is recomputed from y_first (quadratic compute, O(1) memory).
        ct = ct_last
        for n in range(last - 1, first - 1, -1):
            y_start, ct, ct_args = _loop.tree_barrier(y_first, ct, ct_args)
            y_n = _loop.integrate(
                step, y_start, args, t0=spec.t0, dt=spec.dt, first=first, last=n, unroll=False
            )
            ct, ct_args = _step_vjp(step, spec, n, y_n, args, ct, ct_args)
        return ct, ct_args
    mid = first + _revolve_split(last - first, free_slots)
    y_start, ct_last, ct_args = _loop.tree_barrier(y_first, ct_last, ct_args)
    y_mid = _loop.integrate(
        step, y_start, args, t0=spec.t0, dt=spec.dt, first=first, last=mid, unroll=False
    )
    ct_mid, ct_args = _reverse_segment(
        step, spec, args, mid, last, y_mid, ct_last, free_slots - 1, ct_args
    )
    return _reverse_segment(step, spec, args, first, mid, y_first, ct_mid, free_slots, ct_args)


def _reverse_storing_all(step, spec, args, first, last, y_first, ct_last, ct_args):
    """Reverses steps first..last-1 storing every step input (one forward loop, then VJPs)."""
    y_start, ct_last, ct_args = _loop.tree_barrier(y_first, ct_last, ct_args)
    inputs = _loop.step_inputs(step, y_start, args, t0=spec.t0, dt=spec.dt, first=first, last=last)
    ct = ct_last
    for n in range(last - 1, first - 1, -1):
        # Slice only once the cotangent has arrived; otherwise XLA materializes every slice right
        # after the loop and holds twice the stored states.
        inputs, ct, ct_args = _loop.tree_barrier(inputs, ct, ct_args)
        y_n = jax.tree.map(lambda stacked: stacked[n - first], inputs)
        ct, ct_args = _step_vjp(step, spec, n, y_n, args, ct, ct_args)
    return ct, ct_args


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _checkpointed_solve(vector_field, y0, args, spec, num_checkpoints):
    return _forward(vector_field, y0, args, spec, differentiated=False)


def _checkpointed_fwd(vector_field, y0, args, spec, num_checkpoints):
    return _forward(vector_field, y0, args, spec, differentiated=False), (y0, args)


def _checkpointed_bwd(vector_field, spec, num_checkpoints, residuals, ct_y1):
    y0, args = residuals
    step = make_step(spec.tableau, vector_field, spec.dt)
    ct_args = jax.tree.map(_loop.zeros_like_cotangent, args)
    free_slots = min(num_checkpoints, spec.num_steps) - 1
    return _reverse_segment(step, spec, args, 0, spec.num_steps, y0, ct_y1, free_slots, ct_args)


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

    def solve(self, vector_field, y0, args, spec):
        return _checkpointed_solve(vector_field, y0, args, spec, self.num_checkpoints)


# --------------------------------------------------------------------------------------------
# Backsolve: the Neural ODE adjoint, integrated backwards in time.


def _split_inexact(tree):
    """(inexact leaves, rebuild(inexact_leaves) -> cotangent tree with float0 elsewhere)."""
    leaves, treedef = jax.tree.flatten(tree)
    mask = [jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact) for x in leaves]
    inexact = [x for x, m in zip(leaves, mask) if m]

    def rebuild_cotangent(ct_inexact):
        it = iter(ct_inexact)
        return jax.tree.unflatten(
            treedef,
            [next(it) if m else _loop.zeros_like_cotangent(x) for x, m in zip(leaves, mask)],
        )

    def rebuild_primal(new_inexact):
        it = iter(new_inexact)
        return jax.tree.unflatten(treedef, [next(it) if m else x for x, m in zip(leaves, mask)])

    return inexact, rebuild_primal, rebuild_cotangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _backsolve_solve(vector_field, y0, args, spec):
    return _forward(vector_field, y0, args, spec, differentiated=False)


def _backsolve_fwd(vector_field, y0, args, spec):
    y1 = _forward(vector_field, y0, args, spec, differentiated=False)
    return y1, (y1, args)


def _backsolve_bwd(vector_field, spec, residuals, ct_y1):
    # The reverse-time reconstruction of y does not depend on the cotangent; without the barrier
    # XLA may hoist every block's reconstruction into the forward pass and keep it alive.
    y1, args, ct_y1 = _loop.tree_barrier(*residuals, ct_y1)
    args_inexact, rebuild_args, rebuild_ct = _split_inexact(args)

    def adjoint_field(t, state, _):
        # Augmented system of Chen et al. (2018), Eq. 4-5 and Alg. 1:
        #   dy/dt = f(t, y),  da/dt = -aᵀ ∂f/∂y,  dg/dt = -aᵀ ∂f/∂θ.
        y, a, _ = state
        fy, vjp = jax.vjp(lambda y_, p_: vector_field(t, y_, rebuild_args(p_)), y, args_inexact)
        a_y, a_p = vjp(a)
        neg = lambda tree: jax.tree.map(jnp.negative, tree)
        return fy, neg(a_y), neg(a_p)

    g1 = [jnp.zeros_like(p) for p in args_inexact]
    back = SolveSpec(spec.tableau, spec.t1, spec.t0, spec.num_steps, spec.unroll)
    _, a0, g0 = _forward(adjoint_field, (y1, ct_y1, g1), None, back)
    return a0, rebuild_ct(g0)


_backsolve_solve.defvjp(_backsolve_fwd, _backsolve_bwd)


@dataclasses.dataclass(frozen=True)
class Backsolve(AbstractAdjoint):
    """The Neural ODE adjoint (Chen et al. 2018, arXiv:1806.07366, Alg. 1). Approximate.

    Stores only y(t1) and integrates the augmented system [y, a, a_θ] from t1 back to t0 with
    the same solver and step count. The reconstructed trajectory is not the forward trajectory
    (the reverse solve of a ReLU/conv network is unstable and not the inverse of the discrete
    forward map), so the gradient is NOT the gradient of the computed forward pass; it converges
    to it only as Nt → ∞ on smooth, well-conditioned problems. Kept as the baseline the ANODE
    papers compare against; do not use it when you need correct gradients.
    """

    name = "backsolve"

    def solve(self, vector_field, y0, args, spec):
        return _backsolve_solve(vector_field, y0, args, spec)


# --------------------------------------------------------------------------------------------

ADJOINTS = ("direct", "anode", "checkpointed", "backsolve")
_CHECKPOINTED_RE = re.compile(r"^checkpointed(?::(\d+))?$")


def get_adjoint(adjoint: str | AbstractAdjoint) -> AbstractAdjoint:
    """Parses a strategy name ("direct", "anode", "backsolve", "checkpointed[:K]") or object."""
    if isinstance(adjoint, AbstractAdjoint):
        return adjoint
    if isinstance(adjoint, str):
        if adjoint == "direct":
            return Direct()
        if adjoint == "anode":
            return Anode()
        if adjoint == "backsolve":
            return Backsolve()
        match = _CHECKPOINTED_RE.match(adjoint)
        if match:
            return Checkpointed(int(match.group(1))) if match.group(1) else Checkpointed()
        raise ValueError(
            f"Unknown adjoint {adjoint!r}; valid names are 'direct', 'anode', 'backsolve' and "
            "'checkpointed:K' (K >= 1 states kept per block), or pass Direct(), Anode(), "
            "Checkpointed(num_checkpoints=K) or Backsolve()."
        )
    raise TypeError(
        "adjoint must be one of 'direct', 'anode', 'backsolve', 'checkpointed:K' or an "
        f"AbstractAdjoint instance, got {type(adjoint).__name__}."
    )
