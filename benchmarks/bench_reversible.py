"""Benchmark of adjoint="reversible": memory, time, compile time and gradient error.

    .venv/bin/python benchmarks/bench_reversible.py                 # Nt in {16, 64, 256}
    .venv/bin/python benchmarks/bench_reversible.py --steps 16 64   # a subset
    .venv/bin/python benchmarks/bench_reversible.py --drift_only    # float32 drift table only

Network: bench_core.py's L = 8 conv-ReLU ODE blocks (state 32×16×16×16 float32, two 3×3
convs per evaluation), built by its `make_problem`; the convolution is a parameter (`--conv`):
`anode_jax.nn.conv_general_dilated` (loop-safe) when importable, else `lax.conv_general_dilated`.

Rows at each Nt: "reversible" with the "reversible:rk4" solver (McCallum & Foster, λ = 0.999);
"anode" and "checkpointed:4" with plain "rk4" (the base method, as in the paper's comparison
against recursive checkpointing); "direct" through "reversible:rk4", unrolled (the same forward
computation: the gradient reference), where it compiles within `--max_direct_steps`.

Memory = compiled temp_size_in_bytes of the gradient; time = median of repeats after warm-up;
ratios are against rows measured in the same run. Writes docs/bench_reversible.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))
import _common
import bench_core

from anode_jax.ode import RK4, Reversible


def default_conv():
    """(conv function, its name): the loop-safe conv when it exists, else plain lax."""
    try:
        from anode_jax.nn import conv_general_dilated

        return conv_general_dilated, "anode_jax.nn.conv_general_dilated"
    except ImportError:
        return lax.conv_general_dilated, "lax.conv_general_dilated"


def make_field(conv_fn):
    """bench_core's vector field ReLU(conv(ReLU(conv(z, w1)), w2)) with a given convolution."""

    def conv(z, w):
        return conv_fn(z, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def vector_field(t, z, theta):
        w1, w2 = theta
        return jax.nn.relu(conv(jax.nn.relu(conv(z, w1)), w2))

    return vector_field


def make_loss(field, num_steps, adjoint, solver, unroll=None):
    return bench_core.make_loss(num_steps, adjoint, solver, unroll, field=field)


def drift_rows(field, steps, couplings, num_blocks=8, max_grad_steps=64):
    """float32: reconstruction drift of z(0) and gradient error vs direct, per Nt and λ.

    Drift: run Reversible(RK4, λ) forward over one block, then its inverse_step back, and report
    max |z0_reconstructed - z0| / max |z0| (the first block of the network). Gradient error:
    float32 reversible vs float32 direct (looped) through the same solver, whole network.
    """
    z0, params = bench_core.make_problem(num_blocks)
    rows = []
    for lam in couplings:
        solver = Reversible(RK4, coupling=lam)
        for num_steps in steps:
            dt = 1.0 / num_steps
            theta = params[0]

            @jax.jit
            def roundtrip(z0, theta, solver=solver, num_steps=num_steps, dt=dt):
                state = solver.init(field, 0.0, z0, theta)

                def fwd(n, s):
                    return solver.step(field, n * dt, dt, s, theta)

                def bwd(i, s):
                    n = num_steps - 1 - i
                    return solver.inverse_step(field, n * dt, dt, s, theta)

                end = lax.fori_loop(0, num_steps, fwd, state)
                back = lax.fori_loop(0, num_steps, bwd, end)
                return jnp.max(jnp.abs(back[0] - z0)) / jnp.max(jnp.abs(z0))

            drift = float(roundtrip(z0, theta))
            if num_steps > max_grad_steps:
                rows.append({"coupling": lam, "num_steps": num_steps, "drift": drift})
                print(f"λ={lam} Nt={num_steps}: drift {drift:.1e}", flush=True)
                continue
            g_rev = jax.jit(jax.grad(make_loss(field, num_steps, "reversible", solver), 1))(
                z0, params
            )
            g_dir = jax.jit(
                jax.grad(make_loss(field, num_steps, "direct", solver, unroll=False), 1)
            )(z0, params)
            err = bench_core.rel_error(g_rev, g_dir)
            rows.append({"coupling": lam, "num_steps": num_steps, "drift": drift, "grad_err": err})
            print(f"λ={lam} Nt={num_steps}: drift {drift:.1e}, grad err {err:.1e}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--conv", choices=("auto", "nn", "lax"), default="auto")
    parser.add_argument(
        "--max_direct_steps", type=int, default=16, help="largest Nt for the direct row"
    )
    parser.add_argument(
        "--direct_unroll",
        action="store_true",
        help="unroll the direct reference (its fastest form on XLA:CPU; long compiles)",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--no_time", nargs="*", default=[], metavar="NT:STRATEGY", help="memory/compile only"
    )
    parser.add_argument("--drift_steps", type=int, nargs="*", default=[4, 16, 64, 256])
    parser.add_argument("--couplings", type=float, nargs="*", default=[0.999, 0.9, 0.5])
    parser.add_argument("--drift_blocks", type=int, default=2)
    parser.add_argument("--drift_grad_max_steps", type=int, default=64)
    parser.add_argument("--skip", nargs="*", default=[], metavar="NT:STRATEGY")
    parser.add_argument("--drift_only", action="store_true")
    parser.add_argument("--append", action="store_true", help="keep the rows of the last run")
    parser.add_argument("--label", default="", help="tag this run's rows (shown in the table)")
    parser.add_argument("--no_drift", action="store_true")
    args = parser.parse_args()

    if args.conv == "lax":
        conv_fn, conv_name = lax.conv_general_dilated, "lax.conv_general_dilated"
    else:
        conv_fn, conv_name = default_conv()
        if args.conv == "nn" and conv_name.startswith("lax"):
            raise SystemExit("--conv nn: anode_jax.nn is not importable on this branch")
    field = make_field(conv_fn)
    print(f"conv: {conv_name}", flush=True)

    z0, params = bench_core.make_problem(args.blocks)
    state_bytes = z0.size * z0.dtype.itemsize
    rows = []
    payload = {
        "machine": _common.machine(),
        "conv": conv_name,
        "blocks": args.blocks,
        "state_bytes": state_bytes,
        "rows": rows,
        "drift": [],
    }
    if args.append:  # add rows to those of the last run (e.g. timings measured later)
        with open(
            os.path.join(os.path.dirname(__file__), "..", "docs", "bench_reversible.json")
        ) as f:
            previous = json.load(f)
        rows.extend(previous["rows"])
        payload["drift"] = previous.get("drift", [])
        payload["drift_blocks"] = previous.get("drift_blocks")
    if not args.drift_only:
        for num_steps in args.steps:
            cases = [("reversible", "reversible:rk4", None)]
            if num_steps <= args.max_direct_steps:
                cases.append(("direct", "reversible:rk4", bool(args.direct_unroll)))
            cases += [("anode", "rk4", None), ("checkpointed:4", "rk4", None)]
            ref_grads = None
            for adjoint, solver, unroll in cases:
                if f"{num_steps}:{adjoint}" in args.skip:
                    continue
                loss = make_loss(field, num_steps, adjoint, solver, unroll)
                grad_fn = jax.grad(loss, argnums=1)
                temp, compile_s, compiled = _common.compiled_temp_bytes(grad_fn, z0, params)
                row = {
                    "label": args.label,
                    "blocks": args.blocks,
                    "num_steps": num_steps,
                    "strategy": adjoint,
                    "solver": solver,
                    "unroll": unroll,
                    "temp_bytes": temp,
                    "temp_state_sizes": temp / state_bytes,
                    "compile_s": compile_s,
                }
                if f"{num_steps}:{adjoint}" not in args.no_time:
                    row["step_s"] = _common.median_seconds(
                        compiled, z0, params, repeats=args.repeats, warmup=args.warmup
                    )
                    grads = compiled(z0, params)
                    if adjoint == "reversible":
                        ref_grads = grads
                    elif adjoint == "direct" and ref_grads is not None:
                        rows[-1]["grad_err_vs_direct"] = bench_core.rel_error(ref_grads, grads)
                rows.append(row)
                _common.write_results("bench_reversible", payload, to_markdown(payload))
                t = f"{row['step_s'] * 1e3:.0f} ms" if "step_s" in row else "not timed"
                print(
                    f"Nt={num_steps:4d} {adjoint:15s} {solver:15s} temp "
                    f"{row['temp_state_sizes']:7.1f} states, {t}, compile {compile_s:.1f} s",
                    flush=True,
                )
    if args.drift_only:  # keep the rows of the last full run
        path = os.path.join(os.path.dirname(__file__), "..", "docs", "bench_reversible.json")
        if os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)
            payload.update({k: previous[k] for k in ("rows", "machine", "blocks") if k in previous})
    if not args.no_drift:
        payload["drift"] = drift_rows(
            field, args.drift_steps, args.couplings, args.drift_blocks, args.drift_grad_max_steps
        )
        payload["drift_blocks"] = args.drift_blocks
    _common.write_results("bench_reversible", payload, to_markdown)


