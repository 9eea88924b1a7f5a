"""anode-jax against PyTorch on the core network, side by side in one process.

    .venv/bin/python benchmarks/bench_torch_core.py                 # Nt in {4, 16}, profile, routes
    .venv/bin/python benchmarks/bench_torch_core.py --rounds 5 --skip_routes --skip_profile
    .venv/bin/python benchmarks/bench_torch_core.py --blocks 1 --steps 2 --rounds 1 \
        --rounds_long 1 --profile_steps 2 --route_steps 2         # smoke test, a minute

Needs the optional extra `peer` (`pip install -e '.[peer]'`: PyTorch, CPU is enough).

Network: the one of benchmarks/bench_core.py (its problem builders are imported, not copied):
8 ODE blocks z' = ReLU(conv3×3(ReLU(conv3×3(z)))), 16 channels, no bias, integrated over
[0, 1] with RK4 and Nt steps; loss = mean(z_8²); one gradient with respect to the 16 kernels.
State 32 × 16 × 16 × 16, float32.

Rows, all timed in the same process in interleaved rounds (the order rotates every round;
median and least time; the first call of each is excluded):

* anode-jax `"anode"`, `"direct"`, `"checkpointed:4"` (library default loop policy and the
  loop-safe convolution with its backward formulations chosen by measurement);
* PyTorch (written here; `torch.set_num_threads(--threads)`, channels-last tensors):
  direct backpropagation; `torch.utils.checkpoint.checkpoint` around each block
  (`use_reentrant=False`); an ANODE-style recompute — a `torch.autograd.Function` per block
  that keeps only the block's input, and in backward recomputes the block with gradients
  enabled and backpropagates through it with one `torch.autograd.grad` call; and the same
  with two `torch.autograd.grad` calls (input, then parameters, the first retaining the
  graph), which is how the original ANODE code's backward is organised.

Before timing, the PyTorch network is checked to compute the same function: the same
kernels are copied in, and the output z_8 and the kernels' gradient are compared with
anode-jax's `"direct"` (max |a − b| / max |b|, float32; the run fails above the tolerance).

Profile (unless `--skip_profile`): for Nt = `--profile_steps` (16) and `"anode"`, XLA:CPU's per-op profile of the gradient
grouped as in benchmarks/profile_step.py, and the block's 3×3 convolution alone (forward,
input gradient, weight gradient; each loop-safe formulation and PyTorch's) times the number of
each in one gradient. Routes (unless `--skip_routes`): three routes of issue 23 for
`"anode"` at Nt = `--route_steps` (4) — XLA:CPU option sets (one compilation each, same process; see
benchmarks/bench_xla_flags.py), pinned conv-gradient formulations, and the convolutions computed
by PyTorch (oneDNN) through `jax.pure_callback` host callbacks — timed against the default in
interleaved rounds (`--routes_only` measures only these and keeps the stored other sections).
Writes docs/bench_torch_core.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import itertools
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _common
import bench_core

# PyTorch's OpenMP threads spin while they wait by default; on a machine shared with other
# processes (2 cores here) a descheduled thread then stalls the others and a 2-thread step
# took 3-18x longer than with passive waiting (measured 2026-11-30 at load 4-5). Passive waiting
# is never slower than spinning when cores are oversubscribed; set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import torch
    import torch.nn.functional as F
    import torch.utils.checkpoint
except ImportError as error:  # benchmark-only dependency
    raise SystemExit(
        "benchmarks/bench_torch_core.py needs PyTorch: pip install -e '.[peer]' "
        f"(or pip install torch); import failed: {error}"
    ) from error

from anode_jax import odeint
from anode_jax.nn import conv_general_dilated

JAX_STRATEGIES = ("anode", "direct", "checkpointed:4")
TORCH_STRATEGIES = ("direct", "checkpoint", "anode-style", "anode-style, two grad calls")
#: max |a − b| / max |b| allowed between the PyTorch and anode-jax networks (float32).
TOLERANCE = 1e-4

# XLA:CPU option sets of route 1 (the same fields as XLA_FLAGS, passed to one compilation).
XLA_OPTIONS = {
    "ynn off": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "ynn conv": {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    },
    "onednn": {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_custom_call": True},
}
# Route 2: the loop-safe conv's backward formulations pinned (input, weight).
PINS = tuple(itertools.product(("conv", "taps"), ("conv", "taps", "gemm")))


# ----------------------------------------------------------------------------- PyTorch side


def torch_field(z, w1, w2):
    return F.relu(F.conv2d(F.relu(F.conv2d(z, w1, padding=1)), w2, padding=1))


def torch_block(z, w1, w2, num_steps):
    """RK4 (classical tableau) over [0, 1] with `num_steps` steps; the field ignores t."""
    h = 1.0 / num_steps
    for _ in range(num_steps):
        k1 = torch_field(z, w1, w2)
        k2 = torch_field(z + (0.5 * h) * k1, w1, w2)
        k3 = torch_field(z + (0.5 * h) * k2, w1, w2)
        k4 = torch_field(z + h * k3, w1, w2)
        z = z + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    return z


class RecomputeBlock(torch.autograd.Function):
    """ANODE-style block: forward without a graph, keeping only the input; backward recomputes
    the block with gradients enabled and backpropagates through the recomputed graph."""

    @staticmethod
    def forward(ctx, z, w1, w2, num_steps, two_calls):
        ctx.num_steps, ctx.two_calls = num_steps, two_calls
        ctx.save_for_backward(z, w1, w2)
        return torch_block(z, w1, w2, num_steps)  # grad mode is off inside forward

    @staticmethod
    def backward(ctx, grad_out):
        z, w1, w2 = ctx.saved_tensors
        need_z = ctx.needs_input_grad[0]
        with torch.enable_grad():
            z = z.detach().requires_grad_(need_z)
            w1, w2 = w1.detach().requires_grad_(), w2.detach().requires_grad_()
            out = torch_block(z, w1, w2, ctx.num_steps)
            if ctx.two_calls:
                # the original code's organisation: input gradient, then parameter gradients,
                # each a backward pass through the same retained graph
                (gz,) = (
                    torch.autograd.grad(out, z, grad_out, retain_graph=True) if need_z else (None,)
                )
                gw1, gw2 = torch.autograd.grad(out, (w1, w2), grad_out)
            elif need_z:
                gz, gw1, gw2 = torch.autograd.grad(out, (z, w1, w2), grad_out)
            else:
                gz = None
                gw1, gw2 = torch.autograd.grad(out, (w1, w2), grad_out)
        return gz, gw1, gw2, None, None


def torch_forward(z, weights, num_steps, strategy):
    for w1, w2 in weights:
        if strategy == "direct":
            z = torch_block(z, w1, w2, num_steps)
        elif strategy == "checkpoint":
            z = torch.utils.checkpoint.checkpoint(
                torch_block, z, w1, w2, num_steps, use_reentrant=False
            )
        elif strategy == "anode-style":
            z = RecomputeBlock.apply(z, w1, w2, num_steps, False)
        elif strategy == "anode-style, two grad calls":
            z = RecomputeBlock.apply(z, w1, w2, num_steps, True)
        else:
            raise ValueError(f"strategy must be one of {TORCH_STRATEGIES}, got {strategy!r}.")
    return z


def torch_problem(z0, params, memory_format):
    """anode-jax's state (NHWC) and kernels (HWIO) as PyTorch tensors (NCHW view, OIHW)."""
    z = torch.from_numpy(np.asarray(z0)).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
    weights = [
        tuple(
            torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy())
            .contiguous(memory_format=memory_format)
            .requires_grad_()
            for w in pair
        )
        for pair in params
    ]
    return z, weights


