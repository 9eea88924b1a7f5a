"""ODE blocks: residual baseline, ANODE `ODEBlock` and ANODEv2 `CoupledODEBlock`.

All three own a vector-field *definition* `f(t, z, train)` (an unbound flax module)
and lift its parameters into an explicit pytree `θ` stored under
`params/vector_field`. The solver receives `θ` through `args`, never through a
closure, so the gradient strategy of `anode_jax.odeint` sees every parameter.

Normalization statistics (see `_norm.py`) are kept **per evaluation time**. The solve
evaluates `f` at the knots `τ_1 < … < τ_K` of `anode_jax.ode.stage_times` (Euler,
`N_t = 2`: `0, ½`), and the statistics of `f(τ, z(τ))` change with `τ`, so one
running average for all of them would normalize every stage in evaluation with statistics
of none. In training mode the ODE state is augmented with accumulators `S` (`K` rows
per statistic) and `W` (`K`)::

    dS/dt = φ(t) ⊗ stats(f(t, z)),   dW/dt = φ(t),   S(0) = W(0) = 0,

with `φ` the hat basis over the knots (one-hot at a knot). Then `S_k(1) / W_k(1)` is
the quadrature-weighted mean of the statistics of the evaluations at `τ_k` (one evaluation
for Euler; RK4's two stages at `t_n + h/2`), and the block updates
`batch_stats/vector_field` (leaves `(K, C)`) once per forward call, after the solve::

    running_k ← momentum · running_k + (1 − momentum) · S_k(1) / W_k(1)

so neither the solver stages nor the backward recomputation touch the running averages. In
evaluation mode the running averages enter the solve as (constant) args, and the stage at
time `t` is normalized with `Σ_k φ_k(t) running_k` (exact at the knots; linear between
them, for a solve with other steps than in training). Stages of zero quadrature weight
(midpoint's first) are never observed and use the nearest knot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from anode_jax.ode import knot_weights, odeint, stage_times

from ._norm import BN_MOMENTUM, STATS_COLLECTION
from ._rda import Q_NAMES, init_q_params, parameter_field

PyTree = Any

_PARAM_NAME = "vector_field"
_TIMES_NAME = "stat_times"


def _lift_vector_field(
    block: nn.Module, definition: nn.Module, z: jax.Array, knots: np.ndarray
) -> tuple[nn.Module, PyTree, Any]:
    """Create/fetch `θ` and the running statistics of `definition` inside `block`.

    Returns `(vf, θ, running)` where `vf` is an unbound copy of the definition that
    can be applied as a pure function, and `running` the block's `_RunningStats`
    (`None` when the vector field has no batch normalization).
    """
    # The definition is adopted by the block as a child (flax registers module-valued
    # fields); an unbound clone is what makes `vf.apply` a pure function of θ.
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
        rows = block.variable(
            "batch_stats",
            _PARAM_NAME,
            lambda: jax.tree.map(
                lambda a: jnp.tile(a[None], (len(knots),) + (1,) * a.ndim),
                init_variables()["batch_stats"],
            ),
        )
        times = block.variable("batch_stats", _TIMES_NAME, lambda: jnp.asarray(knots, jnp.float32))
        running = _RunningStats(block, rows, times)
    return vf, theta, running


class _RunningStats:
    """A block's running statistics per evaluation time.

    `rows`: `batch_stats/<block>/vector_field` (the vector field's BatchNorm statistics,
    leaves `(K, C)`); `times`: `batch_stats/<block>/stat_times` (`(K,)`), the times the
    rows were recorded at (the knots of the training solve). Evaluation interpolates the rows
    at the stage time, so a solve with other steps or another solver than in training reads
    consistent statistics; a training step with other knots first resamples the rows onto
    its own knots.
    """

    def __init__(self, block: nn.Module, rows: Any, times: Any):
        self.block, self.rows, self.times = block, rows, times

    def frozen(self) -> tuple[jax.Array, PyTree]:
        """`(times, rows)` as constants of the solve (eval mode)."""
        return jax.lax.stop_gradient((self.times.value, self.rows.value))

    def accumulators(self, knots: np.ndarray) -> tuple[PyTree, jax.Array]:
        """`(S(0), W(0)) = (0, 0)`: per-knot zeros like one row of the statistics, and `(K,)`."""
        dtype = jax.tree.leaves(self.rows.value)[0].dtype
        zeros = jax.tree.map(
            lambda a: jnp.zeros((len(knots),) + a.shape[1:], a.dtype), self.rows.value
        )
        return zeros, jnp.zeros((len(knots),), dtype)

    def update(self, knots: np.ndarray, averaged: PyTree, momentum: float) -> None:
        """One EMA step per knot, `running_k ← m·running_k + (1 − m)·averaged_k` (not
        during init), after resampling the stored rows onto `knots` (exact when the stored
        times are the knots: the resampling matrix is then the identity)."""
        if self.block.is_initializing():
            return
        times = jax.lax.stop_gradient(self.times.value)
        resample = jnp.stack([knot_weights(times, tau) for tau in np.asarray(knots, np.float32)])
        self.rows.value = jax.tree.map(
            lambda r, s: (
                momentum * jnp.tensordot(resample.astype(r.dtype), r, axes=1)
                + (1.0 - momentum) * s.astype(r.dtype)
            ),
            self.rows.value,
            averaged,
        )
        self.times.value = jnp.asarray(knots, jnp.float32)


def _train_field(
    vf: nn.Module,
) -> Callable[[jax.Array, jax.Array, PyTree], tuple[jax.Array, PyTree]]:
    """`(t, z, θ) -> (f(t, z; θ), batch statistics used)` in training mode."""

    def field(t, z, theta):
        dz, state = vf.apply({"params": theta}, t, z, train=True, mutable=[STATS_COLLECTION])
        return dz, unfreeze(state).get(STATS_COLLECTION, {})

    return field


def _eval_field(vf: nn.Module) -> Callable[[jax.Array, jax.Array, PyTree, PyTree], jax.Array]:
    """`(t, z, θ, frozen) -> f(t, z; θ)` in eval mode; `frozen = (times, rows)` (or
    `None`): the vector field normalizes with `Σ_k φ_k(t) rows_k`, the running statistics
    interpolated at `t` (leaves `(K, C)` → `(C,)`)."""

    def field(t, z, theta, frozen):
        variables = {"params": theta}
        if frozen is not None:
            times, rows = frozen
            phi = knot_weights(times, t)
            variables["batch_stats"] = jax.tree.map(
                lambda r: jnp.tensordot(phi.astype(r.dtype), r, axes=1), rows
            )
        return vf.apply(variables, t, z, train=False)

    return field


def _stats_derivative(knots: np.ndarray, t: jax.Array, stats: PyTree, acc: PyTree) -> PyTree:
    """`(dS/dt, dW/dt) = (φ(t) ⊗ stats, φ(t))`, cast to the accumulators' dtypes."""
    s_like, w_like = acc
    phi = knot_weights(knots, t)

    def row(st, like):
        return (phi.reshape(phi.shape + (1,) * st.ndim) * st[None]).astype(like.dtype)

    return jax.tree.map(row, stats, s_like), phi.astype(w_like.dtype)


