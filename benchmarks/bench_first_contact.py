"""First-contact costs: the revolve planner at large step counts and eager `odeint` calls.

    .venv/bin/python benchmarks/bench_first_contact.py            # full table
    .venv/bin/python benchmarks/bench_first_contact.py --quick    # smaller repeats

Measures (a) `revolve_schedule(Nt, K)` planning time for Nt in {1e3, 1e4, 1e5}, K in {4, 8}
(cache cleared before each repeat); (b) the first gradient of `"checkpointed:4"` on the scalar
y' = -a y with Euler (plan + trace + compile + run) and the trace+compile time of the
gradient program at growing Nt; (c) the cost of eager `odeint` calls (first and later calls,
and eager `jax.grad`) against a jitted call and a hand-written `lax.scan` RK4, for a 3-dim field
tanh(W y). Times are medians of interleaved repeats in one run (the machine may be shared);
the load average during the run is recorded. Writes docs/bench_first_contact.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))
import _common

from anode_jax import odeint
from anode_jax.ode.adjoints.checkpointed import revolve_cost, revolve_schedule

# The figures reported before the planner and the eager path were changed (issue text):
# first gradient of "checkpointed:4", y' = -y, Euler, and one eager call of a 3-dim field.
BEFORE_FIRST_GRADIENT_S = {1000: 0.36, 2000: 1.24, 4000: 5.4, 10000: 40.0}
BEFORE_EAGER_CALL_S = 0.1


def machine(loads) -> dict:
    """The machine header of every benchmark (benchmarks/_common.py) and the load per phase."""
    return {**_common.machine(), "load_average_1min": [round(x, 2) for x in loads]}


def _seconds(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def planner(repeats: int) -> list[dict]:
    rows = []
    for num_steps in (1_000, 10_000, 100_000):
        for k in (4, 8):
            times, cpu_times = [], []
            for _ in range(repeats):
                revolve_schedule.cache_clear()
                cpu = time.process_time()
                times.append(_seconds(lambda: revolve_schedule(num_steps, k) and 0))
                cpu_times.append(time.process_time() - cpu)
            schedule = revolve_schedule(num_steps, k)
            cached = _seconds(lambda: revolve_schedule(num_steps, k) and 0)
            rows.append(
                {
                    "num_steps": num_steps,
                    "num_checkpoints": k,
                    "plan_s": statistics.median(times),
                    "plan_cpu_s": statistics.median(cpu_times),
                    "cached_s": cached,
                    "actions": len(schedule),
                    "recomputed_steps": schedule.num_recomputed_steps,
                    "binomial_minimum": revolve_cost(num_steps, k),
                }
            )
            print(rows[-1], flush=True)
    return rows


def _decay_loss(num_steps, adjoint):
    def loss(a):
        y1 = odeint(
            lambda t, y, a: -a * y,
            jnp.ones(()),
            a,
            num_steps=num_steps,
            solver="euler",
            adjoint=adjoint,
        )
        return y1

    return loss


def first_gradient(steps) -> list[dict]:
    rows = []
    for num_steps in steps:
        revolve_schedule.cache_clear()
        loss = _decay_loss(num_steps, "checkpointed:4")
        first = _seconds(lambda: jax.jit(jax.grad(loss))(jnp.asarray(1.0)))
        revolve_schedule.cache_clear()
        start = time.perf_counter()
        compiled = jax.jit(jax.grad(loss)).lower(jnp.asarray(1.0)).compile()
        compile_s = time.perf_counter() - start
        run_s = statistics.median(_seconds(lambda: compiled(jnp.asarray(1.0))) for _ in range(3))
        rows.append(
            {
                "num_steps": num_steps,
                "first_gradient_s": first,
                "trace_compile_s": compile_s,
                "run_s": run_s,
                "before_first_gradient_s": BEFORE_FIRST_GRADIENT_S.get(num_steps),
            }
        )
        print(rows[-1], flush=True)
    return rows


def _field(t, y, w):
    return jnp.tanh(w @ y)


def _scan_rk4(y0, w, num_steps=8):
    h = 1.0 / num_steps

    def step(y, _):
        k1 = _field(0.0, y, w)
        k2 = _field(0.0, y + 0.5 * h * k1, w)
        k3 = _field(0.0, y + 0.5 * h * k2, w)
        k4 = _field(0.0, y + h * k3, w)
        return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), None

    return lax.scan(step, y0, None, length=num_steps)[0]


def eager(repeats: int) -> list[dict]:
    y0 = jnp.ones(3)
    ws = [0.1 * (i + 1) * jnp.eye(3) for i in range(2 * repeats + 4)]
    solve = lambda w: odeint(_field, y0, w, num_steps=8, solver="rk4", adjoint="anode")
    loss = lambda w: jnp.sum(solve(w))
    jitted = jax.jit(solve)
    jitted_grad = jax.jit(jax.grad(loss))
    scan_jitted = jax.jit(_scan_rk4)
    cases = {
        "odeint, eager": lambda w: solve(w),
        "odeint, jax.jit": lambda w: jitted(w),
        "jax.grad(odeint), eager": lambda w: jax.grad(loss)(w),
        "jax.grad(odeint), jax.jit": lambda w: jitted_grad(w),
        "hand-written lax.scan RK4, jax.jit": lambda w: scan_jitted(y0, w),
        "hand-written lax.scan RK4, eager": lambda w: _scan_rk4(y0, w),
    }
    first = {name: _seconds(lambda: fn(ws[0])) for name, fn in cases.items()}
    later = {name: [] for name in cases}
    for i in range(repeats):  # interleaved: every case once per round
        for name, fn in cases.items():
            later[name].append(_seconds(lambda: fn(ws[1 + i])))
    rows = []
    for name in cases:
        rows.append(
            {
                "case": name,
                "first_call_s": first[name],
                "later_call_s": statistics.median(later[name]),
            }
        )
        print(rows[-1], flush=True)
    return rows


def second_order_memory() -> list[dict]:
    """Compiled temp memory (in states) of the gradient and of a Hessian-vector product, field
    tanh(W y) with y of 256 float32, RK4 (reversible:rk4 for "reversible")."""
    n = 256
    y0 = jnp.ones(n)
    w = 0.01 * jnp.ones((n, n))
    v = jnp.ones((n, n))
    rows = []
    for num_steps in (16, 64):
        for adjoint, solver in (
            ("direct", "rk4"),
            ("anode", "rk4"),
            ("checkpointed:4", "rk4"),
            ("reversible", "reversible:rk4"),
        ):
            loss = lambda w: jnp.sum(
                odeint(_field, y0, w, num_steps=num_steps, solver=solver, adjoint=adjoint) ** 2
            )
            grad = jax.grad(loss)
            hvp = jax.grad(lambda w: jnp.vdot(v, grad(w)))
            temp = {}
            for name, fn in (("gradient", grad), ("hvp", hvp)):
                compiled = jax.jit(fn).lower(w).compile()
                temp[name] = compiled.memory_analysis().temp_size_in_bytes / (4 * n)
            rows.append(
                {
                    "num_steps": num_steps,
                    "adjoint": adjoint,
                    "solver": solver,
                    "gradient_temp_states": temp["gradient"],
                    "hvp_temp_states": temp["hvp"],
                }
            )
            print(rows[-1], flush=True)
    return rows


def to_markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        "# First-contact costs: revolve planning and eager calls",
        "",
        "Generated by `.venv/bin/python benchmarks/bench_first_contact.py` from "
        "`bench_first_contact.json`. "
        f"Machine: {m.get('cpu_model', m.get('cpu'))} ({m['cpu_count']} CPUs), backend {m['backend']}; jax {m['jax']}, "
        f"jaxlib {m['jaxlib']}; XLA_FLAGS `{m['xla_flags'] or '(unset)'}`; load average (1 min) "
        f"during the run {m['load_average_1min']}; {m['date']}. Times are medians of repeats "
        "interleaved in one run on a shared machine: compare rows of one table, not absolute "
        "seconds across machines.",
        "",
        "## Planner: `revolve_schedule(Nt, K)` (cache cleared)",
        "",
        "| Nt | K | plan, wall (s) | plan, CPU (s) | cached (s) | actions | recomputed steps "
        "| binomial minimum |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["planner"]:
        lines.append(
            f"| {r['num_steps']:,} | {r['num_checkpoints']} | {r['plan_s']:.3f} | "
            f"{r['plan_cpu_s']:.3f} | "
            f"{r['cached_s']:.1e} | {r['actions']:,} | {r['recomputed_steps']:,} | "
            f"{r['binomial_minimum']:,} |"
        )
    lines += [
        "",
        "## First gradient of `checkpointed:4`, y' = −a y, Euler (`jax.jit(jax.grad)`)",
        "",
        "| Nt | first gradient (s) | before (s, issue figure) | trace + compile (s) | run (s) |",
        "|---|---|---|---|---|",
    ]
    for r in payload["first_gradient"]:
        before = r["before_first_gradient_s"]
        lines.append(
            f"| {r['num_steps']:,} | {r['first_gradient_s']:.2f} | "
            f"{before if before is not None else '–'} | {r['trace_compile_s']:.2f} | "
            f"{r['run_s']:.3f} |"
        )
    lines += [
        "",
        "## Eager calls: 3-dim field tanh(W y), RK4, Nt = 8, `anode` (new W each call)",
        "",
        f"Before: about {BEFORE_EAGER_CALL_S} s per eager call (one compilation per call, two "
        "under `jax.grad`; issue figure).",
        "",
        "| case | first call (s) | later calls (ms, median) |",
        "|---|---|---|",
    ]
    for r in payload["eager"]:
        lines.append(f"| {r['case']} | {r['first_call_s']:.3f} | {1e3 * r['later_call_s']:.2f} |")
    lines += [
        "",
        "## Memory of first- and second-order programs (compiled temp, in states)",
        "",
        "Field tanh(W y), y of 256 float32 (one state = 1 KiB; W itself is 256 states), RK4; "
        "`jax.grad` and a Hessian-vector product `jax.grad(<v, jax.grad(loss)>)`.",
        "",
        "| Nt | adjoint | solver | gradient | Hessian-vector product |",
        "|---|---|---|---|---|",
    ]
    for r in payload["second_order_memory"]:
        lines.append(
            f"| {r['num_steps']} | `{r['adjoint']}` | `{r['solver']}` | "
            f"{r['gradient_temp_states']:.0f} | {r['hvp_temp_states']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and step counts")
    flags = parser.parse_args()
    repeats = 3 if flags.quick else 5
    loads = [os.getloadavg()[0]]
    payload = {"planner": planner(repeats)}
    loads.append(os.getloadavg()[0])
    steps = (1_000, 4_000, 10_000) if flags.quick else (1_000, 2_000, 4_000, 10_000, 100_000)
    payload["first_gradient"] = first_gradient(steps)
    loads.append(os.getloadavg()[0])
    payload["eager"] = eager(3 * repeats)
    loads.append(os.getloadavg()[0])
    payload["second_order_memory"] = second_order_memory()
    loads.append(os.getloadavg()[0])
    payload["machine"] = machine(loads)
    docs = os.path.join(os.path.dirname(__file__), "..", "docs")
    with open(os.path.join(docs, "bench_first_contact.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(docs, "bench_first_contact.md"), "w") as f:
        f.write(to_markdown(payload))


if __name__ == "__main__":
    main()
