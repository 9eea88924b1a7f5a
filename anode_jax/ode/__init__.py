"""The pure core: ODE solvers (`solvers/`: fixed-step and adaptive embedded pairs) and
gradient strategies (`adjoints/`).

Imports no Flax.
"""

from anode_jax.ode._loop import DEFAULT_MAX_UNROLL
from anode_jax.ode._odeint import odeint
from anode_jax.ode._policy import resolve_unroll, uses_plain_convolutions
from anode_jax.ode._stages import knot_weights, stage_times
from anode_jax.ode.adaptive import MaxStepsError
from anode_jax.ode.adjoints import (
    ADJOINTS,
    AbstractAdjoint,
    Anode,
    Backsolve,
    Checkpointed,
    Direct,
    ReversibleAdjoint,
    SolveSpec,
    get_adjoint,
)
from anode_jax.ode.solvers import (
    ALF,
    BOSH3,
    DOPRI5,
    EULER,
    HEUN,
    HEUN_EULER,
    MIDPOINT,
    RK4,
    SOLVERS,
    TSIT5,
    AbstractReversibleSolver,
    AbstractSolver,
    ButcherTableau,
    EmbeddedTableau,
    PIDController,
    Reversible,
    ReversibleHeun,
    adaptive_solver_names,
    get_solver,
    make_step,
    reversible_solver_names,
    solver_names,
)

__all__ = [
    "ADJOINTS",
    "ALF",
    "BOSH3",
    "DOPRI5",
    "EmbeddedTableau",
    "HEUN_EULER",
    "MaxStepsError",
    "PIDController",
    "TSIT5",
    "adaptive_solver_names",
    "AbstractAdjoint",
    "AbstractReversibleSolver",
    "AbstractSolver",
    "Anode",
    "Backsolve",
    "ButcherTableau",
    "Checkpointed",
    "DEFAULT_MAX_UNROLL",
    "Direct",
    "EULER",
    "HEUN",
    "MIDPOINT",
    "RK4",
    "Reversible",
    "ReversibleAdjoint",
    "ReversibleHeun",
    "SOLVERS",
    "SolveSpec",
    "get_adjoint",
    "get_solver",
    "knot_weights",
    "make_step",
    "odeint",
    "resolve_unroll",
    "reversible_solver_names",
    "solver_names",
    "stage_times",
    "uses_plain_convolutions",
]
