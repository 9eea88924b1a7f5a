"""Backsolve: the Neural ODE adjoint, integrated backwards in time. Approximate."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from anode_jax.ode import _loop, adaptive
from anode_jax.ode.adjoints.base import AbstractAdjoint, SolveSpec, forward


def _split_inexact(tree):
    """(inexact leaves, rebuild(inexact_leaves) -> cotangent tree with float0 elsewhere)."""
    leaves, treedef = jax.tree.flatten(tree)
    mask = [jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact) for x in leaves]
    inexact = [x for x, m in zip(leaves, mask) if m]

    def rebuild_cotangent(ct_inexact):
        it = iter(ct_inexact)
        return jax.tree.unflatten(
            treedef,
            [next(it) if m else _loop.zeros_like_cotangent(x) for x, m in zip(leaves, mask)],
        )

    def rebuild_primal(new_inexact):
        it = iter(new_inexact)
        return jax.tree.unflatten(treedef, [next(it) if m else x for x, m in zip(leaves, mask)])

    return inexact, rebuild_primal, rebuild_cotangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _backsolve_solve(vector_field, y0, args, spec):
    return forward(vector_field, y0, args, spec, unroll=False)


def _backsolve_fwd(vector_field, y0, args, spec):
    y1 = forward(vector_field, y0, args, spec, unroll=False)
    return y1, (y1, args)


def _backsolve_bwd(vector_field, spec, residuals, ct_y1):
    # The reverse-time reconstruction of y does not depend on the cotangent; without the barrier
    # XLA may hoist every block's reconstruction into the forward pass and keep it alive.
    y1, args, ct_y1 = _loop.tree_barrier(*residuals, ct_y1)
    args_inexact, rebuild_args, rebuild_ct = _split_inexact(args)
    g1 = [jnp.zeros_like(p) for p in args_inexact]
    back = SolveSpec(spec.solver, spec.t1, spec.t0, spec.num_steps, spec.unroll)
    adjoint_field = _adjoint_field(vector_field, rebuild_args)
    _, a0, g0 = forward(adjoint_field, (y1, ct_y1, g1), args_inexact, back)
    return a0, rebuild_ct(g0)


_backsolve_solve.defvjp(_backsolve_fwd, _backsolve_bwd)


def _adjoint_field(vector_field, rebuild_args):
    def field(t, state, args_inexact):
        # Augmented system of Chen et al. (2018), Eq. 4-5 and Alg. 1:
        #   dy/dt = f(t, y),  da/dt = -aᵀ ∂f/∂y,  dg/dt = -aᵀ ∂f/∂θ.
        y, a, _ = state
        fy, vjp = jax.vjp(lambda y_, p_: vector_field(t, y_, rebuild_args(p_)), y, args_inexact)
        a_y, a_p = vjp(a)
        neg = lambda tree: jax.tree.map(jnp.negative, tree)
        return fy, neg(a_y), neg(a_p)

    return field


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _backsolve_adaptive(vector_field, y0, args, spec):
    return adaptive.forward_record(vector_field, y0, args, spec)


def _backsolve_adaptive_fwd(vector_field, y0, args, spec):
    y1, record = adaptive.forward_record(vector_field, y0, args, spec)
    return (y1, record), (y1, args)


def _backsolve_adaptive_bwd(vector_field, spec, residuals, cts):
    y1, args, ct_y1 = _loop.tree_barrier(*residuals, cts[0])
    args_inexact, rebuild_args, rebuild_ct = _split_inexact(args)
    g1 = [jnp.zeros_like(p) for p in args_inexact]
    # The adjoint system is solved adaptively from t1 back to t0 with the forward's
    # controller (tolerances over the whole augmented state, as torchdiffeq's default norm).
    field = _adjoint_field(vector_field, rebuild_args)
    (_, a0, g0), _ = adaptive.forward_record(field, (y1, ct_y1, g1), args_inexact, spec.reversed())
    return a0, rebuild_ct(g0)


_backsolve_adaptive.defvjp(_backsolve_adaptive_fwd, _backsolve_adaptive_bwd)


@dataclasses.dataclass(frozen=True)
class Backsolve(AbstractAdjoint):
    """The Neural ODE adjoint (Chen et al. 2018, arXiv:1806.07366, Alg. 1). Approximate.

    Stores only y(t1) and integrates the augmented system [y, a, a_θ] from t1 back to t0 with
    the same solver and step count. The reconstructed trajectory is not the forward trajectory
    (the reverse solve of a ReLU/conv network is unstable and not the inverse of the discrete
    forward map), so the gradient is NOT the gradient of the computed forward pass; it converges
    to it only as Nt → ∞ on smooth, well-conditioned problems. Kept as the baseline the ANODE
    papers compare against; do not use it when you need correct gradients.

    Adaptive solves: the forward keeps y(t1); the backward integrates the augmented system
    from t1 to t0 with the same embedded pair and controller (its own accepted steps, not the
    forward's; torchdiffeq's `odeint_adjoint`). Inexact: the error is of the tolerances' size.
    """

    name = "backsolve"

    def solve_adaptive(self, vector_field, y0, args, spec):
        return _backsolve_adaptive(vector_field, y0, args, spec)

    def check_solver(self, solver):
        if not hasattr(solver, "num_stages"):  # Runge–Kutta tableaux only
            raise ValueError(
                f"adjoint='backsolve' integrates the adjoint ODE with a Runge–Kutta method and "
                f"cannot use solver {solver.name!r}; choose 'euler', 'midpoint', 'heun', 'rk4' "
                "or a ButcherTableau (or adjoint='reversible' for an exact O(1)-memory gradient)."
            )

    def solve(self, vector_field, state0, args, spec):
        return _backsolve_solve(vector_field, state0, args, spec)
