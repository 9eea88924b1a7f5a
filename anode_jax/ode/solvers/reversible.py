"""Algebraically reversible solvers: each step can be undone exactly, so the backward pass
reconstructs step inputs from the block output instead of storing them (`adjoint="reversible"`).

Three methods, each an `AbstractReversibleSolver` whose state carries an auxiliary variable:

| name               | state         | f evals / step | order       | reference                        |
|--------------------|---------------|----------------|-------------|----------------------------------|
| "reversible:<rk>"  | (y, z)        | 2 s            | base's      | McCallum & Foster (2024)         |
| "reversible_heun"  | (y, ŷ, f(ŷ))  | 1              | 2           | Kidger et al. (2021), Alg. 1-2   |
| "alf"              | (z, v)        | 1              | 2           | Zhuang et al. (2021), MALI, ALF  |

Every solver also implements `backward_step`, which reconstructs the step input and
backpropagates through the step in one go, reusing the vector-field evaluations of the
reconstruction for the vector-Jacobian products (the generic route — inverse, recompute the step,
VJP — costs one more forward pass per step). `backward_step` differentiates the same forward
expressions as `step`, so the gradient is exact for the discrete forward pass up to the round-off
of the reconstruction.
"""

from __future__ import annotations

import dataclasses

import jax

from anode_jax._typing import Array, PyTree, VectorField
from anode_jax.ode.solvers.base import AbstractReversibleSolver
from anode_jax.ode.solvers.runge_kutta import ButcherTableau, rk_stages


def _lin(*terms):
    """Σ c_i x_i over pytrees for (c_i, x_i) pairs, c_i Python floats (zero terms skipped)."""
    terms = [(c, x) for c, x in terms if c != 0.0]
    coeffs = [c for c, _ in terms]
    trees = [x for _, x in terms]

    def leaf(*xs):
        acc = coeffs[0] * xs[0] if coeffs[0] != 1.0 else xs[0]
        for c, x in zip(coeffs[1:], xs[1:]):
            acc = acc + (x if c == 1.0 else c * x)
        return acc

    return jax.tree.map(leaf, *trees)


def _add(a, b):
    """a + b leafwise; float0 (integer-leaf) cotangents pass through."""
    return jax.tree.map(lambda x, y: y if x.dtype == jax.dtypes.float0 else x + y, a, b)


def rk_increment(
    tableau: ButcherTableau, vector_field: VectorField, t: Array, dt: float, y: PyTree, args
) -> PyTree:
    """Ψ_h(t, y) = h Σ_i b_i k_i, the increment of one explicit RK step (y_{n+1} = y_n + Ψ)."""
    ks = rk_stages(tableau, vector_field, t, dt, y, args)
    terms = [(dt * b, k) for b, k in zip(tableau.b, ks) if b != 0.0]
    return _lin(*terms)


def backward_step(solver, vector_field, t, dt, state_next, ct_next, args):
    """(state at t, its cotangent, the args cotangent of this step) from the state at t + dt.

    Uses `solver.backward_step` where the solver defines one; otherwise reconstructs the input
    with `inverse_step` and backpropagates through a recomputed `step`.
    """
    fused = getattr(solver, "backward_step", None)
    if fused is not None:
        return fused(vector_field, t, dt, state_next, ct_next, args)
    state = solver.inverse_step(vector_field, t, dt, state_next, args)
    _, vjp = jax.vjp(lambda s, a: solver.step(vector_field, t, dt, s, a), state, args)
    ct_state, ct_args = vjp(ct_next)
    return state, ct_state, ct_args


