"""Solver names: `get_solver` turns a name or object into an `AbstractSolver`."""

from __future__ import annotations

from anode_jax.ode._solvers import SOLVERS, AbstractSolver


def solver_names() -> list[str]:
    """Every valid solver name (for error messages and config validation)."""
    return sorted(SOLVERS)


def get_solver(solver: str | AbstractSolver) -> AbstractSolver:
    """Returns the solver for a name ("euler", "midpoint", "heun", "rk4") or passes an
    `AbstractSolver` (e.g. a `ButcherTableau`) through."""
    if isinstance(solver, AbstractSolver):
        return solver
    if isinstance(solver, str):
        if solver in SOLVERS:
            return SOLVERS[solver]
        raise ValueError(
            f"Unknown solver {solver!r}; valid names are {solver_names()}, or pass a "
            "ButcherTableau or another AbstractSolver."
        )
    raise TypeError(
        f"solver must be a name in {solver_names()} or an AbstractSolver (e.g. a "
        f"ButcherTableau), got {type(solver).__name__}."
    )
