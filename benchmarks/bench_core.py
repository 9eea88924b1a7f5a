"""Benchmark of the core engine: memory, time, compile time and gradient error per strategy.

    .venv/bin/python benchmarks/bench_core.py            # full grid (30-60 min on 2 cores)
    .venv/bin/python benchmarks/bench_core.py --quick    # L=2, Nt in {4, 16}: a few minutes
    .venv/bin/python benchmarks/bench_core.py --resume   # keep the rows an interrupted run wrote

Network: L ODE blocks of the ANODE paper's kind, each z' = f(z, θ_l) with
f(z) = ReLU(conv3×3(ReLU(conv3×3(z)))) (no normalization, t unused), integrated over [0, 1]
with RK4 and Nt steps; loss = mean(z_L²). State: batch 32 × 16 × 16 × 16 (NHWC), float32.
The convolution is `anode_jax.nn.conv_general_dilated` (loop-safe); `--conv=lax` measures
plain `lax.conv_general_dilated` instead.

Writes docs/bench_core.json and docs/bench_core.md. Memory is the compiled program's
temp_size_in_bytes; time is the median of repeats after warm-up, as a ratio to a reference
measured in the same run (these machines are noisy): unrolled "direct" where it compiles
(Nt <= 16), else looped "direct".
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

sys.path.insert(0, os.path.dirname(__file__))
import _common

from anode_jax import Direct, odeint

CONVS = {"lax": jax.lax.conv_general_dilated}
try:
    from anode_jax.nn import conv_general_dilated as _loop_safe_conv

    CONVS["loop_safe"] = _loop_safe_conv
except ImportError:  # an older checkout without anode_jax.nn
    pass
_CONV = {"fn": CONVS.get("loop_safe", CONVS["lax"])}

# (label, adjoint, unroll): the rows of every (L, Nt) cell. "direct (unrolled)" is the reference
# where it compiles; "direct+remat" is lax.scan + jax.checkpoint around each step.
STRATEGIES = (
    ("direct (unrolled)", "direct", True),
    ("direct (looped)", "direct", False),
    ("direct+remat (looped)", Direct(jax.checkpoint_policies.nothing_saveable), False),
    ("anode", "anode", None),
    ("checkpointed:4", "checkpointed:4", None),
    ("backsolve", "backsolve", None),
)


def conv(z, w):
    return _CONV["fn"](z, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


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


def make_loss(num_steps, adjoint, solver="rk4", unroll=None, field=None):
    """mean(z_L²) after L blocks of `field` (default: this benchmark's `vector_field`)."""
    field = vector_field if field is None else field

    def loss(z0, params):
        z = z0
        for theta in params:
            z = odeint(
                field,
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
    if grads is None or ref is None:
        return None
    num = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref))
    )
    den = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(ref))
    return num / den


def measure(loss, z0, params, repeats):
    """(temp bytes, compile s, median step s or None when repeats == 0), and the gradients
    (None when untimed: a row too slow to time is too slow to run once)."""
    grad_fn = jax.grad(loss, argnums=1)
    temp, compile_s, compiled = _common.compiled_temp_bytes(grad_fn, z0, params)
    if not repeats:
        return {"temp_bytes": temp, "compile_s": compile_s, "step_s": None}, None
    seconds = _common.median_seconds(compiled, z0, params, repeats=repeats)
    return {"temp_bytes": temp, "compile_s": compile_s, "step_s": seconds}, compiled(z0, params)


def diffrax_rows(state_bytes, repeats):
    """anode-jax vs diffrax on the same network, solver (Heun, which both have) and steps, once
    with plain lax convolutions and once with the loop-safe one (diffrax loops too)."""
    num_blocks, num_steps, solver = 8, 4, "heun"
    z0, params = make_problem(num_blocks)
    out = []
    saved = _CONV["fn"]
    try:
        for conv_name, conv_fn in CONVS.items():
            _CONV["fn"] = conv_fn
            theirs, theirs_grads = measure(diffrax_loss(num_steps, solver), z0, params, repeats)
            for adjoint in ("anode", "checkpointed:2"):
                ours, ours_grads = measure(
                    make_loss(num_steps, adjoint, solver), z0, params, repeats
                )
                row = {
                    "blocks": num_blocks,
                    "num_steps": num_steps,
                    "solver": solver,
                    "conv": conv_name,
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
                    f"diffrax {solver} {conv_name} conv vs {adjoint}: ours {ours['step_s'] * 1e3:.1f} ms "
                    f"{row['anode_temp_state_sizes']:.1f} states, diffrax "
                    f"{theirs['step_s'] * 1e3:.1f} ms {row['diffrax_temp_state_sizes']:.1f} states, "
                    f"speedup {row['speedup']:.1f}x",
                    flush=True,
                )
    finally:
        _CONV["fn"] = saved
    return out


