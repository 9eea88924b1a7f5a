"""Throughput and time breakdown of one training step, per config.

    python benchmarks/bench_training.py                       # default + CIFAR resnet4/resnet ANODE
    python benchmarks/bench_training.py --configs=configs/cifar10.py:resnet4-anode --steps=5
    python benchmarks/bench_training.py --cprofile            # + cProfile of a short default run

For every config it reports: data loading, state initialization (compile + run), train-step
compile, steady-state step time and images/s (median over --steps timed steps, each
synchronized with block_until_ready), host batch preparation (gather + device_put), and
the eval step. CIFAR configs read the shared CIFAR-10 subset (../shared/data/cifar10)
when present, else random uint8 images of the same shape (flagged in the output).
Numbers are for the machine it runs on; see docs/training.md for the recorded ones.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from anode_jax.data import CIFAR_MEAN, CIFAR_STD, Dataset, TrainOrder, load_dataset  # noqa: E402
from anode_jax.training import (  # noqa: E402
    batch_sharded,
    build_model,
    compile_steps,
    get_config,
    init_state,
    make_lr_schedule,
    make_mesh,
    make_optimizer,
    param_count,
    put_batch,
)

SHARED = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10")
DEFAULT_CONFIGS = (
    "configs/default.py",
    "configs/cifar10.py:resnet4-anode",
    "configs/cifar10.py:resnet-anode",
)


def load_config(spec: str):
    """`configs/NAME.py[:ARG]` -> the package's config of that name (no file is executed)."""
    path, _, arg = spec.partition(":")
    return get_config(os.path.splitext(os.path.basename(path))[0], arg or None)


def dataset_for(config, n_needed: int) -> tuple[Dataset, str]:
    if config.data.name == "digits":
        return load_dataset("digits"), "digits"
    if config.data.name == "cifar10" and os.path.isdir(SHARED):
        return load_dataset(
            "cifar10", SHARED, train_size=max(n_needed, 1024), test_size=1024
        ), "shared CIFAR-10 subset"
    rng = np.random.default_rng(0)
    n = max(n_needed, 1024)
    classes = 100 if config.data.name == "cifar100" else 10
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, classes, n).astype(np.int32)
    return Dataset(
        config.data.name,
        x,
        y,
        x[:1024],
        y[:1024],
        classes,
        1 / 255,
        CIFAR_MEAN,
        CIFAR_STD,
        "synthetic",
    ), "synthetic random images"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t


def bench(spec: str, steps: int, batch_size: int | None, width: float | None) -> dict:
    config = load_config(spec)
    if batch_size:
        config.batch_size = batch_size
    if width:
        config.model.width = width
    bs = config.batch_size
    t = time.perf_counter()
    ds, source = dataset_for(config, bs * (steps + 2))
    t_data = time.perf_counter() - t
    mesh = make_mesh(config.num_devices)
    order = TrainOrder(ds.num_train, bs, config.seed)
    model = build_model(config, ds.num_classes)
    sched = make_lr_schedule(config, order.steps_per_epoch)
    tx = make_optimizer(config, sched)
    state, t_init = timed(lambda: init_state(model, tx, config.seed, ds.image_shape, mesh))
    train_step, eval_step = compile_steps(model, tx, ds, config.data, mesh, sched)
    bsh = batch_sharded(mesh)

    def batch(i):
        idx = order.indices(i % order.steps_per_epoch)
        return put_batch((ds.train_images[idx], ds.train_labels[idx]), bsh)

    prep = []
    for i in range(steps + 1):
        b, dt = timed(lambda: batch(i))
        prep.append(dt)
    x, y = batch(0)
    t = time.perf_counter()
    compiled = train_step.lower(state, x, y).compile()
    t_compile = time.perf_counter() - t
    (state, _), t_first = timed(lambda: compiled(state, x, y))
    times = []
    for i in range(steps):
        x, y = batch(i + 1)
        (state, m), dt = timed(lambda: compiled(state, x, y))
        times.append(dt)
    step_s = statistics.median(times)
    ebs = config.eval_batch_size
    ex, ey = ds.test_images[:ebs], ds.test_labels[:ebs]
    if ex.shape[0] < ebs:
        ebs = ex.shape[0] - ex.shape[0] % len(mesh.devices.flat)
        ex, ey = ex[:ebs], ey[:ebs]
    args = put_batch((ex, ey, np.ones(ebs, np.float32)), bsh)
    t = time.perf_counter()
    ecomp = eval_step.lower(state, *args).compile()
    t_ecompile = time.perf_counter() - t
    timed(lambda: ecomp(state, *args))
    etimes = [timed(lambda: ecomp(state, *args))[1] for _ in range(3)]
    return {
        "config": spec,
        "model": config.model.name,
        "method": config.model.method,
        "width": config.model.width,
        "num_steps": config.model.num_steps,
        "params": param_count(state.params),
        "batch_size": bs,
        "data_source": source,
        "devices": f"{len(mesh.devices.flat)}x {jax.default_backend()}",
        "data_load_s": t_data,
        "init_s": t_init,
        "train_compile_s": t_compile,
        "first_step_s": t_first,
        "step_s": step_s,
        "step_s_min": min(times),
        "images_per_sec": bs / step_s,
        "batch_prep_ms": 1e3 * statistics.median(prep),
        "eval_compile_s": t_ecompile,
        "eval_batch_size": ebs,
        "eval_images_per_sec": ebs / statistics.median(etimes),
        "final_loss": float(m["loss"]),
    }


def cprofile_default_run(epochs: int) -> str:
    """cProfile of a short default run; top functions by cumulative time."""
    from anode_jax.training import train_and_evaluate

    c = load_config("configs/default.py")
    c.num_epochs, c.progress_bar, c.plots = epochs, False, False
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as d:
        prof.enable()
        train_and_evaluate(c, d)
        prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(15)
    return out.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per config")
    ap.add_argument("--batch_size", type=int, default=0, help="override (0 = config's)")
    ap.add_argument("--width", type=float, default=0.0, help="override model.width (0 = config's)")
    ap.add_argument("--json", default="", help="also write results to this JSON file")
    ap.add_argument("--cprofile", action="store_true", help="cProfile a short default run")
    ap.add_argument("--cprofile_epochs", type=int, default=5)
    a = ap.parse_args()
    rows = []
    for spec in a.configs.split(","):
        r = bench(spec, a.steps, a.batch_size or None, a.width or None)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print()
    print(
        "| config | params | batch | images/s | step (ms) | batch prep (ms) | train compile (s) "
        "| init (s) | eval images/s | data |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| `{r['config'].replace('configs/', '')}` | {r['params']:,} | {r['batch_size']} "
            f"| {r['images_per_sec']:.0f} | {1e3 * r['step_s']:.1f} | {r['batch_prep_ms']:.2f} "
            f"| {r['train_compile_s']:.1f} | {r['init_s']:.1f} "
            f"| {r['eval_images_per_sec']:.0f} | {r['data_source']} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    if a.cprofile:
        print()
        print(cprofile_default_run(a.cprofile_epochs))


if __name__ == "__main__":
    main()
