"""Benchmark of the loop-safe convolution (anode_jax.nn.conv_general_dilated): its backward
and, when the optional oneDNN extension is built, its forward pass.

    .venv/bin/python benchmarks/bench_conv.py                    # every conv of resnet, sqnxt
    .venv/bin/python benchmarks/bench_conv.py --networks resnet --batch 32 --rounds 3
    .venv/bin/python benchmarks/bench_conv.py --scan             # also gradients inside scans

Shapes: every distinct convolution of the papers' networks (`create_model("resnet")`,
`create_model("sqnxt")`, width 1.0, 32×32×3 inputs, batch `--batch`), read from the traced
model, plus the core benchmark's 3×3/16-channel convolution. Per shape, in one process, all
programs are compiled first and then timed in `--rounds` interleaved rounds (median), so a
change of machine load touches every column alike:

* weight gradient alone (cotangent given): lax's transpose rule (fast at top level only,
  slow inside loops), and the loop-safe formulations "conv", "taps", "gemm" and, when the
  extension `anode_jax.nn.onednn` is built, "onednn" (oneDNN's weight-gradient kernel);
* input gradient alone: lax's, and the loop-safe "conv", "taps" (and "onednn");
* forward alone, only when oneDNN is built: `forward="xla"` and `forward="onednn"`;
* backward (both gradients of `<conv(x, w), g>`): lax, and the loop-safe conv as shipped, with
  its choice by measurement (`"auto"`: every candidate, oneDNN's among them when built;
  autotuner cache in a fresh temporary directory, so it measures on this machine in this run).
  The chosen formulations are read back from that cache file (entries matched by kind and
  shapes) and recorded;
* with `--scan`: gradient of `Σ_t <conv(s_t·x, w), g>` over a `--scan-steps`-step
  `lax.scan` at batch `--scan-batch`, loop-safe conv with the measured choice against the
  earlier fixed rule (what `ANODE_JAX_AUTOTUNE=off` runs: XLA's forward, the shape rule's
  weight gradient, a convolution for the input gradient; lax's loop gradient is 10–300×
  slower, docs/bench_conv.md history, and is left out).

oneDNN is a candidate only for 2-D float32 convolutions with one feature group and no
dilation (`anode_jax.nn.onednn_unsupported_reason`); its columns are absent when the extension
is not built (and read "–" at a shape it cannot compute). "Best" is the fastest correct
formulation of each pass measured here (lax's and oneDNN's included); the target is the
loop-safe choice within 1.1× of it. `OMP_WAIT_POLICY=PASSIVE` unless set (oneDNN's OpenMP
threads would otherwise spin between calls and slow XLA's down). Writes docs/bench_conv.json
and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _common

from anode_jax.nn import (
    autotune,
    conv_general_dilated,
    onednn,
    onednn_unsupported_reason,
    weight_gradient_method,
)

DN = ("NHWC", "HWIO", "NHWC")
#: the core benchmark's convolution (bench_core.py: 3×3, 16 channels, 16×16 pixels)
CORE_SHAPE = ("core", (32, 16, 16, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1)))


def network_shapes(names, batch):
    """Distinct (network, x shape, w shape, strides, padding) of the networks' convolutions."""
    from jax.extend import core as jcore

    from anode_jax.models import create_model

    found = {}

    def walk(jaxpr, name):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                p = eqn.params
                key = (
                    tuple(eqn.invars[0].aval.shape),
                    tuple(eqn.invars[1].aval.shape),
                    tuple(p["window_strides"]),
                    tuple(tuple(int(v) for v in pad) for pad in p["padding"]),
                )
                found.setdefault(key, name)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(sub, jcore.ClosedJaxpr):
                        walk(sub.jaxpr, name)
                    elif isinstance(sub, jcore.Jaxpr):
                        walk(sub, name)

    for name in names:
        # conv="lax": the convolutions appear as plain primitives with NHWC/HWIO operands
        model = create_model(name, num_steps=2, adjoint="direct", conv="lax", unroll=True)
        x = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
        jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
            variables, x
        )
        walk(jaxpr.jaxpr, name)
    return [(name,) + key for key, name in found.items()]