def torch_grad_fn(z, weights, num_steps, strategy):
    flat = [w for pair in weights for w in pair]

    def grad():
        loss = torch.mean(torch_forward(z, weights, num_steps, strategy) ** 2)
        return torch.autograd.grad(loss, flat)

    return grad


def to_hwio(grads):
    """Flat OIHW gradients -> anode-jax's [(HWIO, HWIO), ...]."""
    g = [t.detach().numpy().transpose(2, 3, 1, 0) for t in grads]
    return [(g[i], g[i + 1]) for i in range(0, len(g), 2)]


# ----------------------------------------------------------------------------- anode-jax side


def jax_output(num_steps, field=None):
    field = bench_core.vector_field if field is None else field

    def out(z0, params):
        z = z0
        for theta in params:
            z = odeint(field, z, theta, num_steps=num_steps, solver="rk4", adjoint="direct")
        return z

    return out


@contextlib.contextmanager
def pinned(input_gradient, weight_gradient, forward=None):
    """The loop-safe conv's formulations pinned while programs are traced (forward: only if
    given)."""
    names = ("ANODE_JAX_CONV_INPUT_GRADIENT", "ANODE_JAX_CONV_WEIGHT_GRADIENT")
    values = (input_gradient, weight_gradient)
    if forward is not None:
        names, values = names + ("ANODE_JAX_CONV_FORWARD",), values + (forward,)
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(zip(names, values))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _torch_nhwc(x):
    """An NHWC NumPy array as an NCHW PyTorch tensor in channels-last memory (no copy)."""
    return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)


