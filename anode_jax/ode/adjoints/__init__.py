"""Gradient strategies: how reverse-mode differentiates a fixed-step solve.

| strategy          | stores in the forward       | backward                                   | exact? |
|-------------------|-----------------------------|--------------------------------------------|--------|
| Direct            | every step's internals      | plain reverse-mode                         | yes    |
| Anode             | the block input y0          | recompute the block (storing Nt states),   | yes    |
|                   |                             | reverse it step by step (Gholami et al.    |        |
|                   |                             | 2019, Alg. 1)                              |        |
| Checkpointed(k)   | the block input y0          | binomial (revolve) schedule: ≤ k states    | yes    |
|                   |                             | alive, recompute the rest                  |        |
| ReversibleAdjoint | the block output y1 (and   | reconstruct each step input by the         | yes    |
|                   | the solver's auxiliary     | solver's algebraic inverse, backpropagate  |        |
|                   | state)                      | through that step (McCallum & Foster 2024) |        |
| Backsolve         | the block output y1         | integrate the adjoint ODE backwards in     | no     |
|                   |                             | time (Chen et al. 2018, Eq. 4–5)           |        |

`Anode` and `Checkpointed` also rematerialise each stage inside a backward step when the
vector field's activations are large next to the state (`recompute_stages=None`, the default:
more than 16 states' worth of residuals per evaluation) or when asked
(`recompute_stages=True`; `False` never; class form only): one step's VJP then holds its stage
inputs and one stage's internals, for one more vector-field evaluation per stage.

One module per strategy; each keeps its primal, forward and backward together.
"""

from __future__ import annotations

import re

from anode_jax.ode.adjoints.anode import Anode
from anode_jax.ode.adjoints.backsolve import Backsolve
from anode_jax.ode.adjoints.base import AbstractAdjoint, SolveSpec
from anode_jax.ode.adjoints.checkpointed import Checkpointed
from anode_jax.ode.adjoints.direct import Direct
from anode_jax.ode.adjoints.reversible import ReversibleAdjoint

ADJOINTS = ("direct", "anode", "checkpointed", "backsolve", "reversible")
_CHECKPOINTED_RE = re.compile(r"^checkpointed(?::(\d+))?$")
_BY_NAME = {
    "direct": Direct,
    "anode": Anode,
    "backsolve": Backsolve,
    "reversible": ReversibleAdjoint,
}
_VALID = (
    "valid names are 'direct', 'anode', 'backsolve', 'reversible' (with a reversible solver) "
    "and 'checkpointed:K' (K >= 1 states kept per block), or pass Direct(), Anode(), "
    "Checkpointed(num_checkpoints=K), Backsolve() or ReversibleAdjoint()"
)


def get_adjoint(adjoint: str | AbstractAdjoint) -> AbstractAdjoint:
    """Parses a strategy name ("direct", "anode", "backsolve", "reversible", "checkpointed[:K]")
    or passes an AbstractAdjoint through."""
    if isinstance(adjoint, AbstractAdjoint):
        return adjoint
    if isinstance(adjoint, str):
        if adjoint in _BY_NAME:
            return _BY_NAME[adjoint]()
        match = _CHECKPOINTED_RE.match(adjoint)
        if match:
            return Checkpointed(int(match.group(1))) if match.group(1) else Checkpointed()
        raise ValueError(f"Unknown adjoint {adjoint!r}; {_VALID}.")
    raise TypeError(
        f"adjoint must be a name or an AbstractAdjoint instance, got {type(adjoint).__name__}; "
        f"{_VALID}."
    )


__all__ = [
    "ADJOINTS",
    "AbstractAdjoint",
    "Anode",
    "Backsolve",
    "Checkpointed",
    "Direct",
    "ReversibleAdjoint",
    "SolveSpec",
    "get_adjoint",
]
