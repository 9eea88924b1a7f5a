"""Does a `jax.ffi` custom call into oneDNN close the convolution gap to PyTorch on XLA:CPU?

    scripts/build_onednn.sh                                    # builds the extension
    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_onednn.py
    .venv/bin/python benchmarks/bench_onednn.py --parts layers,loop --rounds 5

Parts (`--parts`, default all three), all in one process and one run:

* `layers`: one 3×3 convolution at the papers' shapes (resnet at batch 128: 32×32×16,
  16×16×32, 8×8×64 stride 1, and the two stride-2 transitions; the core network's
  32×16×16×16), each pass alone — forward, input gradient (cotangent given), weight gradient —
  as: the oneDNN custom call (`anode_jax.nn.onednn`), XLA's own (`lax.conv_general_dilated`
  and its transpose rules, jitted at top level), the library's loop-safe conv
  (`anode_jax.nn.conv_general_dilated`, its gradients chosen by measurement), and PyTorch's
  `conv2d` / `convolution_backward` (NCHW, as the original ANODE code runs, and channels-last).
* `loop`: the gradient (w.r.t. input and the T kernels) of `Σ <h_T, g>` with
  `h_{t+1} = tanh(conv(h_t, w_t))` over a `--loop_steps`-step `lax.scan` at each stride-1
  shape: loop-safe conv against the oneDNN conv (PyTorch: the same recursion in autograd).
* `step`: the resnet ODE network's training step (benchmarks/bench_peer.py's machinery and
  rows: anode-jax `"anode"` and `"direct"` with the loop-safe conv as shipped — autotuned per
  shape, oneDNN among its candidates when the extension is built — PyTorch's original ANODE,
  checkpointing and plain autograd in a worker process) plus anode-jax `"anode"` with every
  loop-safe convolution of the network pinned to oneDNN (`ANODE_JAX_CONV_FORWARD` /
  `_INPUT_GRADIENT` / `_WEIGHT_GRADIENT=onednn` while that row is compiled).

Times: every candidate of a row is compiled (and run once) first, then timed in `--rounds`
interleaved rounds with the order rotating; a layer sample is the mean of `--inner` calls.
Median, least in brackets; ratios are of medians within this run. torch uses 2 threads and
`OMP_WAIT_POLICY=PASSIVE` unless set (as bench_peer.py; the oneDNN extension's GNU OpenMP
threads read the same variable). Writes docs/bench_onednn.json and docs/bench_onednn.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from anode_jax.nn import conv_general_dilated, onednn  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")
#: (name, x shape NHWC, kernel HWIO, stride); padding SAME (1 each side, or (0, 1) at stride 2).
#: The resnet shapes are its ODE blocks' convolutions and one transition (`create_model("resnet")`
#: at batch 128; benchmarks/bench_conv.py lists all of them).
SHAPES = (
    ("resnet stage 1: 32×32×64", (128, 32, 32, 64), (3, 3, 64, 64), 1),
    ("resnet stage 2: 16×16×128", (128, 16, 16, 128), (3, 3, 128, 128), 1),
    ("resnet stage 3: 8×8×256", (128, 8, 8, 256), (3, 3, 256, 256), 1),
    ("resnet stage 4: 4×4×512", (128, 4, 4, 512), (3, 3, 512, 512), 1),
    ("resnet transition 16×16×128→256 /2", (128, 16, 16, 128), (3, 3, 128, 256), 2),
    ("core 32×16×16×16", (32, 16, 16, 16), (3, 3, 16, 16), 1),
)
PASSES = ("forward", "input grad", "weight grad")
TORCH_THREADS = 2


def timed_rounds(calls: dict, rounds: int, inner: int) -> dict:
    """{label: {median_s, least_s, times_s}}: interleaved rounds, rotating order."""
    for call in calls.values():
        call()
    labels = list(calls)
    times = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            start = time.perf_counter()
            for _ in range(inner):
                calls[label]()
            times[label].append((time.perf_counter() - start) / inner)
    return {
        label: {"median_s": statistics.median(ts), "least_s": min(ts), "times_s": ts}
        for label, ts in times.items()
    }


def _pads(x_shape, w_shape, stride):
    return tuple(lax.padtype_to_pads(x_shape[1:3], w_shape[:2], (stride, stride), "SAME"))


def _jit_call(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return lambda: jax.block_until_ready(compiled(*args))


def layer_calls(x_shape, w_shape, stride, torch):
    """{pass: {implementation: call}} for one shape, plus the largest relative deviation of
    each oneDNN pass from XLA's (float32)."""
    strides = (stride, stride)
    pads = _pads(x_shape, w_shape, stride)
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, x_shape, jnp.float32)
    w = jax.random.normal(kw, w_shape, jnp.float32) / np.sqrt(np.prod(w_shape[:3]))
    y_shape = jax.eval_shape(lambda: lax.conv_general_dilated(x, w, strides, pads, None, None, DN))
    g = jax.random.normal(kg, y_shape.shape, jnp.float32)

    def lax_conv(x, w):
        return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=DN)

    def safe_conv(x, w):
        return conv_general_dilated(x, w, strides, pads, dimension_numbers=DN)

    def input_grad(conv):
        return lambda g, w: jax.vjp(lambda x: conv(x, w), jnp.zeros(x_shape))[1](g)[0]

    def weight_grad(conv):
        return lambda x, g: jax.vjp(lambda w: conv(x, w), jnp.zeros(w_shape))[1](g)[0]

    calls = {p: {} for p in PASSES}
    calls["forward"]["oneDNN custom call"] = _jit_call(
        lambda x, w: onednn.conv_forward(x, w, strides, pads), x, w
    )
    calls["forward"]["XLA (lax)"] = _jit_call(lax_conv, x, w)
    calls["input grad"]["oneDNN custom call"] = _jit_call(
        lambda g, w: onednn.conv_input_grad(g, w, x_shape, strides, pads), g, w
    )
    calls["input grad"]["XLA (lax)"] = _jit_call(input_grad(lax_conv), g, w)
    calls["input grad"]["loop-safe conv"] = _jit_call(input_grad(safe_conv), g, w)
    calls["weight grad"]["oneDNN custom call"] = _jit_call(
        lambda x, g: onednn.conv_weight_grad(x, g, w_shape, strides, pads), x, g
    )
    calls["weight grad"]["XLA (lax)"] = _jit_call(weight_grad(lax_conv), x, g)
    calls["weight grad"]["loop-safe conv"] = _jit_call(weight_grad(safe_conv), x, g)

    errors = {}
    ref = {
        "forward": lax_conv(x, w),
        "input grad": jax.jit(input_grad(lax_conv))(g, w),
        "weight grad": jax.jit(weight_grad(lax_conv))(x, g),
    }
    got = {
        "forward": onednn.conv_forward(x, w, strides, pads),
        "input grad": onednn.conv_input_grad(g, w, x_shape, strides, pads),
        "weight grad": onednn.conv_weight_grad(x, g, w_shape, strides, pads),
    }
    for p in PASSES:
        errors[p] = float(jnp.max(jnp.abs(got[p] - ref[p])) / jnp.max(jnp.abs(ref[p])))

    if torch is not None:
        for layout in ("NCHW", "channels-last"):
            fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
            tx = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
            tw = torch.from_numpy(np.asarray(w)).permute(3, 2, 0, 1).contiguous(memory_format=fmt)
            tg = torch.from_numpy(np.asarray(g)).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
            # SAME at stride 2 on an even map pads (0, 1); torch pads symmetrically, so the
            # stride-2 rows use padding 1 (same output size, same work).
            tpad = [pads[0][0] if stride == 1 else 1, pads[1][0] if stride == 1 else 1]
            label = f"PyTorch ({layout})"

            def fwd(tx=tx, tw=tw, tpad=tpad):
                with torch.no_grad():
                    torch.nn.functional.conv2d(tx, tw, None, strides, tpad)

            def bwd(mask, tx=tx, tw=tw, tg=tg, tpad=tpad):
                torch.ops.aten.convolution_backward(
                    tg, tx, tw, None, list(strides), tpad, [1, 1], False, [0, 0], 1, mask
                )

            calls["forward"][label] = fwd
            calls["input grad"][label] = lambda b=bwd: b([True, False, False])
            calls["weight grad"][label] = lambda b=bwd: b([False, True, False])
    return calls, errors


