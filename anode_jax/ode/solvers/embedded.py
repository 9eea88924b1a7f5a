"""Embedded Runge–Kutta pairs: a solution and an error estimate from the same stages.

One step of an s-stage embedded pair (Hairer, Nørsett & Wanner, *Solving ODEs I*, Sec. II.4,
Eq. 4.8) computes the stages k_1..k_s as an explicit method (`ButcherTableau`), then

    y_{n+1} = y_n + h Σ_i b_i k_i             (order p, the propagated solution)
    err     =       h Σ_i e_i k_i,  e = b − b̂  (b̂ of order p − 1: the local error estimate)

The step-size controller (`controllers.PIDController`) accepts or rejects each step from
`err`. A pair is FSAL ("first same as last") when its last stage is evaluated at
(t_n + h, y_{n+1}): c_s = 1, row s of a equals b and b_s = 0. Then an accepted step's last
stage is the next step's first, and each step after the first costs s − 1 evaluations.

| name         | pair                           | stages | FSAL | source                              |
|--------------|--------------------------------|--------|------|-------------------------------------|
| `heun_euler` | Heun–Euler 2(1)                | 2      | no   | Hairer et al., Sec. II.4            |
| `bosh3`      | Bogacki–Shampine 3(2)          | 4      | yes  | Bogacki & Shampine 1989, Eq. 2.1    |
| `dopri5`     | Dormand–Prince 5(4)            | 7      | yes  | Dormand & Prince 1980, Table 2      |
| `tsit5`      | Tsitouras 5(4)                 | 7      | yes  | Tsitouras 2011, Table 1             |
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from anode_jax.ode.solvers.runge_kutta import ButcherTableau, stage_inputs


def _axpy(y, h, coeffs, ks):
    """y + h Σ coeffs[j] ks[j] over pytrees for a traced step h (cast to each leaf's dtype:
    a float64 time with float32 states stays float32), skipping zero coefficients."""
    terms = [(c, k) for c, k in zip(coeffs, ks) if c != 0.0]
    if not terms:
        return y

    def leaf(y_leaf, *k_leaves):
        hl = jnp.asarray(h).astype(y_leaf.dtype)
        acc = y_leaf
        for (c, _), k_leaf in zip(terms, k_leaves):
            acc = acc + (hl * c) * k_leaf
        return acc

    return jax.tree.map(leaf, y, *(k for _, k in terms))


@dataclasses.dataclass(frozen=True)
class EmbeddedTableau(ButcherTableau):
    """An explicit embedded Runge–Kutta pair: a `ButcherTableau` plus error weights.

    Attributes (besides `ButcherTableau`'s a, b, c, order, name):
      b_error: the s error weights e_i = b_i − b̂_i (b̂ the embedded, lower-order weights);
        they must sum to 0 (both weight vectors are consistent). `order` is the order p of
        the propagated solution b; the controller's exponent is 1/p, as in diffrax
        (`error_order` = p for ODEs) and Hairer's 1/(q + 1) with q = p − 1 the embedded order.

    Raises:
      ValueError: b_error of the wrong length, or not summing to 0.
    """

    b_error: tuple[float, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        e = tuple(float(x) for x in self.b_error)
        if len(e) != self.num_stages:
            raise ValueError(
                f"EmbeddedTableau {self.name!r}: b_error has {len(e)} entries for "
                f"{self.num_stages} stages; give e_i = b_i - b̂_i for every stage."
            )
        if not math.isclose(sum(e), 0.0, rel_tol=0, abs_tol=1e-12):
            raise ValueError(
                f"EmbeddedTableau {self.name!r}: b_error sums to {sum(e)}, not 0 "
                "(b and the embedded b̂ must both sum to 1)."
            )
        object.__setattr__(self, "b_error", e)

    @property
    def fsal(self) -> bool:
        """Whether the last stage is f(t_n + h, y_{n+1}) (first same as last)."""
        s = self.num_stages
        return (
            s > 1
            and self.c[-1] == 1.0
            and self.b[-1] == 0.0
            and tuple(self.a[-1]) + (0.0,) * (s - 1 - len(self.a[-1])) == self.b[:-1]
        )

    def attempt(self, vector_field, t, dt, y, args, k1=None):
        """One trial step from (t, y) of size `dt` (traced or not).

        `k1`: f(t, y) if already known (FSAL), else evaluated here. Returns
        (y_next, err, k_last): the propagated solution, the error estimate h Σ e_i k_i (y's
        pytree) and the last stage (f(t + dt, y_next) for an FSAL pair).
        """
        ks = [vector_field(t, y, args) if k1 is None else k1]
        for i in range(1, self.num_stages):
            y_stage, args = stage_inputs(vector_field, _axpy(y, dt, self.a[i], ks), args, i)
            ks.append(vector_field(t + self.c[i] * dt, y_stage, args))
        y_next = _axpy(y, dt, self.b, ks)
        zero = jax.tree.map(lambda leaf: leaf * 0, y)
        err = _axpy(zero, dt, self.b_error, ks)
        return y_next, err, ks[-1]

    def step(self, vector_field, t, dt, state, args):
        """The propagated solution of one step (the replay of an accepted step): the same
        operations as `attempt`'s y_next, with k_1 evaluated afresh."""
        ks = [vector_field(t, state, args)]
        for i in range(1, self.num_stages):
            y_stage, args = stage_inputs(vector_field, _axpy(state, dt, self.a[i], ks), args, i)
            ks.append(vector_field(t + self.c[i] * dt, y_stage, args))
        return _axpy(state, dt, self.b, ks)


def _rows(*rows):
    return tuple(tuple(row) for row in rows)


HEUN_EULER = EmbeddedTableau(
    a=_rows((), (1.0,)),
    b=(0.5, 0.5),
    c=(0.0, 1.0),
    b_error=(0.5 - 1.0, 0.5),
    order=2,
    name="heun_euler",
)

# Bogacki & Shampine (1989), "A 3(2) pair of Runge–Kutta formulas", Appl. Math. Lett. 2(4),
# Eq. (2.1): b̂ = (7/24, 1/4, 1/3, 1/8).
BOSH3 = EmbeddedTableau(
    a=_rows((), (1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    b_error=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    order=3,
    name="bosh3",
)

# Dormand & Prince (1980), "A family of embedded Runge–Kutta formulae", J. Comput. Appl. Math.
# 6(1), Table 2 (RK5(4)7M); also Hairer, Nørsett & Wanner, Table II.5.2.
_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DOPRI5_B_HAT = (
    5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40,
)  # fmt: skip
DOPRI5 = EmbeddedTableau(
    a=_rows(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        _DOPRI5_B[:6],
    ),
    b=_DOPRI5_B,
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    b_error=tuple(b - bh for b, bh in zip(_DOPRI5_B, _DOPRI5_B_HAT)),
    order=5,
    name="dopri5",
)

# Tsitouras (2011), "Runge–Kutta pairs of order 5(4) satisfying only the first column
# simplifying assumption", Comput. Math. Appl. 62(2), Table 1 (coefficients to 20 digits).
_TSIT5_B = (
    0.09646076681806522951816731316512876333712,
    0.01,
    0.47988965041449957477524953229059651991304,
    1.37900857410374189319227482185687277075646,
    -3.29006951543608067990104758571136385011568,
    2.32471052409977398241535591839876579610906,
    0.0,
)
_TSIT5_B_HAT = (
    0.09468075576583945807478876255758922856118,
    0.00918356554034325309677636393664531375981,
    0.48777052842476157078556425996312282415167,
    1.23429756693047898565510967388423765403554,
    -2.70771234998352545488110997505932167068961,
    1.86662841817058703575371939956621149866626,
    1 / 66,
)
TSIT5 = EmbeddedTableau(
    a=_rows(
        (),
        (0.161,),
        (-0.00848065549235698854442687425023077467512, 0.33548065549235698854442687425023077467512),
        (
            2.89715305710549343213043259419293876492489,
            -6.35944848997507484314815991238362562595270,
            4.36229543286958141101772731819088686102781,
        ),
        (
            5.32586482843925660442887792084051131783648,
            -11.74888356406282787774717033978577296188744,
            7.49553934288983620830460478456435815565868,
            -0.09249506636175524925650207933207191611350,
        ),
        (
            5.86145544294642002865925148698264789039434,
            -12.92096931784710929170611868178335939541781,
            8.15936789857615864318040079453925348518192,
            -0.07158497328140099722453054252582973869127,
            -0.02826905039406838290900305721271224146718,
        ),
        _TSIT5_B[:6],
    ),
    b=_TSIT5_B,
    c=(0.0, 0.161, 0.327, 0.9, 0.98002554090450968572981028628702459549421, 1.0, 1.0),
    b_error=tuple(b - bh for b, bh in zip(_TSIT5_B, _TSIT5_B_HAT)),
    order=5,
    name="tsit5",
)

EMBEDDED_SOLVERS: dict[str, EmbeddedTableau] = {
    t.name: t for t in (HEUN_EULER, BOSH3, DOPRI5, TSIT5)
}
