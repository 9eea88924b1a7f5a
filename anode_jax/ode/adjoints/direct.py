"""Direct: reverse-mode through every solver step (the reference)."""

from __future__ import annotations

import dataclasses

from anode_jax.ode.adjoints.base import AbstractAdjoint, forward


@dataclasses.dataclass(frozen=True)
class Direct(AbstractAdjoint):
    """Backpropagate through every solver step (the reference for every other strategy).

    Memory O(L·Nt·s) activations for L blocks, Nt steps and s stages; no recomputation. Looped
    (`lax.scan`) or unrolled by the loop policy; both give the same gradient.
    """

    name = "direct"
    needs_closure_conversion = False

    def solve(self, vector_field, state0, args, spec):
        return forward(vector_field, state0, args, spec)