def loop_calls(x_shape, w_shape, steps, torch):
    """Gradient of a `steps`-step scan of tanh(conv) with each implementation."""
    pads = _pads(x_shape, w_shape, 1)
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(kx, x_shape, jnp.float32)
    ws = jax.random.normal(kw, (steps, *w_shape), jnp.float32) / np.sqrt(np.prod(w_shape[:3]))
    g = jax.random.normal(kg, x_shape, jnp.float32)

    def loss(conv):
        def f(x, ws):
            h, _ = lax.scan(lambda h, w: (jnp.tanh(conv(h, w)), None), x, ws)
            return jnp.vdot(h, g)

        return jax.grad(f, argnums=(0, 1))

    convs = {
        "loop-safe conv": lambda h, w: conv_general_dilated(
            h, w, (1, 1), pads, dimension_numbers=DN
        ),
        "oneDNN custom call": lambda h, w: onednn.conv(h, w, (1, 1), pads),
    }
    calls = {label: _jit_call(loss(c), x, ws) for label, c in convs.items()}
    grads = {label: jax.jit(loss(c))(x, ws) for label, c in convs.items()}
    a, b = grads["loop-safe conv"], grads["oneDNN custom call"]
    error = max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(u))) for u, v in zip(a, b))
    if torch is not None:
        tx = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
        tws = [torch.from_numpy(np.asarray(w)).permute(3, 2, 0, 1).contiguous() for w in ws]
        tg = torch.from_numpy(np.asarray(g)).permute(0, 3, 1, 2).contiguous()

        def torch_grad():
            xs = tx.clone().requires_grad_(True)
            wl = [t.clone().requires_grad_(True) for t in tws]
            h = xs
            for w in wl:
                h = torch.tanh(torch.nn.functional.conv2d(h, w, None, 1, 1))
            torch.autograd.grad((h * tg).sum(), [xs, *wl])

        calls["PyTorch (NCHW)"] = torch_grad
    return calls, error


