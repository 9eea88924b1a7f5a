"""NNX ODE blocks: ANODE `ODEBlock` and ANODEv2 `CoupledODEBlock` around any `nnx.Module` field.

The vector field is an `nnx.Module` called as `field(t, y) -> dy/dt`. A solve needs it as a
*pure* function of explicit pytrees (the gradient strategies of `anode_jax.ode.odeint` recompute,
reverse or checkpoint the forward pass, so nothing may be captured by closure or mutated in
place), so each block splits the field once per call, `nnx.split(field, nnx.Param,
nnx.BatchStat, ...) -> (graphdef, params, stats, rest)`, hands the states to `odeint` through
`args`, and `nnx.merge`s a fresh copy inside every evaluation. Mutations that copy makes (a
BatchNorm's running averages, an RNG stream's counter) stay inside the evaluation; the block
applies their effect once per forward call, outside the solver:

* **BatchNorm** (`nnx.BatchNorm` in the field) keeps running statistics *per evaluation time*,
  with the semantics of the Linen blocks (`anode_jax.models`, see `_blocks.py` there): in
  training (`use_running_average=False`, e.g. after `model.train()`) the ODE state is augmented
  with the accumulators `S` and `W` of the batch statistics at the knots `τ_k` of
  `anode_jax.ode.stage_times` (`dS/dt = φ(t) ⊗ stats(t)`, `dW/dt = φ(t)`, with `φ` the hat basis
  `anode_jax.ode.knot_weights`), and after the solve the block sets
  `running_k ← momentum · running_k + (1 − momentum) · S_k(1) / W_k(1)` (leaves `(K, C)`, in
  `block.stats`, with their times in `block.stat_times`). Inside the evaluation each BatchNorm
  runs with momentum 0, so the "running average" it writes is exactly the batch statistic it
  normalized with. In evaluation (`use_running_average=True`, `model.eval()`) the stage at
  time `t` is normalized with `Σ_k φ_k(t) running_k`. The field's own `mean`/`var` variables
  are not used by the block.
* **RNG streams** (`nnx.Dropout` and anything drawing from `nnx.Rngs` in the field): inside the
  solve every key is `fold_in(key, bits(t))`, so a stage's randomness is a pure function of the
  stream's state and the time — the backward recomputation of ANODE, a checkpointed solve and
  the reverse solve of backsolve draw the same masks as the forward pass — and each stream
  advances once per forward call (as one draw would).

Everything else in the field (parameters of any shape, other variables) is read-only inside
the solve. Gradients reach every `nnx.Param` of the field through `args` (`ODEBlock`) or the
initial weights `θ(0)` of the coupled state (`CoupledODEBlock`), under every strategy, looped
or unrolled, and under `nnx.jit`/`nnx.grad`/`nnx.value_and_grad`/`nnx.Optimizer`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anode_jax.models import Q_NAMES, init_q_params, parameter_field
from anode_jax.ode import knot_weights, odeint, stage_times

PyTree = Any

#: Running-average momentum of the per-time statistics (as the Linen blocks: PyTorch's 0.1).
BN_MOMENTUM = 0.9


def _path_key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _batch_norms(field: nnx.Module) -> list[tuple[tuple, nnx.BatchNorm]]:
    """The `nnx.BatchNorm` modules of `field` with their paths; raises for other BatchStats."""
    norms, stat_owners = [], set()
    for path, node in nnx.iter_graph(field):
        if isinstance(node, nnx.BatchNorm):
            norms.append((tuple(path), node))
        elif isinstance(node, nnx.BatchStat):
            stat_owners.add(tuple(path[:-1]))
    known = {p for p, _ in norms}
    foreign = sorted(_path_key(p) for p in stat_owners - known)
    if foreign:
        raise NotImplementedError(
            f"the vector field holds nnx.BatchStat variables outside nnx.BatchNorm (at {foreign}); "
            "an ODE block keeps per-time statistics only for nnx.BatchNorm layers."
        )
    return norms


def _norm_mode(norms: list[tuple[tuple, nnx.BatchNorm]]) -> str | None:
    """ "train" / "eval" from the BatchNorms' `use_running_average`; None without BatchNorm."""
    if not norms:
        return None
    flags = {bool(bn.use_running_average) for _, bn in norms if bn.use_running_average is not None}
    unset = [_path_key(p) for p, bn in norms if bn.use_running_average is None]
    if unset or len(flags) != 1:
        raise ValueError(
            "every nnx.BatchNorm in the vector field must have use_running_average set, all to "
            f"the same value (False: training, True: evaluation; model.train() / model.eval() "
            f"set them); unset at {unset}, values {sorted(flags)}."
        )
    return "eval" if flags.pop() else "train"


