"""Benchmark of many output times (`odeint(..., ts=ts)`) against diffrax's SaveAt(ts) + StepTo.

    .venv/bin/python benchmarks/bench_times.py                    # n in {100, 1000}, N in {1, 4}
    .venv/bin/python benchmarks/bench_times.py --outputs 100 --steps 1 --repeats 3

Problem: MLP vector field 2 → 64 → 64 → 2 (tanh), a batch of 256 trajectories (state 256×2
float32), n output times evenly spaced on [0, n/100] (the compiled programs do not depend on
the values), RK4 with N steps per interval, loss = mean squared distance of all n outputs to
a fixed target. Rows: every anode-jax strategy ("direct", "anode", "checkpointed:4",
"reversible" through "reversible:rk4", "backsolve"; "anode" and "checkpointed:4" by default
rematerialise each stage in the backward step for this field, whose activations are 128
states' worth, and are also measured with `recompute_stages=False`) and diffrax 0.7
`diffeqsolve` with
`SaveAt(ts=ts)`, `StepTo(ts refined N times)`, a classical RK4 tableau and
`RecursiveCheckpointAdjoint()` (its default) or `DirectAdjoint()`.

Measured: time per gradient (median of interleaved repeats: every row once per round),
compiled temp memory of the gradient (`memory_analysis().temp_size_in_bytes`, exact), compile
time, and the saving overhead (`ts` with one interval vs the final-state form on the same
grid). Ratios are taken within the run. Writes docs/bench_times.{json,md}.
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
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common

from anode_jax.ode import odeint
from anode_jax.ode.adjoints import Anode, Checkpointed

BATCH, WIDTH = 256, 64
STRATEGIES = [
    ("direct", "rk4", "direct"),
    ("anode", "rk4", "anode"),
    ("anode, recompute_stages=False", "rk4", Anode(recompute_stages=False)),
    ("checkpointed:4", "rk4", "checkpointed:4"),
    ("checkpointed:4, recompute_stages=False", "rk4", Checkpointed(4, recompute_stages=False)),
    ("reversible", "reversible:rk4", "reversible"),
    ("backsolve", "rk4", "backsolve"),
]
DIFFRAX = ["diffrax recursive", "diffrax direct"]


def field(t, y, params):
    w1, b1, w2, b2, w3, b3 = params
    h = jnp.tanh(y @ w1 + b1)
    h = jnp.tanh(h @ w2 + b2)
    return h @ w3 + b3


def make_problem():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    sizes = [(2, WIDTH), (WIDTH, WIDTH), (WIDTH, 2)]
    params = []
    for k, (m, n) in zip(keys, sizes):
        params += [
            jax.random.normal(k, (m, n), jnp.float32) / np.sqrt(m),
            jnp.zeros(n, jnp.float32),
        ]
    y0 = jax.random.normal(keys[3], (BATCH, 2), jnp.float32)
    return tuple(params), y0


def diffrax_rk4():
    import diffrax

    class RK4(diffrax.AbstractERK):
        tableau = diffrax.ButcherTableau(
            c=np.array([0.5, 0.5, 1.0]),
            b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
            b_error=np.zeros(4),
            a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
        )
        interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

        def order(self, terms):
            return 4

    return RK4()


def make_solve(name, ts, num_steps):
    """solve(params, y0) -> ys of shape (n, BATCH, 2) for one row."""
    for row, solver, adjoint in STRATEGIES:
        if row == name:
            return lambda params, y0: odeint(
                field, y0, params, ts=ts, num_steps=num_steps, solver=solver, adjoint=adjoint
            )
    import diffrax

    grid = np.concatenate(
        [np.linspace(a, b, num_steps + 1)[:-1] for a, b in zip(ts[:-1], ts[1:])] + [ts[-1:]]
    )
    adjoint = (
        diffrax.RecursiveCheckpointAdjoint()
        if name == "diffrax recursive"
        else diffrax.DirectAdjoint()
    )

    def solve(params, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            diffrax_rk4(),
            t0=float(ts[0]),
            t1=float(ts[-1]),
            dt0=None,
            y0=y0,
            args=params,
            stepsize_controller=diffrax.StepTo(ts=jnp.asarray(grid, jnp.float32)),
            saveat=diffrax.SaveAt(ts=jnp.asarray(ts, jnp.float32)),
            adjoint=adjoint,
            max_steps=len(grid) - 1,
        )
        return sol.ys

    return solve


def make_grad(solve, target):
    def loss(params, y0):
        return jnp.mean((solve(params, y0) - target) ** 2)

    return jax.grad(loss)


def run(outputs, steps, repeats, max_direct_steps):
    params, y0 = make_problem()
    rows, load = [], [os.getloadavg()[0]]
    for n in outputs:
        ts = np.linspace(0.0, n / 100, n).astype(np.float32)
        target = jnp.zeros((n, BATCH, 2), jnp.float32)
        for num_steps in steps:
            cases = {}
            for name in [s[0] for s in STRATEGIES] + DIFFRAX:
                if "direct" in name and n * num_steps > max_direct_steps:
                    continue  # every step's internals: GBs at this size; not run
                grad = make_grad(make_solve(name, ts, num_steps), target)
                temp, compile_s, compiled = _common.compiled_temp_bytes(grad, params, y0)
                cases[name] = dict(temp=temp, compile_s=compile_s, compiled=compiled, times=[])
                print(f"n={n} N={num_steps} {name}: compiled {compile_s:.1f} s, "
                      f"temp {temp / 2**20:.2f} MiB", flush=True)  # fmt: skip
            for _ in range(repeats):  # interleaved: every row once per round
                for case in cases.values():
                    start = time.perf_counter()
                    jax.block_until_ready(case["compiled"](params, y0))
                    case["times"].append(time.perf_counter() - start)
            load.append(os.getloadavg()[0])
            for name, case in cases.items():
                rows.append(dict(
                    outputs=n, steps_per_interval=num_steps, row=name,
                    temp_bytes=case["temp"], compile_s=case["compile_s"],
                    seconds=statistics.median(case["times"]), times=case["times"],
                ))  # fmt: skip
                print(f"n={n} N={num_steps} {name}: {rows[-1]['seconds'] * 1e3:.1f} ms", flush=True)
    return rows, load


def saving_overhead(num_steps, repeats):
    """ts = [0, T] (one interval, outputs y0 and y(T)) vs the final-state form over [0, T]."""
    params, y0 = make_problem()

    def final_state(params, y0):
        return jnp.mean(odeint(field, y0, params, t0=0.0, t1=1.0, num_steps=num_steps) ** 2)

    def one_interval(params, y0):
        ys = odeint(field, y0, params, ts=jnp.asarray([0.0, 1.0]), num_steps=num_steps)
        return jnp.mean(ys[-1] ** 2)

    compiled = {
        name: jax.jit(jax.grad(fn)).lower(params, y0).compile()
        for name, fn in [("final state", final_state), ("ts, one interval", one_interval)]
    }
    times = {name: [] for name in compiled}
    for c in compiled.values():
        jax.block_until_ready(c(params, y0))
    for _ in range(repeats):
        for name, c in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(c(params, y0))
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return dict(num_steps=num_steps, seconds=medians, times=times,
                ratio=medians["ts, one interval"] / medians["final state"])  # fmt: skip


def engine_probe(repeats, num_steps=100):
    """Where the time goes: `ts` with num_steps intervals of one step vs the final-state form
    with num_steps steps (the fixed-interval engine alone), against diffrax on the same grid."""
    params, y0 = make_problem()
    ts = np.linspace(0.0, 1.0, num_steps + 1).astype(np.float32)
    mse = lambda y: jnp.mean(y**2)
    cases = {
        "anode, ts (1 step per interval)": lambda p, y: mse(
            odeint(field, y, p, ts=ts, num_steps=1)[-1]
        ),
        "anode, final state": lambda p, y: mse(
            odeint(field, y, p, t0=0.0, t1=1.0, num_steps=num_steps)
        ),
        "direct, final state": lambda p, y: mse(
            odeint(field, y, p, t0=0.0, t1=1.0, num_steps=num_steps, adjoint="direct")
        ),
        "diffrax recursive": lambda p, y: mse(make_solve("diffrax recursive", ts, 1)(p, y)[-1]),
    }
    compiled = {k: jax.jit(jax.grad(f)).lower(params, y0).compile() for k, f in cases.items()}
    times = {k: [] for k in compiled}
    for _ in range(repeats):
        for k, c in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(c(params, y0))
            times[k].append(time.perf_counter() - start)
    return dict(num_steps=num_steps, load=os.getloadavg()[0],
                seconds={k: statistics.median(t) for k, t in times.items()})  # fmt: skip


def markdown(payload):
    m = payload["machine"]
    lines = [
        "# Many output times: anode-jax strategies vs diffrax (generated by "
        "benchmarks/bench_times.py)",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, jax {m['jax']} (jaxlib "
        f"{m['jaxlib']}), backend {m['backend']}, XLA_FLAGS={m['xla_flags']!r}; {m['date']}; "
        f"load average (1 min) during the run: {min(payload['load']):.1f}–"
        f"{max(payload['load']):.1f} (shared machine: compare ratios within a row group only).",
        "",
        f"MLP field 2→{WIDTH}→{WIDTH}→2 tanh, batch {BATCH}, float32, RK4, N steps per interval, "
        "gradient of the mean squared error over all n outputs with respect to the parameters. "
        f"Time: median of {payload['repeats']} interleaved repeats; ratio to "
        "diffrax RecursiveCheckpointAdjoint in the same group. Memory: compiled temp bytes.",
        "",
        "| n outputs | N / interval | row | time (ms) | × diffrax recursive | temp (MiB) | "
        "temp / outputs | compile (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        ref = next(
            r for r in payload["rows"]
            if r["row"] == "diffrax recursive" and r["outputs"] == row["outputs"]
            and r["steps_per_interval"] == row["steps_per_interval"]
        )  # fmt: skip
        outputs_bytes = row["outputs"] * BATCH * 2 * 4
        lines.append(
            f"| {row['outputs']} | {row['steps_per_interval']} | {row['row']} | "
            f"{row['seconds'] * 1e3:.1f} | {row['seconds'] / ref['seconds']:.2f} | "
            f"{row['temp_bytes'] / 2**20:.2f} | {row['temp_bytes'] / outputs_bytes:.1f} | "
            f"{row['compile_s']:.1f} |"
        )
    lines += ["", "Saving overhead (gradient time, `ts=[0, 1]` vs `t0=0, t1=1`, same steps):", ""]
    for s in payload["saving"]:
        lines.append(
            f"- N = {s['num_steps']}: final state {s['seconds']['final state'] * 1e3:.2f} ms, "
            f"ts with one interval {s['seconds']['ts, one interval'] * 1e3:.2f} ms, "
            f"ratio {s['ratio']:.2f} (target ≤ 1.1)"
        )
    probe = payload.get("probe")
    if probe:
        ref = probe["seconds"]["diffrax recursive"]
        lines += [
            "",
            f"Engine probe ({probe['num_steps']} RK4 steps, gradient time, same run):",
            "",
        ]
        lines += [
            f"- {name}: {sec * 1e3:.1f} ms ({sec / ref:.2f}× diffrax recursive)"
            for name, sec in probe["seconds"].items()
        ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--probe_only",
        action="store_true",
        help="add the engine probe to an existing docs/bench_times.json",
    )
    parser.add_argument(
        "--max_direct_steps",
        type=int,
        default=1000,
        help="skip the direct rows above this many steps in all",
    )
    args = parser.parse_args()

    machine = _common.machine()
    if args.probe_only:
        payload = _common.read_results("bench_times")
        payload["probe"] = engine_probe(max(args.repeats, 5))
        _common.write_results("bench_times", payload, markdown(payload))
        return
    rows, load = run(args.outputs, args.steps, args.repeats, args.max_direct_steps)
    saving = [saving_overhead(n, max(args.repeats, 5)) for n in (16, 64)]
    load.append(os.getloadavg()[0])
    payload = dict(machine=machine, repeats=args.repeats, load=load, rows=rows, saving=saving)
    payload["probe"] = engine_probe(max(args.repeats, 5))
    _common.write_results("bench_times", payload, markdown(payload))
    print(json.dumps(saving, indent=1))


if __name__ == "__main__":
    main()
