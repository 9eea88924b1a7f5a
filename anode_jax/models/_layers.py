"""Vector fields (for ODE / residual / coupled blocks) and standard (non-ODE) blocks.

Vector fields have the signature `f(t, z, train) -> dz` with `dz.shape == z.shape`
(`z`: `(N, H, W, C)`); `t` is accepted for the solver and unused, as in ANODE,
whose blocks are autonomous. Their normalization is `vector_field_norm`
(pure BatchNorm or GroupNorm); the standard blocks use `standard_norm`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from anode_jax.nn import conv_general_dilated

from ._norm import standard_norm, vector_field_norm

#: Convolution implementations accepted by `conv=`: `"loop_safe"` (default,
#: `anode_jax.nn.conv_general_dilated`, whose gradient stays fast inside loops on
#: XLA:CPU) or `"lax"` (`lax.conv_general_dilated`; supports forward-mode autodiff).
CONV_NAMES = ("loop_safe", "lax")


def conv_function(conv: str):
    """The `conv_general_dilated` function of a `CONV_NAMES` entry."""
    if conv == "loop_safe":
        return conv_general_dilated
    if conv == "lax":
        return lax.conv_general_dilated
    raise ValueError(f"conv must be one of {CONV_NAMES}, got {conv!r}")


def _loop_safe_conv_cls():
    return conv_general_dilated


def _lax_conv_cls():
    return lax.conv_general_dilated


# `nn.Conv(conv_general_dilated_cls=c)` calls `c()` for the convolution function; its older
# field `conv_general_dilated` is marked "Deprecated. Will be removed." by Flax.
_CONV_CLS = {"loop_safe": _loop_safe_conv_cls, "lax": _lax_conv_cls}


def Conv(conv: str, features: int, kernel_size: tuple[int, int], **kwargs: Any) -> nn.Conv:
    """`nn.Conv` computed by the `CONV_NAMES` implementation `conv`.

    Parameters, their names and the result are those of a plain `nn.Conv`.
    """
    conv_function(conv)  # the one error message for a bad name
    return nn.Conv(features, kernel_size, conv_general_dilated_cls=_CONV_CLS[conv], **kwargs)


class ResNetVectorField(nn.Module):
    """ANODE ResNet vector field `f(z) = ReLU(BN(conv3×3(ReLU(BN(conv3×3(z))))))`.

    Both convolutions `C → C`, stride 1, no bias; no inner skip connection (the skip
    is the ODE itself: forward Euler with `dt = 1` gives `z + f(z)`).
    """

    channels: int
    norm: str = "batch"
    conv: str = "loop_safe"

    @nn.compact
    def __call__(self, t: jax.Array, z: jax.Array, train: bool = False) -> jax.Array:
        del t  # autonomous
        h = Conv(self.conv, self.channels, (3, 3), padding="SAME", use_bias=False)(z)
        h = nn.relu(vector_field_norm(self.norm, h, train))
        h = Conv(self.conv, self.channels, (3, 3), padding="SAME", use_bias=False)(h)
        return nn.relu(vector_field_norm(self.norm, h, train))


class SqueezeNextVectorField(nn.Module):
    """SqueezeNext unit as vector field (Gholami et al. 2018, Fig. 2, reduction 1/2).

    `1×1 (C→C/2) → 1×1 (C/2→C/4) → 1×3 (C/4→C/2) → 3×1 (C/2→C/2) → 1×1 (C/2→C)`,
    every convolution with bias, followed by normalization and ReLU.
    """

    channels: int
    norm: str = "batch"
    conv: str = "loop_safe"

    @nn.compact
    def __call__(self, t: jax.Array, z: jax.Array, train: bool = False) -> jax.Array:
        del t  # autonomous
        half = max(1, self.channels // 2)
        quarter = max(1, self.channels // 4)
        h = z
        for features, kernel in (
            (half, (1, 1)),
            (quarter, (1, 1)),
            (half, (1, 3)),
            (half, (3, 1)),
            (self.channels, (1, 1)),
        ):
            h = Conv(self.conv, features, kernel, padding="SAME", use_bias=True)(h)
            h = nn.relu(vector_field_norm(self.norm, h, train))
        return h


class AlexNetVectorField(nn.Module):
    """AlexNet ODE vector field `f(z) = ReLU(BN(conv3×3(z)))` (this project's choice).

    One `C → C` convolution without bias: the same-shape fifth convolution of the
    CIFAR AlexNet turned into an ODE.
    """

    channels: int
    norm: str = "batch"
    conv: str = "loop_safe"

    @nn.compact
    def __call__(self, t: jax.Array, z: jax.Array, train: bool = False) -> jax.Array:
        del t  # autonomous
        h = Conv(self.conv, self.channels, (3, 3), padding="SAME", use_bias=False)(z)
        return nn.relu(vector_field_norm(self.norm, h, train))


class BasicBlock(nn.Module):
    """Standard ResNet basic block (He et al. 2016), used once per ResNet-18 stage.

    `ReLU(BN(conv3×3(ReLU(BN(conv3×3_s(x))))) + shortcut(x))`; the shortcut is the
    identity, or `BN(conv1×1_s(x))` when stride or channel count change. No biases.
    `x`: `(N, H, W, C_in)` → `(N, H/s, W/s, features)`.
    """

    features: int
    stride: int = 1
    norm: str = "batch"
    conv: str = "loop_safe"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        s = (self.stride, self.stride)
        h = Conv(
            self.conv,
            self.features,
            (3, 3),
            strides=s,
            padding="SAME",
            use_bias=False,
            name="conv1",
        )(x)
        h = nn.relu(standard_norm(self.norm, h, train, name="norm1"))
        h = Conv(self.conv, self.features, (3, 3), padding="SAME", use_bias=False, name="conv2")(h)
        h = standard_norm(self.norm, h, train, name="norm2")
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = Conv(
                self.conv, self.features, (1, 1), strides=s, use_bias=False, name="shortcut_conv"
            )(x)
            shortcut = standard_norm(self.norm, shortcut, train, name="shortcut_norm")
        return nn.relu(h + shortcut)


class SqueezeNextBlock(nn.Module):
    """Standard SqueezeNext block (Gholami et al. 2018), used once per SqNxt stage.

    Bottleneck width `a = C_in·r` with `r = 1` for stride 2, `1/4` when
    `C_in > C_out`, else `1/2`; `1×1_s (C_in→a) → 1×1 (a→a/2) → 1×3 (a/2→a) →
    3×1 (a→a) → 1×1 (a→C_out)`, each conv with bias + norm + ReLU; shortcut identity or
    `BN(conv1×1_s(x))` (with bias) when shape changes; ReLU after the addition.
    """

    features: int
    stride: int = 1
    norm: str = "batch"
    conv: str = "loop_safe"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cin = x.shape[-1]
        if self.stride == 2:
            reduction = 1.0
        elif cin > self.features:
            reduction = 0.25
        else:
            reduction = 0.5
        a = max(1, int(cin * reduction))
        s = (self.stride, self.stride)
        h = x
        for i, (features, kernel, strides) in enumerate(
            (
                (a, (1, 1), s),
                (max(1, a // 2), (1, 1), (1, 1)),
                (a, (1, 3), (1, 1)),
                (a, (3, 1), (1, 1)),
                (self.features, (1, 1), (1, 1)),
            )
        ):
            h = Conv(
                self.conv,
                features,
                kernel,
                strides=strides,
                padding="SAME",
                use_bias=True,
                name=f"conv{i + 1}",
            )(h)
            h = nn.relu(standard_norm(self.norm, h, train, name=f"norm{i + 1}"))
        shortcut = x
        if self.stride != 1 or cin != self.features:
            shortcut = Conv(
                self.conv, self.features, (1, 1), strides=s, use_bias=True, name="shortcut_conv"
            )(x)
            shortcut = standard_norm(self.norm, shortcut, train, name="shortcut_norm")
        return nn.relu(h + shortcut)


def conv_norm_relu(
    x: jax.Array,
    features: int,
    kernel: tuple[int, int],
    *,
    norm: str,
    train: bool,
    name: str,
    strides: int = 1,
    use_bias: bool = False,
    relu: bool = True,
    conv: str = "loop_safe",
) -> jax.Array:
    """`ReLU(norm(conv(x)))` for stems, transitions and heads (call inside compact)."""
    h = Conv(
        conv,
        features,
        kernel,
        strides=(strides, strides),
        padding="SAME",
        use_bias=use_bias,
        name=f"{name}_conv",
    )(x)
    h = standard_norm(norm, h, train, name=f"{name}_norm")
    return nn.relu(h) if relu else h


def global_average_pool(x: jax.Array) -> jax.Array:
    """`(N, H, W, C) → (N, C)`."""
    return jnp.mean(x, axis=(1, 2))
