"""The gradient-strategy interface and what every strategy shares.

All strategies compute y(t1) identically in the forward pass; they differ in what the forward
stores and how the backward pass obtains the vector-Jacobian product. Strategies see the
*solver state* (y itself for Runge–Kutta methods; y with an auxiliary state for the reversible
solvers): `odeint` calls `solver.init` before and `solver.output` after `solve`.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp

from anode_jax._typing import Array, PyTree, StepFn, VectorField
from anode_jax.ode import _loop
from anode_jax.ode.solvers import AbstractSolver, make_step


@dataclasses.dataclass(frozen=True)
class SolveSpec:
    """Static description of one fixed-step solve (hashable, no arrays).

    `unroll` is the resolved loop policy: True unrolls the Nt steps in Python, False runs them
    in `lax.scan` / `fori_loop` (program size and compile time independent of Nt).
    """

    solver: AbstractSolver
    t0: float
    t1: float
    num_steps: int
    unroll: bool

    @property
    def dt(self) -> float:
        return (self.t1 - self.t0) / self.num_steps

    def time(self, n) -> Array:
        """t_n = t0 + n dt for a Python or traced integer step index n."""
        tdtype = _loop.time_dtype()
        return jnp.asarray(self.t0, tdtype) + jnp.asarray(n, tdtype) * jnp.asarray(self.dt, tdtype)

    def step_fn(self, vector_field: VectorField) -> StepFn:
        return make_step(self.solver, vector_field, self.dt)


class AbstractAdjoint(abc.ABC):
    """Interface of a gradient strategy.

    `solve(vector_field, state0, args, spec)` returns the solver state at t1. `vector_field`
    closes over no traced values when `needs_closure_conversion` is True (odeint guarantees
    it), so strategies may wrap it in custom_vjp freely.
    """

    name: str = "abstract"
    # Whether odeint must closure-convert the vector field before calling `solve`.
    needs_closure_conversion: bool = True
    # Whether the backward pass of a fixed-step solve needs only the solve's input and args
    # (no state from its forward pass): a solve at many output times then keeps only a few
    # interval inputs and recomputes the others, each being the previous output (`_times`).
    backward_needs_input_only: bool = False

    @abc.abstractmethod
    def solve(
        self, vector_field: VectorField, state0: PyTree, args: PyTree, spec: SolveSpec
    ) -> PyTree: ...

    def check_solver(self, solver: AbstractSolver) -> None:
        """Raises a clear error if this strategy cannot differentiate `solver`."""
        del solver

    def solve_adaptive(self, vector_field: VectorField, y0: PyTree, args: PyTree, spec):
        """(y at t1, `adaptive.Record`) of an adaptive solve (`spec` an `AdaptiveSpec`).
        Strategies without an adaptive form raise a ValueError naming the ones that have it."""
        del vector_field, y0, args, spec
        raise ValueError(
            f"adjoint={self.name!r} is not available with adaptive step sizes (embedded "
            "solvers); use 'direct', 'anode', 'checkpointed:K' or 'backsolve'."
        )


def forward(vector_field: VectorField, state0, args, spec: SolveSpec, *, unroll=None, step=None):
    """The solver state at t1: Nt steps from state0, unrolled or looped as `spec` says (or as
    `unroll` overrides); `step` replaces the solver's step function (e.g. a rematerialized
    one)."""
    return _loop.integrate(
        spec.step_fn(vector_field) if step is None else step,
        state0,
        args,
        t0=spec.t0,
        dt=spec.dt,
        first=0,
        last=spec.num_steps,
        unroll=spec.unroll if unroll is None else unroll,
    )


def tree_add(a, b):
    """a + b leafwise; float0 (integer-leaf) cotangents pass through."""
    return jax.tree.map(lambda x, y: y if x.dtype == jax.dtypes.float0 else x + y, a, b)
