"""Benchmark of the core engine: memory, time, compile time and gradient error per strategy.

    .venv/bin/python benchmarks/bench_core.py            # full grid (about 10-20 min on 2 cores)
    .venv/bin/python benchmarks/bench_core.py --quick    # small grid, a minute or two

Network: L ODE blocks of the ANODE paper's kind, each z' = f(z, θ_l) with
f(z) = ReLU(conv3×3(ReLU(conv3×3(z)))) (no normalization, t unused), integrated over [0, 1]
with RK4 and Nt steps; loss = mean(z_L²). State: batch 32 × 16 × 16 × 16 (NHWC), float32.

Writes docs/bench_core.json and docs/bench_core.md. Memory is the compiled program's
temp_size_in_bytes; time is the median of repeats after warm-up, as a ratio to "direct"
measured in the same run (these machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common

from anode_jax import odeint

STRATEGIES = ("direct", "anode", "checkpointed:4", "backsolve")


def conv(z, w):
    return jax.lax.conv_general_dilated(
        z, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def vector_field(t, z, theta):
    w1, w2 = theta
    return jax.nn.relu(conv(jax.nn.relu(conv(z, w1)), w2))


def make_problem(num_blocks, batch=32, size=16, channels=16, seed=0):
    key = jax.random.PRNGKey(seed)
    k_z, *k_w = jax.random.split(key, 1 + 2 * num_blocks)
    scale = 1.0 / np.sqrt(9 * channels)
    params = [
        (
            scale * jax.random.normal(k_w[2 * i], (3, 3, channels, channels)),
            scale * jax.random.normal(k_w[2 * i + 1], (3, 3, channels, channels)),
        )
        for i in range(num_blocks)
    ]
    z0 = jax.random.normal(k_z, (batch, size, size, channels))
    return z0, params


def make_loss(num_steps, adjoint, solver="rk4", unroll=None):
    def loss(z0, params):
        z = z0
        for theta in params:
            z = odeint(
                vector_field,
                z,
                theta,
                num_steps=num_steps,
                solver=solver,
                adjoint=adjoint,
                unroll=unroll,
            )
        return jnp.mean(z**2)

    return loss


def diffrax_loss(num_steps, solver_name):
    import diffrax

    solver = {"heun": diffrax.Heun(), "midpoint": diffrax.Midpoint(), "euler": diffrax.Euler()}[
        solver_name
    ]

    def loss(z0, params):
        z = z0
        for theta in params:
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(vector_field),
                solver,
                t0=0.0,
                t1=1.0,
                dt0=1.0 / num_steps,
                y0=z,
                args=theta,
                stepsize_controller=diffrax.ConstantStepSize(),
                adjoint=diffrax.RecursiveCheckpointAdjoint(),
                saveat=diffrax.SaveAt(t1=True),
                max_steps=num_steps,
            )
            z = sol.ys[0]
        return jnp.mean(z**2)

    return loss


def rel_error(grads, ref):
    num = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref))
    )
    den = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(ref))
    return num / den


def measure(loss, z0, params, repeats):
    grad_fn = jax.grad(loss, argnums=1)
    temp, compile_s, compiled = _common.compiled_temp_bytes(grad_fn, z0, params)
    seconds = _common.median_seconds(compiled, z0, params, repeats=repeats)
    return {"temp_bytes": temp, "compile_s": compile_s, "step_s": seconds}, compiled(z0, params)


def diffrax_rows(state_bytes, repeats):
    """anode-jax vs diffrax on the same network, solver (Heun, which both have) and steps."""
    num_blocks, num_steps, solver = 8, 4, "heun"
    z0, params = make_problem(num_blocks)
    theirs, theirs_grads = measure(diffrax_loss(num_steps, solver), z0, params, repeats)
    out = []
    for adjoint in ("anode", "checkpointed:2"):
        ours, ours_grads = measure(make_loss(num_steps, adjoint, solver), z0, params, repeats)
        row = {
            "blocks": num_blocks,
            "num_steps": num_steps,
            "solver": solver,
            "strategy": adjoint,
            "anode_step_s": ours["step_s"],
            "diffrax_step_s": theirs["step_s"],
            "speedup": theirs["step_s"] / ours["step_s"],
            "anode_temp_state_sizes": ours["temp_bytes"] / state_bytes,
            "diffrax_temp_state_sizes": theirs["temp_bytes"] / state_bytes,
            "anode_compile_s": ours["compile_s"],
            "diffrax_compile_s": theirs["compile_s"],
            "grad_rel_difference": rel_error(ours_grads, theirs_grads),
        }
        out.append(row)
        print(
            f"diffrax {solver} vs {adjoint}: ours {ours['step_s'] * 1e3:.1f} ms "
            f"{row['anode_temp_state_sizes']:.1f} states, diffrax {theirs['step_s'] * 1e3:.1f} ms "
            f"{row['diffrax_temp_state_sizes']:.1f} states, speedup {row['speedup']:.1f}x",
            flush=True,
        )
    return out


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="L in {2, 8}, Nt in {1, 4, 16}; fewer repeats"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of an interrupted run in docs/bench_core.json",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="L:NT:STRATEGY[=REASON]",
        help="do not measure this row; it is recorded as skipped with REASON",
    )
    parser.add_argument(
        "--diffrax_only",
        action="store_true",
        help="re-measure only the diffrax comparison; keep the other tables",
    )
    args = parser.parse_args()
    if args.diffrax_only:
        with open(os.path.join(os.path.dirname(__file__), "..", "docs", "bench_core.json")) as f:
            payload = json.load(f)
        z0, _ = make_problem(1)
        payload["diffrax"] = diffrax_rows(z0.size * z0.dtype.itemsize, args.repeats or 5)
        _common.write_results("bench_core", payload, to_markdown(payload))
        return
    skip = {}
    for item in args.skip:
        row, _, reason = item.partition("=")
        skip[tuple(row.split(":", 2))] = reason or "not measured"
    previous = {}
    if args.resume:
        with open(os.path.join(os.path.dirname(__file__), "..", "docs", "bench_core.json")) as f:
            previous = {
                (r["blocks"], r["num_steps"], r["strategy"]): r for r in json.load(f)["rows"]
            }
    blocks = (2, 8)
    steps = (1, 4, 16) if args.quick else (1, 4, 16, 64)
    repeats = args.repeats or (3 if args.quick else 5)

    rows = []
    state_bytes = None
    for num_blocks in blocks:
        z0, params = make_problem(num_blocks)
        state_bytes = z0.size * z0.dtype.itemsize
        for num_steps in steps:
            ref_grads = None
            ref = None
            for adjoint in STRATEGIES:
                key = (num_blocks, num_steps, adjoint)
                if (str(num_blocks), str(num_steps), adjoint) in skip:
                    reason = skip[(str(num_blocks), str(num_steps), adjoint)]
                    rows.append(
                        {
                            "blocks": num_blocks,
                            "num_steps": num_steps,
                            "strategy": adjoint,
                            "skipped": reason,
                        }
                    )
                    print(
                        f"L={num_blocks} Nt={num_steps:3d} {adjoint:15s} skipped: {reason}",
                        flush=True,
                    )
                    continue
                # A kept "direct" row is reused only when no row of its (L, Nt) needs its gradients.
                if key in previous and (
                    adjoint != "direct"
                    or all(
                        (num_blocks, num_steps, s) in previous
                        or (str(num_blocks), str(num_steps), s) in skip
                        for s in STRATEGIES
                    )
                ):
                    rows.append(previous[key])
                    if adjoint == "direct":
                        ref = previous[key]
                    continue
                # direct and backsolve differentiate (or run VJPs inside) their time loop; their fast
                # form on XLA:CPU is unrolled at every Nt (see the loop table). anode and checkpointed
                # run with the library defaults.
                unroll = True if adjoint in ("direct", "backsolve") else None
                result, grads = measure(
                    make_loss(num_steps, adjoint, unroll=unroll), z0, params, repeats
                )
                if adjoint == "direct":
                    ref, ref_grads = result, grads
                result.update(
                    blocks=num_blocks,
                    num_steps=num_steps,
                    strategy=adjoint,
                    temp_state_sizes=result["temp_bytes"] / state_bytes,
                    memory_ratio=result["temp_bytes"] / ref["temp_bytes"],
                    time_ratio=result["step_s"] / ref["step_s"],
                    grad_rel_error=rel_error(grads, ref_grads),
                )
                rows.append(result)
                # Written after every row, so an interrupted run still leaves its measured rows.
                partial = {
                    "machine": _common.machine(),
                    "quick": args.quick,
                    "state_bytes": state_bytes,
                    "rows": rows,
                    "diffrax": [],
                    "loops": [],
                    "complete": False,
                }
                _common.write_results("bench_core", partial, to_markdown(partial))
                print(
                    f"L={num_blocks} Nt={num_steps:3d} {adjoint:15s} temp={result['temp_state_sizes']:8.1f} states "
                    f"({result['memory_ratio']:.3f}x direct) time={result['step_s'] * 1e3:8.1f} ms "
                    f"({result['time_ratio']:.2f}x) compile={result['compile_s']:.1f}s err={result['grad_rel_error']:.1e}",
                    flush=True,
                )

    diffrax_results = diffrax_rows(state_bytes, repeats)

    # Unrolled vs looped time loop (the measurement behind DEFAULT_MAX_UNROLL).
    loop_rows = []
    z0, params = make_problem(2)
    for num_steps in (4, 16) if args.quick else (4, 16, 32):
        for adjoint in ("direct", "anode"):
            timings = {}
            for unroll in (True, False):
                result, _ = measure(
                    make_loss(num_steps, adjoint, "rk4", unroll), z0, params, repeats
                )
                timings[unroll] = result
            row = {
                "blocks": 2,
                "num_steps": num_steps,
                "strategy": adjoint,
                "unrolled_step_s": timings[True]["step_s"],
                "scan_step_s": timings[False]["step_s"],
                "unrolled_compile_s": timings[True]["compile_s"],
                "scan_compile_s": timings[False]["compile_s"],
                "unrolled_temp_bytes": timings[True]["temp_bytes"],
                "scan_temp_bytes": timings[False]["temp_bytes"],
            }
            loop_rows.append(row)
            print(
                f"loop L=2 Nt={num_steps} {adjoint}: unrolled {row['unrolled_step_s'] * 1e3:.1f} ms / "
                f"{row['unrolled_compile_s']:.1f} s compile, scan {row['scan_step_s'] * 1e3:.1f} ms / "
                f"{row['scan_compile_s']:.1f} s compile",
                flush=True,
            )

    payload = {
        "machine": _common.machine(),
        "quick": args.quick,
        "state_bytes": state_bytes,
        "rows": rows,
        "diffrax": diffrax_results,
        "loops": loop_rows,
        "complete": True,
    }
    _common.write_results("bench_core", payload, to_markdown(payload))


def to_markdown(payload) -> str:
    m = payload["machine"]
    lines = [
        "# Core engine benchmark",
        "",
        "Generated by `.venv/bin/python benchmarks/bench_core.py"
        + (" --quick" if payload["quick"] else "")
        + "`."
        + ("" if payload.get("complete", True) else " **Partial: the run was interrupted.**"),
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, backend {m['backend']}; Python {m['python']}, "
        f"jax {m['jax']}; {m['date']}.",
        "",
        "L conv-ReLU ODE blocks (two 3×3 convs, 16 channels), RK4, batch 32×16×16×16 float32. "
        "Memory = compiled temp bytes of the gradient, in units of one state (32·16·16·16·4 B) and "
        "as a ratio to direct. Time = median gradient time, ratio to direct in the same run. "
        "Error = max |g − g_direct| / max |g_direct|. `direct` and `backsolve` run unrolled at every Nt "
        "(their fast form here); `anode` and `checkpointed:4` run with the library defaults "
        "(above 16 steps: looped forward passes, step-by-step reversal).",
        "",
        "| L | Nt | strategy | temp (states) | memory vs direct | time (ms) | time vs direct | compile (s) | grad error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        if "skipped" in r:
            lines.append(
                f"| {r['blocks']} | {r['num_steps']} | {r['strategy']} | – | – | – | – | – | "
                f"skipped: {r['skipped']} |"
            )
            continue
        lines.append(
            f"| {r['blocks']} | {r['num_steps']} | {r['strategy']} | {r['temp_state_sizes']:.1f} | "
            f"{r['memory_ratio']:.3f} | {r['step_s'] * 1e3:.1f} | {r['time_ratio']:.2f} | "
            f"{r['compile_s']:.1f} | {r['grad_rel_error']:.1e} |"
        )
    lines += [
        "",
        "## Against diffrax (same network, solver and steps; RecursiveCheckpointAdjoint)",
        "",
        "| L | Nt | solver | anode-jax strategy | anode-jax (ms) | diffrax (ms) | speed-up | anode-jax temp (states) | diffrax temp (states) | compile ours / diffrax (s) | grad difference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["diffrax"]:
        lines.append(
            f"| {r['blocks']} | {r['num_steps']} | {r['solver']} | {r.get('strategy', 'anode')} | {r['anode_step_s'] * 1e3:.1f} | "
            f"{r['diffrax_step_s'] * 1e3:.1f} | {r['speedup']:.1f}× | {r['anode_temp_state_sizes']:.1f} | "
            f"{r['diffrax_temp_state_sizes']:.1f} | {r['anode_compile_s']:.1f} / {r['diffrax_compile_s']:.1f} | "
            f"{r['grad_rel_difference']:.1e} |"
        )
    lines += [
        "",
        "## Unrolled vs `lax.scan` time loop (L = 2, RK4)",
        "",
        "| Nt | strategy | unrolled (ms) | scan (ms) | scan / unrolled | compile unrolled / scan (s) | temp unrolled / scan (states) |",
        "|---|---|---|---|---|---|---|",
    ]
    sb = payload["state_bytes"]
    for r in payload.get("loops", []):
        lines.append(
            f"| {r['num_steps']} | {r['strategy']} | {r['unrolled_step_s'] * 1e3:.1f} | {r['scan_step_s'] * 1e3:.1f} | "
            f"{r['scan_step_s'] / r['unrolled_step_s']:.1f}× | {r['unrolled_compile_s']:.1f} / {r['scan_compile_s']:.1f} | "
            f"{r['unrolled_temp_bytes'] / sb:.0f} / {r['scan_temp_bytes'] / sb:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
