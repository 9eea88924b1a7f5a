"""Flax (linen) models of ANODE (arXiv:1902.10298) and ANODEv2 (arXiv:1906.04596).

Entry point for training code::

    from anode_jax.models import create_model, MODEL_NAMES, BLOCK_TYPES, Q_NAMES

    model = create_model("resnet", num_classes=10, block="ode", num_steps=2,
                         solver="euler", adjoint="anode", q="rda", norm="batch", width=1.0)
    variables = model.init({"params": key}, x, train=False)   # x: (N, H, W, C) float32
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

See `docs/models.md` for layer tables, parameter counts and the normalization design.
"""

from ._blocks import CoupledODEBlock, ODEBlock, ResidualBlock
from ._layers import (
    CONV_NAMES,
    AlexNetVectorField,
    BasicBlock,
    Conv,
    ResNetVectorField,
    SqueezeNextBlock,
    SqueezeNextVectorField,
)
from ._networks import (
    BLOCK_TYPES,
    MODEL_NAMES,
    AlexNet,
    ResNet4,
    ResNet10,
    ResNet18,
    SmallNet,
    SqueezeNext23,
    count_params,
    create_model,
)
from ._norm import NORM_NAMES, STATS_COLLECTION, BatchNorm, BatchStatNorm, num_groups
from ._odeint_linen import odeint_linen
from ._rda import (
    Q_NAMES,
    conv_rhs,
    init_q_params,
    kernel_gradient,
    kernel_laplacian,
    parameter_field,
    rda_rhs,
    tap_operators,
)

__all__ = [
    "BLOCK_TYPES",
    "CONV_NAMES",
    "MODEL_NAMES",
    "NORM_NAMES",
    "Q_NAMES",
    "STATS_COLLECTION",
    "AlexNet",
    "AlexNetVectorField",
    "BasicBlock",
    "BatchNorm",
    "BatchStatNorm",
    "Conv",
    "CoupledODEBlock",
    "ODEBlock",
    "ResNet4",
    "ResNet10",
    "ResNet18",
    "ResNetVectorField",
    "ResidualBlock",
    "SmallNet",
    "SqueezeNext23",
    "SqueezeNextBlock",
    "SqueezeNextVectorField",
    "conv_rhs",
    "count_params",
    "create_model",
    "init_q_params",
    "kernel_gradient",
    "kernel_laplacian",
    "num_groups",
    "odeint_linen",
    "parameter_field",
    "rda_rhs",
    "tap_operators",
]
