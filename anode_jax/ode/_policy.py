"""The default loop policy: loop, unless a vector field's own convolutions would be slow in one.

On XLA:CPU a convolution gets its fast layout only in the program's top-level computation, not
inside a while body (`lax.scan`, `fori_loop`), and JAX's transpose rules make the gradient
convolutions of a plain `lax.conv_general_dilated` non-canonical: in a loop they fall back to a
naive kernel (8 weight-gradient convs 32×16×16×16: 564 ms looped vs 5.4 ms unrolled).
`anode_jax.nn.conv_general_dilated` owns its backward and emits canonical convolutions only, so
vector fields built from it (every model of `anode_jax.models`) loop at unrolled speed.

`uses_plain_convolutions` finds the others: a convolution in the traced vector field that no
`custom_vjp` rule owns.
"""

from __future__ import annotations

import warnings

import jax

# Primitives whose sub-computations carry a user-written derivative rule: a convolution inside
# one is differentiated by that rule, not by JAX's transpose rules.
_OWNED_DERIVATIVE_PRIMITIVES = ("custom_vjp_call", "custom_vjp_call_jaxpr")

_warned: set[str] = set()


def _sub_jaxprs(params):
    for value in params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if hasattr(v, "eqns"):
                yield v
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr


def _contains_plain_conv(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            return True
        if name in _OWNED_DERIVATIVE_PRIMITIVES:
            continue
        if any(_contains_plain_conv(sub) for sub in _sub_jaxprs(eqn.params)):
            return True
    return False


def uses_plain_convolutions(vector_field, t, y0, args) -> bool:
    """Whether vector_field(t, y0, args) runs a convolution whose gradient JAX derives."""
    return _contains_plain_conv(jax.make_jaxpr(vector_field)(t, y0, args).jaxpr)


def resolve_unroll(unroll, num_steps: int, vector_field, t, y0, args) -> bool:
    """The loop policy of one solve: True unrolls the Nt steps, False loops.

    `unroll`: True/False force it; an int n unrolls solves of at most n steps; None (default)
    loops, except on the CPU backend when the vector field uses plain `lax` convolutions: then
    the solve is unrolled as before loops were the default (as fast as it was, compile time
    growing with Nt; `anode` reverses solves of more than DEFAULT_MAX_UNROLL steps step by
    step) and a one-time warning names the loop-safe convolution.
    """
    if isinstance(unroll, bool):
        return unroll
    if unroll is not None:
        return num_steps <= unroll
    if num_steps == 1 or jax.default_backend() != "cpu":
        return False
    if not uses_plain_convolutions(vector_field, t, y0, args):
        return False
    name = getattr(vector_field, "__qualname__", type(vector_field).__name__)
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"odeint: the vector field {name!r} uses jax.lax.conv_general_dilated, whose "
            "gradient is slow inside a loop on CPU, so the solve is unrolled (compile time "
            "grows with the number of steps). Use anode_jax.nn.conv_general_dilated (same "
            "signature) to loop at unrolled speed, or pass unroll=True/False to choose.",
            stacklevel=3,
        )
    return True
