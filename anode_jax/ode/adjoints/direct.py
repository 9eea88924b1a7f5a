"""Direct: reverse-mode through every solver step (the reference)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from anode_jax.ode import adaptive
from anode_jax.ode.adjoints.base import AbstractAdjoint, forward


@dataclasses.dataclass(frozen=True)
class Direct(AbstractAdjoint):
    """Backpropagate through every solver step (the reference for every other strategy).

    Memory O(L·Nt·s) activations for L blocks, Nt steps and s stages; no recomputation. Looped
    (`lax.scan`) or unrolled by the loop policy; both give the same gradient.

    Args:
      remat_policy: None (default) keeps every step's internals. A `jax.checkpoint_policies`
        policy rematerializes each step (`jax.checkpoint` around the step; with
        `nothing_saveable` the solve stores only the Nt step inputs per block, L·Nt states in
        all, and recomputes each step once in the backward pass; the `offload_*` policies move
        what they save to host memory on accelerators).
    """

    remat_policy: Callable | None = None
    name = "direct"
    needs_closure_conversion = False

    def solve_adaptive(self, vector_field, y0, args, spec):
        """Adaptive solves: reverse-mode through a `lax.scan` of `max_steps` attempts
        (finished ones skip their work), step sizes held constant; memory O(max_steps) step
        internals (diffrax's `DirectAdjoint` is the analogue)."""
        if self.remat_policy is not None:
            raise ValueError(
                "Direct(remat_policy=...) applies to fixed-step solves; with an adaptive "
                "solver use adjoint='anode' or 'checkpointed:K' to bound memory."
            )
        return adaptive.forward_differentiable(vector_field, y0, args, spec)

    def solve(self, vector_field, state0, args, spec):
        if self.remat_policy is None:
            return forward(vector_field, state0, args, spec)
        step = jax.checkpoint(spec.step_fn(vector_field), policy=self.remat_policy)
        return forward(vector_field, state0, args, spec, step=step)
