"""XLA:CPU options for convolutions and fusions: the whole training step, not one layer.

    .venv/bin/python benchmarks/bench_xla_flags.py                  # resnet and sqnxt, batch 16
    .venv/bin/python benchmarks/bench_xla_flags.py --models sqnxt --batch 32 --rounds 5

Each variant is a set of XLA debug options passed to one compilation
(`jax.jit(...).lower(...).compile(compiler_options=...)`, the same fields as `XLA_FLAGS`), so
every variant lives in the same process and the variants are timed in interleaved rounds
(median): the ratios to the default compile are same-run ratios. Programs: one training step
of each network (Euler, Nt = 2, `"anode"`, SGD momentum, BatchNorm statistics, loop-safe
convolution) and, as the single-layer reference, the gradient (input and weight) of one
3×3/64-channel convolution at 32×32 pixels. The loop-safe conv's backward formulations are
chosen under the default options (`ANODE_JAX_AUTOTUNE`), once, before the variants compile.

Writes docs/bench_xla_flags.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _common
import bench_models

from anode_jax.models import create_model
from anode_jax.nn import conv_general_dilated

#: name -> (XLA debug options, what it does)
VARIANTS = {
    "default": ({}, "jaxlib's defaults (YNNPACK for individual dots, Eigen convolutions)"),
    "ynn off": (
        {"xla_cpu_experimental_ynn_fusion_type": ""},
        "`--xla_cpu_experimental_ynn_fusion_type=`: no YNNPACK, Eigen dots",
    ),
    "ynn conv": (
        {
            "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
            "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
        },
        "`--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`: YNNPACK convolutions too",
    ),
    "onednn": (
        {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_custom_call": True},
        "`--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true`: "
        "oneDNN convolutions (custom calls, with fused activations)",
    ),
}


def bf16_compute_step(model, tx):
    """The training step with bfloat16 compute: float32 parameters, optimizer and BatchNorm
    running statistics, cast to bfloat16 for the forward and backward (activations,
    convolutions, solver); logits and loss in float32. A timing probe of a mixed-precision
    policy, not a library option."""

    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
            logits, updates = model.apply(
                {"params": p16, "batch_stats": batch_stats},
                x.astype(jnp.bfloat16),
                train=True,
                mutable=["batch_stats"],
            )
            logits = logits.astype(jnp.float32)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            stats = jax.tree.map(
                lambda a, b: a.astype(b.dtype), updates["batch_stats"], batch_stats
            )
            return loss, stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return step


def programs(models, batch, bf16):
    """label -> (function, arguments, variants to compile it with (None: all))."""
    out = {}
    for name in models:
        model = create_model(
            name, num_classes=10, block="ode", num_steps=2, solver="euler", adjoint="anode"
        )
        tx = optax.sgd(0.1, momentum=0.9)
        args, _ = bench_models.step_arguments(model, tx, batch, concrete=True)
        out[f"{name} step"] = (bench_models.make_train_step(model, tx), args, None)
        if bf16:
            out[f"{name} step, bf16 compute"] = (bf16_compute_step(model, tx), args, ["default"])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 32, 32, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) / 24, jnp.float32)
    g = jnp.asarray(rng.normal(size=(batch, 32, 32, 64)), jnp.float32)

    def layer(x, w, g):
        conv = lambda x, w: conv_general_dilated(
            x, w, (1, 1), "SAME", None, None, ("NHWC", "HWIO", "NHWC")
        )
        return jax.vjp(conv, x, w)[1](g)

    out["conv 3×3 64 @32 backward"] = (layer, (x, w, g), None)
    if bf16:
        bf = [a.astype(jnp.bfloat16) for a in (x, w, g)]
        out["conv 3×3 64 @32 backward, bf16"] = (layer, tuple(bf), ["default"])
    return out


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet,sqnxt")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also the bfloat16-compute step and layer (default options)",
    )
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    payload = {
        "machine": _common.machine(),
        "settings": {
            "command": " ".join(["benchmarks/bench_xla_flags.py"] + sys.argv[1:]),
            "batch": args.batch,
            "rounds": args.rounds,
            "variants": {v: VARIANTS[v][1] for v in variants},
        },
        "rows": [],
    }
    for label, (fn, fn_args, only) in programs(
        args.models.split(","), args.batch, args.bf16
    ).items():
        lowered = jax.jit(fn).lower(*fn_args)
        compiled, compile_s, errors = {}, {}, {}
        for v in [v for v in variants if only is None or v in only]:
            start = time.perf_counter()
            try:
                compiled[v] = lowered.compile(compiler_options=VARIANTS[v][0])
                jax.block_until_ready(compiled[v](*fn_args))
            except Exception as error:  # an option this jaxlib rejects: recorded, not fatal
                errors[v] = f"{type(error).__name__}: {str(error)[:200]}"
                compiled.pop(v, None)
            compile_s[v] = time.perf_counter() - start
        times = {v: [] for v in compiled}
        for _ in range(args.rounds):
            for v, exe in compiled.items():
                t = time.perf_counter()
                jax.block_until_ready(exe(*fn_args))
                times[v].append(time.perf_counter() - t)
        row = {
            "program": label,
            "seconds": {v: statistics.median(ts) for v, ts in times.items()},
            "compile_s": compile_s,
            "errors": errors,
            "load_average": round(os.getloadavg()[0], 2),
        }
        payload["rows"].append(row)
        print(label, {v: round(s, 4) for v, s in row["seconds"].items()}, errors, flush=True)
        _common.write_results("bench_xla_flags", payload, to_markdown)


def to_markdown(payload) -> str:
    s = payload["settings"]
    variants = list(s["variants"])
    lines = [
        "# XLA:CPU options: whole training step and one layer",
        "",
        f"Generated by `.venv/bin/python {s['command']}`.",
        "",
        _common.machine_header(payload["machine"]),
        "",
        f"Batch {s['batch']}; median of {s['rounds']} interleaved rounds after a warm-up; every "
        "variant compiled in the same process (per-compile options), so each ratio is a "
        "same-run ratio to `default`; `–` = not compiled with that variant. A `bf16` row is "
        "the same program in bfloat16 compute (its ratio: compare with the float32 row's "
        "`default` of the same run). Variants:",
        "",
    ]
    lines += [f"* `{v}`: {s['variants'][v]}" for v in variants]
    lines += [
        "",
        "| program | " + " | ".join(variants) + " | load |",
        "|---|" + "---|" * (len(variants) + 1),
    ]
    for r in payload["rows"]:
        base = r["seconds"].get("default")
        cells = []
        for v in variants:
            if v in r.get("errors", {}):
                cells.append("failed")
            elif v not in r["seconds"]:
                cells.append("–")
            elif base is None or v == "default":
                cells.append(f"{r['seconds'][v] * 1e3:.0f} ms")
            else:
                cells.append(f"{r['seconds'][v] * 1e3:.0f} ms ({r['seconds'][v] / base:.2f}×)")
        lines.append(f"| {r['program']} | " + " | ".join(cells) + f" | {r['load_average']} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
