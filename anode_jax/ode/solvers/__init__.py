"""Fixed-step solvers, one family per module, and the registry of their names.

| module           | contents                                                             |
|------------------|----------------------------------------------------------------------|
| `base`           | `AbstractSolver` (init, step, output), `AbstractReversibleSolver`    |
| `runge_kutta`    | `ButcherTableau` and the explicit methods EULER, MIDPOINT, HEUN, RK4 |
| `reversible`     | `Reversible` (McCallum & Foster), `ReversibleHeun`, `ALF` (MALI)     |
| `embedded`       | `EmbeddedTableau`: adaptive pairs heun_euler, bosh3, dopri5, tsit5   |
| `controllers`    | `PIDController`: the step-size controller of the embedded pairs      |

`get_solver` turns a name or an object into an `AbstractSolver`; `solver_names` lists the
valid fixed-step names (error messages and config validation use it), `adaptive_solver_names`
the embedded pairs (adaptive step sizes: `odeint(..., rtol=, atol=, max_steps=)`).
"""

from __future__ import annotations

from anode_jax.ode.solvers.base import AbstractReversibleSolver, AbstractSolver
from anode_jax.ode.solvers.controllers import PIDController
from anode_jax.ode.solvers.embedded import (
    BOSH3,
    DOPRI5,
    EMBEDDED_SOLVERS,
    HEUN_EULER,
    TSIT5,
    EmbeddedTableau,
)
from anode_jax.ode.solvers.reversible import (
    ALF,
    ALF_SOLVER,
    REVERSIBLE_HEUN,
    Reversible,
    ReversibleHeun,
    backward_step,
)
from anode_jax.ode.solvers.runge_kutta import (
    EULER,
    HEUN,
    MIDPOINT,
    RK4,
    SOLVERS,
    ButcherTableau,
    make_step,
    rk_stages,
    rk_step,
)

_REVERSIBLE_PREFIX = "reversible:"
REVERSIBLE_SOLVERS = {REVERSIBLE_HEUN.name: REVERSIBLE_HEUN, ALF_SOLVER.name: ALF_SOLVER}


def solver_names() -> list[str]:
    """Every valid solver name (for error messages and config validation)."""
    return (
        sorted(SOLVERS)
        + [_REVERSIBLE_PREFIX + name for name in sorted(SOLVERS)]
        + sorted(REVERSIBLE_SOLVERS)
    )


def adaptive_solver_names() -> list[str]:
    """The names of the embedded pairs (adaptive step sizes)."""
    return list(EMBEDDED_SOLVERS)


def reversible_solver_names() -> list[str]:
    """The names of the algebraically reversible solvers (usable with adjoint="reversible")."""
    return [name for name in solver_names() if get_solver(name).reversible]


def get_solver(solver: str | AbstractSolver) -> AbstractSolver:
    """Returns the solver for a name or passes an `AbstractSolver` through.

    Names: "euler", "midpoint", "heun", "rk4" (explicit Runge–Kutta); "reversible:<base>" for
    McCallum & Foster's reversible wrapper of a base method with the default coupling λ = 0.999
    (e.g. "reversible:rk4"; pass `Reversible(tableau, coupling=λ)` for another λ or tableau);
    "reversible_heun"; "alf" (MALI's asynchronous leapfrog, η = 1; pass `ALF(eta=η)` to damp);
    the embedded pairs "heun_euler", "bosh3", "dopri5", "tsit5" (adaptive step sizes; pass an
    `EmbeddedTableau` for another pair).
    """
    if isinstance(solver, AbstractSolver):
        return solver
    if isinstance(solver, str):
        if solver in SOLVERS:
            return SOLVERS[solver]
        if solver in REVERSIBLE_SOLVERS:
            return REVERSIBLE_SOLVERS[solver]
        if solver in EMBEDDED_SOLVERS:
            return EMBEDDED_SOLVERS[solver]
        if solver.startswith(_REVERSIBLE_PREFIX) and solver[len(_REVERSIBLE_PREFIX) :] in SOLVERS:
            return Reversible(SOLVERS[solver[len(_REVERSIBLE_PREFIX) :]])
        raise ValueError(
            f"Unknown solver {solver!r}; valid names are {solver_names()} (fixed steps) and "
            f"{adaptive_solver_names()} (adaptive), or pass a "
            "ButcherTableau, Reversible(tableau, coupling=λ), ALF(eta=η) or another AbstractSolver."
        )
    raise TypeError(
        f"solver must be a name in {solver_names()} or an AbstractSolver (e.g. a "
        f"ButcherTableau), got {type(solver).__name__}."
    )


__all__ = [
    "ALF",
    "BOSH3",
    "DOPRI5",
    "EMBEDDED_SOLVERS",
    "HEUN_EULER",
    "TSIT5",
    "EmbeddedTableau",
    "PIDController",
    "adaptive_solver_names",
    "EULER",
    "HEUN",
    "MIDPOINT",
    "REVERSIBLE_SOLVERS",
    "RK4",
    "SOLVERS",
    "AbstractReversibleSolver",
    "AbstractSolver",
    "ButcherTableau",
    "Reversible",
    "ReversibleHeun",
    "backward_step",
    "get_solver",
    "make_step",
    "reversible_solver_names",
    "rk_stages",
    "rk_step",
    "solver_names",
]
