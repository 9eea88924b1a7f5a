"""Neural-network primitives that stay fast inside loops (Flax-free, like the core).

* `conv_general_dilated`: drop-in for `lax.conv_general_dilated` whose reverse-mode
  derivative emits only convolutions in XLA:CPU's canonical layout (fast inside
  `lax.scan` / `fori_loop`); use it in Flax as
  `nn.Conv(..., conv_general_dilated=anode_jax.nn.conv_general_dilated)`. The formulation of
  its forward pass and of each gradient is chosen by measurement on the running machine and
  cached on disk (`anode_jax.nn.autotune`: `ANODE_JAX_AUTOTUNE=on|off|cache`,
  `ANODE_JAX_AUTOTUNE_CACHE`); oneDNN's kernels are candidates when the optional extension
  `anode_jax.nn.onednn` is built (`scripts/build_onednn.sh`).
* `noncanonical_convs`: the convolutions of a compiled program that XLA:CPU runs on its
  slow path inside loops (a debugging and regression-test utility).
"""

from ._conv import (
    FORWARD_METHODS,
    INPUT_GRADIENT_METHODS,
    WEIGHT_GRADIENT_METHODS,
    conv_general_dilated,
    onednn_unsupported_reason,
    weight_gradient_method,
)
from ._hlo import convs_in_loops, is_canonical_conv, noncanonical_convs

__all__ = [
    "FORWARD_METHODS",
    "INPUT_GRADIENT_METHODS",
    "WEIGHT_GRADIENT_METHODS",
    "conv_general_dilated",
    "convs_in_loops",
    "is_canonical_conv",
    "noncanonical_convs",
    "onednn_unsupported_reason",
    "weight_gradient_method",
]