def _torch_oihw(w):
    return torch.from_numpy(np.asarray(w)).permute(3, 2, 0, 1).contiguous()


def _host_conv(x, w):
    with torch.no_grad():
        out = F.conv2d(_torch_nhwc(x), _torch_oihw(w), padding=1)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def _host_conv_backward(g, x, w):
    with torch.no_grad():
        gx, gw, _ = torch.ops.aten.convolution_backward(
            _torch_nhwc(g), _torch_nhwc(x), _torch_oihw(w), None, [1, 1], [1, 1], [1, 1],
            False, [0, 0], 1, [True, True, False],
        )  # fmt: skip
    return gx.permute(0, 2, 3, 1).contiguous().numpy(), gw.permute(2, 3, 1, 0).contiguous().numpy()


@jax.custom_vjp
def callback_conv(x, w):
    """3×3 SAME convolution (NHWC, HWIO) computed by PyTorch through `jax.pure_callback`: the
    route "a well-kept convolution library (oneDNN, inside PyTorch) called from XLA" measured
    without building a custom call; CPU only, one host round trip per convolution."""
    return jax.pure_callback(_host_conv, jax.ShapeDtypeStruct(x.shape, x.dtype), x, w)


def _callback_conv_fwd(x, w):
    return callback_conv(x, w), (x, w)


def _callback_conv_bwd(residuals, g):
    x, w = residuals
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype))
    return jax.pure_callback(_host_conv_backward, shapes, g, x, w)


callback_conv.defvjp(_callback_conv_fwd, _callback_conv_bwd)


def callback_field(t, z, theta):
    """bench_core's vector field with its convolutions through `callback_conv`."""
    w1, w2 = theta
    return jax.nn.relu(callback_conv(jax.nn.relu(callback_conv(z, w1)), w2))


def fresh_field():
    """A new vector-field object: anode-jax caches traced solves per field, so a program
    traced under another pin or option must not reuse an earlier trace."""

    def field(t, z, theta):
        return bench_core.vector_field(t, z, theta)

    return field


def compile_grad(num_steps, adjoint, z0, params, field=None, compiler_options=None):
    loss = bench_core.make_loss(num_steps, adjoint, field=field)
    lowered = jax.jit(jax.grad(loss, argnums=1)).lower(z0, params)
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options or None)
    compile_s = time.perf_counter() - start
    return compiled, compile_s


def formulations(compiled) -> str:
    """The loop-safe conv's formulations present in a compiled program (named scopes)."""
    text = compiled.as_text()
    fwd = sorted(set(re.findall(r"conv_forward_([a-z]+)", text)))
    inp = sorted(set(re.findall(r"conv_input_grad_([a-z]+)", text)))
    wgt = sorted(set(re.findall(r"conv_weight_grad_([a-z]+)", text)))
    forward = f"forward {'+'.join(fwd)}, " if fwd else ""
    return f"{forward}input {'+'.join(inp) or '?'}, weight {'+'.join(wgt) or '?'}"


def rel_diff(a, b) -> float:
    a = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
    b = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)) / max(
        float(np.max(np.abs(y))) for y in b
    )


# ----------------------------------------------------------------------------- timing


