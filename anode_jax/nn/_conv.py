"""A convolution whose reverse-mode derivative stays fast inside loops on XLA:CPU.

`lax.conv_general_dilated`'s transpose rules express the input gradient as a convolution
with a reversed window and swapped kernel dimensions (`b01f_01oi->b01f`) and the weight
gradient as one with batch and feature roles exchanged (`f01b_i01o->01bf`). XLA:CPU
rewrites such convolutions into its fast layout (NHWC input, HWIO kernel, no window
reversal) only in the program's entry computation; inside a while body (`lax.scan`,
`fori_loop`, a looped checkpoint) they run on a naive loop nest, 10–100× slower
(jax issue #12868; measured in docs/bench_conv.md).

`conv_general_dilated` computes the same convolution, but its `jax.custom_vjp`
backward is written with explicit transposes around convolutions that are already in the
canonical layout (`b01f_01io->b01f`), so no pass is needed to make them fast. The
backward calls `conv_general_dilated` itself, so higher reverse-mode derivatives stay
canonical too. Each gradient has several correct formulations (the weight gradient as one
canonical convolution, as one batch-parallel matrix product per kernel tap, or as one matrix
product per tap over batch and pixels together; the input gradient as one canonical
convolution or as per-tap products); which is fastest depends on the shape and the machine,
so by default it is chosen by measurement on first use and cached on disk
(`anode_jax.nn.autotune`; docs/bench_conv.md), with the shape rule
`weight_gradient_method` as the deterministic default when measuring is off.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import autotune, onednn

#: Formulations of the weight gradient accepted by `weight_gradient=`.
WEIGHT_GRADIENT_METHODS = ("auto", "conv", "taps", "gemm", "onednn")
#: Formulations of the input gradient accepted by `input_gradient=`.
INPUT_GRADIENT_METHODS = ("auto", "conv", "taps", "onednn")
#: Implementations of the forward convolution accepted by `forward=`.
FORWARD_METHODS = ("auto", "xla", "onednn")


def _canonical_dimension_numbers(num_spatial: int) -> lax.ConvDimensionNumbers:
    """NHWC / HWIO / NHWC for any number of spatial dimensions."""
    spatial = tuple(range(1, num_spatial + 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, num_spatial + 1) + spatial,
        rhs_spec=(num_spatial + 1, num_spatial) + tuple(range(num_spatial)),
        out_spec=(0, num_spatial + 1) + spatial,
    )


def _dilate(size: int, dilation: int) -> int:
    return 0 if size == 0 else 1 + dilation * (size - 1)


def weight_gradient_method(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    out_shape: Sequence[int],
    feature_group_count: int = 1,
) -> str:
    """The default (unmeasured) weight-gradient formulation of a canonical conv: "conv" | "taps".

    Used when autotuning is off (`ANODE_JAX_AUTOTUNE=off`) or cannot measure; otherwise the
    formulation is chosen by timing all of them on the running machine.

    Shapes in the canonical layout: `lhs` `(N, *spatial, C_in)`, `rhs`
    `(*kernel, C_in/G, C_out)`, `out` `(N, *spatial_out, C_out)`.

    * `"taps"`: one batch-parallel matrix product `Σ_n x_nᵀ·g_n` per kernel tap
      (`einsum("n…i,n…o->nio").sum(0)` over a strided slice of the padded input);
    * `"conv"`: one canonical convolution with the input's channels as batch and the
      output cotangent as kernel (what XLA:CPU does for lax's weight gradient at top level);
    * `"gemm"` (never the default): one matrix product per tap contracting batch and
      pixels together.

    Rule (XLA:CPU on an earlier 2-core machine, measured in benchmarks/bench_conv.py, docs/bench_conv.md): "taps" when the
    kernel has at most 3 taps (1×1, 1×3, 3×1) or the per-group channel product
    `(C_in/G)·(C_out/G)` is at least `64·64` (each tap's product is then a large enough
    matrix product); "conv" otherwise (e.g. 3×3 with 16 or 32 channels), whatever the image
    size.
    """
    del lhs_shape, out_shape
    taps = math.prod(rhs_shape[:-2])
    cin_per_group = rhs_shape[-2]
    cout_per_group = rhs_shape[-1] // feature_group_count
    if taps <= _TAPS_MAX_SMALL_KERNEL or cin_per_group * cout_per_group >= _TAPS_MIN_CHANNELS:
        return "taps"
    return "conv"


#: Kernels with at most this many taps use the per-tap formulation (docs/bench_conv.md).
_TAPS_MAX_SMALL_KERNEL = 3
#: (C_in/G)·(C_out/G) from which the per-tap formulation is used (docs/bench_conv.md).
_TAPS_MIN_CHANNELS = 64 * 64


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    weight_gradient: str = "auto",
    input_gradient: str = "auto",
    forward: str = "auto",
) -> jax.Array:
    """Drop-in for `lax.conv_general_dilated` with a loop-safe reverse-mode derivative.

    Same arguments, value and derivatives as `lax.conv_general_dilated` (float64 results
    agree to rounding, tests/test_conv.py). Its backward emits only convolutions in
    XLA:CPU's canonical layout (`b01f_01io->b01f`, no window reversal) with explicit
    transposes around them, so that gradients through `lax.scan` / `fori_loop` run on
    the fast convolution kernel; check a program with `anode_jax.nn.noncanonical_convs`.
    Use it in Flax as `nn.Conv(..., conv_general_dilated=conv_general_dilated)`.

    Supported: any number of spatial dimensions, any `dimension_numbers` (the operands
    are transposed to NHWC/HWIO and the result back), strides, padding (`"SAME"`,
    `"VALID"`, `"SAME_LOWER"` or explicit `(low, high)` pairs, negative too; strings
    only without input dilation, as in lax), input (`lhs`) and kernel (`rhs`) dilation,
    `feature_group_count`; `precision` is passed to every convolution of the forward
    and backward passes. Grouped convolutions stay canonical inside loops, but XLA:CPU's
    grouped kernel itself was not faster than lax's slow path there (one measurement, 3×3
    with 4 groups: 124 vs 106 ms). A window with more taps than the map has pixels (3×3 on
    1×1 or 2×2) is computed on an explicitly zero-padded input behind an optimization
    barrier, since XLA would otherwise swap the operands into a reversed, non-canonical
    convolution.

    Differentiation: reverse mode to any order (`grad`, `grad` of `grad`: the backward
    is built from this function itself, transposes, reshapes, slices and einsums, or
    oneDNN's gradient kernels with their own VJPs);
    `vmap` and `jit` work. **Forward mode (`jvp`, `jacfwd`, `linearize` of a
    `jvp`) is not supported**: it is a `jax.custom_vjp` function, and JAX raises
    `TypeError: can't apply forward-mode autodiff (jvp) to a custom_vjp function` — use
    `lax.conv_general_dilated` (e.g. `create_model(..., conv="lax")`) there.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision: as in `lax.conv_general_dilated`.
      batch_group_count: must be 1 (ValueError otherwise).
      preferred_element_type: must be None (ValueError otherwise).
      weight_gradient: `"auto"` (the fastest measured on this machine, see below),
        `"conv"`, `"taps"`, `"gemm"` or `"onednn"` (force one formulation).
      input_gradient: `"auto"`, `"conv"` (one canonical convolution with the flipped
        kernel), `"taps"` (the transpose of per-tap matrix products) or `"onednn"`.
      forward: `"auto"`, `"xla"` (`lax.conv_general_dilated` in the canonical layout) or
        `"onednn"`.

    oneDNN (`"onednn"`): kernels of the optional extension `anode_jax.nn.onednn` (built by
    `scripts/build_onednn.sh`, which `scripts/setup.sh` runs when it can), called as XLA
    custom calls. A candidate only when the extension is built, the default backend is the
    CPU with a single device (no partitioning rule for sharded programs) and the convolution
    is 2-D float32 with one feature group, no dilation and
    non-negative padding (`onednn_unsupported_reason`); its kernels have no derivative of
    their own, so the VJP of a oneDNN gradient is that of the same linear map written with
    XLA convolutions (higher orders still work). Under `vmap` it runs one call per mapped
    element (docs/bench_onednn.md).

    Choice by measurement (`"auto"`): when the forward and the backward are first traced for
    a new shape (under `jit` that is at compile time; shapes are static), every formulation
    that can compute it is compiled and timed on random inputs of that shape outside the
    trace, inside a short loop (where solvers run it), and the fastest is used and cached in memory and on disk per machine (CPU model
    and flags, backend, jax/jaxlib, `XLA_FLAGS`, the candidates and the oneDNN build).
    `ANODE_JAX_AUTOTUNE=off` uses the deterministic default (XLA's forward,
    `weight_gradient_method`, a convolution for the input gradient; never oneDNN),
    `ANODE_JAX_AUTOTUNE=cache` uses cached choices only, `ANODE_JAX_AUTOTUNE_CACHE=<dir>`
    moves the cache (default `~/.cache/anode_jax`), and `ANODE_JAX_CONV_FORWARD` /
    `ANODE_JAX_CONV_WEIGHT_GRADIENT` / `ANODE_JAX_CONV_INPUT_GRADIENT` pin a formulation
    for every call (a pinned `onednn` falls back to the default where it cannot compute a
    convolution). All formulations give the same values and gradients up to rounding.

    Raises:
      ValueError: for `batch_group_count != 1`, a `preferred_element_type`, an unknown
        `weight_gradient`, `input_gradient`, `forward` or padding string, arguments of the
        wrong length, or `"onednn"` requested for a convolution it cannot compute (the
        reason and the valid choices are named).
    """
    if batch_group_count != 1:
        raise ValueError(
            "anode_jax.nn.conv_general_dilated supports batch_group_count=1 only, got "
            f"{batch_group_count}; use lax.conv_general_dilated for grouped-batch convolutions."
        )
    if preferred_element_type is not None:
        raise ValueError(
            "anode_jax.nn.conv_general_dilated supports preferred_element_type=None only (the "
            f"result has the operands' dtype), got {preferred_element_type!r}."
        )
    if weight_gradient not in WEIGHT_GRADIENT_METHODS:
        raise ValueError(
            f"weight_gradient must be one of {WEIGHT_GRADIENT_METHODS}, got {weight_gradient!r}."
        )
    if input_gradient not in INPUT_GRADIENT_METHODS:
        raise ValueError(
            f"input_gradient must be one of {INPUT_GRADIENT_METHODS}, got {input_gradient!r}."
        )
    if forward not in FORWARD_METHODS:
        raise ValueError(f"forward must be one of {FORWARD_METHODS}, got {forward!r}.")
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    if lhs.ndim != rhs.ndim or lhs.ndim < 3:
        raise ValueError(
            "lhs and rhs must have the same rank >= 3 (batch, feature, spatial...), got shapes "
            f"{lhs.shape} and {rhs.shape}."
        )
    num_spatial = lhs.ndim - 2
    dnums = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    strides = _int_tuple("window_strides", window_strides, num_spatial)
    lhs_dil = _int_tuple("lhs_dilation", lhs_dilation, num_spatial)
    rhs_dil = _int_tuple("rhs_dilation", rhs_dilation, num_spatial)
    groups = int(feature_group_count)

    lhs_perm = (dnums.lhs_spec[0],) + tuple(dnums.lhs_spec[2:]) + (dnums.lhs_spec[1],)
    rhs_perm = tuple(dnums.rhs_spec[2:]) + (dnums.rhs_spec[1], dnums.rhs_spec[0])
    x = _transpose(lhs, lhs_perm)
    w = _transpose(rhs, rhs_perm)
    # checked before any formulation is traced or measured (lax would say it too, but only
    # after the autotuner had tried every candidate on the inconsistent shapes)
    if x.shape[-1] != w.shape[-2] * groups or w.shape[-1] % groups:
        raise ValueError(
            f"lhs has {x.shape[-1]} input features but rhs expects {w.shape[-2]} per group × "
            f"{groups} group(s), with {w.shape[-1]} output features (must be a multiple of the "
            f"groups); lhs shape {lhs.shape}, rhs shape {rhs.shape}, dimension_numbers "
            f"{dimension_numbers!r} (None means NCHW/OIHW/NCHW)."
        )
    if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
        raise ValueError(
            "padding must be 'SAME', 'VALID', 'SAME_LOWER' or a sequence of (low, high) pairs, "
            f"got {padding!r}."
        )
    if isinstance(padding, str):
        if any(d != 1 for d in lhs_dil):
            raise ValueError(
                "string padding is not supported with lhs_dilation != 1 (as in "
                "lax.conv_general_dilated); give explicit (low, high) pairs."
            )
        kernel = [_dilate(k, d) for k, d in zip(w.shape[:-2], rhs_dil)]
        pads = tuple(
            (int(lo), int(hi))
            for lo, hi in lax.padtype_to_pads(x.shape[1:-1], kernel, strides, padding)
        )
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        if len(pads) != num_spatial:
            raise ValueError(
                f"padding must be a string or {num_spatial} (low, high) pairs, got {padding!r}."
            )
    if isinstance(precision, list):
        precision = tuple(precision)
    methods = (weight_gradient, input_gradient, forward)
    requested = [
        f"{name}={value!r}"
        for name, value in zip(("weight_gradient", "input_gradient", "forward"), methods)
        if value == "onednn"
    ]
    if requested:
        reason = onednn_unsupported_reason(x, w, pads, lhs_dil, rhs_dil, groups)
        if reason is not None:
            raise ValueError(
                f"{', '.join(requested)}: oneDNN cannot compute this convolution ({reason}); "
                "use 'auto' (chooses among the formulations that can) or name another one: "
                f"forward {FORWARD_METHODS}, input_gradient {INPUT_GRADIENT_METHODS}, "
                f"weight_gradient {WEIGHT_GRADIENT_METHODS}."
            )
    y = _conv(x, w, strides, pads, lhs_dil, rhs_dil, groups, precision, methods)
    # y is (batch, spatial..., feature); out_spec[k] is where dimension k of the spec goes.
    out_perm = [0] * lhs.ndim
    canonical_index = (0, num_spatial + 1) + tuple(range(1, num_spatial + 1))
    for k, axis in enumerate(dnums.out_spec):
        out_perm[axis] = canonical_index[k]
    return _transpose(y, tuple(out_perm))


def _int_tuple(name: str, value, num_spatial: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * num_spatial
    value = tuple(int(v) for v in value)
    if len(value) != num_spatial:
        raise ValueError(f"{name} must have {num_spatial} entries, got {value}.")
    return value


def _transpose(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
    if perm == tuple(range(x.ndim)):
        return x
    return jnp.transpose(x, perm)


def _conv_raw(x, w, strides, pads, lhs_dil, rhs_dil, groups, precision):
    kernel, spatial = w.shape[:-2], x.shape[1:-1]
    if groups == 1 and math.prod(kernel) > math.prod(spatial):
        # XLA swaps the operands of an ungrouped convolution whose window has more taps
        # than the input has pixels (e.g. 3×3 on a 2×2 map) into a reversed, non-canonical
        # one (ConvOperandSwapper). Zero-pad the input to at least the window explicitly,
        # behind a barrier so that the pad is not folded back into the window.
        extra = [max(k - s, 0) for k, s in zip(kernel, spatial)]
        before = [e // 2 for e in extra]
        after = [e - b for e, b in zip(extra, before)]
        config = [(0, 0, 0)] + [(b, a, 0) for b, a in zip(before, after)] + [(0, 0, 0)]
        x = lax.optimization_barrier(lax.pad(x, jnp.zeros((), x.dtype), config))
        pads = tuple(
            (lo - b * d, hi - a * d) for (lo, hi), b, a, d in zip(pads, before, after, lhs_dil)
        )
    return lax.conv_general_dilated(
        x,
        w,
        strides,
        pads,
        lhs_dilation=lhs_dil,
        rhs_dilation=rhs_dil,
        dimension_numbers=_canonical_dimension_numbers(x.ndim - 2),
        feature_group_count=groups,
        precision=precision,
    )


def onednn_unsupported_reason(x, w, pads, lhs_dil, rhs_dil, groups) -> str | None:
    """Why oneDNN cannot compute this canonical convolution, or None when it can.

    oneDNN (`anode_jax.nn.onednn`, optional) is a candidate formulation of the forward pass and
    of both gradients when its extension is built, JAX's default backend is the CPU with one
    device (a sharded program would gather the custom calls' operands onto every device), and
    the convolution is 2-D float32 with one feature group, no dilation and non-negative
    padding.
    """
    reason = onednn.unavailable_reason()
    if reason is not None:
        return reason
    if jax.default_backend() != "cpu":
        return f"it runs on the CPU backend only, the default backend is {jax.default_backend()!r}"
    if jax.device_count() > 1:
        # The custom calls have no partitioning rule: under a sharded jit XLA would gather
        # every sharded operand onto each device (correct, but no data parallelism).
        return (
            f"single-device programs only, {jax.device_count()} devices are visible and its "
            "custom calls have no partitioning rule"
        )
    if x.ndim != 4:
        return f"2-D convolutions only, this one has {x.ndim - 2} spatial dimensions"
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return f"float32 only, got {x.dtype} and {w.dtype}"
    if groups != 1:
        return f"one feature group only, got feature_group_count={groups}"
    if any(d != 1 for d in tuple(lhs_dil) + tuple(rhs_dil)):
        return f"no dilation, got lhs_dilation={lhs_dil} and rhs_dilation={rhs_dil}"
    if any(p < 0 for pair in pads for p in pair):
        return f"non-negative padding only, got {pads}"
    return None


def _fields(x, w, out_shape, geometry, onednn_ok) -> dict[str, Any]:
    """What a measured choice for this convolution depends on (the autotune cache key)."""
    strides, pads, lhs_dil, rhs_dil, groups, precision = geometry
    fields = {
        "x": list(x.shape),
        "w": list(w.shape),
        "ct": list(out_shape),
        "strides": list(strides),
        "pads": [list(p) for p in pads],
        "lhs_dilation": list(lhs_dil),
        "rhs_dilation": list(rhs_dil),
        "groups": groups,
        "dtype": str(x.dtype),
        "precision": str(precision),
    }
    if onednn_ok:
        # a rebuilt extension (another oneDNN) is measured again
        fields["onednn"] = onednn.build_id()
    return fields


def _choose(kind, requested, candidates, args, *, default, pin_env, fields, onednn_reason) -> str:
    """The formulation to run: the one requested per call, else pinned, cached or measured.

    `candidates` are the formulations that can compute this convolution; `onednn_reason` says
    why oneDNN cannot (None when it can). A per-call "onednn" where it cannot (only reached by
    the convolutions nested in another formulation: the public function rejects it up front)
    falls back to the automatic choice; a pinned one to the default (`autotune.choose`).
    """
    if requested != "auto" and (requested != "onednn" or onednn_reason is None):
        return requested
    inapplicable = {}
    if onednn_reason is not None:
        inapplicable["onednn"] = (
            f"oneDNN cannot compute some convolutions (the first: {fields['dtype']} x "
            f"{fields['x']}, w {fields['w']}: {onednn_reason})"
        )
    timed = {name: _in_loop(fn) for name, fn in candidates.items()}
    fields = {**fields, "timed": f"in a loop of {_TIMING_LOOP_TRIPS}"}
    return autotune.choose(
        kind, fields, timed, args, default=default, pin_env=pin_env, inapplicable=inapplicable
    )


#: Iterations of the loop each candidate is timed in (see `_in_loop`).
_TIMING_LOOP_TRIPS = 4


def _in_loop(fn):
    """`fn` timed as it runs in an ODE solve: inside a while loop, `_TIMING_LOOP_TRIPS` times.

    A candidate's cost in a loop body can differ from its cost alone at the program's top level
    (measured: a oneDNN forward at 8×16×16×32, 1×1 → 64 took 0.57 ms alone against XLA's
    0.67 ms, but 0.42 against 0.26 ms per iteration of a loop, and its VJP in a scan 2.3× XLA's
    there), and the library's convolutions run mostly in solver loops. Each iteration scales the
    first operand by a data-dependent factor (so no iteration is hoisted out of the loop) and
    adds the result into a carry; the trip count is data-dependent too (so XLA cannot unroll
    the loop). The extra work is the same for every candidate.
    """

    def looped(first, *rest):
        # equal to _TIMING_LOOP_TRIPS for the measurement's inputs (|entries| << 1e30), unknown
        # to the compiler
        trips = _TIMING_LOOP_TRIPS + (jnp.abs(first.ravel()[0]) > 1e30).astype(jnp.int32)

        def body(i, total):
            scale = (1 + i).astype(first.dtype)
            return total + fn(first * scale, *rest)

        out = jax.eval_shape(fn, first, *rest)
        return lax.fori_loop(0, trips, body, jnp.zeros(out.shape, out.dtype))

    return looped


def _out_shape(x, w, strides, pads, lhs_dil, rhs_dil) -> tuple[int, ...]:
    spatial = tuple(
        (_dilate(s, ld) + lo + hi - _dilate(k, rd)) // st + 1
        for s, k, st, (lo, hi), ld, rd in zip(
            x.shape[1:-1], w.shape[:-2], strides, pads, lhs_dil, rhs_dil
        )
    )
    return (x.shape[0],) + spatial + (w.shape[-1],)


def _forward(x, w, strides, pads, lhs_dil, rhs_dil, groups, precision, methods):
    """The canonical convolution's value with the chosen implementation ("xla" | "onednn")."""
    geometry = (strides, pads, lhs_dil, rhs_dil, groups, precision)
    onednn_reason = onednn_unsupported_reason(x, w, pads, lhs_dil, rhs_dil, groups)
    onednn_ok = onednn_reason is None
    candidates = {"xla": lambda x, w: _conv_raw(x, w, *geometry)}
    if onednn_ok:
        candidates["onednn"] = functools.partial(
            onednn.conv_forward, window_strides=strides, padding=pads
        )
    method = _choose(
        "conv_forward",
        methods[2],
        candidates,
        (_abstract(x), _abstract(w)),
        default="xla",
        pin_env="ANODE_JAX_CONV_FORWARD",
        fields=_fields(
            x, w, _out_shape(x, w, strides, pads, lhs_dil, rhs_dil), geometry, onednn_ok
        ),
        onednn_reason=onednn_reason,
    )
    with jax.named_scope(f"conv_forward_{method}"):
        return candidates[method](x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7, 8))
def _conv(x, w, strides, pads, lhs_dil, rhs_dil, groups, precision, methods):
    """Canonical-layout convolution (x: (N, *S, C_in), w: (*K, C_in/G, C_out)).

    methods: (weight gradient, input gradient, forward) formulations.
    """
    return _forward(x, w, strides, pads, lhs_dil, rhs_dil, groups, precision, methods)


def _conv_fwd(x, w, strides, pads, lhs_dil, rhs_dil, groups, precision, methods):
    # Through `_conv` itself, not `_forward`: a higher-order derivative differentiates this
    # rule, and must meet the custom rule (a oneDNN forward has no derivative of its own).
    y = _conv(x, w, strides, pads, lhs_dil, rhs_dil, groups, precision, methods)
    return y, (x, w)


def _conv_bwd(strides, pads, lhs_dil, rhs_dil, groups, precision, methods, residuals, ct):
    x, w = residuals
    geometry = (strides, pads, lhs_dil, rhs_dil, groups, precision)
    weight_method, input_method, _ = methods
    onednn_reason = onednn_unsupported_reason(x, w, pads, lhs_dil, rhs_dil, groups)
    onednn_ok = onednn_reason is None
    fields = _fields(x, w, ct.shape, geometry, onednn_ok)
    input_names = INPUT_GRADIENT_METHODS[1:] if onednn_ok else INPUT_GRADIENT_METHODS[1:-1]
    input_method = _choose(
        "conv_input_gradient",
        input_method,
        {
            m: functools.partial(_input_grad, m, x.shape, geometry=geometry, methods=methods)
            for m in input_names
        },
        (_abstract(ct), _abstract(w)),
        default="conv",
        pin_env="ANODE_JAX_CONV_INPUT_GRADIENT",
        fields=fields,
        onednn_reason=onednn_reason,
    )
    weight_names = WEIGHT_GRADIENT_METHODS[1:] if onednn_ok else WEIGHT_GRADIENT_METHODS[1:-1]
    weight_method = _choose(
        "conv_weight_gradient",
        weight_method,
        {
            m: functools.partial(_weight_grad, m, w.shape, geometry=geometry, methods=methods)
            for m in weight_names
        },
        (_abstract(x), _abstract(ct)),
        default=weight_gradient_method(x.shape, w.shape, ct.shape, groups),
        pin_env="ANODE_JAX_CONV_WEIGHT_GRADIENT",
        fields=fields,
        onednn_reason=onednn_reason,
    )
    # named scopes: profiles and HLO metadata tell the two gradients apart
    with jax.named_scope(f"conv_input_grad_{input_method}"):
        dx = _input_grad(input_method, x.shape, ct, w, geometry=geometry, methods=methods)
    with jax.named_scope(f"conv_weight_grad_{weight_method}"):
        dw = _weight_grad(weight_method, w.shape, x, ct, geometry=geometry, methods=methods)
    return dx.astype(x.dtype), dw.astype(w.dtype)


def _abstract(a) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype)


