"""Benchmark of the loop-safe convolution (anode_jax.nn.conv_general_dilated) against lax.

    .venv/bin/python benchmarks/bench_conv.py                 # batch 128 top level, 16 in scans
    .venv/bin/python benchmarks/bench_conv.py --quick         # batch 32 / 8, fewer shapes

Shapes: the convolutions of the ANODE ResNet (3×3, 64/128/256/512 channels at 32/16/8/4
pixels, width 1.0; also 16 and 32 channels) and SqueezeNext vector fields (1×1, 1×3, 3×1), one
strided 3×3, NHWC float32, batch ``--batch``. Per shape, median wall time (``--repeats`` after
one warm-up) of jitted:

* forward: ``lax.conv_general_dilated`` vs the loop-safe conv (the same convolution);
* weight gradient alone (the cotangent given): lax's transpose rule, the loop-safe conv's
  "conv" formulation (one canonical convolution) and its "taps" formulation (one
  batch-parallel product per kernel tap) — the measurement behind
  ``anode_jax.nn.weight_gradient_method``;
* backward (input and weight gradients of ``<conv(x, w), g>``): lax vs the loop-safe conv
  with its shape rule ("auto");
* in a loop: gradient of ``Σ_t <conv(s_t·x, w), g>`` over a ``lax.scan`` of ``--scan-steps``
  steps at batch ``--scan-batch`` (lax's convolutions inside a while body run on XLA:CPU's
  naive path; ``--scan-batch`` is small because that path takes seconds per step).

Writes docs/bench_conv.json and docs/bench_conv.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))
import _common

from anode_jax.nn import conv_general_dilated, weight_gradient_method
from anode_jax.nn._conv import _weight_grad_conv, _weight_grad_taps

DN = ("NHWC", "HWIO", "NHWC")

# (label, H=W, C_in, C_out, kernel, stride)
SHAPES = (
    ("resnet 3×3 64 @32", 32, 64, 64, (3, 3), 1),
    ("resnet 3×3 128 @16", 16, 128, 128, (3, 3), 1),
    ("resnet 3×3 256 @8", 8, 256, 256, (3, 3), 1),
    ("resnet 3×3 512 @4", 4, 512, 512, (3, 3), 1),
    ("3×3 16 @32", 32, 16, 16, (3, 3), 1),
    ("3×3 32 @32", 32, 32, 32, (3, 3), 1),
    ("3×3 64 @16", 16, 64, 64, (3, 3), 1),
    ("3×3 256 @16", 16, 256, 256, (3, 3), 1),
    ("3×3/2 64→128 @32", 32, 64, 128, (3, 3), 2),
    ("sqnxt 1×1 32→16 @32", 32, 32, 16, (1, 1), 1),
    ("sqnxt 1×3 8→16 @32", 32, 8, 16, (1, 3), 1),
    ("sqnxt 3×1 16→16 @32", 32, 16, 16, (3, 1), 1),
    ("sqnxt 1×3 32→64 @8", 8, 32, 64, (1, 3), 1),
    ("sqnxt 3×1 64→64 @8", 8, 64, 64, (3, 1), 1),
    ("sqnxt 1×1 256→128 @4", 4, 256, 128, (1, 1), 1),
)
QUICK = (0, 2, 4, 9, 11)


def _seconds(fn, *args, repeats):
    compiled = jax.jit(fn).lower(*args).compile()
    return _common.median_seconds(compiled, *args, repeats=repeats)


def _pads(size, kernel, stride):
    return tuple(
        tuple(int(p) for p in pair)
        for pair in lax.padtype_to_pads((size, size), kernel, (stride, stride), "SAME")
    )


def measure(shape, args):
    label, size, cin, cout, kernel, stride = shape
    rng = np.random.default_rng(0)
    strides = (stride, stride)

    def data(batch):
        x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=kernel + (cin, cout)) / np.sqrt(cin), jnp.float32)
        out = jax.eval_shape(
            lambda: lax.conv_general_dilated(x, w, strides, "SAME", None, None, DN)
        )
        g = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
        return x, w, g

    def conv(impl):
        return lambda x, w: impl(x, w, strides, "SAME", None, None, DN)

    lax_conv, safe_conv = conv(lax.conv_general_dilated), conv(conv_general_dilated)
    x, w, g = data(args.batch)
    row = {"shape": label, "batch": args.batch, "size": size, "cin": cin, "cout": cout}
    row["kernel"], row["stride"] = list(kernel), stride
    row["method"] = weight_gradient_method(x.shape, w.shape, g.shape)
    r = args.repeats
    row["fwd_lax"] = _seconds(lax_conv, x, w, repeats=r)
    row["fwd_safe"] = _seconds(safe_conv, x, w, repeats=r)
    pads = _pads(size, kernel, stride)
    row["dw_lax"] = _seconds(
        lambda x, g: jax.vjp(lambda w: lax_conv(x, w), w)[1](g)[0], x, g, repeats=r
    )
    one = (1, 1)
    row["dw_conv"] = _seconds(
        lambda x, g: _weight_grad_conv(x, g, kernel, strides, pads, one, one, 1, None, "conv"),
        x,
        g,
        repeats=r,
    )
    row["dw_taps"] = _seconds(
        lambda x, g: _weight_grad_taps(x, g, kernel, strides, pads, one, one, 1, None),
        x,
        g,
        repeats=r,
    )

    def backward(impl):
        return lambda x, w, g: jax.vjp(impl, x, w)[1](g)

    row["bwd_lax"] = _seconds(backward(lax_conv), x, w, g, repeats=r)
    row["bwd_safe"] = _seconds(backward(safe_conv), x, w, g, repeats=r)

    xs, ws, gs = data(args.scan_batch)
    scales = jnp.linspace(1.0, 0.5, args.scan_steps, dtype=jnp.float32)

    def scanned(impl):
        def loss(x, w):
            def body(total, s):
                return total + jnp.vdot(impl(x * s, w), gs), None

            return lax.scan(body, jnp.float32(0.0), scales)[0]

        return jax.grad(loss, argnums=(0, 1))

    row["scan_batch"], row["scan_steps"] = args.scan_batch, args.scan_steps
    row["scan_lax"] = _seconds(scanned(lax_conv), xs, ws, repeats=args.scan_repeats)
    row["scan_safe"] = _seconds(scanned(safe_conv), xs, ws, repeats=args.scan_repeats)
    return row


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="batch 32 / scan batch 8, 5 shapes")
    parser.add_argument("--batch", type=int, default=None, help="top-level batch (default 128)")
    parser.add_argument("--scan-batch", type=int, default=None, help="batch in scans (default 16)")
    parser.add_argument("--scan-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan-repeats", type=int, default=2)
    parser.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the measured shapes' rows in the existing docs/bench_conv.json",
    )
    parser.add_argument(
        "--markdown-only",
        action="store_true",
        help="re-render docs/bench_conv.md from docs/bench_conv.json, measure nothing",
    )
    args = parser.parse_args()
    if args.markdown_only:
        with open(os.path.join(os.path.dirname(__file__), "..", "docs", "bench_conv.json")) as f:
            payload = json.load(f)
        _common.write_results("bench_conv", payload, to_markdown(payload))
        return
    args.batch = args.batch or (32 if args.quick else 128)
    args.scan_batch = args.scan_batch or (8 if args.quick else 16)
    if args.shapes:
        indices = [int(i) for i in args.shapes.split(",")]
    else:
        indices = QUICK if args.quick else range(len(SHAPES))
    rows = []
    previous_command = ""
    for i in indices:
        start = time.perf_counter()
        row = measure(SHAPES[i], args)
        rows.append(row)
        print(
            f"{row['shape']:22s} fwd {row['fwd_lax'] * 1e3:7.1f}/{row['fwd_safe'] * 1e3:7.1f}  "
            f"dw lax/conv/taps {row['dw_lax'] * 1e3:7.1f}/{row['dw_conv'] * 1e3:7.1f}/"
            f"{row['dw_taps'] * 1e3:7.1f} ({row['method']})  bwd {row['bwd_lax'] * 1e3:7.1f}/"
            f"{row['bwd_safe'] * 1e3:7.1f}  scan {row['scan_lax'] * 1e3:8.1f}/"
            f"{row['scan_safe'] * 1e3:7.1f} ms  [{time.perf_counter() - start:.0f} s]",
            flush=True,
        )
    json_path = os.path.join(os.path.dirname(__file__), "..", "docs", "bench_conv.json")
    if args.merge and os.path.exists(json_path):
        with open(json_path) as f:
            old_payload = json.load(f)
        old_rows = {r["shape"]: r for r in old_payload["rows"]}
        previous_command = old_payload["settings"]["command"]
        old_rows.update({r["shape"]: r for r in rows})
        order = [shape[0] for shape in SHAPES]
        rows = sorted(old_rows.values(), key=lambda r: order.index(r["shape"]))
    payload = {
        "machine": _common.machine(),
        "settings": {
            "command": (previous_command + "` then `" if args.merge else "")
            + " ".join(["benchmarks/bench_conv.py"] + sys.argv[1:]),
            "batch": args.batch,
            "scan_batch": args.scan_batch,
            "scan_steps": args.scan_steps,
            "repeats": args.repeats,
            "scan_repeats": args.scan_repeats,
        },
        "rows": rows,
    }
    _common.write_results("bench_conv", payload, to_markdown(payload))


def to_markdown(payload) -> str:
    m, s = payload["machine"], payload["settings"]

    def ms(v):
        return f"{v * 1e3:.1f}"

    lines = [
        "# Loop-safe convolution benchmark",
        "",
        f"Generated by `.venv/bin/python {s['command']}`. Machine: {m['platform']}, "
        f"{m['cpu_count']} CPUs (shared with other jobs, so absolute times are noisy; each ratio "
        f"compares runs of the same process), backend {m['backend']}; Python {m['python']}, "
        f"jax {m['jax']}; {m['date']}.",
        "",
        "`lax` = `lax.conv_general_dilated` (JAX's transpose rules), `safe` ="
        " `anode_jax.nn.conv_general_dilated`. NHWC float32, SAME padding; times in ms, median "
        f"of {s['repeats']} jitted runs after a warm-up. Top level: batch {s['batch']}. "
        f"In a loop: gradient (input and weight) of a {s['scan_steps']}-step `lax.scan` over "
        f"the convolution at batch {s['scan_batch']}, median of {s['scan_repeats']}.",
        "",
        "## Top level (no loop)",
        "",
        "| shape (H=W, C_in→C_out) | fwd lax | fwd safe | dw lax | dw conv | dw taps | rule picks "
        "| bwd lax | bwd safe | bwd safe / lax |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        best = "conv" if r["dw_conv"] <= r["dw_taps"] else "taps"
        pick = r["method"] + ("" if r["method"] == best else f" (**{best} faster**)")
        lines.append(
            f"| {r['shape']} | {ms(r['fwd_lax'])} | {ms(r['fwd_safe'])} | {ms(r['dw_lax'])} | "
            f"{ms(r['dw_conv'])} | {ms(r['dw_taps'])} | {pick} | {ms(r['bwd_lax'])} | "
            f"{ms(r['bwd_safe'])} | {r['bwd_safe'] / r['bwd_lax']:.2f}× |"
        )
    lines += [
        "",
        "## Inside a `lax.scan`",
        "",
        "| shape | batch | grad lax | grad safe | lax / safe |",
        "|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['shape']} | {r['scan_batch']} | {ms(r['scan_lax'])} | {ms(r['scan_safe'])} | "
            f"{r['scan_lax'] / r['scan_safe']:.1f}× |"
        )
    lines += ["", RULE_TEXT, ""]
    return "\n".join(lines)


RULE_TEXT = """## Weight-gradient rule

`anode_jax.nn.weight_gradient_method` (used when `weight_gradient="auto"`) picks the
formulation from the shapes: see its docstring for the current rule; the "rule picks"
column above marks in bold where the other formulation was measured faster."""


if __name__ == "__main__":
    main()