def interleaved(fns: dict, rounds: int) -> dict:
    """name -> (median s, least s) over `rounds` rounds; each fn called once first (excluded);
    the order rotates every round so no row always runs after the same one."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            start = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - start)
    return {n: (statistics.median(ts), min(ts)) for n, ts in times.items()}


def jax_call(compiled, *args):
    return lambda: jax.block_until_ready(compiled(*args))


# ----------------------------------------------------------------------------- profile


def profile_jax(compiled, z0, params, trace_dir, calls=2):
    """XLA:CPU per-op times of one gradient, grouped as in benchmarks/profile_step.py."""
    import profile_step

    instructions = profile_step.hlo_instructions(compiled.as_text())
    directory = tempfile.mkdtemp(dir=trace_dir)
    with jax.profiler.trace(directory):
        for _ in range(calls):
            jax.block_until_ready(compiled(z0, params))
    (path,) = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    totals = collections.Counter()
    for event in events:
        if event.get("ph") != "X" or event["name"] not in instructions:
            continue
        cat = profile_step.category(*instructions[event["name"]])
        if cat is not None:
            totals[cat] += event.get("dur", 0.0) * 1e-6 / calls
    return {c: totals.get(c, 0.0) for c in profile_step.CATEGORIES}


def conv_pieces(batch, size, channels, rounds, reps, memory_format):
    """Seconds of one 3×3 convolution at the block's shape: forward, input gradient, weight
    gradient; XLA (lax forward, each loop-safe formulation) and PyTorch (oneDNN)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, channels)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, channels, channels)) / 12, jnp.float32)
    ct = jnp.asarray(rng.normal(size=(batch, size, size, channels)), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")

    def lax_conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

    def safe(inp="auto", wgt="auto"):
        return lambda x, w: conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=dn, input_gradient=inp, weight_gradient=wgt
        )

    def input_grad(conv):
        return lambda x, w, ct: jax.vjp(lambda x: conv(x, w), x)[1](ct)[0]

    def weight_grad(conv):
        return lambda x, w, ct: jax.vjp(lambda w: conv(x, w), w)[1](ct)[0]

    def repeated(compiled, *args):
        def run():
            for _ in range(reps):
                out = compiled(*args)
            jax.block_until_ready(out)

        return run

    progs = {"XLA forward": jax.jit(lax_conv).lower(x, w).compile()}
    progs["XLA input gradient (lax)"] = jax.jit(input_grad(lax_conv)).lower(x, w, ct).compile()
    progs["XLA weight gradient (lax)"] = jax.jit(weight_grad(lax_conv)).lower(x, w, ct).compile()
    for m in ("auto", "conv", "taps"):
        progs[f"XLA input gradient ({m})"] = (
            jax.jit(input_grad(safe(inp=m))).lower(x, w, ct).compile()
        )
    for m in ("auto", "conv", "taps", "gemm"):
        progs[f"XLA weight gradient ({m})"] = (
            jax.jit(weight_grad(safe(wgt=m))).lower(x, w, ct).compile()
        )
    fns = {
        name: repeated(p, *((x, w) if name == "XLA forward" else (x, w, ct)))
        for name, p in progs.items()
    }
    tx = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
    tct = (
        torch.from_numpy(np.asarray(ct)).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
    )
    tw = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()).contiguous(
        memory_format=memory_format
    )

    def torch_op(kind):
        def run():
            with torch.no_grad():
                for _ in range(reps):
                    if kind == "forward":
                        F.conv2d(tx, tw, padding=1)
                    else:
                        mask = [kind == "input", kind == "weight", False]
                        torch.ops.aten.convolution_backward(
                            tct, tx, tw, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
                        )

        return run

    fns["PyTorch forward"] = torch_op("forward")
    fns["PyTorch input gradient"] = torch_op("input")
    fns["PyTorch weight gradient"] = torch_op("weight")
    timed = interleaved(fns, rounds)
    return {n: med / reps for n, (med, _) in timed.items()}


