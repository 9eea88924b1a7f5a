"""The solver interface: a fixed-step one-step method over a *solver state*.

`init` builds the state from y0, `step` advances it by dt, `output` reads y from it. For
Runge–Kutta methods (`runge_kutta.py`) the state is y itself; the reversible solvers
(`reversible.py`) carry an auxiliary state and add `inverse_step`. Gradient strategies
(`anode_jax.ode.adjoints`) see only this interface.
"""

from __future__ import annotations

import abc

from anode_jax._typing import Array, PyTree, VectorField


class AbstractSolver(abc.ABC):
    """A fixed-step one-step method over a solver state (a pytree of floating arrays).

    Subclasses implement `step`; `init` and `output` default to the identity (state = y).
    Every method is a pure function of its arguments: parameters arrive through `args`.
    """

    name: str  # a short name for error messages and tables
    order: int  # the classical order of accuracy
    # True for solvers whose step can be inverted algebraically (`AbstractReversibleSolver`).
    reversible = False

    def init(self, vector_field: VectorField, t0: Array, y0: PyTree, args: PyTree) -> PyTree:
        """The solver state at t0 for the initial value y0."""
        del vector_field, t0, args
        return y0

    @abc.abstractmethod
    def step(
        self, vector_field: VectorField, t: Array, dt: float, state: PyTree, args: PyTree
    ) -> PyTree:
        """The solver state at t + dt from the state at t."""

    def output(self, state: PyTree) -> PyTree:
        """y read off a solver state."""
        return state

    def rescale_time(self, state: PyTree, ratio: Array) -> PyTree:
        """The solver state after the time variable is stretched by `ratio`.

        Parts of the state that are derivatives with respect to time (a cached f, a velocity)
        are multiplied by `ratio`; values of y are unchanged. A solve at many output times
        integrates each interval [a, b] in its own normalised time s = (t - a)/(b - a), whose
        rates are (b - a) times those in t, and carries the state from one interval to the next
        with ratio = (b' - a')/(b - a) (`anode_jax.ode._times`). Default: the state holds no
        rates (Runge–Kutta: the state is y).
        """
        del ratio
        return state


class AbstractReversibleSolver(AbstractSolver):
    """A solver whose step the backward pass inverts exactly (up to round-off)."""

    reversible = True

    @abc.abstractmethod
    def inverse_step(
        self, vector_field: VectorField, t: Array, dt: float, state_next: PyTree, args: PyTree
    ) -> PyTree:
        """The state at t reconstructed from the state at t + dt (`step`'s algebraic inverse)."""
