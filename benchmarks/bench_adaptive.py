"""Benchmark of adaptive step sizes (`solver="tsit5"`) against diffrax Tsit5 + PIDController.

    .venv/bin/python benchmarks/bench_adaptive.py                 # every section (writes docs/)
    .venv/bin/python benchmarks/bench_adaptive.py --problems mlp --tols 1e-3 --repeats 3
    .venv/bin/python benchmarks/bench_adaptive.py --sections accepted  # one section, printed only

Problems (float32, t ∈ [0, 1]):
- `mlp`: state 256×64 (batch 256), field tanh(y W1 + b1 cos t) W2 (64 → 64 → 64);
- `mlp_fast`: the same field times 40 (a 40× longer horizon: tens to hundreds of steps);
- `conv`: state 8×16×16×16 (NHWC), field ReLU(conv(ReLU(conv(z)))) with 3×3 kernels through
  `anode_jax.nn.conv_general_dilated` (the ANODE paper's block without normalisation).

Loss: mean of y(1)². Rows: anode-jax "anode", "checkpointed:4" and "backsolve" ("direct"
holds O(max_steps) attempts' internals: compiled only in the max_steps sweep, timed on a small
state in the accepted-steps section), and diffrax 0.7
`diffeqsolve(Tsit5(), PIDController(rtol, atol))` with
`RecursiveCheckpointAdjoint()` (its default: the reference of every ratio),
`RecursiveCheckpointAdjoint(checkpoints=4)` and `BacksolveAdjoint()`; rtol = atol for each
tolerance, max_steps 4096 for both libraries. The step counts of both are recorded.

Measured: time per gradient (median over interleaved repeats: every row once per round),
compiled temp memory of the gradient (`memory_analysis().temp_size_in_bytes`), compile time.
Then compile time and temp memory of the "anode" / "checkpointed:4" / "direct" gradient of
the mlp problem against max_steps (100 … 100,000).

Then (`accepted`) the cost against the number n of *accepted* steps at one fixed max_steps
(16,384): `oscillator`, state 16×32 (2 KiB in float32), field speed · y A with A a fixed
skew-symmetric 32×32 matrix (spectral radius 1.27; a rotation, so the amplitude and the step
size stay constant and n grows linearly with the speed), t ∈ [0, 1], rtol = atol = 1e-5, speeds
chosen for n ≈ 100, 1,000 and 10,000. Each n is its own compiled program (the speed is a
constant of the field). For "anode", "checkpointed:4" and "direct": accepted/rejected steps
(`return_stats`), compiled temp bytes of the gradient, time per gradient and of the forward
solve alone (the same `lax.while_loop` solve the custom-VJP strategies run forward), and
gradient/forward against the steps each backward pass recomputes: `revolve_cost(n, 4)` for
"checkpointed:4", 2n − ⌈n/m⌉ for "anode" (its first pass steps n times, storing every m-th
state, m = ⌈n / ⌈√max_steps⌉⌉; then each segment of m steps is recomputed from its
checkpoint: m − 1 steps a segment). Writes docs/bench_adaptive.{json,md} when every section
runs; `--render` rewrites the Markdown from the stored JSON.
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
from anode_jax.ode.adaptive import anode_slots
from anode_jax.ode.adjoints.checkpointed import revolve_cost

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


ACCEPTED_MAX_STEPS = 16_384
ACCEPTED_TOL = 1e-5
# Speeds giving n ≈ 100, 1,000 and 10,000 accepted tsit5 steps (n ≈ 2 · speed here).
ACCEPTED_SPEEDS = (50.0, 500.0, 5000.0)
ACCEPTED_ADJOINTS = ("anode", "checkpointed:4", "direct")


def oscillator_problem():
    """(y0 of shape 16×32, args {"a": skew-symmetric 32×32}) for `oscillator_field`."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    w = jax.random.normal(k1, (32, 32)) / 32**0.5
    return jax.random.normal(k2, (16, 32)), {"a": (w - w.T) / 2}


def oscillator_field(speed):
    def field(t, y, p):
        return speed * (y @ p["a"])

    return field