# ----------------------------------------------------------------------------- step


#: Every convolution of the loop-safe conv on oneDNN where it can compute it (the rest, e.g.
#: float64 or dilated ones, on the default formulation): the public pins.
ONEDNN_PINS = {
    "ANODE_JAX_CONV_FORWARD": "onednn",
    "ANODE_JAX_CONV_INPUT_GRADIENT": "onednn",
    "ANODE_JAX_CONV_WEIGHT_GRADIENT": "onednn",
}


def compile_onednn_step(name: str, adjoint: str, batch: int):
    """bench_peer.compile_jax_step with every loop-safe conv pinned to oneDNN.

    Returns (compiled, arguments, fields, (oneDNN custom calls, XLA convolutions) in the
    compiled program).
    """
    import bench_peer

    saved = {k: os.environ.get(k) for k in ONEDNN_PINS}
    os.environ.update(ONEDNN_PINS)
    try:
        compiled, step_args, fields = bench_peer.compile_jax_step(name, adjoint, "loop_safe", batch)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = compiled.as_text()
    routed = len(re.findall(r'custom_call_target="anode_onednn_conv_', text))
    fallback = len(re.findall(r"\bconvolution\(", text))
    fields["formulations"] = (
        f"oneDNN custom calls ({routed} in the program; {fallback} XLA convolutions)"
    )
    return compiled, step_args, fields, (routed, fallback)


def step_agreement(name: str = "resnet", batch: int = 128) -> dict:
    """One `"anode"` SGD step from the same state with each route: the largest deviation of
    the oneDNN route's parameter update from the loop-safe one, relative to the largest
    update entry of that leaf (the update is -lr·gradient at the first step), and both losses."""
    import bench_peer

    compiled, step_args, _ = bench_peer.compile_jax_step(name, "anode", "loop_safe", batch)
    state_a, metrics_a = compiled(*step_args)
    compiled_o, step_args_o, _, _ = compile_onednn_step(name, "anode", batch)
    state_o, metrics_o = compiled_o(*step_args_o)
    old = jax.tree.leaves(step_args[0].params)
    deviation = 0.0
    for p0, pa, po in zip(old, jax.tree.leaves(state_a.params), jax.tree.leaves(state_o.params)):
        ua, uo = np.asarray(pa - p0), np.asarray(po - p0)
        if np.max(np.abs(ua)) > 0:
            deviation = max(deviation, float(np.max(np.abs(ua - uo)) / np.max(np.abs(ua))))
    # The same measure between two loop-safe steps whose images differ by 2^-20 relative: how
    # far float32 rounding alone moves this network's first update.
    state, images, labels = step_args
    state_p, _ = compiled(state, images * (1 + 2.0**-20), labels)
    sensitivity = 0.0
    for p0, pa, pp in zip(old, jax.tree.leaves(state_a.params), jax.tree.leaves(state_p.params)):
        ua, up = np.asarray(pa - p0), np.asarray(pp - p0)
        if np.max(np.abs(ua)) > 0:
            sensitivity = max(sensitivity, float(np.max(np.abs(ua - up)) / np.max(np.abs(ua))))
    return {
        "update_rel_deviation": deviation,
        "update_rel_deviation_images_perturbed": sensitivity,
        "loss_loop_safe": float(metrics_a["loss"]),
        "loss_onednn": float(metrics_o["loss"]),
    }