def _from_pure(template: nnx.State, pure: PyTree) -> nnx.State:
    """A State shaped like `template` with the leaves of the pure dict `pure` (same key order)."""
    return jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(pure))


def _is_key(a) -> bool:
    return jnp.issubdtype(getattr(a, "dtype", None), jax.dtypes.prng_key)


def _time_bits(t: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.asarray(t).astype(jnp.float32), jnp.uint32)


class _PureField:
    """`field(t, z)` as a function of explicit states, merged afresh at every evaluation.

    Calls return `(dz, stats)`: `stats` is the flat dict `{path: batch statistic}` of the
    evaluation in training mode (stop-gradient), else None.
    """

    def __init__(self, graphdef, params_like, stats_like, mode):
        self.graphdef, self.params_like, self.stats_like, self.mode = (
            graphdef,
            params_like,
            stats_like,
            mode,
        )

    def __call__(self, t, z, params, stats, rest):
        # Fresh Variables of the current trace (the solver's loop body may close over the
        # states), with every RNG key folded with the time: a stage's randomness is a pure
        # function of the stream's state and t.
        bits = _time_bits(t)
        params, stats = jax.tree.map(lambda a: a, (params, stats))
        rest = jax.tree.map(lambda a: jax.random.fold_in(a, bits) if _is_key(a) else a, rest)
        field = nnx.merge(self.graphdef, params, stats, rest)
        if self.mode == "train":
            for _, node in nnx.iter_graph(field):
                if isinstance(node, nnx.BatchNorm):
                    node.momentum = 0.0  # its "running average" becomes the batch statistic
        dz = field(t, z)
        if self.mode != "train":
            return dz, None
        written = {
            _path_key(path): jax.lax.stop_gradient(node[...])
            for path, node in nnx.iter_graph(field)
            if isinstance(node, nnx.BatchStat)
        }
        return dz, written


