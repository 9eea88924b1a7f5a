"""Benchmark of adaptive step sizes (`solver="tsit5"`) against diffrax Tsit5 + PIDController.

    .venv/bin/python benchmarks/bench_adaptive.py                 # both problems, both tolerances
    .venv/bin/python benchmarks/bench_adaptive.py --problems mlp --tols 1e-3 --repeats 3

Problems (float32, t ∈ [0, 1]):
- `mlp`: state 256×64 (batch 256), field tanh(y W1 + b1 cos t) W2 (64 → 64 → 64);
- `mlp_fast`: the same field times 40 (a 40× longer horizon: tens to hundreds of steps);
- `conv`: state 8×16×16×16 (NHWC), field ReLU(conv(ReLU(conv(z)))) with 3×3 kernels through
  `anode_jax.nn.conv_general_dilated` (the ANODE paper's block without normalisation).

Loss: mean of y(1)². Rows: anode-jax "anode", "checkpointed:4" and "backsolve" ("direct"
holds O(max_steps) attempts' internals: compiled only, in the max_steps sweep), and diffrax 0.7 `diffeqsolve(Tsit5(), PIDController(rtol, atol))` with
`RecursiveCheckpointAdjoint()` (its default: the reference of every ratio),
`RecursiveCheckpointAdjoint(checkpoints=4)` and `BacksolveAdjoint()`; rtol = atol for each
tolerance, max_steps 4096 for both libraries. The step counts of both are recorded.

Measured: time per gradient (median over interleaved repeats: every row once per round),
compiled temp memory of the gradient (`memory_analysis().temp_size_in_bytes`), compile time.
Then compile time and temp memory of the "anode" / "checkpointed:4" / "direct" gradient of
the mlp problem against max_steps (100 … 100,000). Writes docs/bench_adaptive.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
# This checkout's package, not another one installed in the environment.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common

from anode_jax.nn import conv_general_dilated
from anode_jax.ode import odeint

OURS = ["anode", "checkpointed:4", "backsolve"]
DIFFRAX = ["diffrax recursive", "diffrax recursive:4", "diffrax backsolve"]
MAX_STEPS = 4096
SKIP_CONV_BACKSOLVE = (
    "diffrax's BacksolveAdjoint applies forward-mode autodiff to the vector field's VJP, "
    "which the custom-VJP convolution anode_jax.nn.conv_general_dilated does not allow"
)


def mlp_field(t, y, p):
    return p["speed"] * (jnp.tanh(y @ p["w1"] + p["b1"] * jnp.cos(t)) @ p["w2"])


def conv_field(t, z, p):
    conv = lambda x, k: conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.nn.relu(conv(jax.nn.relu(conv(z, p["w1"])), p["w2"]))


def make_problem(name):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    if name in ("mlp", "mlp_fast"):
        p = {
            "w1": jax.random.normal(k1, (64, 64)) / 8.0,
            "b1": 0.1 * jnp.ones(64),
            "w2": jax.random.normal(k2, (64, 64)) / 8.0,
            "speed": jnp.asarray(1.0 if name == "mlp" else 40.0),
        }
        return mlp_field, jax.random.normal(k3, (256, 64)), p
    scale = 1.0 / (9 * 16) ** 0.5
    p = {
        "w1": scale * jax.random.normal(k1, (3, 3, 16, 16)),
        "w2": scale * jax.random.normal(k2, (3, 3, 16, 16)),
    }
    return conv_field, jax.random.normal(k3, (8, 16, 16, 16)), p


def ours_loss(field, adjoint, tol, max_steps=MAX_STEPS):
    def loss(y0, p):
        y1 = odeint(
            field, y0, p, solver="tsit5", adjoint=adjoint, rtol=tol, atol=tol,
            max_steps=max_steps,
        )  # fmt: skip
        return jnp.mean(y1**2)

    return loss


def diffrax_loss(field, row, tol):
    import diffrax

    adjoint = {
        "diffrax recursive": diffrax.RecursiveCheckpointAdjoint(),
        "diffrax recursive:4": diffrax.RecursiveCheckpointAdjoint(checkpoints=4),
        "diffrax backsolve": diffrax.BacksolveAdjoint(),
    }[row]

    def loss(y0, p):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), diffrax.Tsit5(), 0.0, 1.0, None, y0, args=p,
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol), adjoint=adjoint,
            max_steps=MAX_STEPS,
        )  # fmt: skip
        return jnp.mean(sol.ys[-1] ** 2)

    return loss


def step_counts(field, y0, p, tol):
    import diffrax

    _, stats = odeint(field, y0, p, solver="tsit5", rtol=tol, atol=tol, return_stats=True)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field), diffrax.Tsit5(), 0.0, 1.0, None, y0, args=p,
        stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol), max_steps=MAX_STEPS,
    )  # fmt: skip
    return {
        "ours_accepted": int(stats["num_accepted_steps"]),
        "ours_rejected": int(stats["num_rejected_steps"]),
        "diffrax_accepted": int(sol.stats["num_accepted_steps"]),
        "diffrax_rejected": int(sol.stats["num_rejected_steps"]),
    }


def bench_case(problem, tol, repeats):
    field, y0, p = make_problem(problem)
    rows = OURS + [r for r in DIFFRAX if not (problem == "conv" and r == "diffrax backsolve")]
    compiled, result = {}, {"problem": problem, "tol": tol, "rows": {}}
    if problem == "conv":
        result["not_run"] = {"diffrax backsolve": SKIP_CONV_BACKSOLVE}
    for row in rows:
        loss = diffrax_loss(field, row, tol) if row.startswith("diffrax") else ours_loss(
            field, row, tol
        )  # fmt: skip
        grad = jax.grad(loss, argnums=(0, 1))
        temp, seconds, exe = _common.compiled_temp_bytes(grad, y0, p)
        jax.block_until_ready(exe(y0, p))  # warm-up
        compiled[row] = exe
        result["rows"][row] = {"temp_bytes": temp, "compile_s": round(seconds, 2), "times": []}
        print(
            f"{problem} tol={tol} {row}: compiled in {seconds:.1f} s, temp {temp / 2**20:.2f} MiB"
        )
    for _ in range(repeats):  # interleaved: every row once per round
        for row, exe in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(exe(y0, p))
            result["rows"][row]["times"].append(time.perf_counter() - start)
    reference = statistics.median(result["rows"]["diffrax recursive"]["times"])
    for r in result["rows"].values():
        r["median_s"] = statistics.median(r["times"])
        r["ratio_to_diffrax"] = r["median_s"] / reference
        r["temp_ratio_to_diffrax"] = r["temp_bytes"] / max(
            result["rows"]["diffrax recursive"]["temp_bytes"], 1
        )
    result["steps"] = step_counts(field, y0, p, tol)
    return result


def bench_max_steps(values):
    field, y0, p = make_problem("mlp")
    out = []
    for max_steps in values:
        for adjoint in ("anode", "checkpointed:4", "direct"):
            if adjoint == "direct" and max_steps > 10_000:
                continue  # O(max_steps) step internals: 100,000 × 7 stages of 256×64 floats
            grad = jax.grad(ours_loss(field, adjoint, 1e-3, max_steps), argnums=(0, 1))
            temp, seconds, _ = _common.compiled_temp_bytes(grad, y0, p)
            out.append(
                {"max_steps": max_steps, "adjoint": adjoint, "temp_bytes": temp,
                 "compile_s": round(seconds, 2)}
            )  # fmt: skip
            print(f"max_steps={max_steps} {adjoint}: {seconds:.1f} s, {temp / 2**20:.2f} MiB")
    return out


def markdown(payload) -> str:
    lines = [
        "# Adaptive step sizes: anode-jax Tsit5 vs diffrax Tsit5 + PIDController",
        "",
        "Generated by `benchmarks/bench_adaptive.py` from `docs/bench_adaptive.json`; do not "
        "edit by hand.",
        "",
        _common.machine_header(payload["machine"]),
        "",
        f"Repeats per row: {payload['repeats']} (interleaved; median). Ratios are to diffrax "
        "`RecursiveCheckpointAdjoint()` measured in the same run (time: lower is faster; "
        "memory: compiled temp bytes of the gradient).",
        "",
        "| problem | rtol = atol | steps ours (acc/rej) | steps diffrax (acc/rej) | row | "
        "time / gradient | time ratio | temp MiB | memory ratio | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in payload["cases"]:
        s = case["steps"]
        ours = f"{s['ours_accepted']}/{s['ours_rejected']}"
        theirs = f"{s['diffrax_accepted']}/{s['diffrax_rejected']}"
        for row, r in case["rows"].items():
            lines.append(
                f"| {case['problem']} | {case['tol']:g} | {ours} | {theirs} | {row} | "
                f"{1e3 * r['median_s']:.1f} ms | {r['ratio_to_diffrax']:.2f} | "
                f"{r['temp_bytes'] / 2**20:.2f} | {r['temp_ratio_to_diffrax']:.2f} | "
                f"{r['compile_s']:.1f} |"
            )
    skipped = {
        row: why for case in payload["cases"] for row, why in case.get("not_run", {}).items()
    }
    for row, why in skipped.items():
        lines += ["", f"Not run on conv: {row} ({why})."]
    lines += [
        "",
        "## Compile time and memory against max_steps (mlp, rtol = atol = 1e-3)",
        "",
        "| max_steps | adjoint | compile s | temp MiB |",
        "|---|---|---|---|",
    ]
    for r in payload["max_steps"]:
        lines.append(
            f"| {r['max_steps']} | {r['adjoint']} | {r['compile_s']:.1f} | "
            f"{r['temp_bytes'] / 2**20:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["mlp", "conv", "mlp_fast"])
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-5])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_steps", type=int, nargs="+", default=[100, 1_000, 10_000, 100_000])
    args = parser.parse_args()
    payload = {"machine": _common.machine(), "repeats": args.repeats, "cases": []}
    for problem in args.problems:
        for tol in args.tols:
            payload["cases"].append(bench_case(problem, tol, args.repeats))
    payload["max_steps"] = bench_max_steps(args.max_steps)
    _common.write_results("bench_adaptive", payload, markdown)


if __name__ == "__main__":
    main()