def _row_key(r):
    return (r["blocks"], r["num_steps"], r["strategy"])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="L=2, Nt in {4, 16}; 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--conv", choices=sorted(CONVS), default=None)
    parser.add_argument("--resume", action="store_true", help="keep the rows of an interrupted run")
    parser.add_argument(
        "--max_unrolled_steps",
        type=int,
        default=16,
        help="skip the unrolled direct reference above this Nt (its compile time grows with Nt)",
    )
    parser.add_argument(
        "--max_timed_work",
        type=int,
        default=1024,
        help="time a row only when L*Nt <= this (memory and compile time are always measured)",
    )
    parser.add_argument(
        "--skip_diffrax",
        action="store_true",
        help="measure no diffrax rows (with --resume: keep the previous run's diffrax rows)",
    )
    parser.add_argument(
        "--redo",
        action="append",
        default=[],
        metavar="L:NT",
        help="with --resume: measure this (L, Nt) cell again (repeatable), e.g. --redo=8:16",
    )
    args = parser.parse_args()
    try:
        redo = {tuple(int(x) for x in cell.split(":")) for cell in args.redo}
    except ValueError:
        parser.error(f"--redo takes cells as L:NT (e.g. 8:16), got {args.redo}")
    if args.conv:
        _CONV["fn"] = CONVS[args.conv]
    conv_name = next(k for k, v in CONVS.items() if v is _CONV["fn"])
    out_json = os.path.join(os.path.dirname(__file__), "..", "docs", "bench_core.json")
    previous, previous_diffrax = {}, []
    if args.resume and os.path.exists(out_json):
        with open(out_json) as f:
            stored = json.load(f)
        previous = {
            _row_key(r): r for r in stored["rows"] if (r["blocks"], r["num_steps"]) not in redo
        }
        previous_diffrax = stored.get("diffrax", [])
    blocks = (2,) if args.quick else (2, 8)
    steps = (4, 16) if args.quick else (4, 16, 64, 256)
    repeats = args.repeats or 3
    z0, _ = make_problem(1)
    state_bytes = z0.size * z0.dtype.itemsize

    def payload(rows, diffrax, complete):
        return {
            "machine": _common.machine(),
            "quick": args.quick,
            "conv": conv_name,
            "state_bytes": state_bytes,
            "rows": rows,
            "diffrax": diffrax,
            "complete": complete,
        }

    rows = []
    for num_blocks in blocks:
        z0, params = make_problem(num_blocks)
        for num_steps in steps:
            ref = ref_grads = None
            cell = [
                (label, adjoint, unroll)
                for label, adjoint, unroll in STRATEGIES
                if not (unroll is True and num_steps > args.max_unrolled_steps)
            ]
            # Resume by whole (L, Nt) cells: every ratio and error of a row is relative to the
            # reference measured in the same run.
            if all((num_blocks, num_steps, label) in previous for label, _, _ in cell):
                rows += [previous[(num_blocks, num_steps, label)] for label, _, _ in cell]
                continue
            for label, adjoint, unroll in cell:
                timed = num_blocks * num_steps <= args.max_timed_work
                loss = make_loss(num_steps, adjoint, unroll=unroll)
                result, grads = measure(loss, z0, params, repeats if timed else 0)
                if ref is None:
                    ref, ref_grads = result, grads
                    ref_label = label
                result.update(
                    measured_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    load_average=round(os.getloadavg()[0], 2),
                    blocks=num_blocks,
                    num_steps=num_steps,
                    strategy=label,
                    reference=ref_label,
                    temp_state_sizes=result["temp_bytes"] / state_bytes,
                    memory_ratio=result["temp_bytes"] / ref["temp_bytes"],
                    time_ratio=(
                        result["step_s"] / ref["step_s"]
                        if result["step_s"] and ref["step_s"]
                        else None
                    ),
                    grad_rel_error=rel_error(grads, ref_grads) if ref_grads is not None else None,
                )
                rows.append(result)
                # Written after every row, so an interrupted run still leaves its measured rows.
                _common.write_results(
                    "bench_core", payload(rows, [], False), to_markdown(payload(rows, [], False))
                )
                step = f"{result['step_s'] * 1e3:8.1f} ms" if result["step_s"] else "   untimed"
                print(
                    f"L={num_blocks} Nt={num_steps:3d} {label:22s} "
                    f"temp={result['temp_state_sizes']:8.1f} states ({result['memory_ratio']:.3f}x) "
                    f"time={step} compile={result['compile_s']:.1f}s",
                    flush=True,
                )
    if args.skip_diffrax:
        diffrax = previous_diffrax
    else:
        diffrax = [] if args.quick else diffrax_rows(state_bytes, repeats)
    final = payload(rows, diffrax, True)
    _common.write_results("bench_core", final, to_markdown)