def _per_knot_mean(acc: PyTree) -> PyTree:
    """`S_k / W_k`: the weighted mean of the statistics at each knot."""
    s, w = acc
    return jax.tree.map(lambda a: a / w.reshape(w.shape + (1,) * (a.ndim - 1)), s)


def _frozen(running: _RunningStats | None) -> PyTree:
    return None if running is None else running.frozen()


# The residual block is one Euler step over [0, 1]: a single evaluation, at t = 0.
_RESIDUAL_KNOTS = np.zeros(1)


def _block_knots(block: nn.Module) -> np.ndarray:
    return stage_times(block.solver, block.num_steps)[0]


class ResidualBlock(nn.Module):
    """Baseline residual block `z ↦ z + f(0, z; θ)` (ResNet, He et al. 2016).

    Same vector field, parameter tree and statistics bookkeeping as `ODEBlock`;
    it equals `ODEBlock(solver="euler", num_steps=1)` (forward Euler over [0, 1]).
    Input/output `z`: `(N, H, W, C)` (any shape `f` preserves).
    """

    vector_field_module: nn.Module
    momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        knots = _RESIDUAL_KNOTS
        vf, theta, running = _lift_vector_field(self, self.vector_field_module, z, knots)
        t0 = jnp.zeros((), z.dtype)
        if train:
            dz, stats = _train_field(vf)(t0, z, theta)
            if running is not None:
                running.update(knots, jax.tree.map(lambda a: a[None], stats), self.momentum)
        else:
            dz = _eval_field(vf)(t0, z, theta, _frozen(running))
        return z + dz