@dataclasses.dataclass(frozen=True)
class Reversible(AbstractReversibleSolver):
    """McCallum & Foster's reversible wrapper around an explicit Runge–Kutta method.

    McCallum & Foster, "Efficient, Accurate and Stable Gradients for Neural ODEs",
    arXiv:2410.11648 (Sec. 3, the reversible method). With Ψ_h(t, y) the base method's increment
    (y + Ψ_h(t, y) is one base step) and coupling λ, the state (y_n, z_n) advances by

        y_{n+1} = λ y_n + (1 - λ) z_n + Ψ_h(t_n, z_n)
        z_{n+1} = z_n - Ψ_{-h}(t_{n+1}, y_{n+1})

    and is recovered exactly (up to round-off) by

        z_n = z_{n+1} + Ψ_{-h}(t_{n+1}, y_{n+1})
        y_n = (y_{n+1} - (1 - λ) z_n - Ψ_h(t_n, z_n)) / λ.

    y_0 = z_0 = the initial value; the output is y. Cost: two base steps per step (2 s vector-
    field evaluations for s stages); order: that of the base method.

    Stability (our derivation for y' = μ y; tested in tests/test_reversible.py): the step is a
    2×2 linear map of determinant λ whose eigenvalues are R(hμ) and λ / R(hμ), exactly when
    R(hμ) R(-hμ) = 1 and up to the base method's O(h^{p+1}) defect otherwise (R: the base
    method's stability function). The first is the base method's own amplification; the second
    is a parasitic mode, seeded by the y–z discrepancy, that stays bounded iff λ ≤ |R(hμ)|.
    So λ < 1 is necessary for any damping; a smaller λ widens the region on the negative real
    axis (RK4: |hμ| < 0.70 at λ = 0.5, < 0.105 at λ = 0.9, ≈ 0.001 at λ = 0.999), while
    λ → 1 favours oscillatory fields (|R| = 1). λ = 1 makes the map area-preserving, like
    reversible Heun. The inverse step has eigenvalues 1 / R(hμ) (reversing a dissipative field
    amplifies round-off by e^{|μ| h} per step, unavoidably) and R(hμ) / λ, so a small λ also
    amplifies the reconstruction by about λ^-Nt along the parasitic mode. Default λ = 0.999
    (the paper's and diffrax's default): for neural-ODE blocks over [0, 1] with moderate
    Lipschitz constants the parasitic growth λ^Nt e^{L T} stays small; for stiff fields choose
    λ below the smallest |R(hμ)| or take more steps.

    Args:
      tableau: the explicit base method (a `ButcherTableau`, e.g. `RK4`).
      coupling: λ, in (0, 1] (0 cannot be inverted; the paper takes λ in (0, 1)).

    State: (y, z), two pytrees with y0's structure; `output` returns y.
    """

    tableau: ButcherTableau
    coupling: float = 0.999

    def __post_init__(self):
        if not isinstance(self.tableau, ButcherTableau):
            raise TypeError(
                "Reversible(tableau, coupling) wraps an explicit ButcherTableau (e.g. "
                f"anode_jax.ode.RK4), got {type(self.tableau).__name__}."
            )
        lam = self.coupling
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 < lam <= 1.0:
            raise ValueError(
                f"Reversible coupling λ must be a number in (0, 1] (default 0.999), got {lam!r}."
            )
        object.__setattr__(self, "coupling", float(lam))

    @property
    def name(self) -> str:
        return f"reversible:{self.tableau.name}"

    @property
    def order(self) -> int:
        return self.tableau.order

    def init(self, vector_field, t0, y0, args):
        return (y0, y0)

    def output(self, state):
        return state[0]

    def _psi(self, vector_field, t, dt, y, args):
        return rk_increment(self.tableau, vector_field, t, dt, y, args)

    def step(self, vector_field, t, dt, state, args):
        lam = self.coupling
        y, z = state
        p = self._psi(vector_field, t, dt, z, args)
        y1 = _lin((lam, y), (1.0 - lam, z), (1.0, p))
        q = self._psi(vector_field, t + dt, -dt, y1, args)
        z1 = _lin((1.0, z), (-1.0, q))
        return (y1, z1)

    def inverse_step(self, vector_field, t, dt, state_next, args):
        lam = self.coupling
        y1, z1 = state_next
        z = _lin((1.0, z1), (1.0, self._psi(vector_field, t + dt, -dt, y1, args)))
        p = self._psi(vector_field, t, dt, z, args)
        y = _lin((1.0 / lam, y1), (-(1.0 - lam) / lam, z), (-1.0 / lam, p))
        return (y, z)

    def backward_step(self, vector_field, t, dt, state_next, ct_next, args):
        lam = self.coupling
        y1, z1 = state_next
        ct_y1, ct_z1 = ct_next
        # Reverse of z1 = z - q(y1), then of y1 = λ y + (1 - λ) z + p(z). Each VJP is applied
        # as soon as its cotangent exists, so only one increment's internals are alive at once.
        q, vjp_q = jax.vjp(lambda y_, a: self._psi(vector_field, t + dt, -dt, y_, a), y1, args)
        g_y1, g_args_q = vjp_q(jax.tree.map(lambda c: -c, ct_z1))
        ct_y1 = _lin((1.0, ct_y1), (1.0, g_y1))
        z = _lin((1.0, z1), (1.0, q))
        p, vjp_p = jax.vjp(lambda z_, a: self._psi(vector_field, t, dt, z_, a), z, args)
        y = _lin((1.0 / lam, y1), (-(1.0 - lam) / lam, z), (-1.0 / lam, p))
        g_z, g_args_p = vjp_p(ct_y1)
        ct_z = _lin((1.0, ct_z1), (1.0 - lam, ct_y1), (1.0, g_z))
        ct_y = _lin((lam, ct_y1))
        return (y, z), (ct_y, ct_z), _add(g_args_q, g_args_p)