# ----------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", default="4,16", help="Nt values, comma-separated")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds, Nt < 16")
    parser.add_argument("--rounds_long", type=int, default=5, help="interleaved rounds, Nt >= 16")
    parser.add_argument("--blocks", type=int, default=8, help="ODE blocks (8: bench_core's L=8)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--memory_format",
        choices=("channels_last", "contiguous"),
        default="channels_last",
        help="PyTorch tensors' layout (NHWC in memory, or NCHW)",
    )
    parser.add_argument("--skip_profile", action="store_true")
    parser.add_argument("--skip_routes", action="store_true")
    parser.add_argument("--profile_steps", type=int, default=16)
    parser.add_argument("--route_steps", type=int, default=4)
    parser.add_argument(
        "--pin",
        default="",
        metavar="INPUT/WEIGHT[/FORWARD]",
        help="add an `anode` row with the conv formulations pinned, e.g. conv/gemm or "
        "conv/conv/xla (XLA's kernels only, when the oneDNN extension is built)",
    )
    parser.add_argument(
        "--merge_from",
        default="",
        metavar="JSON",
        help="keep the profile and routes of an earlier run's result file (with its machine "
        "record) when this run skips them",
    )
    parser.add_argument(
        "--routes_only",
        action="store_true",
        help="measure the routes only; keep the stored result file's other sections",
    )
    parser.add_argument(
        "--render_only",
        action="store_true",
        help="rewrite docs/bench_torch_core.md from the JSON result file; measure nothing",
    )
    args = parser.parse_args()
    if args.render_only:
        _common.write_results(
            "bench_torch_core", _common.read_results("bench_torch_core"), to_markdown
        )
        return
    steps = [int(s) for s in args.steps.split(",") if s]
    torch.set_num_threads(args.threads)
    memory_format = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}[
        args.memory_format
    ]
    payload = {
        "machine": {
            **_common.machine(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "torch_mkldnn": bool(torch.backends.mkldnn.is_available()),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        },
        "settings": {
            "command": " ".join(["benchmarks/bench_torch_core.py"] + sys.argv[1:]),
            "blocks": args.blocks,
            "rounds": args.rounds,
            "rounds_long": args.rounds_long,
            "memory_format": args.memory_format,
            "autotune": os.environ.get("ANODE_JAX_AUTOTUNE", "on"),
            "tolerance": TOLERANCE,
        },
        "rows": [],
        "checks": [],
    }

    def write():
        _common.write_results("bench_torch_core", payload, to_markdown)

    machine_now = payload["machine"]
    if args.routes_only:
        payload = _common.read_results("bench_torch_core")
        steps, args.skip_profile = [], True
    if args.merge_from:
        with open(args.merge_from) as f:
            earlier = json.load(f)
        for key in ("profile", "routes"):
            if key in earlier:
                payload[key] = {**earlier[key], "machine": earlier["machine"]}
    z0, params = bench_core.make_problem(args.blocks)
    compiled_by_steps = {}
    for num_steps in steps:
        # -- the same function: output and gradient against anode-jax "direct"
        tz, tw = torch_problem(z0, params, memory_format)
        with torch.no_grad():
            t_out = torch_forward(tz, tw, num_steps, "direct").permute(0, 2, 3, 1).numpy()
        j_out = jax.jit(jax_output(num_steps))(z0, params)
        compiled = {}
        compile_s = {}
        for adjoint in JAX_STRATEGIES:
            compiled[adjoint], compile_s[adjoint] = compile_grad(num_steps, adjoint, z0, params)
        if args.pin:
            with pinned(*args.pin.split("/")):
                label = f"anode, pinned {args.pin}"
                compiled[label], compile_s[label] = compile_grad(
                    num_steps, "anode", z0, params, fresh_field()
                )
        compiled_by_steps[num_steps] = compiled
        ref = compiled["direct"](z0, params)
        check = {
            "num_steps": num_steps,
            "output_rel_diff": rel_diff(t_out, j_out),
            "grad_rel_diff": {},
        }
        torch_fns = {}
        for strategy in TORCH_STRATEGIES:
            torch_fns[strategy] = torch_grad_fn(tz, tw, num_steps, strategy)
            check["grad_rel_diff"][f"PyTorch {strategy}"] = rel_diff(
                to_hwio(torch_fns[strategy]()), ref
            )
        for adjoint in [a for a in compiled if a != "direct"]:
            check["grad_rel_diff"][f"anode-jax {adjoint}"] = rel_diff(
                compiled[adjoint](z0, params), ref
            )
        worst = max([check["output_rel_diff"], *check["grad_rel_diff"].values()])
        check["passed"] = worst <= TOLERANCE
        payload["checks"].append(check)
        print(f"Nt={num_steps} check: {check}", flush=True)
        if not check["passed"]:
            write()
            raise SystemExit(
                f"PyTorch and anode-jax networks differ at Nt={num_steps}: {worst:.2e} > "
                f"{TOLERANCE:.0e} (see docs/bench_torch_core.md)"
            )
        # -- timing, interleaved
        fns = {f"anode-jax {a}": jax_call(exe, z0, params) for a, exe in compiled.items()}
        fns.update({f"PyTorch {s}": fn for s, fn in torch_fns.items()})
        load_start = os.getloadavg()[0]
        rounds = args.rounds_long if num_steps >= 16 else args.rounds
        timed = interleaved(fns, rounds)
        for name, (median, least) in timed.items():
            adjoint = name.removeprefix("anode-jax ")
            row = {
                "num_steps": num_steps,
                "row": name,
                "median_s": median,
                "least_s": least,
                "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                "rounds": rounds,
            }
            if adjoint in compiled:
                row["compile_s"] = compile_s[adjoint]
                row["temp_bytes"] = int(compiled[adjoint].memory_analysis().temp_size_in_bytes)
                row["formulations"] = formulations(compiled[adjoint])
            payload["rows"].append(row)
            print(f"Nt={num_steps:3d} {name:40s} {median * 1e3:8.1f} ms (least {least * 1e3:.1f})")
        write()

    if not args.skip_profile:
        trace_dir = tempfile.mkdtemp(prefix="anode_jax_torch_core_")
        compiled = compiled_by_steps.get(args.profile_steps, {}).get("anode")
        if compiled is None:
            compiled, _ = compile_grad(args.profile_steps, "anode", z0, params)
        start = time.perf_counter()
        jax.block_until_ready(compiled(z0, params))
        wall = time.perf_counter() - start
        cats = profile_jax(compiled, z0, params, trace_dir)
        pieces = conv_pieces(32, 16, 16, rounds=5, reps=20, memory_format=memory_format)
        payload["profile"] = {
            "num_steps": args.profile_steps,
            "strategy": "anode",
            "formulations": formulations(compiled),
            "wall_s": wall,
            "categories": cats,
            "conv_pieces_s": pieces,
        }
        print("profile:", json.dumps(payload["profile"], indent=1), flush=True)
        write()

    if not args.skip_routes:
        num_steps = args.route_steps
        variants, info = {}, {}
        base = compiled_by_steps.get(num_steps, {}).get("anode")
        if base is None:
            base, _ = compile_grad(num_steps, "anode", z0, params)
        variants["default"] = base
        info["default"] = {"what": "jaxlib defaults, formulations chosen by measurement"}
        for name, options in XLA_OPTIONS.items():
            try:
                exe, cs = compile_grad(
                    num_steps, "anode", z0, params, fresh_field(), compiler_options=options
                )
                variants[f"XLA {name}"] = exe
                info[f"XLA {name}"] = {"what": str(options), "compile_s": cs}
            except Exception as error:  # an option this jaxlib rejects: recorded, not fatal
                info[f"XLA {name}"] = {"what": str(options), "error": str(error)[:200]}
        for inp, wgt in PINS:
            with pinned(inp, wgt):
                exe, cs = compile_grad(num_steps, "anode", z0, params, fresh_field())
            variants[f"pin {inp}/{wgt}"] = exe
            info[f"pin {inp}/{wgt}"] = {"what": f"input {inp}, weight {wgt}", "compile_s": cs}
        # Route 3: the convolutions computed by PyTorch (oneDNN) through host callbacks.
        exe, cs = compile_grad(num_steps, "anode", z0, params, callback_field)
        variants["host callback: PyTorch conv"] = exe
        info["host callback: PyTorch conv"] = {
            "what": "jax.pure_callback into F.conv2d / aten.convolution_backward",
            "compile_s": cs,
        }
        for name, exe in variants.items():
            info[name]["formulations"] = formulations(exe)
            info[name]["grad_rel_diff"] = rel_diff(exe(z0, params), variants["default"](z0, params))
        tz, tw = torch_problem(z0, params, memory_format)
        fns = {name: jax_call(exe, z0, params) for name, exe in variants.items()}
        for s in ("direct", "checkpoint", "anode-style"):
            fns[f"PyTorch {s}"] = torch_grad_fn(tz, tw, num_steps, s)
        load_start = os.getloadavg()[0]
        timed = interleaved(fns, args.rounds)
        payload["routes"] = {
            "num_steps": num_steps,
            "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            "rows": [
                {"row": n, "median_s": m, "least_s": lt, **info.get(n, {})}
                for n, (m, lt) in timed.items()
            ],
        }
        if args.routes_only:
            payload["routes"]["machine"] = machine_now
            payload["routes"]["command"] = " ".join(
                ["benchmarks/bench_torch_core.py"] + sys.argv[1:]
            )
        for r in payload["routes"]["rows"]:
            print(f"route {r['row']:30s} {r['median_s'] * 1e3:8.1f} ms {r.get('formulations', '')}")
        write()


