"""Neural-network primitives that stay fast inside loops (Flax-free, like the core).

* `conv_general_dilated`: drop-in for `lax.conv_general_dilated` whose reverse-mode
  derivative emits only convolutions in XLA:CPU's canonical layout (fast inside
  `lax.scan` / `fori_loop`); use it in Flax as
  `nn.Conv(..., conv_general_dilated=anode_jax.nn.conv_general_dilated)`. The formulation of
  each gradient is chosen by measurement on the running machine and cached on disk
  (`anode_jax.nn.autotune`: `ANODE_JAX_AUTOTUNE=on|off|cache`, `ANODE_JAX_AUTOTUNE_CACHE`).
* `noncanonical_convs`: the convolutions of a compiled program that XLA:CPU runs on its
  slow path inside loops (a debugging and regression-test utility).
"""

from ._conv import (
    INPUT_GRADIENT_METHODS,
    WEIGHT_GRADIENT_METHODS,
    conv_general_dilated,
    weight_gradient_method,
)
from ._hlo import convs_in_loops, is_canonical_conv, noncanonical_convs

__all__ = [
    "INPUT_GRADIENT_METHODS",
    "WEIGHT_GRADIENT_METHODS",
    "conv_general_dilated",
    "convs_in_loops",
    "is_canonical_conv",
    "noncanonical_convs",
    "weight_gradient_method",
]
