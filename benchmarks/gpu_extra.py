"""GPU figures, second part: output times against diffrax (issue 19) and `sqnxt` against the
original PyTorch ANODE code (issue 23), on whatever accelerator JAX and torch find.

Run on a device machine from the project root, with the original code (MIT) at `--peer_dir`:

    PYTHONPATH=. python3 benchmarks/gpu_extra.py --peer_dir=<dir> --out $OUT/gpu_extra.json
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_extra.py --smoke --peer_dir=<dir>   # CPU check
    PYTHONPATH=. python3 benchmarks/gpu_extra.py --parts times --outputs 100 --steps 1 4 ...

Parts (time: median of interleaved repeats after two warm-ups; memory: XLA's compiled
`temp_size_in_bytes` for JAX, `torch.cuda.max_memory_allocated` for torch):
  sqnxt  one SGD step, batch 128, Euler Nt = 2: anode-jax "anode" / "direct"; the original
         code's `odesolver_adjoint`, `torch.utils.checkpoint` around `odesolver`, plain autograd.
  times  `benchmarks/bench_times.py`'s problem and rows (every strategy, diffrax
         `RecursiveCheckpointAdjoint` / `DirectAdjoint`) at n in {100, 1000}, N in {1, 4}.
The JSON is rewritten after each part and configuration, so a run cut short keeps its rows.
The figures are in docs/benchmarks.md ("On a GPU").
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _write(rows, out):
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


def interleaved(fns, repeats):
    for f in fns.values():
        f()
        f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def times_part(a, rows, out):
    import _common
    import bench_times as bt
    import jax
    import jax.numpy as jnp
    import numpy as np

    params, y0 = bt.make_problem()
    names = [row for row, _, _ in bt.STRATEGIES] + bt.DIFFRAX
    for n in a.outputs:
        ts = np.linspace(0.0, n / 100, n).astype(np.float32)
        target = jnp.zeros((n, bt.BATCH, 2))
        for N in a.steps:
            fns, mem, comp = {}, {}, {}
            for r in names:
                grad = bt.make_grad(bt.make_solve(r, ts, N), target)
                temp, comp[r], c = _common.compiled_temp_bytes(grad, params, y0)
                mem[r] = temp / 2**20
                fns[r] = lambda c=c: jax.block_until_ready(c(params, y0))
            sec = interleaved(fns, a.repeats)
            for r in names:
                row = dict(
                    part="times",
                    n=n,
                    N=N,
                    row=r,
                    ms=1e3 * sec[r],
                    ratio=sec[r] / sec["diffrax recursive"],
                    temp_mib=mem[r],
                    compile_s=comp[r],
                )
                rows.append(row)
                print(row, flush=True)
            _write(rows, out)


def sqnxt_part(a, rows, out):
    import jax
    import jax.numpy as jnp
    import optax

    from anode_jax.models import create_model

    x = jax.random.normal(jax.random.PRNGKey(1), (a.rbatch, 32, 32, 3))
    y = jnp.arange(a.rbatch) % 10
    tx = optax.sgd(0.1, momentum=0.9)
    fns, mem = {}, {}
    for adj in ("anode", "direct"):
        m = create_model(
            a.rmodel, num_classes=10, block="ode", num_steps=2, solver="euler", adjoint=adj
        )
        v = m.init({"params": jax.random.PRNGKey(0)}, x[:2], train=False)
        params, stats = v["params"], v.get("batch_stats", {})
        opt = tx.init(params)

        def step(params, stats, opt, x, y, m=m):
            def loss(p):
                logits, upd = m.apply(
                    {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
                )
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd[
                    "batch_stats"
                ]

            (loss_value, st), g = jax.value_and_grad(loss, has_aux=True)(params)
            u, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, u), st, opt, loss_value

        c = jax.jit(step).lower(params, stats, opt, x, y).compile()
        mem["jax " + adj] = c.memory_analysis().temp_size_in_bytes / 2**20
        fns["jax " + adj] = lambda c=c, p=params, s=stats, o=opt: jax.block_until_ready(
            c(p, s, o, x, y)
        )
    sec = interleaved(fns, a.repeats)
    for k in fns:
        rows.append(dict(part=a.rmodel, row=k, ms=1e3 * sec[k], temp_mib=mem[k]))
        print(rows[-1], flush=True)
    _write(rows, out)
    import torch
    import torch.nn as nn
    from torch.utils.checkpoint import checkpoint

    sys.path.insert(0, a.peer_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        import models.sqnxt
        from anode import odesolver, odesolver_adjoint
        from models.sqnxt import SqNxt_23_1x

    from bench_peer import sqnxt_block_forward

    models.sqnxt.BasicBlock.forward = sqnxt_block_forward
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tx_ = torch.randn(a.rbatch, 3, 32, 32, device=dev)
    ty = torch.arange(a.rbatch, device=dev) % 10
    for variant in ("original", "checkpoint", "direct"):

        class ODEBlock(nn.Module):
            def __init__(self, odefunc):
                super().__init__()
                self.odefunc = odefunc
                self.options = {"Nt": 2, "method": "Euler"}

            def forward(self, x):
                if variant == "original":
                    return odesolver_adjoint(self.odefunc, x, self.options)
                if variant == "checkpoint":
                    return checkpoint(odesolver, self.odefunc, x, self.options, use_reentrant=False)
                return odesolver(self.odefunc, x, self.options)

        with contextlib.redirect_stdout(io.StringIO()):
            net = SqNxt_23_1x(10, ODEBlock).to(dev)
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        crit = nn.CrossEntropyLoss()

        def step():
            opt.zero_grad()
            crit(net(tx_), ty).backward()
            opt.step()
            if dev == "cuda":
                torch.cuda.synchronize()

        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        s = interleaved({"s": step}, a.repeats)["s"]
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else float("nan")
        rows.append(dict(part=a.rmodel, row="torch " + variant, ms=1e3 * s, peak_mib=peak))
        print(rows[-1], flush=True)
    _write(rows, out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_extra.json")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check on a CPU")
    ap.add_argument("--peer_dir", default=".gpu/peers/anode", help="the original ANODE code")
    ap.add_argument("--parts", nargs="+", choices=("sqnxt", "times"), default=["sqnxt", "times"])
    ap.add_argument("--outputs", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    a = ap.parse_args()
    if a.smoke:
        a.outputs, a.steps, a.repeats, a.rbatch, a.rmodel = (10,), (1,), 2, 4, "sqnxt"
    else:
        a.repeats, a.rbatch, a.rmodel = 5, 128, "sqnxt"
    import jax

    print(dict(jax=jax.__version__, devices=[str(d) for d in jax.devices()]), flush=True)
    rows = []
    if "sqnxt" in a.parts:
        sqnxt_part(a, rows, a.out)
    if "times" in a.parts:
        times_part(a, rows, a.out)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
