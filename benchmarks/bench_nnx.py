"""NNX training step vs the Linen step for the same network: time (interleaved) and memory.

    .venv/bin/python benchmarks/bench_nnx.py            # writes docs/bench_nnx.{json,md}
    .venv/bin/python benchmarks/bench_nnx.py --quick    # tiny run, prints only

The network is the digits network `small` (`anode_jax.models.SmallNet`: stem, ODE block,
strided conv, ODE block, head; BatchNorm everywhere, Euler N_t = 2, ANODE gradient), one
AdamW step on a batch of real digits. Variants:

* `linen`: `models.create_model("small")`, `jax.jit` of `value_and_grad` + optax (the trainer's
  structure);
* `nnx blocks`: the same network written in NNX (`nnx.Conv`/`nnx.BatchNorm`/`nnx.Linear`, the
  vector fields in `anode_jax.nnx.ODEBlock`), same arithmetic;
* `nnx bridge`: `anode_jax.nnx.create_model("small")` (the Linen definition through
  `flax.nnx.bridge`);

each NNX variant stepped two ways: `nnx.jit` on `(model, optimizer)` (NNX's graph traversal
on every call), and `jax.jit` of a pure function of the split state (`nnx.split` once,
`nnx.merge` inside the trace: no per-call Python work). Times are medians over interleaved
repeats (every repeat runs each variant once, in turn), reported as ratios to `linen`
measured in the same run; memory is the compiled `temp_size_in_bytes` of each step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
import _common

from anode_jax import models
from anode_jax import nnx as anx
from anode_jax.data import load_digits, preprocess


class Field(nnx.Module):
    """NNX twin of `models.ResNetVectorField(C)`: conv–BN–ReLU twice, loop-safe conv."""

    def __init__(self, c, *, rngs):
        conv = dict(padding="SAME", use_bias=False, conv_general_dilated=anx.conv_general_dilated)
        self.conv1 = nnx.Conv(c, c, (3, 3), **conv, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.conv2 = nnx.Conv(c, c, (3, 3), **conv, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c, epsilon=1e-5, use_fast_variance=False, rngs=rngs)

    def __call__(self, t, z):
        h = nnx.relu(self.bn1(self.conv1(z)))
        return nnx.relu(self.bn2(self.conv2(h)))


class SmallNet(nnx.Module):
    """NNX twin of `models.SmallNet` (same layers, same arithmetic)."""

    def __init__(self, width, num_steps, solver, adjoint, *, rngs):
        c1, c2 = round(32 * width), round(64 * width)
        conv = dict(padding="SAME", use_bias=False, conv_general_dilated=anx.conv_general_dilated)
        bn = dict(momentum=0.9, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        block = dict(num_steps=num_steps, solver=solver, adjoint=adjoint)
        self.stem = nnx.Conv(1, c1, (3, 3), **conv, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(c1, **bn)
        self.ode1 = anx.ODEBlock(Field(c1, rngs=rngs), **block)
        self.down = nnx.Conv(c1, c2, (3, 3), strides=2, **conv, rngs=rngs)
        self.down_bn = nnx.BatchNorm(c2, **bn)
        self.ode2 = anx.ODEBlock(Field(c2, rngs=rngs), **block)
        self.head = nnx.Linear(c2, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.stem_bn(self.stem(x)))
        h = self.ode1(h)
        h = nnx.relu(self.down_bn(self.down(h)))
        h = self.ode2(h)
        return self.head(jnp.mean(h, axis=(1, 2)))


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def linen_variant(args, tx, norm, images, labels):
    model = models.create_model(
        "small", width=args.width, num_steps=args.num_steps, solver=args.solver
    )
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
    params, stats = variables["params"], variables["batch_stats"]
    carry = (params, stats, tx.init(params))

    def step(carry, images, labels):
        params, stats, opt_state = carry
        x = preprocess(images, key=None, **norm)

        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return _loss(logits, labels), upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), loss

    return _pure(step, carry, images, labels)


def _nnx_step(norm):
    def step(model, optimizer, images, labels):
        x = preprocess(images, key=None, **norm)
        loss, grads = nnx.value_and_grad(lambda m: _loss(m(x), labels))(model)
        optimizer.update(model, grads)
        return loss

    return step


def nnx_variants(make_model, tx, norm, images, labels):
    """`(nnx.jit runner, pure-jit runner)` for a freshly built model each."""
    inner = _nnx_step(norm)

    model = make_model()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    jitted = nnx.jit(inner)
    jax.block_until_ready(jitted(model, optimizer, images, labels))  # compile

    def run_nnx_jit():
        return jitted(model, optimizer, images, labels)

    model2 = make_model()
    optimizer2 = nnx.Optimizer(model2, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model2, optimizer2))

    def step(state, images, labels):
        model, optimizer = nnx.merge(graphdef, state)
        loss = inner(model, optimizer, images, labels)
        return nnx.state((model, optimizer)), loss

    return run_nnx_jit, _pure(step, state, images, labels)


def _pure(step, carry, images, labels):
    """A runner that carries the state of a `jax.jit`-compiled step, and its temp bytes."""
    temp, _, compiled = _common.compiled_temp_bytes(step, carry, images, labels)
    box = [carry]

    def run():
        box[0], loss = compiled(box[0], images, labels)
        return loss

    jax.block_until_ready(run())
    run.temp_bytes = temp
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--num-steps", type=int, default=2)
    parser.add_argument("--solver", default="euler")
    parser.add_argument("--repeats", type=int, default=21, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timing")
    parser.add_argument("--quick", action="store_true", help="tiny run; writes nothing")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.width, args.repeats, args.steps = 32, 0.25, 3, 2

    data = load_digits()
    images = jnp.asarray(data.train_images[: args.batch])
    labels = jnp.asarray(data.train_labels[: args.batch])
    norm = dict(pixel_scale=data.pixel_scale, mean=data.mean, std=data.std)
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    block = dict(num_steps=args.num_steps, solver=args.solver, adjoint="anode")
    load = [os.getloadavg()[0]]

    runners = {"linen": linen_variant(args, tx, norm, images, labels)}
    native = lambda: SmallNet(args.width, rngs=nnx.Rngs(0), **block)
    bridge = lambda: anx.create_model(
        "small", input_shape=(8, 8, 1), rngs=nnx.Rngs(0), width=args.width, **block
    )
    for name, make in (("nnx blocks", native), ("nnx bridge", bridge)):
        eager, pure = nnx_variants(make, tx, norm, images, labels)
        runners[f"{name}, nnx.jit"] = eager
        runners[f"{name}, jax.jit(split state)"] = pure
    load.append(os.getloadavg()[0])

    samples = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():  # interleaved: load drifts hit every variant alike
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = run()
            jax.block_until_ready(loss)
            samples[name].append((time.perf_counter() - start) / args.steps)
        load.append(os.getloadavg()[0])

    base = statistics.median(samples["linen"])
    rows = []
    for name, times in samples.items():
        # Ratio per round (same moment, same load), then the median over rounds.
        ratios = [t / b for t, b in zip(times, samples["linen"])]
        temp = getattr(runners[name], "temp_bytes", None)
        rows.append(
            {
                "variant": name,
                "step_ms": 1e3 * statistics.median(times),
                "ratio_to_linen": statistics.median(ratios),
                "temp_bytes": temp,
            }
        )
    linen_temp = runners["linen"].temp_bytes
    payload = {
        "machine": {
            **_common.machine(),
            "flax": flax.__version__,
            "optax": optax.__version__,
            "loadavg_1min": {"min": min(load), "median": statistics.median(load), "max": max(load)},
        },
        "setup": {**vars(args), "network": "small", "adjoint": "anode", "optimizer": "adamw"},
        "linen_step_ms": 1e3 * base,
        "linen_temp_bytes": linen_temp,
        "rows": rows,
    }
    markdown = to_markdown(payload)
    print(markdown)
    if not args.quick:
        _common.write_results("bench_nnx", payload, markdown)


def to_markdown(payload) -> str:
    m, s = payload["machine"], payload["setup"]
    load = m["loadavg_1min"]
    lines = [
        "# NNX vs Linen training step (`benchmarks/bench_nnx.py`)",
        "",
        "Generated from `docs/bench_nnx.json`; do not edit by hand.",
        "",
        f"Machine: {m['cpu_model']} ({m['cpu_count']} CPUs), {m['backend']}; jax {m['jax']}, "
        f"jaxlib {m['jaxlib']}, flax {m['flax']}, optax {m['optax']}; "
        f"XLA_FLAGS=`{m['xla_flags'] or '(unset)'}`; 1-min load average during the run "
        f"{load['min']:.1f}–{load['max']:.1f} (median {load['median']:.1f}); {m['date']}.",
        "",
        f"Network `{s['network']}` (width {s['width']}, {s['solver']}, N_t = {s['num_steps']}, "
        f"{s['adjoint']} gradient, BatchNorm), one {s['optimizer']} step on {s['batch']} real "
        f"digits; medians of {s['repeats']} interleaved rounds of {s['steps']} steps; ratio = "
        "median over rounds of (variant / linen) in the same round.",
        "",
        "| variant | step (ms) | ratio to linen | compiled temp (bytes) | memory vs linen |",
        "|---|---:|---:|---:|---:|",
    ]
    base_temp = payload["linen_temp_bytes"]
    for r in payload["rows"]:
        temp = r["temp_bytes"]
        mem = "—" if temp is None else f"{temp / base_temp:.3f}×"
        temp_s = "(same program as the pure step)" if temp is None else f"{temp:,}"
        lines.append(
            f"| {r['variant']} | {r['step_ms']:.2f} | {r['ratio_to_linen']:.3f}× | {temp_s} | {mem} |"
        )
    lines += [
        "",
        "Target (issue 21): NNX step within 1.1× of the Linen step, same compiled memory.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
