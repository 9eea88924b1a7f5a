"""Type aliases used across anode-jax."""

from collections.abc import Callable
from typing import Any

import jax

Array = jax.Array
PyTree = Any
# vector_field(t, y, args) -> dy/dt, with dy/dt of y's pytree structure, shapes and dtypes.
VectorField = Callable[[Array, PyTree, PyTree], PyTree]
# step(t, y, args) -> y after one solver step of the (fixed) size the step was built with.
StepFn = Callable[[Array, PyTree, PyTree], PyTree]