def _input_grad(method, x_shape, ct, w, *, geometry, methods):
    """dx of the canonical conv with the given formulation ("conv" | "taps")."""
    strides, pads, lhs_dil, rhs_dil, groups, precision = geometry
    if method == "onednn":
        return _onednn_input_grad(tuple(x_shape), ct, w, geometry, methods)
    if method == "taps":
        x_struct = jax.ShapeDtypeStruct(tuple(x_shape), ct.dtype)
        # geometry is (strides, pads, lhs_dil, rhs_dil, groups, precision): _conv_taps's order
        return jax.linear_transpose(lambda x: _conv_taps(x, w, *geometry), x_struct)(ct)[0]
    if method != "conv":
        raise ValueError(f"input_gradient must be one of {INPUT_GRADIENT_METHODS}, got {method!r}.")
    # Correlate the cotangent with the spatially flipped kernel whose in/out channels are
    # swapped (per group), strides and input dilation exchanged.
    num_spatial = len(x_shape) - 2
    kernel = w.shape[:-2]
    lhs_dilated = [_dilate(s, d) for s, d in zip(x_shape[1:-1], lhs_dil)]
    rhs_dilated = [_dilate(k, d) for k, d in zip(kernel, rhs_dil)]
    out_dilated = [_dilate(s, d) for s, d in zip(ct.shape[1:-1], strides)]
    spatial_axes = tuple(range(num_spatial))
    w_t = jnp.flip(w, spatial_axes)
    cin_g, cout = w.shape[-2], w.shape[-1]
    w_t = w_t.reshape(kernel + (cin_g, groups, cout // groups))
    w_t = jnp.transpose(w_t, spatial_axes + (num_spatial + 2, num_spatial + 1, num_spatial))
    w_t = w_t.reshape(kernel + (cout // groups, groups * cin_g))
    pads_x = []
    for (lo, _), k, i, o in zip(pads, rhs_dilated, lhs_dilated, out_dilated):
        before = k - lo - 1
        pads_x.append((before, i + k - 1 - o - before))
    return _conv(ct, w_t, lhs_dil, tuple(pads_x), strides, rhs_dil, groups, precision, methods)


def _weight_grad(method, w_shape, x, ct, *, geometry, methods):
    """dw of the canonical conv with the given formulation ("conv" | "taps" | "gemm")."""
    strides, pads, lhs_dil, rhs_dil, groups, precision = geometry
    kernel = tuple(w_shape[:-2])
    if method == "onednn":
        return _onednn_weight_grad(tuple(w_shape), x, ct, geometry, methods)
    if method in ("taps", "gemm"):
        return _weight_grad_taps(
            x, ct, kernel, strides, pads, lhs_dil, rhs_dil, groups, precision, flat=method == "gemm"
        )
    if method != "conv":
        raise ValueError(
            f"weight_gradient must be one of {WEIGHT_GRADIENT_METHODS}, got {method!r}."
        )
    return _weight_grad_conv(
        x, ct, kernel, strides, pads, lhs_dil, rhs_dil, groups, precision, methods
    )


def _tap_patches(x, out_spatial, kernel, strides, pads, lhs_dil, rhs_dil, groups):
    """For each kernel tap, the input pixels it meets: (N, prod(out_spatial), G, C_in/G)."""
    n, cin = x.shape[0], x.shape[-1]
    config = [(0, 0, 0)]
    config += [(lo, hi, d - 1) for (lo, hi), d in zip(pads, lhs_dil)]
    config += [(0, 0, 0)]
    x_pad = lax.pad(x, jnp.zeros((), x.dtype), config)
    for tap in np.ndindex(*kernel):
        start = (0,) + tuple(t * d for t, d in zip(tap, rhs_dil)) + (0,)
        limit = (
            (n,)
            + tuple(s + (o - 1) * st + 1 for s, o, st in zip(start[1:-1], out_spatial, strides))
            + (cin,)
        )
        patch = lax.slice(x_pad, start, limit, (1,) + tuple(strides) + (1,))
        yield tap, patch.reshape((n, math.prod(out_spatial), groups, cin // groups))


def _conv_taps(x, w, strides, pads, lhs_dil, rhs_dil, groups, precision):
    """The canonical conv as a sum of per-tap matrix products (no convolution op).

    Its transpose in x is the "taps" input gradient. x: (N, *S, C_in), w: (*K, C_in/G, C_out).
    """
    n, cout = x.shape[0], w.shape[-1]
    kernel = w.shape[:-2]
    in_spatial = [_dilate(s, d) + lo + hi for s, d, (lo, hi) in zip(x.shape[1:-1], lhs_dil, pads)]
    out_spatial = tuple(
        (s - _dilate(k, d)) // st + 1 for s, k, d, st in zip(in_spatial, kernel, rhs_dil, strides)
    )
    total = None
    for tap, patch in _tap_patches(x, out_spatial, kernel, strides, pads, lhs_dil, rhs_dil, groups):
        w_tap = w[tap].reshape((w.shape[-2], groups, cout // groups))
        term = jnp.einsum("npgi,igo->npgo", patch, w_tap, precision=precision)
        total = term if total is None else total + term
    return total.reshape((n,) + out_spatial + (cout,))


def _weight_grad_conv(
    x,
    ct,
    kernel,
    strides,
    pads,
    lhs_dil,
    rhs_dil,
    groups,
    precision,
    methods=("auto", "auto", "auto"),
):
    """dw as one canonical convolution: channels of x as batch, the cotangent as kernel."""
    num_spatial = x.ndim - 2
    n, cin = x.shape[0], x.shape[-1]
    spatial = tuple(range(1, num_spatial + 1))
    # lhs: (C_in/G, *S, G·N), feature groups g-major; rhs: (*S_out, N, C_out).
    lhs = x.reshape(x.shape[:-1] + (groups, cin // groups))
    lhs = jnp.transpose(lhs, (num_spatial + 2,) + spatial + (num_spatial + 1, 0))
    lhs = lhs.reshape((cin // groups,) + x.shape[1:-1] + (groups * n,))
    rhs = jnp.transpose(ct, spatial + (0, num_spatial + 1))
    lhs_dilated = [_dilate(s, d) for s, d in zip(x.shape[1:-1], lhs_dil)]
    rhs_dilated = [_dilate(k, d) for k, d in zip(kernel, rhs_dil)]
    out_dilated = [_dilate(s, d) for s, d in zip(ct.shape[1:-1], strides)]
    pads_w = tuple(
        (lo, o - i + k - lo - 1)
        for (lo, _), i, k, o in zip(pads, lhs_dilated, rhs_dilated, out_dilated)
    )
    dw = _conv(lhs, rhs, rhs_dil, pads_w, lhs_dil, strides, groups, precision, methods)
    # (C_in/G, *K, C_out) -> (*K, C_in/G, C_out)
    return jnp.transpose(dw, spatial + (0, num_spatial + 1))


def _weight_grad_taps(
    x, ct, kernel, strides, pads, lhs_dil, rhs_dil, groups, precision, flat=False
):
    """dw as one product `Σ_n x_tapᵀ·ct` per kernel tap.

    `flat=False`: batch-parallel products summed over the batch ("taps");
    `flat=True`: one matrix product contracting batch and pixels together ("gemm").
    """
    n, cin, cout = x.shape[0], x.shape[-1], ct.shape[-1]
    out_spatial = ct.shape[1:-1]
    g = ct.reshape((n, math.prod(out_spatial), groups, cout // groups))
    taps = []
    for _, patch in _tap_patches(x, out_spatial, kernel, strides, pads, lhs_dil, rhs_dil, groups):
        if flat:
            prod = jnp.einsum("npgi,npgo->gio", patch, g, precision=precision)
        else:
            prod = jnp.einsum("npgi,npgo->ngio", patch, g, precision=precision).sum(0)
        # (G, C_in/G, C_out/G) -> (C_in/G, G·C_out/G)
        taps.append(jnp.transpose(prod, (1, 0, 2)).reshape(cin // groups, cout))
    return jnp.stack(taps).reshape(tuple(kernel) + (cin // groups, cout))


_conv.defvjp(_conv_fwd, _conv_bwd)


# oneDNN's two gradient kernels are custom calls with no derivative of their own. Each
# gradient is linear in both of its operands, so its VJP is that of the same map written
# with XLA convolutions ("conv"), whose own backward is loop-safe and chosen by measurement:
# higher reverse-mode derivatives work whichever formulation the first one used.


def _onednn_gradient(kernel, same_map):
    """oneDNN's `kernel(a, b, shape, strides, pads)` with the VJP of `same_map("conv", shape,
    a, b, geometry=, methods=)`, the same linear map in XLA convolutions."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
    def gradient(shape, a, b, geometry, methods):
        strides, pads = geometry[:2]
        return kernel(a, b, shape, strides, pads)

    def gradient_fwd(shape, a, b, geometry, methods):
        return gradient(shape, a, b, geometry, methods), (a, b)

    def gradient_bwd(shape, geometry, methods, residuals, g):
        xla = functools.partial(same_map, "conv", shape, geometry=geometry, methods=methods)
        return jax.vjp(xla, *residuals)[1](g)

    gradient.defvjp(gradient_fwd, gradient_bwd)
    return gradient


#: dx from (x_shape, ct, w, geometry, methods); dw from (w_shape, x, ct, geometry, methods).
_onednn_input_grad = _onednn_gradient(onednn.conv_input_grad, _input_grad)
_onednn_weight_grad = _onednn_gradient(onednn.conv_weight_grad, _weight_grad)