def recomputed_steps(adjoint, n, max_steps):
    """Steps the backward pass of `adjoint` recomputes for n accepted steps (its VJPs, one
    per accepted step, not counted)."""
    if adjoint == "checkpointed:4":
        return revolve_cost(n, 4)
    if adjoint == "anode":
        top, _ = anode_slots(max_steps)
        m = max(1, -(-n // top))
        return 2 * n - (-(-n // m))
    return 0  # "direct": reverse mode through the stored attempts, nothing recomputed


def bench_accepted(speeds, repeats):
    y0, p = oscillator_problem()
    state_bytes = y0.size * y0.dtype.itemsize
    out = {
        "max_steps": ACCEPTED_MAX_STEPS,
        "tol": ACCEPTED_TOL,
        "state_shape": list(y0.shape),
        "state_bytes": int(state_bytes),
        "anode_slots": list(anode_slots(ACCEPTED_MAX_STEPS)),
        "cases": [],
    }
    for speed in speeds:
        field = oscillator_field(speed)
        kw = dict(
            solver="tsit5", rtol=ACCEPTED_TOL, atol=ACCEPTED_TOL, max_steps=ACCEPTED_MAX_STEPS
        )
        _, stats = odeint(field, y0, p, return_stats=True, **kw)
        n, rejected = int(stats["num_accepted_steps"]), int(stats["num_rejected_steps"])
        forward = lambda y0, p: jnp.mean(odeint(field, y0, p, adjoint="anode", **kw) ** 2)
        programs = {}
        temp, seconds, programs["forward"] = _common.compiled_temp_bytes(forward, y0, p)
        case = {"speed": speed, "accepted": n, "rejected": rejected, "rows": {}}
        case["forward"] = {"temp_bytes": temp, "compile_s": round(seconds, 2), "times": []}
        for adjoint in ACCEPTED_ADJOINTS:
            loss = ours_loss(field, adjoint, ACCEPTED_TOL, ACCEPTED_MAX_STEPS)
            grad = jax.grad(loss, argnums=(0, 1))
            temp, seconds, programs[adjoint] = _common.compiled_temp_bytes(grad, y0, p)
            case["rows"][adjoint] = {
                "temp_bytes": temp,
                "compile_s": round(seconds, 2),
                "recomputed_steps": recomputed_steps(adjoint, n, ACCEPTED_MAX_STEPS),
                "times": [],
            }
            print(f"accepted n={n} {adjoint}: compiled in {seconds:.1f} s, {temp / 2**20:.2f} MiB")
        for exe in programs.values():
            jax.block_until_ready(exe(y0, p))  # warm-up
        for _ in range(repeats):  # interleaved: the forward and every gradient once per round
            for name, exe in programs.items():
                start = time.perf_counter()
                jax.block_until_ready(exe(y0, p))
                row = case["forward"] if name == "forward" else case["rows"][name]
                row["times"].append(time.perf_counter() - start)
        case["forward"]["median_s"] = statistics.median(case["forward"]["times"])
        for r in case["rows"].values():
            r["median_s"] = statistics.median(r["times"])
            r["ratio_to_forward"] = r["median_s"] / case["forward"]["median_s"]
        print(
            f"accepted n={n}: forward {1e3 * case['forward']['median_s']:.1f} ms; "
            + ", ".join(f"{a} {r['ratio_to_forward']:.1f}x" for a, r in case["rows"].items())
        )
        out["cases"].append(case)
    for adjoint in ACCEPTED_ADJOINTS:
        temps = {c["rows"][adjoint]["temp_bytes"] for c in out["cases"]}
        out.setdefault("temp_bytes_equal_across_n", {})[adjoint] = len(temps) == 1
    return out


def accepted_markdown(acc) -> list[str]:
    top, seg = acc["anode_slots"]
    kib = acc["state_bytes"] / 1024
    lines = [
        "",
        f"## Cost against accepted steps at fixed max_steps = {acc['max_steps']:,} "
        f"(oscillator, rtol = atol = {acc['tol']:g})",
        "",
        f"State {'×'.join(map(str, acc['state_shape']))} float32: {acc['state_bytes']:,} bytes "
        f'({kib:g} KiB) per stored state. "anode" holds {top} + {seg} state slots '
        f'(⌈√max_steps⌉ checkpoints + a segment), "checkpointed:4" 4; both also keep the '
        f"2·max_steps recorded step scalars. Every n is its own compiled program; temp bytes "
        "are a property of the compiled shapes, which do not depend on n.",
        "",
        "| n accepted/rejected | adjoint | temp MiB | forward ms | gradient ms | "
        "gradient / forward | recomputed steps R | R / n | gradient / forward − 1 − R/n | "
        "gradient µs per accepted step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in acc["cases"]:
        n = case["accepted"]
        fwd = case["forward"]["median_s"]
        for adjoint, r in case["rows"].items():
            ratio = r["ratio_to_forward"]
            rn = r["recomputed_steps"] / n
            lines.append(
                f"| {n}/{case['rejected']} | {adjoint} | {r['temp_bytes'] / 2**20:.3f} | "
                f"{1e3 * fwd:.1f} | {1e3 * r['median_s']:.1f} | {ratio:.1f} | "
                f"{r['recomputed_steps']:,} | {rn:.1f} | {ratio - 1 - rn:.1f} | "
                f"{1e6 * r['median_s'] / n:.0f} |"
            )
    lines += [
        "",
        'The revolve cost seen in time: "checkpointed:4" recomputes R₄ − R_anode more steps '
        'than "anode" for the same n (same VJPs); its extra time per extra recomputed step, '
        "against the forward's time per attempted step:",
        "",
        "| n | extra recomputed steps | extra time | extra µs per extra step | "
        "forward µs per attempted step |",
        "|---|---|---|---|---|",
    ]
    for case in acc["cases"]:
        rows = case["rows"]
        if "checkpointed:4" not in rows or "anode" not in rows:
            continue
        extra = rows["checkpointed:4"]["recomputed_steps"] - rows["anode"]["recomputed_steps"]
        dt = rows["checkpointed:4"]["median_s"] - rows["anode"]["median_s"]
        attempts = case["accepted"] + case["rejected"]
        lines.append(
            f"| {case['accepted']} | {extra:,} | {1e3 * dt:.1f} ms | "
            f"{1e6 * dt / max(extra, 1):.1f} | {1e6 * case['forward']['median_s'] / attempts:.1f} |"
        )
    same = ", ".join(
        f"{a}: {'same' if eq else 'DIFFERENT'}"
        for a, eq in acc["temp_bytes_equal_across_n"].items()
    )
    lines += [
        "",
        f"Compiled temp bytes across the three n — {same}. The forward is the `lax.while_loop` "
        'solve alone (loss value, no gradient). "gradient / forward − 1 − R/n" is what the '
        "gradient costs beyond its forward solve and the R recomputed steps, per accepted step, "
        "in units of one forward step: the VJP of a step (plus loop overheads); a cost model "
        "that holds leaves it roughly constant in n (the forward's fixed cost, the n ≈ 100 "
        'forward time, inflates every ratio at small n). "direct" runs all max_steps '
        "iterations of its `lax.scan` forward and backward whatever n (finished ones skip "
        "their step in a `lax.cond`): its time is O(max_steps), not O(n).",
    ]
    return lines


def markdown(payload) -> str:
    lines = [
        "# Adaptive step sizes: anode-jax Tsit5 vs diffrax Tsit5 + PIDController",
        "",
        "Generated by `benchmarks/bench_adaptive.py` from `docs/bench_adaptive.json`; do not "
        "edit by hand.",
        "",
        _common.machine_header(payload["machine"]),
        "",
        f"Repeats per row: {payload['repeats']} (interleaved; median).",
    ]
    if payload.get("cases"):
        lines += [
            "",
            "## Against diffrax",
            "",
            "Ratios are to diffrax `RecursiveCheckpointAdjoint()` measured in the same run "
            "(time: lower is faster; memory: compiled temp bytes of the gradient).",
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
    if payload.get("max_steps"):
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
    if payload.get("accepted"):
        lines += accepted_markdown(payload["accepted"])
    return "\n".join(lines) + "\n"


SECTIONS = ("diffrax", "max_steps", "accepted")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
        help="what to run (default: all; docs/ is written only when all run, else printed)",
    )  # fmt: skip
    parser.add_argument(
        "--render", action="store_true",
        help="only re-render docs/bench_adaptive.md from docs/bench_adaptive.json",
    )  # fmt: skip
    parser.add_argument("--problems", nargs="+", default=["mlp", "conv", "mlp_fast"])
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-5])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_steps", type=int, nargs="+", default=[100, 1_000, 10_000, 100_000])
    parser.add_argument(
        "--accepted_speeds", type=float, nargs="+", default=list(ACCEPTED_SPEEDS),
        help="oscillator speeds of the accepted-steps section (n ≈ 2 · speed)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.render:
        _common.write_results("bench_adaptive", _common.read_results("bench_adaptive"), markdown)
        return
    payload = {"machine": _common.machine(), "repeats": args.repeats, "cases": []}
    if "diffrax" in args.sections:
        for problem in args.problems:
            for tol in args.tols:
                payload["cases"].append(bench_case(problem, tol, args.repeats))
    if "max_steps" in args.sections:
        payload["max_steps"] = bench_max_steps(args.max_steps)
    if "accepted" in args.sections:
        payload["accepted"] = bench_accepted(args.accepted_speeds, args.repeats)
    if set(args.sections) == set(SECTIONS):
        _common.write_results("bench_adaptive", payload, markdown)
    else:
        payload["machine"]["load_average_end"] = round(os.getloadavg()[0], 2)
        print(markdown(payload))


if __name__ == "__main__":
    main()
