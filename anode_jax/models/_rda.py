"""Parameter dynamics `dθ/dt = q(θ, p)` for ANODEv2 coupled blocks.

ANODEv2 (Zhang et al. 2019, arXiv:1906.04596, Eq. 3) evolves the weights of a block in
time together with its activations::

    dz/dt = f(z, θ(t)),    dθ/dt = q(θ, p),    θ(0) = θ₀,

and trains `θ₀` and `p`. The paper uses a reaction-diffusion-advection (RDA)
equation for `q` but does not publish its discretization. The operator below is
**this project's** definition, not the paper's exact one.

For every convolution kernel `K` of shape `(H, W, I, O)` (flax HWIO layout) the
spatial taps `(h, w)` form a small grid with unit spacing, and::

    ∂K/∂t = D ⊙ ΔK + v_h ∂_h K + v_w ∂_w K + a ⊙ tanh(K) + b ⊙ K

* `Δ` is the 5-point Laplacian, `∂_h, ∂_w` central differences, both with zero-flux
  (Neumann) boundaries implemented by edge-replicating ghost taps; for a 1-wide axis
  these vanish, so 1×1 kernels have `Δ = ∇ = 0` and 1×3 / 3×1 kernels diffuse along
  their long axis only.
* `D = softplus(d) ≥ 0` (diffusivity), `v = (v_h, v_w)` (velocity), `a` and `b`
  (reaction) are learned per output channel `o` and broadcast over `(h, w, i)`.

Because the ghost taps copy the boundary, the discrete Laplacian sums to zero over the
taps, so pure diffusion (`v = 0`, `a = b = 0`) conserves each kernel's tap sum.

`"conv"` is a learned linear map over the tap dimension, per output channel:
`dK[k', i, o]/dt = Σ_k M[o, k', k] K[k, i, o]` with `k` the flattened `(h, w)`.

`"none"`: `dθ/dt = 0` (ANODEv2 reduces to ANODE).

Only 4-D leaves (conv kernels) evolve; biases and normalization scales/offsets are
part of the state but have `dθ/dt = 0`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

#: Names of the parameter dynamics accepted by `CoupledODEBlock(q=...)`.
Q_NAMES = ("none", "rda", "conv")

#: softplus(_DIFFUSION_INIT) ≈ 0.1: weak initial smoothing of the kernels.
_DIFFUSION_INIT = -2.2521684610440903

PyTree = Any


@functools.cache
def tap_operators(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Finite-difference matrices `(Δ, ∂_h, ∂_w)` over the taps of an `height×width` grid.

    Each is `(k, k)` with `k = height·width` taps in row-major order, acting on a
    kernel reshaped to `(k, I, O)`. Unit spacing; zero-flux (Neumann) boundaries via
    ghost taps equal to their boundary neighbour, so `Δ` (5-point) has zero column
    sums and `∂` (central differences) is `½·(inner − boundary)` at the boundary.
    A 1-wide axis contributes nothing: 1×1 kernels have `Δ = ∂_h = ∂_w = 0`.
    """
    k = height * width
    lap = np.zeros((k, k))
    grad_h = np.zeros((k, k))
    grad_w = np.zeros((k, k))

    def index(i, j):  # ghost taps (outside the grid) take the boundary value
        return min(max(i, 0), height - 1) * width + min(max(j, 0), width - 1)

    for i in range(height):
        for j in range(width):
            a = index(i, j)
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                lap[a, index(i + di, j + dj)] += 1.0
                lap[a, a] -= 1.0
            grad_h[a, index(i + 1, j)] += 0.5
            grad_h[a, index(i - 1, j)] -= 0.5
            grad_w[a, index(i, j + 1)] += 0.5
            grad_w[a, index(i, j - 1)] -= 0.5
    for m in (lap, grad_h, grad_w):
        m.setflags(write=False)
    return lap, grad_h, grad_w


def _apply_taps(operator: jax.Array, kernel: jax.Array) -> jax.Array:
    """`out[a, i, o] = Σ_b operator[o, a, b] · kernel[b, i, o]` on an HWIO kernel.

    `operator`: `(O, k, k)`. One batched matmul over output channels keeps the
    compiled program small (a pad/slice stencil per kernel per solver stage made XLA's
    compile time explode for whole networks).
    """
    h, w, i, o = kernel.shape
    taps = kernel.reshape(h * w, i, o)
    return jnp.einsum("oab,bio->aio", operator, taps).reshape(kernel.shape)


def kernel_laplacian(kernel: jax.Array) -> jax.Array:
    """5-point Laplacian over the taps of an HWIO kernel, Neumann boundaries, h = 1."""
    lap, _, _ = tap_operators(*kernel.shape[:2])
    op = jnp.broadcast_to(jnp.asarray(lap, kernel.dtype), (kernel.shape[-1],) + lap.shape)
    return _apply_taps(op, kernel)