@dataclasses.dataclass(frozen=True)
class ReversibleHeun(AbstractReversibleSolver):
    """Reversible Heun (Kidger, Foster, Li & Lyons 2021, arXiv:2105.13493, Sec. 3, Alg. 1-2),
    here for ODEs (no noise term).

    State (y_n, ŷ_n, f_n) with f_n = f(t_n, ŷ_n); one vector-field evaluation per step:

        ŷ_{n+1} = 2 y_n - ŷ_n + h f_n
        f_{n+1} = f(t_{n+1}, ŷ_{n+1})
        y_{n+1} = y_n + (h / 2) (f_n + f_{n+1})

    Inverse (Alg. 2): ŷ_n = 2 y_{n+1} - ŷ_{n+1} - h f_{n+1},  f_n = f(t_n, ŷ_n),
    y_n = y_{n+1} - (h / 2)(f_n + f_{n+1}). Init: ŷ_0 = y_0, f_0 = f(t_0, y_0). Order 2.
    Linear stability: only on the imaginary axis |hμ| ≤ 1 (the step is neutrally stable, never
    damped; McCallum & Foster, Sec. 2), so errors of dissipative fields are not damped.
    """

    name = "reversible_heun"
    order = 2

    def init(self, vector_field, t0, y0, args):
        return (y0, y0, vector_field(t0, y0, args))

    def output(self, state):
        return state[0]

    def rescale_time(self, state, ratio):
        y, yh, f = state  # f = dy/dt at ŷ: a rate
        return (y, yh, jax.tree.map(lambda leaf: leaf * ratio.astype(leaf.dtype), f))

    def step(self, vector_field, t, dt, state, args):
        y, yh, f = state
        yh1 = _lin((2.0, y), (-1.0, yh), (dt, f))
        f1 = vector_field(t + dt, yh1, args)
        y1 = _lin((1.0, y), (0.5 * dt, f), (0.5 * dt, f1))
        return (y1, yh1, f1)

    def inverse_step(self, vector_field, t, dt, state_next, args):
        y1, yh1, f1 = state_next
        yh = _lin((2.0, y1), (-1.0, yh1), (-dt, f1))
        f = vector_field(t, yh, args)
        y = _lin((1.0, y1), (-0.5 * dt, f), (-0.5 * dt, f1))
        return (y, yh, f)

    def backward_step(self, vector_field, t, dt, state_next, ct_next, args):
        y1, yh1, f1 = state_next
        ct_y1, ct_yh1, ct_f1 = ct_next
        state = self.inverse_step(vector_field, t, dt, state_next, args)
        # The step's only nonlinearity is f1 = f(t + h, ŷ_{n+1}), at a stored point.
        _, vjp_f = jax.vjp(lambda y_, a: vector_field(t + dt, y_, a), yh1, args)
        g_f1 = _lin((1.0, ct_f1), (0.5 * dt, ct_y1))
        g_yh1, ct_args = vjp_f(g_f1)
        g_yh1 = _lin((1.0, ct_yh1), (1.0, g_yh1))
        ct_y = _lin((1.0, ct_y1), (2.0, g_yh1))
        ct_yh = jax.tree.map(lambda c: -c, g_yh1)
        ct_f = _lin((0.5 * dt, ct_y1), (dt, g_yh1))
        return state, (ct_y, ct_yh, ct_f), ct_args


