"""ODE blocks: residual baseline, ANODE ``ODEBlock`` and ANODEv2 ``CoupledODEBlock``.

All three own a vector-field *definition* ``f(t, z, train)`` (an unbound flax module)
and lift its parameters into an explicit pytree ``θ`` stored under
``params/vector_field``. The solver receives ``θ`` through ``args``, never through a
closure, so the gradient strategy of :func:`anode_jax.odeint` sees every parameter.

Normalization statistics (see ``_norm.py``): in training mode the ODE state is
augmented with an accumulator ``s`` whose derivative is the (stop-gradient) batch
statistics of the current evaluation, ``ds/dt = stats(f(t, z))``, ``s(0) = 0``. Then
``s(1) = ∫₀¹ stats dt`` is their time average under the solver's quadrature weights,
and the block updates ``batch_stats/vector_field`` once per forward call, after the
solve::

    running ← momentum · running + (1 − momentum) · s(1)

so neither the solver stages nor the backward recomputation touch the running
averages. In evaluation mode the running averages enter the solve as (constant) args.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import unfreeze

from anode_jax.ode import odeint

from ._norm import BN_MOMENTUM, STATS_COLLECTION
from ._rda import Q_NAMES, init_q_params, parameter_field

PyTree = Any

_PARAM_NAME = "vector_field"


def _lift_vector_field(
    block: nn.Module, definition: nn.Module, z: jax.Array
) -> tuple[nn.Module, PyTree, Any]:
    """Create/fetch ``θ`` and the running statistics of ``definition`` inside ``block``.

    Returns ``(vf, θ, running)`` where ``vf`` is an unbound copy of the definition that
    can be applied as a pure function, and ``running`` the ``batch_stats`` variable
    (``None`` when the vector field has no batch normalization).
    """
    # The definition is adopted by the block as a child (flax registers module-valued
    # fields); an unbound clone is what makes ``vf.apply`` a pure function of θ.
    vf = definition.clone(parent=None)
    t0 = jnp.zeros((), z.dtype)
    initialized = {}  # one vf.init provides θ₀ and the initial running statistics

    def init_variables():
        if not initialized:
            initialized.update(unfreeze(vf.init(block.make_rng("params"), t0, z, train=False)))
        return initialized

    # `variable("params", ...)` rather than `param(...)`: flax's param() re-traces its
    # initializer at every apply to validate shapes, i.e. a full vf.init per block per call.
    theta = block.variable("params", _PARAM_NAME, lambda: init_variables()["params"]).value
    if block.is_initializing():
        has_stats = "batch_stats" in init_variables()
    else:
        has_stats = block.has_variable("batch_stats", _PARAM_NAME)
    running = None
    if has_stats:
        running = block.variable(
            "batch_stats", _PARAM_NAME, lambda: init_variables()["batch_stats"]
        )
    return vf, theta, running


def _train_field(
    vf: nn.Module,
) -> Callable[[jax.Array, jax.Array, PyTree], tuple[jax.Array, PyTree]]:
    """``(t, z, θ) -> (f(t, z; θ), batch statistics used)`` in training mode."""

    def field(t, z, theta):
        dz, state = vf.apply({"params": theta}, t, z, train=True, mutable=[STATS_COLLECTION])
        return dz, unfreeze(state).get(STATS_COLLECTION, {})

    return field


def _eval_field(vf: nn.Module) -> Callable[[jax.Array, jax.Array, PyTree, PyTree], jax.Array]:
    """``(t, z, θ, running) -> f(t, z; θ)`` using the running averages (eval mode)."""

    def field(t, z, theta, running):
        variables = {"params": theta}
        if running is not None:
            variables["batch_stats"] = running
        return vf.apply(variables, t, z, train=False)

    return field


def _cast_like(tree: PyTree, reference: PyTree) -> PyTree:
    return jax.tree.map(lambda a, r: a.astype(r.dtype), tree, reference)


def _update_running(block: nn.Module, running: Any, averaged: PyTree, momentum: float) -> None:
    """One exponential-moving-average step of the running statistics (not during init)."""
    if block.is_initializing():
        return
    running.value = jax.tree.map(
        lambda r, s: momentum * r + (1.0 - momentum) * s.astype(r.dtype),
        running.value,
        averaged,
    )


def _frozen(running: Any) -> PyTree:
    return None if running is None else jax.lax.stop_gradient(running.value)


class ResidualBlock(nn.Module):
    """Baseline residual block ``z ↦ z + f(0, z; θ)`` (ResNet, He et al. 2016).

    Same vector field, parameter tree and statistics bookkeeping as :class:`ODEBlock`;
    it equals ``ODEBlock(solver="euler", num_steps=1)`` (forward Euler over [0, 1]).
    Input/output ``z``: ``(N, H, W, C)`` (any shape ``f`` preserves).
    """

    vector_field_module: nn.Module
    momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        vf, theta, running = _lift_vector_field(self, self.vector_field_module, z)
        t0 = jnp.zeros((), z.dtype)
        if train:
            dz, stats = _train_field(vf)(t0, z, theta)
            if running is not None:
                _update_running(self, running, stats, self.momentum)
        else:
            dz = _eval_field(vf)(t0, z, theta, _frozen(running))
        return z + dz


class ODEBlock(nn.Module):
    """ANODE block: ``z(1)`` of ``dz/dt = f(t, z; θ)``, ``z(0) = z`` (ANODE Eq. 1).

    Integrated over ``[0, 1]`` with ``num_steps`` fixed steps ``dt = 1/num_steps``
    (paper default ``N_t = 2``) of ``solver`` ("euler" | "midpoint" | "heun" | "rk4" |
    ButcherTableau); gradients by ``adjoint`` ("direct" | "anode" | "backsolve" |
    "checkpointed:K" | object). ``unroll``: the time loop's unrolling, passed to
    :func:`anode_jax.odeint` (None: the core's default). Input/output ``z``: ``(N, H, W, C)``.
    """

    vector_field_module: nn.Module
    num_steps: int = 2
    solver: Any = "euler"
    adjoint: Any = "anode"
    momentum: float = BN_MOMENTUM
    unroll: bool | int | None = None

    def _solve(self, rhs, y0, args):
        return _solve_block(self, rhs, y0, args)

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        vf, theta, running = _lift_vector_field(self, self.vector_field_module, z)
        if train and running is not None:
            field = _train_field(vf)
            s0 = jax.tree.map(jnp.zeros_like, running.value)

            def rhs(t, y, theta):
                dz, stats = field(t, y[0], theta)
                return dz, _cast_like(stats, y[1])

            z1, s1 = self._solve(rhs, (z, s0), theta)
            _update_running(self, running, s1, self.momentum)
            return z1
        if train:  # no batch statistics to track (e.g. GroupNorm)
            field = _train_field(vf)
            return self._solve(lambda t, y, theta: field(t, y, theta)[0], z, theta)
        field = _eval_field(vf)
        return self._solve(
            lambda t, y, args: field(t, y, args[0], args[1]), z, (theta, _frozen(running))
        )


class CoupledODEBlock(nn.Module):
    """ANODEv2 block: ``dz/dt = f(t, z; θ(t))``, ``dθ/dt = q(θ, p)`` (ANODEv2 Eq. 3).

    ``(z, θ)`` is integrated jointly over ``[0, 1]`` by the same solver and gradient
    strategy as :class:`ODEBlock`; trained are ``θ₀`` (``params/vector_field``, same
    tree as ``ODEBlock``) and ``p`` (``params/q``, see ``_rda.py``). ``θ`` is shared by
    the batch, so ``q`` runs once per solver stage. ``q="none"`` keeps ``θ`` constant
    and reproduces :class:`ODEBlock`. ``unroll`` as in :class:`ODEBlock`. Input/output
    ``z``: ``(N, H, W, C)``.
    """

    vector_field_module: nn.Module
    q: str = "rda"
    num_steps: int = 2
    solver: Any = "euler"
    adjoint: Any = "anode"
    momentum: float = BN_MOMENTUM
    unroll: bool | int | None = None

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        if self.q not in Q_NAMES:
            raise ValueError(f"q must be one of {Q_NAMES}, got {self.q!r}")
        vf, theta0, running = _lift_vector_field(self, self.vector_field_module, z)
        q_params = (
            self.param("q", lambda rng: init_q_params(self.q, theta0)) if self.q != "none" else {}
        )
        q = self.q
        track = train and running is not None  # state (z, θ, s) instead of (z, θ)
        field = _train_field(vf) if train else _eval_field(vf)

        def rhs(t, y, args):
            z, theta = y[0], y[1]
            p, frozen = args
            dtheta = parameter_field(q, theta, p)  # once per stage: θ is not batched
            if not train:
                return field(t, z, theta, frozen), dtheta
            dz, stats = field(t, z, theta)
            if not track:
                return dz, dtheta
            return dz, dtheta, _cast_like(stats, y[2])

        y0 = (z, theta0)
        if track:
            y0 = y0 + (jax.tree.map(jnp.zeros_like, running.value),)
        args = (q_params, None if train else _frozen(running))
        y1 = _solve_block(self, rhs, y0, args)
        if track:
            _update_running(self, running, y1[2], self.momentum)
        return y1[0]


def _solve_block(block, rhs, y0, args):
    """y(1) of the block's ODE over [0, 1] with its num_steps, solver, adjoint and unroll."""
    return odeint(
        rhs,
        y0,
        args,
        t0=0.0,
        t1=1.0,
        num_steps=block.num_steps,
        solver=block.solver,
        adjoint=block.adjoint,
        unroll=block.unroll,
    )