class _Solve:
    """Shared machinery of the two blocks: field split, statistics bookkeeping, the solve."""

    field: nnx.Module

    def _setup(self, field, num_steps, solver, adjoint, momentum, unroll):
        if not isinstance(field, nnx.Module):
            raise TypeError(
                f"field must be an nnx.Module called as field(t, y), got {type(field).__name__}."
            )
        self.field = field
        self.num_steps = num_steps
        self.solver = solver
        self.adjoint = adjoint
        self.momentum = float(momentum)
        self.unroll = unroll
        knots = self._knots()
        norms = _batch_norms(field)
        if norms:
            rows = {
                _path_key(path): jnp.tile(node[...][None], (len(knots),) + (1,) * node[...].ndim)
                for path, node in nnx.iter_graph(field)
                if isinstance(node, nnx.BatchStat)
            }
            self.stats = nnx.BatchStat(rows)
            self.stat_times = nnx.BatchStat(jnp.asarray(knots, jnp.float32))
        else:
            self.stats = nnx.data(None)
            self.stat_times = nnx.data(None)

    def _knots(self) -> np.ndarray:
        return stage_times(self.solver, self.num_steps)[0]

    def _split(self):
        norms = _batch_norms(self.field)
        mode = _norm_mode(norms)
        graphdef, params, stats, rest = nnx.split(self.field, nnx.Param, nnx.BatchStat, ...)
        return _PureField(graphdef, params, stats, mode), params, stats, rest

    def _frozen(self):
        """`(times, rows)` as constants of an evaluation-mode solve."""
        return jax.lax.stop_gradient((self.stat_times[...], self.stats.get_value()))

    @staticmethod
    def _interpolated(pure: _PureField, frozen, t):
        times, rows = frozen
        phi = knot_weights(times, t)
        at_t = {k: jnp.tensordot(phi.astype(r.dtype), r, axes=1) for k, r in rows.items()}
        flat = [at_t[_path_key(path)] for path, _ in nnx.to_flat_state(pure.stats_like)]
        return jax.tree.unflatten(jax.tree.structure(pure.stats_like), flat)

    def _accumulators(self, knots):
        """`(S(0), W(0)) = (0, 0)`: per-knot zeros like the rows, and `(K,)`."""
        rows = self.stats.get_value()
        dtype = jax.tree.leaves(rows)[0].dtype
        s = {k: jnp.zeros((len(knots),) + r.shape[1:], r.dtype) for k, r in rows.items()}
        return s, jnp.zeros((len(knots),), dtype)

    @staticmethod
    def _stats_derivative(knots, t, stats, acc):
        s_like, w_like = acc
        phi = knot_weights(knots, t)
        ds = {
            k: (phi.reshape(phi.shape + (1,) * st.ndim) * st[None]).astype(s_like[k].dtype)
            for k, st in stats.items()
        }
        return ds, phi.astype(w_like.dtype)

    def _update_stats(self, knots, acc):
        """One EMA step per knot after resampling the stored rows onto `knots`."""
        s, w = acc
        averaged = {k: a / w.reshape(w.shape + (1,) * (a.ndim - 1)) for k, a in s.items()}
        times = jax.lax.stop_gradient(self.stat_times[...])
        resample = jnp.stack([knot_weights(times, tau) for tau in np.asarray(knots, np.float32)])
        m = self.momentum
        self.stats.set_value(
            {
                k: m * jnp.tensordot(resample.astype(r.dtype), r, axes=1)
                + (1.0 - m) * averaged[k].astype(r.dtype)
                for k, r in self.stats.get_value().items()
            }
        )
        self.stat_times.set_value(jnp.asarray(knots, jnp.float32))

    def _advance_rngs(self):
        for _, node in nnx.iter_graph(self.field):
            if isinstance(node, nnx.RngStream):
                node()  # one draw per forward call: the next call sees new randomness

    def _odeint(self, rhs, y0, args):
        return odeint(
            rhs,
            y0,
            args,
            t0=0.0,
            t1=1.0,
            num_steps=self.num_steps,
            solver=self.solver,
            adjoint=self.adjoint,
            unroll=self.unroll,
        )


class ODEBlock(_Solve, nnx.Module):
    """ANODE block: `z(1)` of `dz/dt = field(t, z)`, `z(0) = y0` (ANODE Eq. 1), in NNX.

    Args:
      field: any `nnx.Module` called as `field(t, y) -> dy/dt` (same shape and dtype as `y`;
        `t` a scalar array). Its `nnx.BatchNorm` layers keep per-time running statistics in
        the block (module docstring); its RNG streams draw per-time randomness.
      num_steps: fixed steps over `[0, 1]` (`dt = 1/num_steps`; paper default `N_t = 2`).
      solver: "euler" | "midpoint" | "heun" | "rk4" | any `anode_jax.ode.AbstractSolver`.
      adjoint: gradient strategy of `anode_jax.ode.odeint` ("anode" | "direct" |
        "checkpointed:K" | "backsolve" | an `AbstractAdjoint`).
      momentum: running-average momentum of the per-time BatchNorm statistics.
      unroll: the time loop's unrolling, as in `odeint` (None: the core's default).

    `block(y0)` returns `y(1)` with `y0`'s shape and dtype (e.g. `(N, H, W, C)`). Equals the
    Linen `anode_jax.models.ODEBlock` around the same field and parameters.
    Raises `TypeError` for a `field` that is not an `nnx.Module`, `ValueError` for BatchNorms
    whose `use_running_average` is unset or mixed, `NotImplementedError` for BatchStat
    variables outside `nnx.BatchNorm`.
    """

    def __init__(
        self,
        field: nnx.Module,
        *,
        num_steps: int = 2,
        solver: Any = "euler",
        adjoint: Any = "anode",
        momentum: float = BN_MOMENTUM,
        unroll: bool | int | None = None,
    ):
        self._setup(field, num_steps, solver, adjoint, momentum, unroll)

    def __call__(self, y0: jax.Array) -> jax.Array:
        pure, params, stats, rest = self._split()
        knots = self._knots()
        if pure.mode == "train":

            def rhs(t, y, args):
                dz, batch = pure(t, y[0], *args)
                return dz, self._stats_derivative(knots, t, batch, y[1])

            z1, acc = self._odeint(rhs, (y0, self._accumulators(knots)), (params, stats, rest))
            self._update_stats(knots, acc)
        elif pure.mode == "eval":

            def rhs(t, y, args):
                params, frozen, rest = args
                return pure(t, y, params, self._interpolated(pure, frozen, t), rest)[0]

            z1 = self._odeint(rhs, y0, (params, self._frozen(), rest))
        else:
            z1 = self._odeint(lambda t, y, args: pure(t, y, *args)[0], y0, (params, stats, rest))
        self._advance_rngs()
        return z1


