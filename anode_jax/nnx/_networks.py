"""The papers' networks as NNX modules: the Linen definitions of `anode_jax.models` through
`flax.nnx.bridge.ToNNX`, so each network has one definition (the Linen one) and the same
parameters, statistics and numbers from both APIs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx

from anode_jax.models import create_model as create_linen_model


class _Bridge(nnx.bridge.ToNNX):
    """`ToNNX` without its forwarding of the Linen module's methods as attributes.

    `ToNNX.__getattr__` answers an unknown attribute with the Linen class's method of that
    name; the networks have a method `head` and a submodule `head`, so the variables of the
    submodule would be merged into the method at `lazy_init`. Here an unknown attribute is an
    `AttributeError`, as for any module.
    """

    def __getattr__(self, name: str):
        return nnx.Module.__getattribute__(self, name)


class Network(nnx.Module):
    """A Linen network of `anode_jax.models` as an NNX module.

    `network(x)` maps images `x: (N, H, W, C)` float32 to logits `(N, num_classes)`. Training
    mode (`use_running_average=False`, set by `network.train()`) normalizes with batch
    statistics and updates the running averages in place; evaluation mode
    (`network.eval()`) reads them. Parameters are `nnx.Param`s, running statistics
    `nnx.BatchStat`s, at the Linen paths (`network.linen_variables()` gives the Linen
    `{"params", "batch_stats"}`), so `nnx.Optimizer(network, tx, wrt=nnx.Param)` trains the
    same parameters as the Linen trainer and checkpoints convert both ways.

    Args:
      module: an unbound Linen network (`anode_jax.models.create_model(...)`).
      input_shape: `(H, W, C)` of one image, for the shape-based initialization.
      rngs: `nnx.Rngs` with a `params` (or default) stream for the initialization.
    """

    def __init__(self, module: linen.Module, *, input_shape: tuple[int, ...], rngs: nnx.Rngs):
        if not isinstance(module, linen.Module):
            raise TypeError(f"module must be a flax.linen.Module, got {type(module).__name__}.")
        dummy = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
        self.linen = _Bridge(module, rngs=rngs).lazy_init(dummy, train=False)
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            return self.linen(x, train=False)
        return self.linen(x, train=True, mutable=["batch_stats"])

    def set_view(self, use_running_average: bool | None = None):
        """Hook of `nnx.view`: evaluation (`True`) or training (`False`) mode."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def linen_variables(self) -> dict[str, Any]:
        """`{"params", "batch_stats"}` as the Linen network's `init`/`apply` use them."""
        out = {"params": nnx.to_pure_dict(nnx.state(self.linen, nnx.Param))}
        stats = nnx.to_pure_dict(nnx.state(self.linen, nnx.BatchStat))
        if stats:
            out["batch_stats"] = stats
        return out

    def load_linen_variables(self, variables: dict[str, Any]) -> None:
        """Set the parameters and statistics from Linen `variables` (same network).

        Raises `ValueError` naming a path of `variables` that the network does not have.
        """
        for collection, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
            if collection not in variables:
                continue
            state = nnx.state(self.linen, kind)
            nnx.replace_by_pure_dict(state, variables[collection])
            nnx.update(self.linen, state)


def create_model(
    name: str, *, input_shape: tuple[int, ...], rngs: nnx.Rngs, **kwargs: Any
) -> Network:
    """`anode_jax.models.create_model(name, **kwargs)` as an NNX `Network`.

    Same arguments and errors as the Linen factory (network names, block, solver, adjoint,
    q, norm, width, conv, unroll); `input_shape` `(H, W, C)` and `rngs` initialize it.
    """
    return Network(create_linen_model(name, **kwargs), input_shape=input_shape, rngs=rngs)