# ----------------------------------------------------------------------------- markdown


def _ms(s):
    return f"{s * 1e3:,.0f} ms" if s >= 0.1 else f"{s * 1e3:.1f} ms"


def _gradient_rows(all_rows) -> list[str]:
    lines = []
    for nt in sorted({r["num_steps"] for r in all_rows}):
        rows = {r["row"]: r for r in all_rows if r["num_steps"] == nt}

        def ratio(r, ref):
            return f"{r['median_s'] / rows[ref]['median_s']:.2f}×" if ref in rows else "–"

        for r in rows.values():
            temp = f"{r['temp_bytes'] / 2**20:.1f} MiB" if "temp_bytes" in r else "–"
            name = r["row"]
            if "formulations" in r:
                name += f" ({r['formulations']})"
            lines.append(
                f"| {nt} | {name} | {_ms(r['median_s'])} ({_ms(r['least_s'])}) | "
                f"{ratio(r, 'anode-jax anode')} | {ratio(r, 'PyTorch direct')} | "
                f"{ratio(r, 'PyTorch checkpoint')} | {ratio(r, 'PyTorch anode-style')} | {temp} | "
                f"{r['load_average'][0]}, {r['load_average'][1]} |"
            )
    return lines


def _earlier(section) -> list[str]:
    if "machine" not in section:
        return []
    command = f" (`{section['command']}`)" if "command" in section else ""
    return [
        "",
        f"Measured in a separate run{command}: " + _common.machine_header(section["machine"]),
    ]