class CoupledODEBlock(_Solve, nnx.Module):
    """ANODEv2 block: `dz/dt = field(t, z; θ(t))`, `dθ/dt = q(θ, p)` (ANODEv2 Eq. 3), in NNX.

    `θ` are the field's `nnx.Param`s: their current values are `θ(0)`, integrated jointly
    with `z` over `[0, 1]` by the block's solver and gradient strategy; `p` (`block.q_params`,
    an `nnx.Param` holding one parameter dict per 4-D conv kernel of the field, see
    `anode_jax.models.parameter_field`) is trained with them. `q`: "rda" | "conv" | "none"
    ("none" keeps `θ` constant and reproduces `ODEBlock`). Other arguments, BatchNorm and RNG
    handling as `ODEBlock`; equals the Linen `anode_jax.models.CoupledODEBlock` around the
    same field and parameters. Raises `ValueError` for an unknown `q`.
    """

    def __init__(
        self,
        field: nnx.Module,
        *,
        q: str = "rda",
        num_steps: int = 2,
        solver: Any = "euler",
        adjoint: Any = "anode",
        momentum: float = BN_MOMENTUM,
        unroll: bool | int | None = None,
    ):
        if q not in Q_NAMES:
            raise ValueError(f"q must be one of {Q_NAMES}, got {q!r}")
        self._setup(field, num_steps, solver, adjoint, momentum, unroll)
        self.q = q
        theta0 = nnx.to_pure_dict(nnx.state(field, nnx.Param))
        self.q_params = nnx.Param(init_q_params(q, theta0)) if q != "none" else nnx.data(None)

    def __call__(self, y0: jax.Array) -> jax.Array:
        pure, params, stats, rest = self._split()
        knots = self._knots()
        q, mode = self.q, pure.mode
        p = self.q_params.get_value() if q != "none" else {}
        track = mode == "train"

        def rhs(t, y, args):
            z, theta = y[0], y[1]
            p, frozen, stats, rest = args
            dtheta = parameter_field(q, theta, p)  # once per stage: θ is not batched
            if mode == "eval":
                stats = self._interpolated(pure, frozen, t)
            dz, batch = pure(t, z, _from_pure(pure.params_like, theta), stats, rest)
            if not track:
                return dz, dtheta
            return dz, dtheta, self._stats_derivative(knots, t, batch, y[2])

        y0 = (y0, nnx.to_pure_dict(params))
        if track:
            y0 = y0 + (self._accumulators(knots),)
        frozen = self._frozen() if mode == "eval" else None
        y1 = self._odeint(rhs, y0, (p, frozen, stats, rest))
        if track:
            self._update_stats(knots, y1[2])
        self._advance_rngs()
        return y1[0]
