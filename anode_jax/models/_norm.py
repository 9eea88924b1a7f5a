"""Normalization layers for vector fields and standard blocks.

Inside an ODE solve every evaluation of the vector field must be a pure function of
`(t, z, params)`: the ANODE backward pass (Gholami et al. 2019, Sec. 3) recomputes
the forward trajectory, so a layer that mutated running averages inside the solve
would update them once per solver stage and again during the recomputation.

`BatchStatNorm` therefore splits flax's `nn.BatchNorm` in two:

* in training mode it normalizes with the statistics of the current batch and only
  *reports* them, by writing `{"mean", "var"}` into the `"norm_stats"` collection
  (the caller chooses whether that collection is mutable; the value is
  `stop_gradient`-ed because running averages are never differentiated);
* in evaluation mode it reads the running averages from the `"batch_stats"`
  collection, which it never writes.

The running averages are updated by the enclosing block (see `_blocks.py`), once per
forward call and outside the solver.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

#: Collection into which `BatchStatNorm` reports the batch statistics it used.
STATS_COLLECTION = "norm_stats"

#: Normalization kinds accepted by the networks (`create_model(norm=...)`).
NORM_NAMES = ("batch", "group")

#: Running-average momentum, as flax's `nn.BatchNorm` default (0.99) is too slow for
#: the short CIFAR schedules of the papers; PyTorch's 0.1 update rate == momentum 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def num_groups(channels: int) -> int:
    """Number of GroupNorm groups for `channels` features.

    The usual 32 groups (Wu & He 2018), reduced to the largest divisor of
    `channels` that still leaves at least two channels per group, so that tiny test
    widths (4 or 8 channels) do not degenerate into instance normalization.
    """
    if channels < 2:
        return 1
    upper = min(32, channels // 2)
    return max(g for g in range(1, upper + 1) if channels % g == 0)


def _batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance over all axes but the last (as `nn.BatchNorm`)."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    return mean, jnp.mean(jnp.square(x - mean), axis=axes)


def _normalize(x, mean, var, scale, bias, epsilon):
    """`(x - mean) / sqrt(var + eps) * scale + bias`, computed in `x`'s dtype."""
    dtype = x.dtype
    inv = jax.lax.rsqrt(var.astype(dtype) + epsilon) * scale.astype(dtype)
    return (x - mean.astype(dtype)) * inv + bias.astype(dtype)


class BatchNorm(nn.Module):
    """Standard batch normalization for layers outside any ODE solve.

    Same semantics and variable layout as flax's `nn.BatchNorm(momentum=0.9,
    epsilon=1e-5)` (params `scale`/`bias`, `batch_stats` `mean`/`var`,
    running averages updated in place in training mode, except during init), but it
    computes in the input's dtype, so float64 gradient checks run under strict dtype
    promotion (flax's version mixes its float32 parameters into float64 inputs).
    `x`: `(..., C)`.
    """

    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        if not train:
            return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon)
        mean, var = _batch_moments(x)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1.0 - m) * mean.astype(ra_mean.value.dtype)
            ra_var.value = m * ra_var.value + (1.0 - m) * var.astype(ra_var.value.dtype)
        return _normalize(x, mean, var, scale, bias, self.epsilon)


class BatchStatNorm(nn.Module):
    """Batch normalization as a pure function of the batch (for use inside ODE solves).

    Input `x`: `(..., C)`; statistics are taken over all axes but the last.
    Training: `y = (x - mean_B) / sqrt(var_B + eps) * scale + bias` with the biased
    batch variance, as `nn.BatchNorm`; `mean_B` and `var_B` are reported in
    `"norm_stats"` when that collection is mutable. Evaluation: the running
    averages `batch_stats/{mean,var}` (created at init as zeros / ones) are used.
    """

    epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        # Running averages are declared only where they are read (eval) or created
        # (init): a training-mode call then needs no "batch_stats" at all, which is
        # what lets the ODE block pass nothing but the parameters through the solver.
        if self.is_initializing() or not train:
            ra_mean = self.variable(
                "batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32)
            )
            ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        if train:
            mean, var = _batch_moments(x)
            if self.is_mutable_collection(STATS_COLLECTION):
                self.put_variable(STATS_COLLECTION, "mean", jax.lax.stop_gradient(mean))
                self.put_variable(STATS_COLLECTION, "var", jax.lax.stop_gradient(var))
        else:
            mean, var = ra_mean.value, ra_var.value
        return _normalize(x, mean, var, scale, bias, self.epsilon)


def vector_field_norm(kind: str, x: jax.Array, train: bool) -> jax.Array:
    """Apply the vector-field normalization `kind` to `x` (call inside `nn.compact`).

    `"batch"`: `BatchStatNorm` (pure; statistics reported, not stored).
    `"group"`: `nn.GroupNorm` with `num_groups` groups (per example, no state).
    """
    if kind == "batch":
        return BatchStatNorm()(x, train)
    if kind == "group":
        return nn.GroupNorm(num_groups=num_groups(x.shape[-1]), epsilon=BN_EPSILON)(x)
    raise ValueError(f"norm must be one of {NORM_NAMES}, got {kind!r}")


def standard_norm(kind: str, x: jax.Array, train: bool, name: str | None = None) -> jax.Array:
    """Normalization for layers outside any ODE solve (stems, standard blocks, heads).

    `"batch"`: `BatchNorm` (momentum 0.9, eps 1e-5) updating `batch_stats`
    itself in training mode; `"group"`: `nn.GroupNorm`.
    """
    if kind == "batch":
        return BatchNorm(name=name)(x, train)
    if kind == "group":
        return nn.GroupNorm(num_groups=num_groups(x.shape[-1]), epsilon=BN_EPSILON, name=name)(x)
    raise ValueError(f"norm must be one of {NORM_NAMES}, got {kind!r}")


def scaled_channels(channels: int, width: float) -> int:
    """`channels * width` rounded to the nearest integer, at least 1."""
    return max(1, int(math.floor(channels * width + 0.5)))
