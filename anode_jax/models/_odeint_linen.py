"""`odeint_linen`: a Flax Linen module (or its submodules) as the vector field of `odeint`.

The core (`anode_jax.odeint`) is pure JAX: it traces the vector field (output check, loop,
custom VJPs) and must see parameters as explicit inputs. A Linen submodule called inside the
solve creates its variables inside those traces at `init` (JAX then reports an
`UnexpectedTracerError`), and its parameters are closed over rather than passed. This helper
lifts the variables first, the way `nn.apply` turns a module into a pure function:

1. at `init` (and when a non-`params` collection such as `batch_stats` is mutable), it calls
   `method(module, t0, y0, args)` once outside the solve, so every submodule creates its
   variables in the module's own scope (params, batch statistics);
2. it takes an unbound copy of the module and its variables (`Module.unbind`) and solves with
   the pure vector field `f(t, y, (variables, args)) = nn.apply(method, unbound)(variables, t,
   y, args)`; the variables enter `odeint` through `args`, so every gradient strategy
   differentiates them, and a parameter's gradient equals the one of `adjoint="direct"`.

Mutations inside the solve are discarded (the solve is a pure function). Running averages of
a BatchNorm in training mode are therefore updated from the one evaluation at (t0, y0)
outside the solve; the statistics the solve itself uses are each evaluation's batch
statistics, as in training. (`ODEBlock` of this package keeps per-time statistics instead.)
Random numbers (dropout) inside the vector field are not supported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from anode_jax.ode import odeint

PyTree = Any


def _call_module(module, t, y, args):
    return module(t, y, args)


def odeint_linen(
    module: nn.Module,
    y0: PyTree,
    args: PyTree = None,
    *,
    method: Callable[..., PyTree] | None = None,
    **odeint_kwargs,
) -> PyTree:
    """`odeint` with a vector field built from a bound Linen module's submodules.

    Call it inside a module's method (`setup` or `nn.compact` form) instead of passing a closure
    over `self`'s submodules to `odeint`:

        class Block(nn.Module):
            def setup(self):
                self.dense = nn.Dense(3)

            def __call__(self, x):
                return odeint_linen(
                    self, x, method=lambda m, t, y, args: jnp.tanh(m.dense(y)), num_steps=4
                )

    Args:
      module: a bound Linen module: `self` inside a module's method, or a submodule (created in
        `setup` or inline in an `nn.compact` method). Its variables (every collection) are
        the parameters of the solve.
      y0: initial state, a pytree of floating arrays (as for `odeint`).
      args: further parameters for the vector field (as for `odeint`).
      method: `method(m, t, y, args) -> dy/dt`, with `m` a bound copy of `module`; it may call
        any submodule of `m`. Default: `m(t, y, args)` (the module is itself the field).
      **odeint_kwargs: `t0`, `t1`, `num_steps`, `solver`, `adjoint`, `unroll` of `odeint`.

    Returns:
      y(t1), with y0's structure.

    Raises:
      TypeError: `module` is not a bound Linen module (e.g. called outside `init`/`apply`).
    """
    if not isinstance(module, nn.Module) or module.scope is None:
        raise TypeError(
            "odeint_linen(module, ...) needs a bound Flax Linen module (call it inside a module "
            f"method during init/apply, e.g. odeint_linen(self, ...)); got {type(module).__name__}."
        )
    method = _call_module if method is None else method
    collections = [c for c in module.variables if c != "params"]
    mutable = any(module.is_mutable_collection(c) for c in collections)
    if module.is_initializing() or mutable:
        # Variables are created (and running averages updated) here, in the module's own
        # scope, never inside the traces of the solve.
        t0 = odeint_kwargs.get("t0", 0.0)
        method(module, jnp.asarray(t0, jnp.result_type(float)), y0, args)
    unbound, variables = module.unbind()
    pure = nn.apply(method, unbound, mutable=True)

    def vector_field(t, y, variables_and_args):
        variables, args = variables_and_args
        dy, _ = pure(variables, t, y, args)  # updates inside the solve are discarded
        return dy

    return odeint(vector_field, y0, (variables, args), **odeint_kwargs)
