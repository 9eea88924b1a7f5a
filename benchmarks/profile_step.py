"""Where the time of a training step goes: XLA:CPU's per-op profile, grouped by what it does.

    .venv/bin/python benchmarks/profile_step.py                       # resnet, sqnxt; anode, direct
    .venv/bin/python benchmarks/profile_step.py --batch 16 --models sqnxt

One training step of the papers' networks (Euler, Nt = 2, SGD momentum, BatchNorm statistics,
loop-safe convolution with its measured backward formulations) is compiled, run once, then
run `--steps` times under `jax.profiler.trace`. XLA:CPU records one event per executed HLO
instruction (thunk); each event is matched to its instruction in the compiled HLO and
grouped by opcode and by the name scope in its metadata:

* convolution forward / input gradient / weight gradient (the loop-safe conv's backward runs
  under the named scopes `conv_input_grad_*` and `conv_weight_grad_*`, its per-tap products
  included);
* BatchNorm (any instruction under a `*norm*`/`*Norm*` module scope: statistics, per-time
  statistics of the ODE blocks, their gradients);
* solver (stage arithmetic, time grid and loop bookkeeping under the ODE solve, outside the
  vector field's modules);
* copies and transposes (opcodes `copy`, `transpose`, and fusions of only those);
* YNNPACK dots: XLA's library rewriter wraps matrix products in `__ynn_fusion`s that carry
  no metadata; they are the per-tap products of the conv gradients' `taps`/`gemm`
  formulations (and the small dense layer), not attributable to input or weight gradient;
* other (activations, residual adds, pooling, the loss, the optimizer update).

Times are summed over events (on 2 cores XLA may run two independent thunks at once, so the
sum can exceed the wall time); shares are of that sum. Loops (`while`, `conditional`, `call`)
are containers and not counted themselves. Writes docs/profile_step.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _common
import bench_models

from anode_jax.models import create_model

CATEGORIES = (
    "conv forward",
    "conv input gradient",
    "conv weight gradient",
    "YNNPACK dots",
    "BatchNorm",
    "solver",
    "copies/transposes",
    "other",
)
_CONTAINERS = {"while", "conditional", "call", "parameter", "tuple", "get-tuple-element"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*.*?\s([a-z][\w-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(text: str) -> dict[str, tuple[str, str, str]]:
    """name -> (opcode, op_name metadata, fused computation's opcodes) of a compiled module."""
    computations: dict[str, set[str]] = {}
    current = None
    out = {}
    for line in text.splitlines():
        if line and not line[0].isspace() and "{" in line:
            current = line.split()[0].lstrip("%")
            if current == "ENTRY":
                current = line.split()[1].lstrip("%")
            computations[current] = set()
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, opcode = m.groups()
        if current is not None:
            computations[current].add(opcode)
        op_name = _OP_NAME.search(line)
        called = re.search(r"calls=%?([\w.\-]+)", line)
        kind = re.search(r'"kind":"(__\w+)"', line)
        out[name] = (
            opcode,
            op_name.group(1) if op_name else "",
            called.group(1) if called else "",
            kind.group(1) if kind else "",
        )
    return {
        name: (opcode, op_name, " ".join(sorted(computations.get(called, ())) + [kind]).strip())
        for name, (opcode, op_name, called, kind) in out.items()
    }


def category(opcode: str, op_name: str, fused: str) -> str | None:
    if opcode in _CONTAINERS:
        return None
    if "__ynn_fusion" in fused.split() and not op_name:
        # XLA's library rewriter wraps dots in YNNPACK fusions without metadata: the per-tap
        # products of the conv gradients ("taps"/"gemm") and the dense layer
        return "YNNPACK dots"
    if "conv_weight_grad" in op_name:
        return "conv weight gradient"
    if "conv_input_grad" in op_name:
        return "conv input gradient"
    if opcode == "convolution" or "convolution" in fused.split():
        return "conv forward"
    if re.search(r"[Nn]orm", op_name):
        return "BatchNorm"
    if opcode in ("copy", "transpose") or (
        opcode == "fusion" and fused and set(fused.split()) <= {"copy", "transpose", "parameter"}
    ):
        return "copies/transposes"
    if "_solve" in op_name and "vector_field" not in op_name:
        return "solver"
    return "other"


def profile(name, adjoint, batch, steps, trace_dir):
    model = create_model(
        name, num_classes=10, block="ode", num_steps=2, solver="euler", adjoint=adjoint
    )
    tx = optax.sgd(0.1, momentum=0.9)
    args, params = bench_models.step_arguments(model, tx, batch, concrete=True)
    start = time.perf_counter()
    compiled = jax.jit(bench_models.make_train_step(model, tx)).lower(*args).compile()
    compile_s = time.perf_counter() - start
    step_s = _common.median_seconds(compiled, *args, repeats=3)
    instructions = hlo_instructions(compiled.as_text())
    directory = os.path.join(trace_dir, f"{name}_{adjoint}")
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(compiled(*args))
    (path,) = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    totals = collections.Counter()
    by_op = collections.Counter()
    for event in events:
        if event.get("ph") != "X" or event["name"] not in instructions:
            continue
        opcode, op_name, fused = instructions[event["name"]]
        cat = category(opcode, op_name, fused)
        if cat is None:
            continue
        seconds = event.get("dur", 0.0) * 1e-6 / steps
        totals[cat] += seconds
        label = re.sub(r"\d+", "#", op_name)[-90:] or f"(no metadata; fuses: {fused[:80]})"
        by_op[(cat, opcode, label)] += seconds
    top = [
        {"category": c, "opcode": o, "op_name": n, "seconds": s}
        for (c, o, n), s in by_op.most_common(12)
    ]
    return {
        "model": name,
        "adjoint": adjoint,
        "batch": batch,
        "params": params,
        "step_s": step_s,
        "compile_s": compile_s,
        "profiled_s": sum(totals.values()),
        "categories": {c: totals.get(c, 0.0) for c in CATEGORIES},
        "top": top,
        "load_average": round(os.getloadavg()[0], 2),
    }


def compare_rule(name, adjoint, batch, rounds):
    """Whole step with the measured conv-gradient choice vs the fixed rule, same process."""
    model = create_model(
        name, num_classes=10, block="ode", num_steps=2, solver="euler", adjoint=adjoint
    )
    tx = optax.sgd(0.1, momentum=0.9)
    args, _ = bench_models.step_arguments(model, tx, batch, concrete=True)
    compiled = {}
    previous = os.environ.get("ANODE_JAX_AUTOTUNE")
    for label, mode in (("measured", previous or "on"), ("fixed rule", "off")):
        os.environ["ANODE_JAX_AUTOTUNE"] = mode  # read when the backward is traced
        step = bench_models.make_train_step(model, tx)  # a new function: traced afresh
        compiled[label] = jax.jit(step).lower(*args).compile()
        jax.block_until_ready(compiled[label](*args))
    if previous is None:
        os.environ.pop("ANODE_JAX_AUTOTUNE")
    else:
        os.environ["ANODE_JAX_AUTOTUNE"] = previous
    times = {label: [] for label in compiled}
    for _ in range(rounds):
        for label, exe in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(exe(*args))
            times[label].append(time.perf_counter() - start)
    return {
        "model": name,
        "adjoint": adjoint,
        "batch": batch,
        "seconds": {label: sorted(ts)[len(ts) // 2] for label, ts in times.items()},
        "load_average": round(os.getloadavg()[0], 2),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet,sqnxt")
    parser.add_argument("--adjoints", default="anode,direct")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps")
    parser.add_argument(
        "--compare-rule",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead of profiling: time the step with the measured conv-gradient choice "
        "against the fixed rule (ANODE_JAX_AUTOTUNE=off), ROUNDS interleaved rounds; "
        "writes docs/profile_step_rule.json",
    )
    args = parser.parse_args()
    if args.compare_rule:
        rows = []
        for name in args.models.split(","):
            for adjoint in args.adjoints.split(","):
                rows.append(compare_rule(name, adjoint, args.batch, args.compare_rule))
                print(rows[-1], flush=True)
                out = {"machine": _common.machine(), "rounds": args.compare_rule, "rows": rows}
                _common.write_results("profile_step_rule", out, rule_markdown)
        return
    trace_dir = tempfile.mkdtemp(prefix="anode_jax_profile_")
    payload = {
        "machine": _common.machine(),
        "settings": {
            "command": " ".join(["benchmarks/profile_step.py"] + sys.argv[1:]),
            "batch": args.batch,
            "steps": args.steps,
            "autotune": os.environ.get("ANODE_JAX_AUTOTUNE", "on"),
        },
        "rows": [],
    }
    for name in args.models.split(","):
        for adjoint in args.adjoints.split(","):
            row = profile(name, adjoint, args.batch, args.steps, trace_dir)
            payload["rows"].append(row)
            shares = ", ".join(
                f"{c} {s / row['profiled_s']:.0%}" for c, s in row["categories"].items()
            )
            print(f"{name} {adjoint}: {row['step_s']:.3f} s/step; {shares}", flush=True)
            _common.write_results("profile_step", payload, to_markdown)


def rule_markdown(payload) -> str:
    lines = [
        "# Training step: measured conv-gradient choice vs the fixed rule",
        "",
        _common.machine_header(payload["machine"]),
        "",
        "Generated by `.venv/bin/python benchmarks/profile_step.py --compare-rule "
        f"{payload['rounds']}`: the same step compiled twice in one process, with the loop-safe "
        "conv's backward formulations chosen by measurement and with `ANODE_JAX_AUTOTUNE=off` "
        f"(the fixed rule); median of {payload['rounds']} interleaved rounds.",
        "",
        "| network | adjoint | batch | measured | fixed rule | rule / measured | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        m, f = r["seconds"]["measured"], r["seconds"]["fixed rule"]
        lines.append(
            f"| {r['model']} | {r['adjoint']} | {r['batch']} | {m * 1e3:.0f} ms | {f * 1e3:.0f} ms "
            f"| {f / m:.2f}× | {r['load_average']} |"
        )
    lines.append("")
    return "\n".join(lines)


def to_markdown(payload) -> str:
    s = payload["settings"]
    lines = [
        "# Where a training step's time goes (XLA:CPU profile)",
        "",
        f"Generated by `.venv/bin/python {s['command']}`.",
        "",
        _common.machine_header(payload["machine"]),
        "",
        f"Batch {s['batch']} × 32 × 32 × 3, width 1.0, Euler, Nt = 2, SGD momentum; autotuning "
        f"`{s['autotune']}`. Per-op times from `jax.profiler.trace` over {s['steps']} steps "
        "(per step), grouped as described in benchmarks/profile_step.py; share = of the "
        "profiled sum. `step` = median wall time of 3 unprofiled steps.",
        "",
        "| network | adjoint | step | profiled | " + " | ".join(CATEGORIES) + " |",
        "|---|---|---|---|" + "---|" * len(CATEGORIES),
    ]
    for r in payload["rows"]:
        total = r["profiled_s"]
        cells = " | ".join(
            f"{r['categories'][c] * 1e3:.0f} ms ({r['categories'][c] / total:.0%})"
            for c in CATEGORIES
        )
        lines.append(
            f"| {r['model']} | {r['adjoint']} | {r['step_s'] * 1e3:.0f} ms | {total * 1e3:.0f} ms "
            f"| {cells} |"
        )
    for r in payload["rows"]:
        lines += [
            "",
            f"## Largest ops: {r['model']}, {r['adjoint']}",
            "",
            "| category | opcode | op_name (end) | ms per step |",
            "|---|---|---|---|",
        ]
        for t in r["top"]:
            lines.append(
                f"| {t['category']} | {t['opcode']} | `{t['op_name']}` | {t['seconds'] * 1e3:.1f} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