def to_markdown(payload) -> str:
    m = payload["machine"]
    lines = [
        "# Reversible gradients: benchmark",
        "",
        "Generated by `.venv/bin/python benchmarks/bench_reversible.py`. "
        f"{_common.machine_header(m)} Convolution: `{payload['conv']}`.",
        "",
        f"L = {payload['blocks']} conv-ReLU ODE blocks of bench_core.py, state 32×16×16×16 "
        "float32. `reversible` uses the `reversible:rk4` solver (λ = 0.999; 8 evaluations per "
        "step); `anode` and `checkpointed:4` use plain `rk4` (4 per step); `direct` runs "
        "`reversible:rk4` looped unless run with --direct_unroll (the same forward computation). "
        "Runs: A = before merging main (loop-safe conv from branch wip/conv), B and C = after "
        "merging main (its merged conv and loop changes lowered every strategy's memory), all "
        "three on a machine shared with other jobs (load average ≈ 16, one repeat); D = idle "
        "machine (load < 2), 3 repeats, `direct` unrolled (`--direct_unroll`); E = idle, 3 "
        "repeats, `direct` looped. Temp = compiled temp_size_in_bytes in units of one state; "
        "time = median of repeats.",
        "",
        'Targets, reading and shortfalls: docs/core.md, "Choosing a strategy: reversible vs '
        'anode vs checkpointed". Read time ratios only between rows of the same run.',
        "",
        "| run | Nt | strategy | solver | temp (states) | time (ms) | compile (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        t = f"{r['step_s'] * 1e3:.0f}" if "step_s" in r else "not timed"
        lines.append(
            f"| {r.get('label') or 'A'} | {r['num_steps']} | {r['strategy']} | {r['solver']} | "
            f"{r['temp_state_sizes']:.1f} | {t} | {r['compile_s']:.1f} |"
        )
    errs = [r for r in payload["rows"] if "grad_err_vs_direct" in r]
    if errs:
        lines += ["", "Gradient error of `reversible` vs `direct` (float32, same solver):", ""]
        for r in errs:
            lines.append(f"- Nt = {r['num_steps']}: {r['grad_err_vs_direct']:.1e}")
    if payload["drift"]:
        lines += [
            "",
            "## float32: reconstruction drift and gradient error",
            "",
            "Drift = max |z(0) reconstructed − z(0)| / max |z(0)| after Nt steps forward and Nt "
            f"inverse steps (first block). L = {payload.get('drift_blocks')} blocks. Gradient error = max |g − g_direct| / max |g_direct| "
            "over the whole network, both in float32 through the same solver.",
            "",
            "| λ | Nt | drift of z(0) | gradient error vs direct |",
            "|---|---|---|---|",
        ]
        for r in payload["drift"]:
            lines.append(
                f"| {r['coupling']} | {r['num_steps']} | "
                + (f"{r['drift']:.1e} | " if np.isfinite(r["drift"]) else "overflow | ")
                + (f"{r['grad_err']:.1e} |" if "grad_err" in r else "not measured |")
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
