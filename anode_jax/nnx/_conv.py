"""The loop-safe convolution in the calling convention of `nnx.Conv`."""

from __future__ import annotations

from typing import Any

import jax

from anode_jax.nn import conv_general_dilated as _loop_safe


def conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides, padding, *, out_sharding=None, **kwargs: Any
) -> jax.Array:
    """`anode_jax.nn.conv_general_dilated` (same values as `lax.conv_general_dilated`, with a
    gradient that stays fast inside solver loops on XLA:CPU) for
    `nnx.Conv(..., conv_general_dilated=conv_general_dilated)`.

    `nnx.Conv` passes lax's `out_sharding` keyword; only its default (None: the sharding
    follows the inputs) is supported, anything else raises `NotImplementedError`.
    """
    if out_sharding is not None:
        raise NotImplementedError(
            f"out_sharding={out_sharding!r} is not supported by the loop-safe convolution; "
            "use out_sharding=None or nnx.Conv's default lax.conv_general_dilated."
        )
    return _loop_safe(lhs, rhs, window_strides, padding, **kwargs)