def kernel_gradient(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Central differences `(∂_h K, ∂_w K)` over the taps, Neumann boundaries, h = 1."""
    _, grad_h, grad_w = tap_operators(*kernel.shape[:2])
    shape = (kernel.shape[-1],) + grad_h.shape
    return tuple(
        _apply_taps(jnp.broadcast_to(jnp.asarray(g, kernel.dtype), shape), kernel)
        for g in (grad_h, grad_w)
    )


def rda_rhs(kernel: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    """RDA right-hand side for one HWIO kernel (module docstring equation).

    `p`: `diffusion` (O,) pre-softplus, `velocity` (2, O), `reaction_tanh` (O,),
    `reaction_linear` (O,). Returns an array shaped like `kernel`. The linear part
    `D Δ + v_h ∂_h + v_w ∂_w` is assembled per output channel as one `(O, k, k)`
    operator and applied in a single batched matmul.
    """
    dtype = kernel.dtype
    lap, grad_h, grad_w = (jnp.asarray(m, dtype) for m in tap_operators(*kernel.shape[:2]))
    diffusivity = jax.nn.softplus(p["diffusion"].astype(dtype))
    velocity = p["velocity"].astype(dtype)
    operator = (
        diffusivity[:, None, None] * lap
        + velocity[0][:, None, None] * grad_h
        + velocity[1][:, None, None] * grad_w
    )
    return (
        _apply_taps(operator, kernel)
        + p["reaction_tanh"].astype(dtype) * jnp.tanh(kernel)
        + p["reaction_linear"].astype(dtype) * kernel
    )


def conv_rhs(kernel: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    """Learned tap mixing for one HWIO kernel: `dK[k',i,o] = Σ_k M[o,k',k] K[k,i,o]`.

    `p["mixing"]`: `(O, H·W, H·W)`.
    """
    return _apply_taps(p["mixing"].astype(kernel.dtype), kernel)


def _init_rda(kernel: jax.Array) -> dict[str, jax.Array]:
    out = kernel.shape[-1]
    return {
        "diffusion": jnp.full((out,), _DIFFUSION_INIT, jnp.float32),
        "velocity": jnp.zeros((2, out), jnp.float32),
        "reaction_tanh": jnp.zeros((out,), jnp.float32),
        "reaction_linear": jnp.zeros((out,), jnp.float32),
    }


def _init_conv(kernel: jax.Array) -> dict[str, jax.Array]:
    h, w, _, out = kernel.shape
    # Zero mixing: the block starts as an ANODE block (θ constant) and learns away.
    return {"mixing": jnp.zeros((out, h * w, h * w), jnp.float32)}


_KERNEL_RHS = {"rda": rda_rhs, "conv": conv_rhs}
_KERNEL_INIT = {"rda": _init_rda, "conv": _init_conv}


def _check_q(q: str) -> None:
    if q not in Q_NAMES:
        raise ValueError(f"q must be one of {Q_NAMES}, got {q!r}")


def _is_kernel(leaf: jax.Array) -> bool:
    return getattr(leaf, "ndim", 0) == 4


def init_q_params(q: str, theta: PyTree) -> PyTree:
    """Initial `p` for the dynamics `q` of the weight pytree `theta`.

    Returns a nested dict mirroring the paths of `theta`'s conv kernels (4-D leaves)
    with one parameter dict per kernel; `{}` for `q="none"`.
    """
    _check_q(q)
    if q == "none":
        return {}
    flat = traverse_util.flatten_dict(theta)
    return traverse_util.unflatten_dict(
        {path: _KERNEL_INIT[q](leaf) for path, leaf in flat.items() if _is_kernel(leaf)}
    )


def _lookup(tree: PyTree, path: tuple[str, ...]) -> PyTree:
    for key in path:
        tree = tree[key]
    return tree


def parameter_field(q: str, theta: PyTree, q_params: PyTree) -> PyTree:
    """`dθ/dt = q(θ, p)` for a whole weight pytree (ANODEv2 Eq. 3, second line).

    Conv kernels get `rda_rhs` / `conv_rhs`; every other leaf gets 0.
    `theta` is not batched, so this is evaluated once per solver stage.
    """
    _check_q(q)
    if q == "none":
        return jax.tree.map(jnp.zeros_like, theta)
    flat = traverse_util.flatten_dict(theta)
    rhs = _KERNEL_RHS[q]
    return traverse_util.unflatten_dict(
        {
            path: rhs(leaf, _lookup(q_params, path)) if _is_kernel(leaf) else jnp.zeros_like(leaf)
            for path, leaf in flat.items()
        }
    )