@dataclasses.dataclass(frozen=True)
class ALF(AbstractReversibleSolver):
    """Asynchronous leapfrog with damping, the integrator of MALI (Zhuang, Dvornek, Tatikonda
    & Duncan, ICLR 2021, arXiv:2102.04668, Sec. 3, Alg. 1 (ψ) and its inverse ψ⁻¹, and the
    damped variant with η).

    State (z_n, v_n), v an estimate of dz/dt; one vector-field evaluation per step:

        k       = z_n + (h / 2) v_n,       u = f(t_n + h / 2, k)
        v_{n+1} = v_n + 2 η (u - v_n)
        z_{n+1} = k + (h / 2) v_{n+1}

    Inverse: k = z_{n+1} - (h / 2) v_{n+1}, u = f(t_n + h/2, k),
    v_n = (v_{n+1} - 2 η u) / (1 - 2 η), z_n = k - (h / 2) v_n. Init: v_0 = f(t_0, z_0).
    Order 2. η = 1 is the undamped ALF (neutrally stable: the v-update maps v to 2u - v); η < 1
    damps the v-mode by |1 - 2η| in the forward and so amplifies it by 1 / |1 - 2η| in the
    reconstruction. η = 1/2 cannot be inverted.

    Args:
      eta: damping η in (0, 1], η != 1/2; default 1 (undamped ALF).
    """

    eta: float = 1.0
    order = 2

    def __post_init__(self):
        eta = self.eta
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 < eta <= 1.0:
            raise ValueError(
                f"ALF damping eta must be a number in (0, 1] (default 1), got {eta!r}."
            )
        if eta == 0.5:
            raise ValueError(
                "ALF damping eta = 0.5 makes the step non-invertible (v_n is divided by 1 - 2η); "
                "choose eta in (0, 0.5) or (0.5, 1]."
            )
        object.__setattr__(self, "eta", float(eta))

    @property
    def name(self) -> str:
        return "alf" if self.eta == 1.0 else f"alf(eta={self.eta})"

    def init(self, vector_field, t0, y0, args):
        return (y0, vector_field(t0, y0, args))

    def output(self, state):
        return state[0]

    def rescale_time(self, state, ratio):
        z, v = state  # v estimates dz/dt: a rate
        return (z, jax.tree.map(lambda leaf: leaf * ratio.astype(leaf.dtype), v))

    def step(self, vector_field, t, dt, state, args):
        z, v = state
        k = _lin((1.0, z), (0.5 * dt, v))
        u = vector_field(t + 0.5 * dt, k, args)
        v1 = _lin((1.0 - 2.0 * self.eta, v), (2.0 * self.eta, u))
        z1 = _lin((1.0, k), (0.5 * dt, v1))
        return (z1, v1)

    def inverse_step(self, vector_field, t, dt, state_next, args):
        z1, v1 = state_next
        k = _lin((1.0, z1), (-0.5 * dt, v1))
        u = vector_field(t + 0.5 * dt, k, args)
        return self._undo(k, u, v1, dt)

    def _undo(self, k, u, v1, dt):
        c = 1.0 / (1.0 - 2.0 * self.eta)
        v = _lin((c, v1), (-2.0 * self.eta * c, u))
        z = _lin((1.0, k), (-0.5 * dt, v))
        return (z, v)

    def backward_step(self, vector_field, t, dt, state_next, ct_next, args):
        z1, v1 = state_next
        ct_z1, ct_v1 = ct_next
        k = _lin((1.0, z1), (-0.5 * dt, v1))
        u, vjp_f = jax.vjp(lambda k_, a: vector_field(t + 0.5 * dt, k_, a), k, args)
        state = self._undo(k, u, v1, dt)
        # Reverse of z1 = k + (h/2) v1, v1 = (1 - 2η) v + 2η u, u = f(k), k = z + (h/2) v.
        g_v1 = _lin((1.0, ct_v1), (0.5 * dt, ct_z1))
        g_k, ct_args = vjp_f(jax.tree.map(lambda c: 2.0 * self.eta * c, g_v1))
        g_k = _lin((1.0, ct_z1), (1.0, g_k))
        ct_v = _lin((1.0 - 2.0 * self.eta, g_v1), (0.5 * dt, g_k))
        return state, (g_k, ct_v), ct_args


REVERSIBLE_HEUN = ReversibleHeun()
ALF_SOLVER = ALF()