def to_markdown(payload) -> str:
    m, s = payload["machine"], payload["settings"]
    lines = [
        "# anode-jax against PyTorch on the core network (same machine, same process)",
        "",
        f"Generated by `.venv/bin/python {s['command']}`.",
        "",
        _common.machine_header(m),
        f" PyTorch {m['torch']} (CPU capability `{m['torch_cpu_capability']}`, oneDNN "
        f"{'yes' if m['torch_mkldnn'] else 'no'}), {m['torch_threads']} threads.",
        "",
        f"Network of benchmarks/bench_core.py: {s['blocks']} ODE blocks z' = "
        "ReLU(conv3×3(ReLU(conv3×3(z)))), 16 channels, RK4 over [0, 1] with Nt steps, "
        "batch 32×16×16×16 float32, loss mean(z²), one gradient with respect to the kernels. "
        "PyTorch: the same network written for PyTorch (tensors "
        f"`{s['memory_format']}`; `OMP_WAIT_POLICY={m.get('omp_wait_policy') or 'unset'}`), the "
        f"same kernels. Time: median of {s['rounds']} (Nt < 16) or {s.get('rounds_long', s['rounds'])} "
        "(Nt ≥ 16) interleaved rounds (order rotating), least in brackets, first call "
        "excluded; every ratio is "
        "between rows of the same run. anode-jax rows use the library's default loop policy "
        f"and the loop-safe convolution (backward formulations: autotuning `{s['autotune']}`).",
        "",
        "## Same function",
        "",
        'max |a − b| / max |b| against anode-jax `"direct"` with the same kernels (output '
        f"z_{s['blocks']}, then the kernels' gradient); tolerance {s['tolerance']:.0e}.",
        "",
        "| Nt | output | "
        + " | ".join(f"grad: {k}" for k in payload["checks"][0]["grad_rel_diff"])
        + " | passed |"
        if payload["checks"]
        else "",
        "|---|---|" + "---|" * (len(payload["checks"][0]["grad_rel_diff"]) + 1)
        if payload["checks"]
        else "",
    ]
    for c in payload["checks"]:
        lines.append(
            f"| {c['num_steps']} | {c['output_rel_diff']:.1e} | "
            + " | ".join(f"{v:.1e}" for v in c["grad_rel_diff"].values())
            + f" | {'yes' if c['passed'] else '**no**'} |"
        )
    lines += [
        "",
        "## One gradient",
        "",
        "| Nt | row | time | ÷ anode-jax `anode` | ÷ PyTorch direct | ÷ PyTorch checkpoint | "
        "÷ PyTorch ANODE-style | compiled temp | load (start, end) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += _gradient_rows(payload["rows"])
    earlier = payload.get("earlier_run")
    if earlier:
        lines += [
            "",
            "### An earlier run of the same table",
            "",
            f"The run that measured the profile and routes below (`{earlier['settings']['command']}`), "
            "under heavier load: " + _common.machine_header(earlier["machine"]),
            "",
            lines[-len(payload["rows"]) - 2],
            lines[-len(payload["rows"]) - 1],
        ]
        lines += _gradient_rows(earlier["rows"])
    p = payload.get("profile")
    if p:
        cats = p["categories"]
        total = sum(cats.values()) or 1.0
        lines += [
            "",
            f"## Where anode-jax's time goes (Nt = {p['num_steps']}, `{p['strategy']}`)",
            "",
            f"XLA:CPU per-op profile of one gradient (`jax.profiler.trace`, grouped as in "
            f"benchmarks/profile_step.py; formulations: {p['formulations']}). Sum of op times "
            f"{_ms(total)} against {_ms(p['wall_s'])} wall for the profiled call's "
            "unprofiled twin; the sum can exceed the wall time when two ops run at once on the "
            "two cores. `YNNPACK dots` are the per-tap matrix products of a `taps`/`gemm` "
            "conv-gradient formulation (XLA's library rewriter strips their metadata).",
            "",
            *_earlier(p)[1:],
            "",
            "| category | time per gradient | share |",
            "|---|---|---|",
        ]
        for c, v in cats.items():
            lines.append(f"| {c} | {_ms(v)} | {v / total:.0%} |")
        pieces = p["conv_pieces_s"]
        nt, L = p["num_steps"], payload["settings"]["blocks"]
        per_pass = L * nt * 4 * 2  # blocks × steps × RK4 stages × convolutions per field
        counts = {
            "forward": 2 * per_pass,  # forward pass + the recompute in backward
            "input gradient": per_pass,
            "weight gradient": per_pass,
        }
        chosen = p["formulations"]
        lines += [
            "",
            "One 3×3 convolution alone at the block's shape (32×16×16×16 → 16; median of 5 "
            "interleaved rounds of 20 calls; XLA programs compiled alone, PyTorch via "
            "`F.conv2d` / `aten.convolution_backward` with one output), and the count of each "
            f"in one `anode` gradient at Nt = {nt}: {counts['forward']:,} forwards (forward "
            f"pass and recompute), {per_pass:,} input and {per_pass:,} weight gradients.",
            "",
            "| piece | one call | × count per gradient |",
            "|---|---|---|",
        ]
        for name, sec in pieces.items():
            kind = next(k for k in counts if k in name)
            lines.append(f"| {name} | {sec * 1e3:.3f} ms | {_ms(sec * counts[kind])} |")
        inp = re.search(r"input (\w+)", chosen)
        wgt = re.search(r"weight (\w+)", chosen)
        if inp and wgt:
            xla = (
                pieces["XLA forward"] * counts["forward"]
                + pieces.get(f"XLA input gradient ({inp.group(1)})", np.nan) * per_pass
                + pieces.get(f"XLA weight gradient ({wgt.group(1)})", np.nan) * per_pass
            )
            pt = (
                pieces["PyTorch forward"] * counts["forward"]
                + (pieces["PyTorch input gradient"] + pieces["PyTorch weight gradient"]) * per_pass
            )
            lines += [
                "",
                f"Convolutions alone, with the formulations the program uses: {_ms(xla)} per "
                "gradient"
                + f" ({xla / p['wall_s']:.0%} of that run's unprofiled `anode` gradient, "
                f"{_ms(p['wall_s'])})"
                + f"; the same convolutions with PyTorch's kernels: {_ms(pt)}.",
            ]
    routes = payload.get("routes")
    if routes:
        rows = {r["row"]: r for r in routes["rows"]}
        base = rows["default"]["median_s"]
        lines += [
            "",
            f"## Routes for `anode` at Nt = {routes['num_steps']} (issue 23: XLA options, pinned "
            "formulations, host callbacks into PyTorch's convolutions)",
            "",
            "Each variant is the same `anode` gradient compiled once in this process (XLA option "
            "sets passed to that compilation; pins through `ANODE_JAX_CONV_*_GRADIENT` at its "
            f"trace), timed in interleaved rounds with PyTorch rows as references; load "
            f"{routes['load_average'][0]} → {routes['load_average'][1]}.",
            *_earlier(routes),
            "",
            "| variant | formulations | time | ÷ default | grad vs default | compile |",
            "|---|---|---|---|---|---|",
        ]
        for r in routes["rows"]:
            err = f"{r['grad_rel_diff']:.1e}" if "grad_rel_diff" in r else "–"
            cs = f"{r['compile_s']:.1f} s" if "compile_s" in r else "–"
            what = r.get("what", "")
            name = r["row"] + (f" (`{what}`)" if r["row"].startswith("XLA") else "")
            lines.append(
                f"| {name} | {r.get('formulations', '–')} | {_ms(r['median_s'])} "
                f"({_ms(r['least_s'])}) | {r['median_s'] / base:.2f}× | {err} | {cs} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
