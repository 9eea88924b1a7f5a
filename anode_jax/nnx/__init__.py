"""Flax NNX front-end: ANODE / ANODEv2 blocks around any `nnx.Module` vector field, and the
papers' networks as NNX modules.

    from flax import nnx
    from anode_jax import nnx as anx

    block = anx.ODEBlock(field, num_steps=2, solver="euler", adjoint="anode")
    z1 = block(z0)   # field: any nnx.Module, field(t, z) -> dz/dt
    # convolutions in the field: nnx.Conv(..., conv_general_dilated=anx.conv_general_dilated)

    model = anx.create_model("small", input_shape=(8, 8, 1), rngs=nnx.Rngs(0), num_steps=2)
    logits = model(x)   # the Linen network of anode_jax.models, through flax.nnx.bridge

See docs/models.md, "Flax NNX".
"""

from ._blocks import BN_MOMENTUM, CoupledODEBlock, ODEBlock
from ._conv import conv_general_dilated
from ._networks import Network, create_model

__all__ = [
    "BN_MOMENTUM",
    "CoupledODEBlock",
    "Network",
    "ODEBlock",
    "conv_general_dilated",
    "create_model",
]
