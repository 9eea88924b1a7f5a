"""Reversible: store the block output, reconstruct every step input by the solver's inverse."""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax

from anode_jax.ode import _loop
from anode_jax.ode.adjoints.base import AbstractAdjoint, SolveSpec, forward, tree_add
from anode_jax.ode.solvers import backward_step, reversible_solver_names


def _reverse_unrolled(solver, vector_field, spec: SolveSpec, args, state, ct, ct_args):
    for n in range(spec.num_steps - 1, -1, -1):
        state, ct, ct_a = backward_step(
            solver, vector_field, spec.time(n), spec.dt, state, ct, args
        )
        ct_args = tree_add(ct_args, ct_a)
    return state, ct, ct_args


def _reverse_looped(solver, vector_field, spec: SolveSpec, args, state, ct, ct_args):
    def body(i, carry):
        state, ct, ct_args = carry
        n = spec.num_steps - 1 - i
        state, ct, ct_a = backward_step(
            solver, vector_field, spec.time(n), spec.dt, state, ct, args
        )
        return state, ct, tree_add(ct_args, ct_a)

    return lax.fori_loop(0, spec.num_steps, body, (state, ct, ct_args))


def reverse_steps(vector_field, spec: SolveSpec, args, state, ct, ct_args):
    """(state at t0, its cotangent, ct_args + the args cotangent) from the state at t1 and its
    cotangent: the solve's steps undone one by one by `solver.backward_step`, looped or
    unrolled as `spec` says."""
    reverse = _reverse_unrolled if spec.unroll else _reverse_looped
    return reverse(spec.solver, vector_field, spec, args, state, ct, ct_args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _reversible_solve(vector_field, state0, args, spec):
    return forward(vector_field, state0, args, spec, unroll=False)


def _reversible_fwd(vector_field, state0, args, spec):
    state1 = forward(vector_field, state0, args, spec, unroll=False)
    return state1, (state1, args)


def _reversible_bwd(vector_field, spec, residuals, ct_state1):
    state1, args = residuals
    ct_args = jax.tree.map(_loop.zeros_like_cotangent, args)
    # Ties the reconstruction to the cotangent so XLA cannot hoist it into the forward pass.
    state1, ct, ct_args = _loop.tree_barrier(state1, ct_state1, ct_args)
    _, ct, ct_args = reverse_steps(vector_field, spec, args, state1, ct, ct_args)
    return ct, ct_args


_reversible_solve.defvjp(_reversible_fwd, _reversible_bwd)


@dataclasses.dataclass(frozen=True)
class ReversibleAdjoint(AbstractAdjoint):
    """Exact gradients in O(1) memory through an algebraically reversible solver.

    The forward pass keeps only the block's final solver state (y and the solver's auxiliary
    variables) and the parameters. The backward pass walks the steps n = Nt-1, ..., 0: the
    solver's `backward_step` reconstructs the state at t_n from the state at t_{n+1} by the
    algebraic inverse of the step and backpropagates the cotangent through that step
    (McCallum & Foster 2024, arXiv:2410.11648, Sec. 3; MALI, Zhuang et al. 2021, Sec. 3;
    Kidger et al. 2021, Sec. 3). The gradient is that of the discrete forward pass, exact up to
    the round-off of the reconstruction (see docs/core.md for float32 figures).

    Memory: the final state plus one step's internals, independent of Nt. Compute: the forward,
    then per step one inverse plus one step VJP (the solvers share the vector-field evaluations
    between the two). Looped (`lax.fori_loop`) or unrolled by the loop policy.

    Needs a reversible solver: "reversible:<base>" (e.g. "reversible:rk4"),
    "reversible_heun", "alf", or an `AbstractReversibleSolver`.
    """

    name = "reversible"

    def check_solver(self, solver):
        if not getattr(solver, "reversible", False):
            raise ValueError(
                f'adjoint="reversible" needs an algebraically reversible solver, got '
                f"{getattr(solver, 'name', type(solver).__name__)!r}; use one of "
                f"{reversible_solver_names()}, Reversible(tableau, coupling=λ), ALF(eta=η), or "
                'another adjoint ("anode", "checkpointed:K", "direct") for this solver.'
            )

    def solve(self, vector_field, state0, args, spec):
        return _reversible_solve(vector_field, state0, args, spec)
