"""The pure core: fixed-step ODE solvers and gradient strategies. Imports no Flax."""

from anode_jax.ode._adjoint import (
    ADJOINTS,
    AbstractAdjoint,
    Anode,
    Backsolve,
    Checkpointed,
    Direct,
    get_adjoint,
)
from anode_jax.ode._loop import DEFAULT_MAX_UNROLL
from anode_jax.ode._odeint import odeint
from anode_jax.ode._solvers import (
    EULER,
    HEUN,
    MIDPOINT,
    RK4,
    SOLVERS,
    ButcherTableau,
    get_solver,
    make_step,
)

__all__ = [
    "ADJOINTS",
    "AbstractAdjoint",
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
    "SOLVERS",
    "get_adjoint",
    "get_solver",
    "make_step",
    "odeint",
]
