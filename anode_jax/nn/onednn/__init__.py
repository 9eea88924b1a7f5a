"""Optional 2-D convolutions through oneDNN as XLA custom calls (`jax.ffi`).

XLA:CPU's own (Eigen) convolution kernels are slower than oneDNN's at many of the papers'
small shapes (docs/bench_onednn.md has the figures and the trade-off). When this extension is
built, the loop-safe convolution (`anode_jax.nn.conv_general_dilated`, which the models use)
offers oneDNN as one more candidate for its forward pass and for each gradient, and its
autotuner picks it per shape where it measures fastest (docs/bench_conv.md); the functions
here are the raw kernels.

Loading the extension sets `OMP_WAIT_POLICY=PASSIVE` unless the variable is already set:
oneDNN's GNU OpenMP threads otherwise spin between calls and take the cores XLA's own threads
need. `ANODE_JAX_ONEDNN=0` switches the extension off at run time (as if it were not built).

The extension is a C++ source (`conv.cc`) compiled by `scripts/build_onednn.sh` against
oneDNN 3.2 (the registry's CPU-only `onednn-cpu-gomp` wheel, unpacked under `build/`) and
the installed jaxlib's FFI headers. Without the built `_onednn_conv.so`, `available()` is
False and every function raises `RuntimeError` naming the build step.

Scope: float32, NHWC activations, HWIO kernels, 2-D, any window strides, explicit or
`"SAME"`/`"VALID"` padding, no dilation, one feature group (what the papers' networks use).
Works under `jit`, `grad` (`conv` is a `jax.custom_vjp` whose backward calls the two
gradient kernels), `lax.scan`/`fori_loop` bodies, and `vmap` (sequentially: one call per
mapped element). CPU backend only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_LIBRARY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_onednn_conv.so")
_TARGETS = {
    "anode_onednn_conv_forward": "AnodeOnednnConvForward",
    "anode_onednn_conv_input_grad": "AnodeOnednnConvInputGrad",
    "anode_onednn_conv_weight_grad": "AnodeOnednnConvWeightGrad",
}
_state: dict = {}


def unavailable_reason() -> str | None:
    """None when the extension is built and registered; otherwise why it is not (one line)."""
    _load()
    return _state.get("error")


def available() -> bool:
    """Whether the oneDNN convolution extension is built and registered with XLA."""
    return unavailable_reason() is None


def build_id() -> str | None:
    """A digest of the built extension (None when not built): part of the autotune cache key,
    so that choices measured with one build are measured again after a rebuild."""
    if "build_id" not in _state:
        try:
            with open(_LIBRARY_PATH, "rb") as f:
                _state["build_id"] = hashlib.sha256(f.read()).hexdigest()[:16]
        except OSError:
            _state["build_id"] = None
    return _state["build_id"]


def _load():
    if "library" in _state or "error" in _state:
        return _state.get("library")
    if os.environ.get("ANODE_JAX_ONEDNN", "").strip().lower() in ("0", "off", "false"):
        _state["error"] = "the oneDNN extension is switched off (ANODE_JAX_ONEDNN=0)"
        return None
    if not os.path.exists(_LIBRARY_PATH):
        _state["error"] = (
            f"the oneDNN extension is not built ({_LIBRARY_PATH} missing); run "
            "scripts/build_onednn.sh"
        )
        return None
    # oneDNN runs on GNU OpenMP threads, which spin-wait between parallel regions by default:
    # beside XLA's own thread pool that took the cores XLA needed (measured: oneDNN's weight
    # gradient 8-16 ms spinning, 0.2-2.7 ms passive, at small shapes on 2 cores). libgomp reads
    # the policy when it is loaded, i.e. here (unless something loaded it before); a value the
    # user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        library = ctypes.CDLL(_LIBRARY_PATH)
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(
                name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
            )
    except (OSError, AttributeError) as e:
        _state["error"] = f"the oneDNN extension failed to load: {e}"
        return None
    _state["library"] = library
    return library


def _require():
    """The loaded extension; a RuntimeError naming the build step when it is not built."""
    library = _load()
    if library is None:
        raise RuntimeError(_state["error"])
    return library


def _pads(padding, in_spatial, kernel, strides) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(
                f"padding must be 'SAME', 'VALID', 'SAME_LOWER' or two (low, high) pairs, got "
                f"{padding!r}."
            )
        pads = lax.padtype_to_pads(in_spatial, kernel, strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if len(pads) != 2 or any(p < 0 for pair in pads for p in pair):
        raise ValueError(f"padding must be two non-negative (low, high) pairs, got {padding!r}.")
    return pads


def _check(name: str, a, rank: int = 4):
    if a.ndim != rank or a.dtype != jnp.float32:
        raise ValueError(
            f"{name} must be a float32 array of rank {rank}, got {a.dtype} of shape {a.shape}."
        )


def _strides(window_strides) -> tuple[int, int]:
    strides = tuple(int(s) for s in window_strides)
    if len(strides) != 2 or any(s < 1 for s in strides):
        raise ValueError(f"window_strides must be two positive integers, got {window_strides!r}.")
    return strides


def _out_spatial(in_spatial, kernel, strides, pads) -> tuple[int, int]:
    return tuple(
        (s + lo + hi - k) // st + 1 for s, k, st, (lo, hi) in zip(in_spatial, kernel, strides, pads)
    )


def _used_extent(in_spatial, kernel, strides, pads) -> tuple[int, int]:
    """Rows/columns of the input any window reads: fewer than the input has when the last
    window stops short of its end (e.g. a 1×1 window at stride 2 on an even map). oneDNN 3.2's
    1×1 weight-gradient kernel gave wrong results with the negative right padding such an
    input implies, so the custom calls only ever see the used part."""
    out = _out_spatial(in_spatial, kernel, strides, pads)
    return tuple(
        min(s, (o - 1) * st + k - lo)
        for s, k, st, o, (lo, _) in zip(in_spatial, kernel, strides, out, pads)
    )


def _geometry(in_spatial, kernel, window_strides, padding):
    """(strides, pads, used extent) of one convolution, checked: what every pass computes."""
    strides = _strides(window_strides)
    pads = _pads(padding, tuple(in_spatial), tuple(kernel), strides)
    return strides, pads, _used_extent(in_spatial, kernel, strides, pads)


def _attrs(strides, pads) -> dict:
    return {
        "window_strides": np.asarray(strides, np.int64),
        "padding": np.asarray([p for pair in pads for p in pair], np.int64),
    }


def conv_forward(x: jax.Array, w: jax.Array, window_strides: Sequence[int], padding) -> jax.Array:
    """y = conv(x, w): x `(N, H, W, C)`, w `(KH, KW, C, O)` -> y `(N, OH, OW, O)`, float32.

    Same value as `lax.conv_general_dilated(x, w, window_strides, padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"))`.

    Raises:
      RuntimeError: the extension is not built. ValueError: wrong rank, dtype, channels,
        strides or padding.
    """
    _require()
    _check("x", x)
    _check("w", w)
    if x.shape[-1] != w.shape[2]:
        raise ValueError(f"x has {x.shape[-1]} channels but w expects {w.shape[2]}.")
    strides, pads, (h, w_) = _geometry(x.shape[1:3], w.shape[:2], window_strides, padding)
    out = (x.shape[0], *_out_spatial(x.shape[1:3], w.shape[:2], strides, pads), w.shape[3])
    x = x[:, :h, :w_]
    return jax.ffi.ffi_call(
        "anode_onednn_conv_forward",
        jax.ShapeDtypeStruct(out, jnp.float32),
        vmap_method="sequential",
    )(x, w, **_attrs(strides, pads))


def conv_input_grad(
    ct: jax.Array,
    w: jax.Array,
    x_shape: Sequence[int],
    window_strides: Sequence[int],
    padding,
) -> jax.Array:
    """dx of `conv_forward` for the output cotangent ct `(N, OH, OW, O)`: `(N, H, W, C)` = x_shape.

    Raises: as `conv_forward`.
    """
    _require()
    _check("ct", ct)
    _check("w", w)
    x_shape = tuple(int(s) for s in x_shape)
    strides, pads, (h, w_) = _geometry(x_shape[1:3], w.shape[:2], window_strides, padding)
    dx = jax.ffi.ffi_call(
        "anode_onednn_conv_input_grad",
        jax.ShapeDtypeStruct((x_shape[0], h, w_, x_shape[3]), jnp.float32),
        vmap_method="sequential",
    )(ct, w, **_attrs(strides, pads))
    if (h, w_) != tuple(x_shape[1:3]):
        dx = jnp.pad(dx, ((0, 0), (0, x_shape[1] - h), (0, x_shape[2] - w_), (0, 0)))
    return dx


def conv_weight_grad(
    x: jax.Array,
    ct: jax.Array,
    w_shape: Sequence[int],
    window_strides: Sequence[int],
    padding,
) -> jax.Array:
    """dw of `conv_forward` for the output cotangent ct `(N, OH, OW, O)`: `(KH, KW, C, O)` = w_shape.

    Raises: as `conv_forward`.
    """
    _require()
    _check("x", x)
    _check("ct", ct)
    w_shape = tuple(int(s) for s in w_shape)
    strides, pads, (h, w_) = _geometry(x.shape[1:3], w_shape[:2], window_strides, padding)
    x = x[:, :h, :w_]
    return jax.ffi.ffi_call(
        "anode_onednn_conv_weight_grad",
        jax.ShapeDtypeStruct(w_shape, jnp.float32),
        vmap_method="sequential",
    )(x, ct, **_attrs(strides, pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, pads):
    return conv_forward(x, w, strides, pads)


def _conv_fwd(x, w, strides, pads):
    return conv_forward(x, w, strides, pads), (x, w)


def _conv_bwd(strides, pads, residuals, ct):
    x, w = residuals
    return (
        conv_input_grad(ct, w, x.shape, strides, pads),
        conv_weight_grad(x, ct, w.shape, strides, pads),
    )


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x: jax.Array, w: jax.Array, window_strides: Sequence[int], padding) -> jax.Array:
    """`conv_forward` with a reverse-mode derivative made of the two oneDNN gradient kernels.

    x `(N, H, W, C)`, w `(KH, KW, C, O)`, float32; padding `"SAME"`, `"VALID"` or two
    `(low, high)` pairs. First-order reverse mode only (the backward's kernels have no
    derivative of their own); no forward mode (`jax.custom_vjp`).
    """
    strides = _strides(window_strides)
    pads = _pads(padding, x.shape[1:3], w.shape[:2], strides)
    return _conv(x, w, strides, pads)


def impl_info(
    kind: str, x_shape: Sequence[int], w_shape: Sequence[int], window_strides, padding
) -> str:
    """The oneDNN kernel chosen for one pass ("forward" | "input_grad" | "weight_grad")."""
    library = _require()
    kinds = ("forward", "input_grad", "weight_grad")
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}.")
    strides = _strides(window_strides)
    pads = _pads(padding, tuple(x_shape[1:3]), tuple(w_shape[:2]), strides)
    out = _out_spatial(x_shape[1:3], w_shape[:2], strides, pads)
    key = [kinds.index(kind), *x_shape, w_shape[0], w_shape[1], w_shape[3], *out, *strides]
    key += [p for pair in pads for p in pair]
    key_array = (ctypes.c_int64 * 16)(*key)
    buffer = ctypes.create_string_buffer(256)
    library.AnodeOnednnImplInfo(key_array, buffer, 256)
    return buffer.value.decode()