class ODEBlock(nn.Module):
    """ANODE block: `z(1)` of `dz/dt = f(t, z; θ)`, `z(0) = z` (ANODE Eq. 1).

    Integrated over `[0, 1]` with `num_steps` fixed steps `dt = 1/num_steps`
    (paper default `N_t = 2`) of `solver` ("euler" | "midpoint" | "heun" | "rk4" |
    ButcherTableau); gradients by `adjoint` ("direct" | "anode" | "backsolve" |
    "checkpointed:K" | object). `unroll`: the time loop's unrolling, passed to
    `anode_jax.odeint` (None: the core's default). Input/output `z`: `(N, H, W, C)`.
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
        knots = _block_knots(self)
        vf, theta, running = _lift_vector_field(self, self.vector_field_module, z, knots)
        if train and running is not None:
            field = _train_field(vf)

            def rhs(t, y, theta):
                dz, stats = field(t, y[0], theta)
                return dz, _stats_derivative(knots, t, stats, y[1])

            z1, acc = self._solve(rhs, (z, running.accumulators(knots)), theta)
            running.update(knots, _per_knot_mean(acc), self.momentum)
            return z1
        if train:  # no batch statistics to track (e.g. GroupNorm)
            field = _train_field(vf)
            return self._solve(lambda t, y, theta: field(t, y, theta)[0], z, theta)
        field = _eval_field(vf)
        return self._solve(
            lambda t, y, args: field(t, y, args[0], args[1]), z, (theta, _frozen(running))
        )


class CoupledODEBlock(nn.Module):
    """ANODEv2 block: `dz/dt = f(t, z; θ(t))`, `dθ/dt = q(θ, p)` (ANODEv2 Eq. 3).

    `(z, θ)` is integrated jointly over `[0, 1]` by the same solver and gradient
    strategy as `ODEBlock`; trained are `θ₀` (`params/vector_field`, same
    tree as `ODEBlock`) and `p` (`params/q`, see `_rda.py`). `θ` is shared by
    the batch, so `q` runs once per solver stage. `q="none"` keeps `θ` constant
    and reproduces `ODEBlock`. `unroll` as in `ODEBlock`. Input/output
    `z`: `(N, H, W, C)`.
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
        knots = _block_knots(self)
        vf, theta0, running = _lift_vector_field(self, self.vector_field_module, z, knots)
        q_params = (
            self.param("q", lambda rng: init_q_params(self.q, theta0)) if self.q != "none" else {}
        )
        q = self.q
        track = train and running is not None  # state (z, θ, (S, W)) instead of (z, θ)
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
            return dz, dtheta, _stats_derivative(knots, t, stats, y[2])

        y0 = (z, theta0)
        if track:
            y0 = y0 + (running.accumulators(knots),)
        args = (q_params, None if train else _frozen(running))
        y1 = _solve_block(self, rhs, y0, args)
        if track:
            running.update(knots, _per_knot_mean(y1[2]), self.momentum)
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