def _fmt(value, spec, scale=1.0):
    return "–" if value is None else format(value * scale, spec)


def to_markdown(payload) -> str:
    m = payload["machine"]
    sb = payload["state_bytes"]
    lines = [
        "# Core engine benchmark",
        "",
        "Generated by `.venv/bin/python benchmarks/bench_core.py"
        + (" --quick" if payload["quick"] else "")
        + (" --conv=lax" if payload.get("conv") == "lax" else "")
        + "`."
        + ("" if payload.get("complete", True) else " **Partial: the run was interrupted.**"),
        _common.machine_header(m),
        "",
        f"L conv-ReLU ODE blocks (two 3×3 convs, 16 channels; convolution: `{payload.get('conv')}`), "
        "RK4, batch 32×16×16×16 float32. Memory = compiled temp bytes of the gradient, in units "
        f"of one state ({sb:,} B) and as a ratio to the reference (unrolled direct where it "
        "compiles, Nt ≤ 16; else looped direct). Time = median gradient time, ratio to the same "
        "reference in the same run (– : not timed, L·Nt above the run's budget). Error = "
        "max |g − g_ref| / max |g_ref|. `anode`, `checkpointed:4` and `backsolve` run with the "
        "library's default loop policy (looped); `direct+remat` is `Direct(remat_policy="
        "nothing_saveable)`: `lax.scan` over `jax.checkpoint`-ed steps. Cells resumed with "
        "`--resume --redo=L:NT` were measured at different times: *measured* gives each row's "
        "time and the 1-minute load average then (2 cores: a load above ~2.5 means shared; "
        "time ratios within a cell stay same-run, absolute times do not).",
        "",
        "| L | Nt | strategy | temp (states) | memory vs ref | time (ms) | time vs ref | compile (s) | grad error | measured (UTC, load) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['blocks']} | {r['num_steps']} | {r['strategy']} | {r['temp_state_sizes']:.1f} | "
            f"{r['memory_ratio']:.3f} | {_fmt(r['step_s'], '.1f', 1e3)} | "
            f"{_fmt(r['time_ratio'], '.2f')} | {r['compile_s']:.1f} | "
            f"{_fmt(r['grad_rel_error'], '.1e')} | "
            f"{r.get('measured_at', m['date'])[5:]}, {_fmt(r.get('load_average'), '.1f')} |"
        )
    if payload.get("diffrax"):
        lines += [
            "",
            "## Against diffrax (same network, solver and steps; RecursiveCheckpointAdjoint)",
            "",
            "Both libraries loop, so both gain from the loop-safe convolution; each pair of rows "
            "uses the same convolution on both sides.",
            "",
            "| L | Nt | solver | conv | anode-jax strategy | anode-jax (ms) | diffrax (ms) | speed-up | anode-jax temp (states) | diffrax temp (states) | compile ours / diffrax (s) | grad difference |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in payload["diffrax"]:
            lines.append(
                f"| {r['blocks']} | {r['num_steps']} | {r['solver']} | {r['conv']} | "
                f"{r['strategy']} | {r['anode_step_s'] * 1e3:.1f} | "
                f"{r['diffrax_step_s'] * 1e3:.1f} | {r['speedup']:.1f}× | "
                f"{r['anode_temp_state_sizes']:.1f} | {r['diffrax_temp_state_sizes']:.1f} | "
                f"{r['anode_compile_s']:.1f} / {r['diffrax_compile_s']:.1f} | "
                f"{r['grad_rel_difference']:.1e} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
