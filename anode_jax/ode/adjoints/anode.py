"""ANODE: store the block input, recompute the block in the backward pass."""

from __future__ import annotations

import dataclasses
import functools

import jax

from anode_jax.ode import _loop, adaptive
from anode_jax.ode.adjoints.base import AbstractAdjoint, forward
from anode_jax.ode.adjoints.checkpointed import check_recompute_stages, reverse_solve, stage_field


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _anode_solve(vector_field, y0, args, spec, recompute_stages):
    return forward(vector_field, y0, args, spec, unroll=False)


def _anode_fwd(vector_field, y0, args, spec, recompute_stages):
    # A forward-only solve always loops: forward convolutions ran as fast in lax.scan as
    # unrolled on XLA:CPU, and the loop compiles in time independent of Nt.
    return forward(vector_field, y0, args, spec, unroll=False), (y0, args)


def _anode_bwd(vector_field, spec, recompute_stages, residuals, ct_y1):
    y0, args = residuals
    if not spec.unroll or spec.num_steps > _loop.DEFAULT_MAX_UNROLL:
        # Recompute the block storing its Nt step inputs, then backpropagate step by step (the
        # revolve executor with a slot per step; looped: the states sit in a buffer carried by
        # the loop). Measured at L=8, Nt=16: 42 states; differentiating a scan of
        # jax.checkpoint-ed steps held 154 (XLA:CPU did not reuse a loop's stacked outputs
        # across blocks). Unrolled above DEFAULT_MAX_UNROLL steps, Nt steps of internals would
        # be too many to keep.
        return reverse_solve(vector_field, spec, y0, args, ct_y1, spec.num_steps, recompute_stages)
    # Unrolled short solves: differentiate the recomputed block as a whole (one extra forward
    # pass, every step's internals alive; with recompute_stages every stage input alive and
    # one stage's internals at a time). The barrier ties the recomputation to the incoming
    # cotangent: it then runs in the backward pass, one block at a time.
    y0, args, ct_y1 = _loop.tree_barrier(y0, args, ct_y1)
    field = stage_field(vector_field, recompute_stages, spec.solver, y0, args)
    _, vjp = jax.vjp(lambda y, a: forward(field, y, a, spec), y0, args)
    return vjp(ct_y1)


_anode_solve.defvjp(_anode_fwd, _anode_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _anode_adaptive(vector_field, y0, args, spec, recompute_stages):
    return adaptive.forward_record(vector_field, y0, args, spec)


def _anode_adaptive_fwd(vector_field, y0, args, spec, recompute_stages):
    y1, record = adaptive.forward_record(vector_field, y0, args, spec)
    return (y1, record), (y0, args, record)


def _anode_adaptive_bwd(vector_field, spec, recompute_stages, residuals, cts):
    y0, args, record = residuals
    top, seg = adaptive.anode_slots(spec.max_steps)
    field = stage_field(vector_field, recompute_stages, spec.solver, y0, args)
    return adaptive.reverse_replay(spec.solver, field, args, y0, record, cts[0], top, seg)


_anode_adaptive.defvjp(_anode_adaptive_fwd, _anode_adaptive_bwd)


@dataclasses.dataclass(frozen=True)
class Anode(AbstractAdjoint):
    """ANODE (Gholami, Keutzer & Biros 2019, arXiv:1902.10298, Sec. 3 and Alg. 1).

    The forward pass keeps only the block input z(0) (and the parameters). The backward pass
    recomputes the block's forward solve and backpropagates through the *discrete* solver
    (discretize-then-optimize), so the gradient is the exact gradient of the computed forward
    pass.

    Looped (the default policy): the recomputation stores the Nt step inputs and one loop
    backpropagates step by step, recomputing one step's internals at a time. Memory: L block
    inputs + Nt states + one step's internals (the paper's O(L) + O(Nt)); compute: about two
    extra forward passes. Unrolled: the recomputed block is differentiated as a whole (one
    extra forward pass, every step's internals of one block alive).

    Adaptive solves (embedded solvers): the forward pass records the accepted (t_n, h_n)
    (2·max_steps scalars) and keeps the block input; the backward pass replays exactly those
    steps (no rejected step is recomputed): a recomputation stores every m-th state in
    ⌈√max_steps⌉ slots (m = 1, every state, while n ≤ ⌈√max_steps⌉), then each segment of m
    steps is recomputed into ⌈max_steps/⌈√max_steps⌉⌉ slots and reversed step by step. Memory:
    about 2√max_steps states whatever n; compute: one extra forward pass when n ≤ √max_steps,
    two above (`adaptive.reverse_replay`).

    `recompute_stages` rematerialises inside each step too (Griewank's multi-level
    checkpointing; diffrax's `RecursiveCheckpointAdjoint` does so by default): the vector
    field is differentiated as `jax.checkpoint(f)`, so the VJP of a step holds the step's s
    stage inputs (states) and the internals of one stage (the activations of one evaluation
    of f) at a time, instead of the internals of all s stages together, and the parameter
    cotangent is summed stage by stage; the price is s more evaluations of f (one per stage)
    in every backward step, one more forward pass of the solve in all. It pays when f's
    activations are large next to the state (MLP 2→64→64→2, batch 256, RK4: one step's VJP
    611 → 220 KB); on the ANODE paper's conv block it saved nothing (docs/core.md). The
    default, None, decides per solve when the backward pass is traced: True when one
    evaluation of f keeps more than `AUTO_RECOMPUTE_RATIO` (16) times the state's bytes as
    residuals for reverse mode (found by tracing f's VJP abstractly, `jax.eval_shape`:
    nothing runs), else False — the MLP above keeps 128 states' worth, the papers' conv
    blocks 3–11, so their programs are those of False. Unrolled short solves, whose block is
    differentiated as a whole, then hold every stage input of the block and one stage's
    internals. Applies to fixed-step solves looped and unrolled, at many output times (each
    interval's backward pass), and to adaptive solves (each replayed step's VJP).

    Attributes:
      recompute_stages: None (default: automatic, as above), True or False (the stages of
        a step are differentiated together).

    Raises:
      ValueError: `recompute_stages` not None or a bool.
    """

    recompute_stages: bool | None = None
    name = "anode"
    backward_needs_input_only = True

    def __post_init__(self):
        stages = check_recompute_stages("Anode", self.recompute_stages)
        object.__setattr__(self, "recompute_stages", stages)

    def solve_adaptive(self, vector_field, y0, args, spec):
        return _anode_adaptive(vector_field, y0, args, spec, self.recompute_stages)

    def solve(self, vector_field, state0, args, spec):
        return _anode_solve(vector_field, state0, args, spec, self.recompute_stages)