def label(shape):
    name, x, w, strides, _ = shape
    kernel = "×".join(str(k) for k in w[:2])
    stride = f"/{strides[0]}" if strides[0] != 1 else ""
    return f"{name} {kernel}{stride} {w[2]}→{w[3]} @{x[1]}"


#: the kinds of the autotuner's entries for one convolution, and the row keys they are stored at
KINDS = ("conv_weight_gradient", "conv_input_gradient", "conv_forward")
#: the columns of each pass: XLA's formulations (lax's transpose rules included), then oneDNN's
DW_XLA = ("dw lax", "dw conv", "dw taps", "dw gemm")
DX_XLA = ("dx lax", "dx conv", "dx taps")


def cache_entries() -> dict[str, dict]:
    """This run's autotune cache file: {key (JSON text): entry}; empty before the first entry."""
    try:
        with open(autotune.cache_path()) as f:
            return json.load(f)["entries"]
    except FileNotFoundError:
        return {}


def find_entry(entries, kind, x, w, ct, strides, pads):
    """The entry of `kind` for the convolution x * w -> ct (None if the autotuner made none).

    Matched on the fields that name the convolution (kind, shapes, strides, padding, no
    dilation), so fields the autotuner adds to its key (candidates, build digests, ...) do not
    break the lookup; the last match wins (a fresh cache per run holds one per convolution).
    """
    found = None
    want = {
        "kind": kind,
        "x": list(x),
        "w": list(w),
        "ct": list(ct),
        "strides": list(strides),
        "pads": [list(p) for p in pads],
    }
    for key, entry in entries.items():
        fields = json.loads(key)
        if any(fields.get(k) != v for k, v in want.items()):
            continue
        if any(d != 1 for k in ("lhs_dilation", "rhs_dilation") for d in fields.get(k, ())):
            continue
        # how the autotuner timed it (e.g. "in a loop of 4"): its times are per loop, not per call
        found = {**entry, "timed": fields.get("timed", "alone")}
    return found


def _loop_trips(entry) -> int:
    """Calls per autotuner timing: N for entries timed "in a loop of N", else 1."""
    timed = str(entry.get("timed", "alone"))
    return int(timed.rsplit(" ", 1)[-1]) if timed.startswith("in a loop of ") else 1


