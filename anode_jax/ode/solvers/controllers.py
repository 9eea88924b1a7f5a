"""Step-size control for the embedded pairs (`embedded.py`): a PID controller.

Each trial step of size h from (t_n, y_n) gives y_{n+1} and the error estimate err (y's pytree).
The scaled error is the root mean square over every element of every leaf

    E = sqrt( (1/M) Σ_leaves Σ_elements ( err / (atol + rtol · max(|y_n|, |y_{n+1}|)) )² )

(M the total number of elements; the norm of diffrax's `PIDController` and torchdiffeq).
The step is accepted when E < 1 (and E is finite: a NaN/inf estimate rejects the step). The
next step size is h · clip(safety · δ_n^β1 · δ_{n−1}^β2 · δ_{n−2}^β3, factormin, factormax)
with δ = 1/E of the last accepted steps, β1 = (p_c + i_c + d_c)/q, β2 = −(p_c + 2 d_c)/q,
β3 = d_c/q and q the solver's order (Söderlind 2002/2003's PID family in diffrax's form (4),
see `diffrax.PIDController`); after a rejection the factor is at most `safety`.
The defaults are diffrax's: an integral controller (p_c = d_c = 0, i_c = 1: Hairer, Nørsett
& Wanner, Eq. II.4.13, h_new = h · safety · E^(−1/q)), safety 0.9, factors in [0.2, 10].
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from anode_jax._typing import PyTree


def _is_number(x) -> bool:
    return isinstance(x, (numbers.Real, np.generic)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class _Tolerance:
    """A tolerance: one number, or one number per leaf of y (a pytree like y). Hashable."""

    treedef: object  # None for a single number
    values: tuple[float, ...]

    @classmethod
    def of(cls, name: str, value) -> _Tolerance:
        if isinstance(value, _Tolerance):
            return value
        if _is_number(value) or (isinstance(value, np.ndarray) and value.ndim == 0):
            values, treedef = (float(value),), None
        else:
            leaves, treedef = jax.tree.flatten(value)
            if not leaves or not all(
                _is_number(x) or (isinstance(x, np.ndarray) and x.ndim == 0) for x in leaves
            ):
                raise TypeError(
                    f"{name} must be a non-negative number or a pytree like y of numbers (one per "
                    f"leaf), got {value!r}; traced tolerances are not supported."
                )
            values = tuple(float(x) for x in leaves)
        for v in values:
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}.")
        return cls(treedef, values)

    def per_leaf(self, name: str, y: PyTree) -> list[float]:
        """The tolerance of each leaf of y; errors name the mismatch."""
        leaves, treedef = jax.tree.flatten(y)
        if self.treedef is None:
            return [self.values[0]] * len(leaves)
        if self.treedef != treedef:
            raise ValueError(
                f"{name} as a pytree must have y's structure {treedef}, got {self.treedef}; "
                "or pass one number."
            )
        return list(self.values)


@dataclasses.dataclass(frozen=True)
class PIDController:
    """A PID step-size controller for embedded Runge–Kutta pairs (see the module docstring).

    Attributes:
      rtol, atol: relative and absolute tolerances: numbers, or pytrees like y with one number
        per leaf (static; not traced). Default 1e-3 and 1e-6 (scipy's `solve_ivp` defaults).
      pcoeff, icoeff, dcoeff: the PID coefficients (diffrax's defaults 0, 1, 0: the integral
        controller of Hairer & Wanner; a PI controller in this form, e.g. pcoeff=0.4,
        icoeff=0.3, damps step-size oscillation on stiff-ish problems).
      safety: factor applied to every proposal (0.9, as diffrax and torchdiffeq).
      factormin, factormax: limits of the step-size ratio per step (0.2 and 10.0, as diffrax).
      dtmin: smallest step size: a proposal below it is raised to it and the next step at it
        is accepted whatever its error (diffrax's `force_dtmin=True`); None: no minimum.
      dtmax: largest step size, or None.
      dt0: the first step size; None (default) picks it by Hairer's heuristic (Hairer,
        Nørsett & Wanner, Sec. II.4, "Starting step size"; as diffrax), two evaluations of f.

    All step sizes are magnitudes in units of t (also when t1 < t0).

    Raises:
      ValueError / TypeError: a negative or non-finite tolerance, both tolerances 0, a
        coefficient out of range, dtmin > dtmax, or a non-positive dt0 / dtmin / dtmax.
    """

    rtol: object = 1e-3
    atol: object = 1e-6
    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0
    safety: float = 0.9
    factormin: float = 0.2
    factormax: float = 10.0
    dtmin: float | None = None
    dtmax: float | None = None
    dt0: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "rtol", _Tolerance.of("rtol", self.rtol))
        object.__setattr__(self, "atol", _Tolerance.of("atol", self.atol))
        if all(v == 0 for v in self.rtol.values + self.atol.values):
            raise ValueError("rtol and atol are both 0; at least one must be positive.")
        for name in ("pcoeff", "icoeff", "dcoeff", "safety", "factormin", "factormax"):
            value = getattr(self, name)
            if not _is_number(value) or not np.isfinite(value):
                raise TypeError(f"PIDController: {name} must be a finite number, got {value!r}.")
            object.__setattr__(self, name, float(value))
        if not 0 < self.safety <= 1:
            raise ValueError(f"PIDController: safety must be in (0, 1], got {self.safety}.")
        if not 0 < self.factormin <= 1 <= self.factormax:
            raise ValueError(
                "PIDController: need 0 < factormin <= 1 <= factormax, got "
                f"factormin={self.factormin}, factormax={self.factormax}."
            )
        for name in ("dtmin", "dtmax", "dt0"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_number(value) or not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number or None, got {value!r}.")
            object.__setattr__(self, name, float(value))
        if self.dtmin is not None and self.dtmax is not None and self.dtmin > self.dtmax:
            raise ValueError(f"dtmin={self.dtmin} exceeds dtmax={self.dtmax}.")

    def scaled_error(self, y0: PyTree, y1: PyTree, err: PyTree, dtype) -> jax.Array:
        """E, the RMS over all elements of err / (atol + rtol · max(|y0|, |y1|)), in `dtype`."""
        rtols = self.rtol.per_leaf("rtol", y0)
        atols = self.atol.per_leaf("atol", y0)
        total, count = jnp.zeros((), dtype), 0
        for a, b, e, rt, at in zip(
            jax.tree.leaves(y0), jax.tree.leaves(y1), jax.tree.leaves(err), rtols, atols
        ):
            a, b, e = (x.astype(dtype) for x in (a, b, e))
            scale = at + rt * jnp.maximum(jnp.abs(a), jnp.abs(b))
            total = total + jnp.sum(jnp.square(e / scale))
            count += int(np.size(e))
        return jnp.sqrt(total / max(count, 1))

    def initial_step(self, vector_field, t0, y0, f0, args, order: int, direction: float, dtype):
        """Hairer's starting step (Hairer, Nørsett & Wanner, Sec. II.4; the form diffrax uses):
        d0 = ‖y0‖, d1 = ‖f0‖ scaled by atol + rtol·|y0|, h0 = 0.01 d0/d1 (1e-6 if either is
        below 1e-5), one Euler step to evaluate f1, d2 = ‖f1 − f0‖/h0, and
        h = min(100 h0, (0.01 / max(d1, d2))^(1/order)). Returns a positive magnitude."""
        rtols = self.rtol.per_leaf("rtol", y0)
        atols = self.atol.per_leaf("atol", y0)

        def norm(tree):
            total, count = jnp.zeros((), dtype), 0
            for x, y, rt, at in zip(jax.tree.leaves(tree), jax.tree.leaves(y0), rtols, atols):
                scale = at + rt * jnp.abs(y.astype(dtype))
                total = total + jnp.sum(jnp.square(x.astype(dtype) / scale))
                count += int(np.size(x))
            return jnp.sqrt(total / max(count, 1))

        d0, d1 = norm(y0), norm(f0)
        small = (d0 < 1e-5) | (d1 < 1e-5)
        h0 = jnp.where(small, 1e-6, 0.01 * d0 / jnp.where(small, 1, d1)).astype(dtype)
        y1 = jax.tree.map(lambda y, f: y + (direction * h0).astype(y.dtype) * f, y0, f0)
        f1 = vector_field(t0 + direction * h0, y1, args)
        d2 = norm(jax.tree.map(lambda a, b: a - b, f1, f0)) / h0
        max_d = jnp.maximum(d1, d2)
        h1 = jnp.where(
            max_d <= 1e-15,
            jnp.maximum(1e-6, h0 * 1e-3),
            (0.01 / jnp.where(max_d <= 1e-15, 1, max_d)) ** (1.0 / order),
        )
        return jnp.minimum(100 * h0, h1).astype(dtype)

    def factor(self, inv_error, prev_inv, prev_prev_inv, accept, order: int):
        """The step-size ratio after a trial step (δ = 1/E of this and the last two accepted
        steps): clipped to [factormin, factormax], at most `safety` after a rejection, and
        factormin for a non-finite error estimate."""
        b1 = (self.pcoeff + self.icoeff + self.dcoeff) / order
        b2 = -(self.pcoeff + 2 * self.dcoeff) / order
        b3 = self.dcoeff / order
        f = self.safety * inv_error**b1
        if b2 != 0:
            f = f * prev_inv**b2
        if b3 != 0:
            f = f * prev_prev_inv**b3
        low = jnp.where(accept, 1.0, self.factormin)
        high = jnp.where(accept, self.factormax, self.safety)
        f = jnp.clip(f, low, high)
        return jnp.where(jnp.isfinite(inv_error) & (inv_error > 0) | accept, f, self.factormin)