def measure_step(args):
    import bench_peer

    peer_reason = bench_peer.peer_unavailable(args.peer_dir)
    if peer_reason:
        print(f"bench_onednn.py: PyTorch side skipped: {peer_reason}")
    original_compile = bench_peer.compile_jax_step
    routed = {}

    def compile_step(name, adjoint, conv, batch):
        if conv != "onednn":
            return original_compile(name, adjoint, conv, batch)
        compiled, step_args, fields, counts = compile_onednn_step(name, adjoint, batch)
        routed.update(routed=counts[0], fallback=counts[1])
        return compiled, step_args, fields

    step_args = argparse.Namespace(
        convs=["loop_safe", "onednn"], repeats=args.step_rounds, batch=128, peer_dir=args.peer_dir
    )
    bench_peer.compile_jax_step = compile_step
    try:
        result = bench_peer.measure_network("resnet", step_args, peer_reason)
    finally:
        bench_peer.compile_jax_step = original_compile
    if peer_reason:
        result["peer_missing"] = peer_reason
    result["routed"] = routed
    return result


# ----------------------------------------------------------------------------- markdown


def to_markdown(payload) -> str:
    s = payload["settings"]
    m = payload["machine"]
    lines = [
        "# Convolutions through a `jax.ffi` custom call into oneDNN (measurement)",
        "",
        f"Generated by `.venv/bin/python {s['command']}`.",
        "",
        _common.machine_header(m)
        + f" oneDNN {s['onednn']} (CPU-only GNU OpenMP build; `OMP_WAIT_POLICY="
        f"{s['omp_wait_policy']}`); PyTorch {s.get('torch', 'not installed')}, "
        f"{TORCH_THREADS} threads, in this process.",
    ]
    if "layers" in payload:
        lines += [
            "",
            "## Single layers (3×3, SAME, float32, batch as shown)",
            "",
            f"Time per call in ms: median of {s['rounds']} interleaved rounds of {s['inner']} "
            "calls each, least in brackets. Ratio column: XLA's best (lax or loop-safe) ÷ "
            "oneDNN (> 1: oneDNN faster), and oneDNN ÷ PyTorch's best layout (> 1: PyTorch "
            "faster). `err`: oneDNN's largest deviation from XLA's result, relative to its "
            "largest entry. oneDNN kernel: the implementation oneDNN chose.",
        ]
        for layer in payload["layers"]:
            impls = list(dict.fromkeys(k for p in layer["passes"].values() for k in p["times"]))
            lines += [
                "",
                f"### {layer['name']}: x {layer['x']} (NHWC), w {layer['w']} (HWIO), "
                f"stride {layer['stride']}",
                "",
                "| pass | "
                + " | ".join(impls)
                + " | XLA best ÷ oneDNN | oneDNN ÷ PyTorch best | err | oneDNN kernel |",
                "|---|" + "---|" * (len(impls) + 4),
            ]
            for name, p in layer["passes"].items():
                t = p["times"]
                cells = [
                    f"{t[i]['median_s'] * 1e3:.2f} ({t[i]['least_s'] * 1e3:.2f})" if i in t else "–"
                    for i in impls
                ]
                one = t["oneDNN custom call"]["median_s"]
                xla = min(
                    v["median_s"] for k, v in t.items() if k in ("XLA (lax)", "loop-safe conv")
                )
                torch_times = [v["median_s"] for k, v in t.items() if k.startswith("PyTorch")]
                vs_torch = f"{one / min(torch_times):.2f}×" if torch_times else "–"
                lines.append(
                    f"| {name} | "
                    + " | ".join(cells)
                    + f" | {xla / one:.2f}× | {vs_torch} | {p['error']:.1e} | `{p['impl']}` |"
                )
    if "loop" in payload:
        lines += [
            "",
            f"## Inside a loop: gradient through a {s['loop_steps']}-step `lax.scan` of tanh(conv)",
            "",
            "Gradient w.r.t. the input and every step's kernel; time per gradient in ms (median, "
            "least in brackets). `err`: largest deviation between the two JAX gradients, "
            "relative to the largest entry.",
            "",
            "| shape | loop-safe conv | oneDNN custom call | PyTorch (NCHW) | loop-safe ÷ oneDNN "
            "| oneDNN ÷ PyTorch | err |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in payload["loop"]:
            t = row["times"]
            cell = {
                k: f"{v['median_s'] * 1e3:.1f} ({v['least_s'] * 1e3:.1f})" for k, v in t.items()
            }
            one = t["oneDNN custom call"]["median_s"]
            torch_t = t.get("PyTorch (NCHW)")
            vs_torch = f"{one / torch_t['median_s']:.2f}×" if torch_t else "–"
            lines.append(
                f"| {row['name']} | {cell['loop-safe conv']} | {cell['oneDNN custom call']} | "
                f"{cell.get('PyTorch (NCHW)', '–')} | "
                f"{t['loop-safe conv']['median_s'] / one:.2f}× | "
                f"{vs_torch} | {row['error']:.1e} |"
            )
    if "step" in payload:
        import bench_peer

        step = payload["step"]
        run = payload.get("step_run")  # the step figures come from an earlier run of the script
        sub = {
            "settings": {
                "command": run["command"] if run else s["command"],
                "batch": 128,
                "repeats": run["step_rounds"] if run else s["step_rounds"],
            },
            "machine": run["machine"] if run else m,
            "networks": [step],
        }
        layer_error = max(
            (p["error"] for layer in payload.get("layers", []) for p in layer["passes"].values()),
            default=None,
        )
        if step.get("peer_missing"):
            sub["peer_missing"] = step["peer_missing"]
        body = bench_peer._run_markdown(sub, "###")[3:]  # without the command / machine lines
        lines += [
            "",
            "## The resnet training step (bench_peer.py's rows, plus every conv on oneDNN)",
            "",
            *(
                [
                    f"From a separate run of `.venv/bin/python {run['command']}`: "
                    + _common.machine_header(run["machine"]),
                    "",
                ]
                if run
                else []
            ),
            'The row `anode-jax anode (onednn)` is `"anode"` with each loop-safe '
            "convolution of the network (forward, input and weight gradient) a oneDNN custom call "
            f"({step['routed'].get('routed', 0)} on oneDNN, "
            f"{step['routed'].get('fallback', 0)} left on XLA)."
            + (
                " One step from the same state with each route: parameter updates agree to "
                f"{step['agreement']['update_rel_deviation']:.1e} (largest deviation relative to "
                "the largest update entry of each leaf; the loop-safe step itself moves by "
                f"{step['agreement'].get('update_rel_deviation_images_perturbed', float('nan')):.1e}"
                " when the images change by 2^-20 relative: this network's first update is that "
                "sensitive to float32 rounding"
                + (
                    f"; single layers agree to ≤ {layer_error:.1e}, tables above"
                    if layer_error is not None
                    else ""
                )
                + "), "
                "losses "
                f"{step['agreement']['loss_loop_safe']:.6f} (loop-safe) and "
                f"{step['agreement']['loss_onednn']:.6f} (oneDNN)."
                if "agreement" in step
                else ""
            ),
            *body,
        ]
    lines += ["", *trade_off(payload), "", *PROPOSAL]
    return "\n".join(lines) + "\n"


def _gains(payload) -> dict:
    """Ranges measured in this run, for the trade-off text."""
    out = {}
    if "layers" in payload:
        ratios = []
        for layer in payload["layers"]:
            for p in layer["passes"].values():
                t = p["times"]
                xla = min(
                    v["median_s"] for k, v in t.items() if k in ("XLA (lax)", "loop-safe conv")
                )
                ratios.append(xla / t["oneDNN custom call"]["median_s"])
        out["layers"] = f"{min(ratios):.2f}–{max(ratios):.2f}×"
    if "loop" in payload:
        ratios = [
            r["times"]["loop-safe conv"]["median_s"] / r["times"]["oneDNN custom call"]["median_s"]
            for r in payload["loop"]
        ]
        out["loop"] = f"{min(ratios):.2f}–{max(ratios):.2f}×"
    if "step" in payload:
        rows = {r["row"]: r for r in payload["step"]["rows"]}
        safe, fast = rows.get("anode-jax anode (loop_safe)"), rows.get("anode-jax anode (onednn)")

        def per_round(a, b):
            r = [x / y for x, y in zip(a["times_s"], b["times_s"])]
            return f"{statistics.median(r):.2f}× ({min(r):.2f}–{max(r):.2f})"

        if safe and fast:
            out["step"] = per_round(safe, fast)
            original = rows.get("PyTorch original")
            if original:
                out["step_vs_original"] = per_round(fast, original)
                out["safe_vs_original"] = per_round(safe, original)
    return out


def trade_off(payload) -> list[str]:
    """The route's costs (facts of the build, checked when it was written) beside its gains."""
    g = _gains(payload)
    gain = []
    if "layers" in g:
        gain.append(f"single layers {g['layers']} faster than XLA's best formulation")
    if "loop" in g:
        gain.append(f"gradients through a scan {g['loop']} faster than the loop-safe conv")
    if "step" in g:
        gain.append(
            f'the resnet `"anode"` step {g["step"]} faster than with the loop-safe conv'
            + (
                f"; with oneDNN the step takes {g['step_vs_original']} of the original PyTorch "
                f"ANODE's time, with the loop-safe conv {g['safe_vs_original']} (medians of "
                "the per-round ratios, ranges in brackets)"
                if "step_vs_original" in g
                else ""
            )
        )
    return [
        "## Trade-off",
        "",
        "Gain (the step timed in its own run when so stated above): "
        + ("; ".join(gain) if gain else "not measured")
        + ".",
        "",
        "| | |",
        "|---|---|",
        "| dependency | oneDNN 3.2.0 from the registry's CPU-only GNU-OpenMP wheels: "
        "`onednn-cpu-gomp==2023.2.0` (38.9 MB download; `libdnnl.so.3` 54.6 MB unpacked; the "
        "wheel itself stores the library three times, 164 MB, which is why the build script "
        "unpacks one copy instead of installing it) and `onednn-devel-cpu-gomp==2023.2.0` "
        "(headers, 0.19 MB). Needs only libgomp, libstdc++ and glibc. The newest registry "
        "package, `onednn==2026.1.0` (97 MB wheel, 109.5 MB library), is the DPC++/SYCL build: "
        "its `libdnnl.so` needs `libsycl.so.9`, `libtbb.so.12`, `libsvml.so`, `libimf.so`, "
        "`libintlc.so.5` (the `dpcpp-cpp-rt` and `intel-opencl-rt` wheels it requires), so "
        "it was not used. PyTorch's wheel carries oneDNN inside `libtorch_cpu.so` (not a "
        "separate library to link). |",
        "| build step | `scripts/build_onednn.sh`: pip-downloads the two wheels into `build/`, "
        "unpacks them, compiles `anode_jax/nn/onednn/conv.cc` (≈ 300 lines of C++17) with "
        "g++ against them and the installed jaxlib's FFI headers (`jax.ffi.include_dir()`): "
        "≈ 11 s here, a 0.15 MB `_onednn_conv.so` linked to `libdnnl.so.3` by rpath. Needs a "
        "C++17 compiler on the user's machine, or a platform wheel per OS/arch if shipped "
        "prebuilt (the package is pure Python today). `scripts/setup.sh` runs it when it can "
        "(≈ 1 min with the downloads on a fresh clone). |",
        "| ABI / version coupling | XLA's FFI is a versioned C ABI (these headers: FFI API "
        "0.5), so the extension does not link against jaxlib; it is built against one jaxlib's "
        "headers and must be rebuilt (and retested) when jaxlib's FFI major version changes. "
        "oneDNN's C++ API is header-only over a stable C ABI within major version 3 "
        "(`libdnnl.so.3`). |",
        "| what works | `jit`; reverse mode to any order through the loop-safe conv (the "
        "raw `onednn.conv` is first-order only: its backward is the two gradient kernels; "
        "inside the library each oneDNN gradient has its own VJP, the same linear map written "
        "with XLA convolutions); `lax.scan` / `fori_loop` bodies (no layout pass involved); "
        '`vmap` only sequentially (`vmap_method="sequential"`: one call per mapped element); '
        "no forward mode; CPU only (GPU/TPU keep XLA's convolutions, where cuDNN already "
        "serves); float32, 2-D, groups = 1, no dilation (oneDNN has the rest; not wired). "
        "Single-device programs only: the custom calls have no partitioning rule, so under a "
        "sharded `jit` XLA gathered their operands onto every device (measured on a 4-device "
        "mesh: correct values, no data parallelism) — the library does not offer oneDNN when "
        "several devices are visible. Untested: `jax.export` (the target must be registered "
        "where the program is loaded). |",
        "| runtime caveats | Each oneDNN primitive is created once per geometry and cached for "
        "the process (creation JIT-compiles a kernel, milliseconds). oneDNN runs on its own "
        "OpenMP team next to XLA's thread pool; calls are serialized by a lock (each uses every "
        "core). Two faults found while building it, both covered by tests/test_onednn_conv.py: "
        "oneDNN's default build shares one library-owned scratchpad among primitives, which "
        "crashed (SIGSEGV) when XLA ran independent custom calls on two threads (fixed: "
        "user-mode scratchpads, one per thread); and oneDNN 3.2's 1×1 weight-gradient kernel "
        "(`jit_1x1:avx2`) returned wrong values from the second call on when the input extends "
        "past the last window (negative right padding, e.g. a 1×1 stride-2 shortcut on an even "
        "map; fixed: the input is cropped to the rows the windows read). The step timings below "
        "the tables were taken before the second fix (same kernels and work; the three 1×1 "
        "stride-2 shortcut weight gradients were wrong); the step agreement was measured after "
        "it. The scratchpads and the kernel-layout reorder buffers are outside XLA's "
        "`memory_analysis()`. |",
        "| memory | The step's compiled `temp_size_in_bytes` (table above) drops with the "
        "custom calls because XLA no longer materializes the loop-safe formulations' per-tap "
        "slices; oneDNN's own scratchpads and reorder buffers are not in that figure (they are "
        "per call and per thread, freed or reused after each call), so the two temp figures "
        "are not a like-for-like memory comparison. |",
        "| maintenance | Ours: the C++ source, the build script, the layout/padding "
        "conventions (oneDNN reads the right padding literally; the source derives it from "
        "the output size), and a second numerical path to keep tested against `lax` "
        "(tests/test_onednn_conv.py, skipped without the build). oneDNN itself is kept by "
        "Intel (Apache-2.0); the pinned 2023.2.0 CPU wheels are the last CPU-only ones on the "
        "registry, so a newer oneDNN means building it from source or the SYCL build's "
        "runtime stack. |",
    ]


PROPOSAL = [
    "## Integration into the library (done)",
    "",
    "The route is one more candidate of the choice by measurement, without a new switch:",
    "",
    '1. `anode_jax/nn/_conv.py`: `"onednn"` in `INPUT_GRADIENT_METHODS`, '
    '`WEIGHT_GRADIENT_METHODS` and the new `FORWARD_METHODS` (`"xla"` | `"onednn"`), offered '
    "to `autotune.choose` only when `onednn.available()`, the backend is the CPU with one "
    "device and the geometry is supported (2-D, float32, groups = 1, no dilation, non-negative "
    "padding: `onednn_unsupported_reason`); everything else keeps the XLA candidates, so a "
    "machine without the extension is unchanged. The choice is per shape (oneDNN does not "
    "win everywhere: the 4×4×512 weight gradient above).",
    "2. Higher-order reverse mode: each oneDNN gradient is a `custom_vjp` whose backward is "
    "the VJP of the same linear map written with XLA convolutions (themselves loop-safe and "
    "autotuned); the forward rule calls the loop-safe conv itself, so `grad` of `grad` "
    "meets the custom rule.",
    "3. The autotuner's cache key holds the candidate names and the extension's build digest "
    "(`onednn.build_id()`): building or rebuilding it leads to a new measurement.",
    "4. Packaging: `scripts/setup.sh` (the README's setup, and so CI) runs "
    "`scripts/build_onednn.sh` on Linux x86-64 with g++, and carries on without it when the "
    "build fails (`ANODE_JAX_ONEDNN=0` skips it); tests/test_onednn_conv.py then runs the "
    "oneDNN tests (skipped without the build).",
    "",
    "Pins: `ANODE_JAX_CONV_FORWARD` / `ANODE_JAX_CONV_INPUT_GRADIENT` / "
    "`ANODE_JAX_CONV_WEIGHT_GRADIENT=onednn` put every convolution oneDNN can compute on it "
    "(the rest on the default formulation); `forward=` / `input_gradient=` / "
    '`weight_gradient="onednn"` per call (a ValueError naming the reason where it cannot).',
]


def render() -> None:
    """Rewrites docs/bench_onednn.md from docs/bench_onednn.json."""
    payload = _common.read_results("bench_onednn")
    _common.write_results("bench_onednn", payload, to_markdown)


# ----------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="layers,loop,step")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the layer and loop rows")
    parser.add_argument("--inner", type=int, default=5, help="calls per layer sample")
    parser.add_argument("--loop_steps", type=int, default=4)
    parser.add_argument("--step_rounds", type=int, default=5)
    parser.add_argument("--peer_dir", default=None, help="as bench_peer.py's --peer_dir")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the Markdown from the JSON"
    )
    parser.add_argument(
        "--keep_step",
        action="store_true",
        help="without the step part: keep the step figures already in docs/bench_onednn.json",
    )
    parser.add_argument(
        "--keep_layers",
        action="store_true",
        help="with --parts step only: keep the layer and loop figures already in "
        "docs/bench_onednn.json (the step's own machine line is recorded beside them)",
    )
    parser.add_argument(
        "--agreement_only",
        action="store_true",
        help="only add the step-agreement check (no timing) to docs/bench_onednn.json",
    )
    args = parser.parse_args()
    if args.render:
        return render()
    if args.agreement_only:
        payload = _common.read_results("bench_onednn")
        payload["step"]["agreement"] = step_agreement()
        print(payload["step"]["agreement"])
        _common.write_results("bench_onednn", payload, to_markdown)
        return None
    parts = args.parts.split(",")
    for part in parts:
        if part not in ("layers", "loop", "step"):
            raise SystemExit(f"--parts: {part!r} is not one of ['layers', 'loop', 'step']")
    if not onednn.available():
        raise SystemExit(f"bench_onednn.py: {onednn.unavailable_reason()}")
    import bench_peer

    args.peer_dir = os.path.abspath(args.peer_dir or bench_peer.DEFAULT_PEER_DIR)
    try:
        import torch

        torch.set_num_threads(TORCH_THREADS)
    except ImportError:
        torch = None
    payload = {
        "machine": _common.machine(),
        "settings": {
            "command": " ".join(["benchmarks/bench_onednn.py"] + sys.argv[1:]),
            "rounds": args.rounds,
            "inner": args.inner,
            "loop_steps": args.loop_steps,
            "step_rounds": args.step_rounds,
            "onednn": "3.2.0 (onednn-cpu-gomp 2023.2.0)",
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "torch": torch.__version__ if torch is not None else None,
        },
    }
    if "layers" in parts:
        payload["layers"] = []
        for name, x_shape, w_shape, stride in SHAPES:
            calls, errors = layer_calls(x_shape, w_shape, stride, torch)
            pads = _pads(x_shape, w_shape, stride)
            layer = {"name": name, "x": x_shape, "w": w_shape, "stride": stride, "passes": {}}
            for p, kind in zip(PASSES, ("forward", "input_grad", "weight_grad")):
                times = timed_rounds(calls[p], args.rounds, args.inner)
                impl = onednn.impl_info(kind, x_shape, w_shape, (stride, stride), pads)
                layer["passes"][p] = {"times": times, "error": errors[p], "impl": impl}
                print(
                    f"{name} {p}: "
                    + ", ".join(f"{k} {v['median_s'] * 1e3:.2f} ms" for k, v in times.items()),
                    flush=True,
                )
            payload["layers"].append(layer)
    if "loop" in parts:
        payload["loop"] = []
        for name, x_shape, w_shape, stride in SHAPES:
            if stride != 1:
                continue
            calls, error = loop_calls(x_shape, w_shape, args.loop_steps, torch)
            times = timed_rounds(calls, args.rounds, 1)
            payload["loop"].append({"name": name, "times": times, "error": error})
            print(
                f"loop {name}: "
                + ", ".join(f"{k} {v['median_s'] * 1e3:.1f} ms" for k, v in times.items()),
                flush=True,
            )
    if "step" in parts and args.keep_layers:
        if parts != ["step"]:
            raise SystemExit("--keep_layers: only with --parts step")
        step_payload = payload
        payload = _common.read_results("bench_onednn")
        payload["step"] = measure_step(args)
        payload["step"]["agreement"] = step_agreement()
        payload["step_run"] = {
            "machine": step_payload["machine"],
            "command": step_payload["settings"]["command"],
            "step_rounds": args.step_rounds,
        }
    elif "step" in parts:
        payload["step"] = measure_step(args)
        payload["step"]["agreement"] = step_agreement()
    elif args.keep_step:
        previous = _common.read_results("bench_onednn")
        payload["step"] = previous["step"]
        payload["step_run"] = previous.get("step_run") or {
            "machine": previous["machine"],
            "command": previous["settings"]["command"],
            "step_rounds": previous["settings"]["step_rounds"],
        }
    _common.write_results("bench_onednn", payload, to_markdown)
    print(to_markdown(payload))


if __name__ == "__main__":
    main()
