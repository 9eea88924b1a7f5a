"""ANODE: store the block input, recompute the block in the backward pass."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from anode_jax.ode import _loop
from anode_jax.ode.adjoints.base import AbstractAdjoint


@dataclasses.dataclass(frozen=True)
class Anode(AbstractAdjoint):
    """ANODE (Gholami, Keutzer & Biros 2019, arXiv:1902.10298, Sec. 3 and Alg. 1).

    The forward pass keeps only the block input z(0) (and the parameters). The backward pass
    recomputes the block's forward solve and backpropagates through the *discrete* solver
    (discretize-then-optimize), so the gradient is the exact gradient of the computed forward
    pass.

    Expressed with `jax.checkpoint`: the block is one rematerialized function; inside it, the
    looped solve (`lax.scan`) rematerializes each step too, so the recomputation stores the Nt
    step inputs and the backward loop recomputes one step's internals at a time.
    Memory: L block inputs + Nt states + one step's internals (the paper's O(L) + O(Nt));
    compute: about two extra forward passes. Under the unrolled loop policy the recomputation
    keeps every step's internals instead (one extra forward pass, O(Nt·s) activations).

    Args:
      remat_policy: a `jax.checkpoint_policies` policy saying which of a step's internals the
        recomputed block keeps instead of recomputing them in the backward loop (None: keep
        none, the minimum memory; e.g. `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`
        keeps matrix products, and the `offload_*` policies move them to host memory on
        accelerators). Only the looped policy uses it.
    """

    remat_policy: Callable | None = None
    name = "anode"
    needs_closure_conversion = False  # jax.checkpoint differentiates closures itself

    def solve(self, vector_field, state0, args, spec):
        step = spec.step_fn(vector_field)
        if not spec.unroll:
            # scan already keeps iterations apart, so CSE prevention is not needed inside it.
            step = jax.checkpoint(step, policy=self.remat_policy, prevent_cse=False)

        def block(state0, args):
            return _loop.integrate(
                step,
                state0,
                args,
                t0=spec.t0,
                dt=spec.dt,
                first=0,
                last=spec.num_steps,
                unroll=spec.unroll,
            )

        return jax.checkpoint(block)(state0, args)
