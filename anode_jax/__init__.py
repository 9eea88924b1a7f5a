"""anode-jax: neural ODEs in JAX/Flax with exact, memory-efficient gradients.

The core (`anode_jax.ode`, re-exported here) imports no Flax; Flax modules live in
`anode_jax.models`, input pipelines in `anode_jax.data`, the trainer in `anode_jax.training`.
"""

from anode_jax.ode import (
    ADJOINTS,
    SOLVERS,
    AbstractAdjoint,
    Anode,
    Backsolve,
    ButcherTableau,
    Checkpointed,
    Direct,
    get_adjoint,
    get_solver,
    odeint,
)

__version__ = "0.1.0"

__all__ = [
    "ADJOINTS",
    "SOLVERS",
    "AbstractAdjoint",
    "Anode",
    "Backsolve",
    "ButcherTableau",
    "Checkpointed",
    "Direct",
    "get_adjoint",
    "get_solver",
    "odeint",
]