def measure(shape, args):
    _, x_shape, w_shape, strides, pads = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape) / np.sqrt(np.prod(w_shape[:-1])), jnp.float32)

    def lax_conv(x, w):
        return lax.conv_general_dilated(x, w, strides, pads, None, None, DN)

    g = jnp.asarray(rng.normal(size=jax.eval_shape(lax_conv, x, w).shape), jnp.float32)

    def safe_conv(x, w, **kwargs):
        return conv_general_dilated(x, w, strides, pads, None, None, DN, **kwargs)

    one = (1,) * (len(x_shape) - 2)
    with_onednn = onednn_unsupported_reason(x, w, pads, one, one, 1) is None
    programs = {
        "dw lax": (lambda x, g: jax.vjp(lambda w: lax_conv(x, w), w)[1](g)[0], (x, g)),
        "dx lax": (lambda w, g: jax.vjp(lambda x: lax_conv(x, w), x)[1](g)[0], (w, g)),
        "bwd lax": (lambda x, w, g: jax.vjp(lax_conv, x, w)[1](g), (x, w, g)),
    }
    # One formulation pinned per program through the public keywords; under jit the unused
    # primal and the other cotangent are dead code, so each program is that gradient alone.
    # The forward stays "auto", as in the autotuner's own candidates: the convolution inside
    # a "conv" formulation runs with the forward measured for its shape.
    for m in ("conv", "taps", "gemm") + (("onednn",) if with_onednn else ()):
        dw = lambda x, g, m=m: jax.vjp(
            lambda w: safe_conv(x, w, weight_gradient=m, input_gradient="conv"), w
        )[1](g)[0]
        programs[f"dw {m}"] = (dw, (x, g))
    for m in ("conv", "taps") + (("onednn",) if with_onednn else ()):
        dx = lambda w, g, m=m: jax.vjp(
            lambda x: safe_conv(x, w, input_gradient=m, weight_gradient="conv"), x
        )[1](g)[0]
        programs[f"dx {m}"] = (dx, (w, g))
    if with_onednn:
        for m in ("xla", "onednn"):
            programs[f"fwd {m}"] = (lambda x, w, m=m: safe_conv(x, w, forward=m), (x, w))

    # the library as shipped: every formulation "auto", chosen among all candidates
    programs["bwd safe"] = (lambda x, w, g: jax.vjp(safe_conv, x, w)[1](g), (x, w, g))
    if args.scan:
        xs = x[: args.scan_batch]
        gs = g[: args.scan_batch]
        scales = jnp.linspace(1.0, 0.5, args.scan_steps, dtype=jnp.float32)

        def scanned(**kwargs):
            def loss(x, w):
                def body(total, s):
                    return total + jnp.vdot(safe_conv(x * s, w, **kwargs), gs), None

                return lax.scan(body, jnp.float32(0.0), scales)[0]

            return jax.grad(loss, argnums=(0, 1))

        rule = weight_gradient_method(x.shape, w.shape, g.shape)
        programs["scan safe"] = (scanned(), (xs, w))
        programs["scan rule"] = (
            scanned(weight_gradient=rule, input_gradient="conv", forward="xla"),
            (xs, w),
        )

    before = set(cache_entries())
    start = time.perf_counter()
    compiled = {}
    own_entries = None
    for name, (fn, fn_args) in programs.items():
        if name.startswith("scan"):  # entries of this shape so far, not of the scan's batch
            own_entries = cache_entries() if own_entries is None else own_entries
        compiled[name] = jax.jit(fn).lower(*fn_args).compile()
    compile_s = time.perf_counter() - start
    own_entries = cache_entries() if own_entries is None else own_entries
    times = {name: [] for name in programs}
    for name, exe in compiled.items():  # warm-up
        jax.block_until_ready(exe(*programs[name][1]))
    for _ in range(args.rounds):
        for name, exe in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(exe(*programs[name][1]))
            times[name].append(time.perf_counter() - t)
    row = {
        "shape": label(shape),
        "x": list(x_shape),
        "w": list(w_shape),
        "strides": list(strides),
        "padding": [list(p) for p in pads],
        "rule": weight_gradient_method(x.shape, w.shape, g.shape),
        "onednn": with_onednn,
        "compile_s": compile_s,
        "load_average": round(os.getloadavg()[0], 2),
        "seconds": {name: statistics.median(ts) for name, ts in times.items()},
        "least_seconds": {name: min(ts) for name, ts in times.items()},
    }
    # What the autotuner chose when these programs were traced: its entries in this run's
    # cache file (a fresh directory per run). The forward's entry is that of x * w -> g.
    row["chosen"] = {}
    for kind in KINDS:
        entry = find_entry(own_entries, kind, x.shape, w.shape, g.shape, strides, pads)
        row["chosen"][kind] = None if entry is None else entry["choice"]
        row[f"autotune_{kind}"] = entry
    # The convolutions nested in the "conv" formulations were measured for their own shapes
    # (the input gradient's, at stride 1, has the forward's fields and shares its entry):
    # kept to tell which of them run on oneDNN's forward kernel.
    row["nested_forward"] = [
        {"x": f["x"], "w": f["w"], "strides": f["strides"], "choice": e["choice"]}
        for k, e in own_entries.items()
        if k not in before
        and e != row["autotune_conv_forward"]
        and (f := json.loads(k))["kind"] == "conv_forward"
    ]
    return row


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--networks", default="resnet,sqnxt", help="comma-separated")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--scan", action="store_true", help="also gradients inside a scan")
    parser.add_argument("--scan-batch", type=int, default=8)
    parser.add_argument("--scan-steps", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated indices of the shapes")
    parser.add_argument(
        "--markdown-only",
        action="store_true",
        help="re-render docs/bench_conv.md from docs/bench_conv.json, measure nothing",
    )
    args = parser.parse_args()
    # measure afresh on this machine, never reading or writing the user's cache
    os.environ["ANODE_JAX_AUTOTUNE_CACHE"] = tempfile.mkdtemp(prefix="anode_jax_autotune_")
    os.environ["ANODE_JAX_AUTOTUNE"] = "on"
    json_path = os.path.join(os.path.dirname(__file__), "..", "docs", "bench_conv.json")
    if args.markdown_only:
        with open(json_path) as f:
            payload = json.load(f)
        _common.write_results("bench_conv", payload, to_markdown(payload))
        return
    names = [n for n in args.networks.split(",") if n]
    shapes = [s for s in network_shapes(names, args.batch) if s[2][2] > 3]  # stem: no gradient
    shapes.append((CORE_SHAPE[0], (args.batch,) + CORE_SHAPE[1][1:]) + CORE_SHAPE[2:])
    if args.only:
        shapes = [shapes[int(i)] for i in args.only.split(",")]
    settings = {
        "command": " ".join(["benchmarks/bench_conv.py"] + sys.argv[1:]),
        "batch": args.batch,
        "rounds": args.rounds,
        "scan": args.scan,
        "scan_batch": args.scan_batch,
        "scan_steps": args.scan_steps,
    }
    if onednn.available():
        settings["onednn"] = {
            "build_id": onednn.build_id(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        }
    payload = {"machine": _common.machine(), "settings": settings, "rows": []}
    for shape in shapes:
        start = time.perf_counter()
        row = measure(shape, args)
        payload["rows"].append(row)
        sec = row["seconds"]
        print(
            f"{row['shape']:28s} "
            + " ".join(f"{k} {v * 1e3:.1f}" for k, v in sec.items())
            + f" chosen {row['chosen']} load {row['load_average']} "
            f"[{time.perf_counter() - start:.0f} s]",
            flush=True,
        )
        _common.write_results("bench_conv", payload, to_markdown)  # partial results survive


def columns(t: dict, names: tuple[str, ...]) -> list[str]:
    """The measured columns of one pass in row times `t`: XLA's, then oneDNN's where timed."""
    onednn_column = names[0].split()[0] + " onednn"
    return [k for k in names if k in t] + ([onednn_column] if onednn_column in t else [])


def pass_ratios(r: dict, key: str = "seconds") -> dict[str, dict]:
    """Per pass of row `r`: the chosen formulation, its time / the best column's, and the times.

    Passes: "dw", "dx" and, where the forward was timed (oneDNN built), "fwd". `key`:
    "seconds" (medians) or "least_seconds".
    """
    t = r.get(key, r["seconds"])
    passes = {
        "dw": (columns(t, DW_XLA), r["chosen"]["conv_weight_gradient"]),
        "dx": (columns(t, DX_XLA), r["chosen"]["conv_input_gradient"]),
    }
    if "fwd xla" in t:
        passes["fwd"] = (["fwd xla", "fwd onednn"], r["chosen"].get("conv_forward"))
    out = {}
    for what, (cols, pick) in passes.items():
        best = min(t[k] for k in cols)
        other_best = min(t[k] for k in cols if not k.endswith("onednn"))
        chosen = t.get(f"{what} {pick}") if pick else None
        out[what] = {
            "pick": pick,
            "ratio": None if chosen is None else chosen / best,
            "other_best": other_best,
            "onednn": t.get(f"{what} onednn"),
        }
    return out


def fmt_ratio(ratio) -> str:
    if ratio is None:
        return "–"
    return f"{ratio:.2f}×" if ratio <= 1.1 else f"**{ratio:.2f}×**"


def to_markdown(payload) -> str:
    m, s = payload["machine"], payload["settings"]
    with_onednn = bool(s.get("onednn"))

    def ms(v):
        return "–" if v is None else f"{v * 1e3:.1f}"

    intro = (
        "Figures from other machines are not mixed in: the per-shape ratios compare programs "
        "of the same process, timed in interleaved rounds (median of "
        f"{s['rounds']} after a warm-up), so load changes touch every column alike. Batch "
        f"{s['batch']}, NHWC float32, the padding the networks use; times in ms. `lax` = "
        "JAX's own transpose rules (correct, and fast at top level, but 10–300× slower inside "
        "a loop on XLA:CPU); `conv`/`taps`/`gemm` = the loop-safe formulations "
        "(`anode_jax.nn.conv_general_dilated`, `weight_gradient=`/`input_gradient=`). "
    )
    if with_onednn:
        intro += (
            "`onednn` = oneDNN's kernel for that pass through the optional extension "
            f"`anode_jax.nn.onednn` (build `{s['onednn']['build_id']}`, `OMP_WAIT_POLICY="
            f"{s['onednn']['omp_wait_policy'] or 'unset'}`), pinned the same way (`forward=` "
            "for the forward pass alone, `fwd`); the convolution nested in a `conv` "
            "formulation runs with the forward chosen for its own shape, as in the library. "
        )
    intro += (
        "**chosen** = what the autotuner measured fastest when the loop-safe "
        + ("passes were" if with_onednn else "backward was")
        + " first traced in this run (its own timing, a separate measurement from the columns). "
        "best = the fastest column of that "
        + ("pass (lax and oneDNN included)" if with_onednn else "gradient (lax included)")
        + "; target: chosen within 1.1× of best. `bwd` = both gradients in one program"
        + (
            " (`bwd safe`: the library as shipped, every pass chosen among all candidates)"
            if with_onednn
            else ""
        )
        + "; `rule` = the fixed shape rule used when measuring is off."
    )
    lines = [
        "# Loop-safe convolution: "
        + ("formulations" if with_onednn else "backward formulations")
        + " chosen by measurement",
        "",
        f"Generated by `.venv/bin/python {s['command']}`.",
        "",
        _common.machine_header(m),
        "",
        intro,
        "",
    ]
    dw_cols = list(DW_XLA) + (["dw onednn"] if with_onednn else [])
    dx_cols = list(DX_XLA) + (["dx onednn"] if with_onednn else [])
    fwd_cols = ["fwd xla", "fwd onednn"] if with_onednn else []
    header = (
        ["shape (kernel/stride C_in→C_out @pixels)"]
        + dw_cols
        + ["dw chosen (rule)", "chosen / best"]
        + dx_cols
        + ["dx chosen", "chosen / best"]
        + (fwd_cols + ["fwd chosen", "chosen / best"] if with_onednn else [])
        + ["bwd lax", "bwd safe", "safe / lax"]
    )
    rows = payload["rows"]
    for network in dict.fromkeys(r["shape"].split()[0] for r in rows):
        lines += [
            f"## {network}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for r in rows:
            if r["shape"].split()[0] != network:
                continue
            t = r["seconds"]
            p = pass_ratios(r)
            cells = [" ".join(r["shape"].split()[1:])]
            cells += [ms(t.get(k)) for k in dw_cols]
            cells += [f"{p['dw']['pick']} ({r['rule']})", fmt_ratio(p["dw"]["ratio"])]
            cells += [ms(t.get(k)) for k in dx_cols]
            cells += [str(p["dx"]["pick"]), fmt_ratio(p["dx"]["ratio"])]
            if with_onednn:
                fwd = p.get("fwd", {"pick": None, "ratio": None})
                cells += [ms(t.get(k)) for k in fwd_cols]
                cells += [str(fwd["pick"] or "–"), fmt_ratio(fwd["ratio"])]
            cells += [ms(t["bwd lax"]), ms(t["bwd safe"]), f"{t['bwd safe'] / t['bwd lax']:.2f}×"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Summary", ""] + summary(rows, with_onednn) + [""]
    lines += [HOW_TEXT + (ONEDNN_TEXT if with_onednn else ""), ""]
    if s.get("scan"):
        lines += [
            "## Inside a `lax.scan`",
            "",
            f"Gradient of a {s['scan_steps']}-step scan at batch {s['scan_batch']}: the measured "
            "choice against the fixed rule (both loop-safe; lax is far slower in loops).",
            "",
            "| shape | measured choice | fixed rule | rule / choice |",
            "|---|---|---|---|",
        ]
        for r in rows:
            t = r["seconds"]
            lines.append(
                f"| {r['shape']} | {ms(t['scan safe'])} | {ms(t['scan rule'])} | "
                f"{t['scan rule'] / t['scan safe']:.2f}× |"
            )
        lines.append("")
    return "\n".join(lines)


def summary(rows, with_onednn: bool = False) -> list[str]:
    """Same-run ratios over all shapes: the measured choice and the fixed rule against the best."""
    out = []
    ratios_by_key = {}
    what_best = "best (oneDNN included)" if with_onednn else "best"
    for key, what in (("seconds", "median"), ("least_seconds", "least time")):
        ratios = ratios_by_key[key] = {"measured choice": [], "fixed rule": []}
        for r in rows:
            t = r.get(key, r["seconds"])
            p = pass_ratios(r, key)
            dw_best = min(t[k] for k in columns(t, DW_XLA))
            dx_best = min(t[k] for k in columns(t, DX_XLA))
            ratios["measured choice"] += [
                p[what]["ratio"] for what in ("dw", "dx") if p[what]["ratio"] is not None
            ]
            ratios["fixed rule"] += [t["dw " + r["rule"]] / dw_best, t["dx conv"] / dx_best]
        for name, values in ratios.items():
            out.append(
                f"* {name} ({what} of the rounds): within 1.1× of the {what_best} on "
                f"**{sum(v <= 1.1 for v in values)} of {len(values)}** gradients, within 1.5× "
                f"on {sum(v <= 1.5 for v in values)}; geometric mean "
                f"{statistics.geometric_mean(values):.2f}×, worst {max(values):.2f}×."
            )
    bwd = [r["seconds"]["bwd safe"] / r["seconds"]["bwd lax"] for r in rows]
    out.append(
        f"* whole backward, loop-safe (measured choice) / lax at top level: geometric mean "
        f"{statistics.geometric_mean(bwd):.2f}× ({min(bwd):.2f}–{max(bwd):.2f}×)."
    )
    if with_onednn:
        out += onednn_summary(rows)
    if all("scan rule" in r["seconds"] for r in rows):
        scan = [r["seconds"]["scan rule"] / r["seconds"]["scan safe"] for r in rows]
        out.append(
            f"* inside a scan, fixed rule / measured choice: geometric mean "
            f"{statistics.geometric_mean(scan):.2f}× ({min(scan):.2f}–{max(scan):.2f}×)."
        )
        slower = [r["shape"] for r, v in zip(rows, scan) if v < 1 / 1.1]
        if with_onednn and slower:
            out.append(
                f"* inside a scan the measured choice was over 1.1× slower than the fixed rule "
                f"at {len(slower)} of {len(rows)} shapes: {', '.join(slower)}."
            )
    if with_onednn:
        out += agreement(rows)
    if with_onednn:
        out.append(
            "* (the fixed rule's `conv` formulations are timed as in the columns, their nested "
            "convolution on the forward measured for its shape, which may be oneDNN's: this "
            "flatters the rule, which runs XLA's forward; the scan rows pin XLA's.)"
        )
    loads = [r["load_average"] for r in rows]
    medians = ratios_by_key["seconds"]["measured choice"]
    rule_medians = ratios_by_key["seconds"]["fixed rule"]
    missed = sum(v > 1.1 for v in medians)
    verdict = (
        f"is **missed** on {missed} of {len(medians)} gradients (marked bold)"
        if missed
        else "is met at every shape"
    )
    choice_gm = statistics.geometric_mean(medians)
    rule_gm = statistics.geometric_mean(rule_medians)
    closer = (
        "The measured choice is closer to the best than the fixed rule fitted on an earlier "
        f"machine (geometric mean {choice_gm:.2f}× against {rule_gm:.2f}×)."
        if choice_gm < rule_gm
        else "The measured choice is not closer to the best than the fixed rule here "
        f"(geometric mean {choice_gm:.2f}× against {rule_gm:.2f}×)."
    )
    out += [
        "",
        f"The target (the measured choice within 1.1× of the {what_best} at every shape, "
        f"medians) {verdict}. The autotuner's own timing (a few rounds at first trace) and this "
        "table's rounds are separate measurements (load average "
        f"{min(loads):.1f}–{max(loads):.1f} on 2 cores during this run); formulations within "
        "a few per cent of each other can swap places between the two, and a loaded machine "
        "widens that (an earlier run at load 12–16 met the target on 55 of 78 gradients). "
        + closer,
    ]
    return out


def agreement(rows) -> list[str]:
    """How far the autotuner's own least times are from this table's, per candidate."""
    pairs = []  # (autotuner's / table's least time, pass, candidate, shape)
    for r in rows:
        t = r.get("least_seconds", r["seconds"])
        for kind, what in zip(KINDS, ("dw", "dx", "fwd")):
            entry = r.get(f"autotune_{kind}") or {}
            trips = _loop_trips(entry)
            for name, seconds in (entry.get("seconds") or {}).items():
                if f"{what} {name}" in t:
                    pairs.append((seconds / trips / t[f"{what} {name}"], what, name, r["shape"]))
    if not pairs:
        return []
    off = sorted((p for p in pairs if not 0.5 <= p[0] <= 2.0), reverse=True)
    by_candidate = {}
    for _, what, name, _ in off:
        by_candidate[f"{what} {name}"] = by_candidate.get(f"{what} {name}", 0) + 1
    looped = any(_loop_trips(r.get(f"autotune_{k}") or {}) > 1 for r in rows for k in KINDS)
    return [
        "* the autotuner's own least time of a candidate"
        + (" per trip of the loop it times candidates in" if looped else "")
        + " and this table's least time (a call alone) differ "
        f"by more than 2× for {len(off)} of {len(pairs)} (candidate, shape) pairs"
        + (
            " ("
            + ", ".join(f"{k}: {v}" for k, v in sorted(by_candidate.items(), key=lambda kv: -kv[1]))
            + "; a candidate pruned after one timed run keeps that run as its time"
            + ("; and a call in a loop body can cost more or less than alone" if looped else "")
            + ")."
            if off
            else "."
        )
    ]


def onednn_summary(rows) -> list[str]:
    """Summary lines on the forward choice and on where oneDNN was chosen (oneDNN built)."""
    out = []
    fwd = [pass_ratios(r)["fwd"] for r in rows if "fwd xla" in r["seconds"]]
    if fwd:
        ratios = [f["ratio"] for f in fwd if f["ratio"] is not None]
        speed = [f["other_best"] / f["onednn"] for f in fwd]
        out.append(
            f"* forward pass: the measured choice within 1.1× of the faster of XLA's and "
            f"oneDNN's at **{sum(v <= 1.1 for v in ratios)} of {len(ratios)}** shapes (worst "
            f"{max(ratios):.2f}×); XLA's time / oneDNN's: geometric mean "
            f"{statistics.geometric_mean(speed):.2f}× ({min(speed):.2f}–{max(speed):.2f}×)."
        )
    passes = {
        "dw": ("weight gradient", "the fastest other column (lax included)"),
        "dx": ("input gradient", "the fastest other column (lax included)"),
        "fwd": ("forward pass", "XLA's forward"),
    }
    counted = [r for r in rows if r.get("onednn", "dw onednn" in r["seconds"])]
    for what, (name, other) in passes.items():
        timed = [(r["shape"], p[what]) for r in counted if what in (p := pass_ratios(r))]
        picks = [(shape, q) for shape, q in timed if q["pick"] == "onednn"]
        fastest = sum(q["onednn"] < q["other_best"] for _, q in timed)
        line = (
            f"* oneDNN chosen for the {name} at **{len(picks)} of {len(timed)}** shapes (its "
            f"column the fastest at {fastest})"
        )
        if picks:
            gains = [q["other_best"] / q["onednn"] for _, q in picks]
            line += (
                f"; there {other} took {statistics.geometric_mean(gains):.2f}× oneDNN's time "
                f"(geometric mean, {min(gains):.2f}–{max(gains):.2f}×): "
                + ", ".join(f"{shape} {g:.2f}×" for (shape, _), g in zip(picks, gains))
            )
        out.append(line + ".")
    nested = [n for r in rows for n in r.get("nested_forward", [])]
    if nested:
        out.append(
            "* convolutions nested in the `conv` gradient formulations (measured for their own "
            f"shapes): oneDNN's forward chosen for {sum(n['choice'] == 'onednn' for n in nested)}"
            f" of {len(nested)}; the `conv` columns and `bwd safe` run it there."
        )
    return out


HOW_TEXT = """## How the choice is made

The loop-safe convolution (`anode_jax.nn.conv_general_dilated`) owns its backward pass, and
each gradient has several correct formulations — all emit only canonical-layout
convolutions or plain matrix products, so all stay fast inside loops:

* weight gradient: `conv` (one canonical convolution, input channels as batch), `taps` (one
  batch-parallel product per kernel tap, summed over the batch), `gemm` (one product per tap
  contracting batch and pixels together);
* input gradient: `conv` (the cotangent correlated with the flipped kernel), `taps` (the
  transpose of per-tap products: pads and slices, no convolution).

With the default `"auto"`, the formulations are timed once per (shape, dtype, precision,
machine) when the backward is first traced — shapes are static in JAX, so under `jit` this is
at compile time, on random inputs, outside the trace (`jax.ensure_compile_time_eval`) — and
the fastest is cached in memory and in `~/.cache/anode_jax/autotune-<machine>.json`
(`ANODE_JAX_AUTOTUNE_CACHE` moves it; the file name hashes the CPU model and ISA flags,
cores, backend, jax/jaxlib and `XLA_FLAGS`). `ANODE_JAX_AUTOTUNE=off` uses the fixed rule
instead (the `rule` column: per-tap products for ≤ 3 taps or ≥ 64×64 channels, a convolution
otherwise; a convolution for the input gradient), `ANODE_JAX_AUTOTUNE=cache` uses cached
choices only, and `ANODE_JAX_CONV_WEIGHT_GRADIENT` / `ANODE_JAX_CONV_INPUT_GRADIENT` (or the
`weight_gradient=` / `input_gradient=` arguments) pin one formulation. The first compile of a
network pays for the measurement (each candidate compiled and run a few times; a candidate
over 3× slower than the best at its first run is not run again); later compiles, in any
process on the same machine and versions, read the cache. The fixed rule was fitted on an
earlier 2-core machine and is kept only as the deterministic default; on this machine it
differs from the measured choice at several shapes (table above)."""

#: Appended to HOW_TEXT when the run had the oneDNN extension built.
ONEDNN_TEXT = """

**oneDNN.** When the optional extension `anode_jax.nn.onednn` is built
(`scripts/build_onednn.sh`, run by `scripts/setup.sh` when it can), oneDNN's kernels are one
more candidate for each pass, called as XLA custom calls (which XLA's layout passes do not
touch, so a loop body runs the same kernel; the scan rows measure what that gives):
`onednn` for the weight and the input gradient, and for the forward pass, which is then
chosen the same way between XLA's convolution (`xla`) and oneDNN's (`forward="auto"` |
`"xla"` | `"onednn"`, `ANODE_JAX_CONV_FORWARD`). oneDNN is a candidate only on the CPU
backend for 2-D float32 convolutions with one feature group, no dilation and non-negative
padding (`anode_jax.nn.onednn_unsupported_reason`; every convolution of these tables
qualifies); elsewhere the choice is among XLA's formulations as before. The cache key holds
the candidates' names and a digest of the built extension, so building or rebuilding it
leads to a new measurement instead of an old entry. With measuring off, oneDNN is never
used (XLA's forward and the fixed rule)."""


if __name__ == "__main__":
    main()
