"""anode-jax: neural ODEs in JAX/Flax with exact, memory-efficient gradients.

The core (`anode_jax.ode`, re-exported here) and the loop-safe convolution (`anode_jax.nn`)
import no Flax; Flax modules live in `anode_jax.models`, input pipelines in `anode_jax.data`,
the trainer in `anode_jax.training`.
"""

from anode_jax import nn
from anode_jax.ode import (
    ADJOINTS,
    ALF,
    SOLVERS,
    AbstractAdjoint,
    AbstractSolver,
    Anode,
    Backsolve,
    ButcherTableau,
    Checkpointed,
    Direct,
    Reversible,
    ReversibleAdjoint,
    ReversibleHeun,
    get_adjoint,
    get_solver,
    odeint,
    solver_names,
)

__version__ = "0.1.0"

__all__ = [
    "ADJOINTS",
    "ALF",
    "SOLVERS",
    "AbstractAdjoint",
    "AbstractSolver",
    "Anode",
    "Backsolve",
    "ButcherTableau",
    "Checkpointed",
    "Direct",
    "Reversible",
    "ReversibleAdjoint",
    "ReversibleHeun",
    "get_adjoint",
    "get_solver",
    "nn",
    "odeint",
    "solver_names",
]
