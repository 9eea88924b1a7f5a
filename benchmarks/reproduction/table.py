"""Part 2 of the reproduction: the CIFAR-10 table (training runs, BN check, paper timing).

`run_config` builds a table cell's trainer config from `anode_jax.training.get_config`;
`run_table` trains every unfinished cell (resumable) and copies each finished run's results
to `docs/reproduction/<scale>/<run>/`; it writes no document (the command line regenerates
the report after each run through `on_run_done`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from benchmarks.reproduction.common import RESULTS, ROOT

TABLE_MODELS = ("resnet4", "alexnet", "resnet10", "sqnxt")
#: Training order: cheapest models first, so an interrupted table has whole models done.
RUN_ORDER = ("resnet4", "sqnxt", "alexnet", "resnet10")
TABLE_METHODS = ("baseline", "backsolve", "anode", "anodev2")
PAPER_METHOD_INDEX = {"baseline": 0, "backsolve": 1, "anode": 2}

#: CPU scale: the shared 10k/10k subset, channel widths and epochs sized for 2 CPU cores
#: (see docs/reproduction.md, "CPU-scale recipe"). Everything else is the paper recipe.
CPU_WIDTH = {"resnet4": 0.25, "alexnet": 0.125, "resnet10": 0.125, "sqnxt": 0.25}
CPU_EPOCHS = 4
CPU_BATCH = 128
CPU_SEEDS = (0, 1)
PAPER_SEEDS = (0,)
PAPER_FULL_TRAIN = 50_000


def scaled_milestones(epochs: int) -> tuple[int, ...]:
    """The paper's lr milestones (150, 250 of 350 epochs) at the same fractions of ``epochs``."""
    return tuple(sorted({max(1, round(epochs * m / 350)) for m in (150, 250)}))


def run_config(
    scale: str,
    model: str,
    method: str,
    seed: int,
    data_dir: str,
    *,
    epochs: int | None = None,
    width: float | None = None,
    train_size: int = 0,
    test_size: int = 0,
):
    """The trainer config of one table cell: ``configs/cifar10.py:MODEL-METHOD`` + scale.

    ``paper``: the config file unchanged (350 epochs, batch 256, lr 0.1 ÷10 at 150/250,
    Nt = 2, Euler; SqueezeNext with RK2 = midpoint). ``cpu``: same recipe with the
    :data:`CPU_WIDTH` channel multiplier, :data:`CPU_EPOCHS` epochs with the milestones at
    the same fractions, batch :data:`CPU_BATCH`.
    """
    from anode_jax.training import get_config

    c = get_config("cifar10", f"{model}-{method}")
    c.seed = int(seed)
    c.data.dir = data_dir
    if model == "sqnxt":
        c.model.solver = "midpoint"  # RK2, as the papers' SqueezeNext curves
    if scale == "cpu":
        c.model.width = CPU_WIDTH[model] if width is None else float(width)
        c.num_epochs = CPU_EPOCHS if epochs is None else int(epochs)
        c.optim.lr_milestones = scaled_milestones(c.num_epochs)
        c.batch_size = CPU_BATCH
        c.eval_batch_size = 1000
        c.log_every_steps = 20
        c.checkpoint_every_steps = 40  # a kill loses at most 40 steps
        c.progress_bar = False
        c.plots = False
    elif scale == "paper":
        if epochs is not None:
            c.num_epochs = int(epochs)
        if width is not None:
            c.model.width = float(width)
        c.progress_bar = False
    else:
        raise ValueError(f"scale must be 'cpu' or 'paper', got {scale!r}")
    if train_size:
        c.data.train_size = int(train_size)
        c.batch_size = min(c.batch_size, int(train_size))
    if test_size:
        c.data.test_size = int(test_size)
        c.eval_batch_size = min(c.eval_batch_size, int(test_size))
    return c


def run_name(model: str, method: str, seed: int) -> str:
    return f"{model}-{method}-s{seed}"


def _copy_results(workdir: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    for name in ("summary.json", "metrics.jsonl"):
        src = os.path.join(workdir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(dest, name))


def run_table(
    scale: str,
    data_dir: str,
    *,
    models=TABLE_MODELS,
    methods=TABLE_METHODS,
    seeds=None,
    runs_dir: str = os.path.join(ROOT, "runs", "reproduce"),
    results_dir: str = RESULTS,
    retry_failed: bool = False,
    on_run_done: Callable[[], None] | None = None,
    check_bn: bool = True,
    log=print,
    **overrides,
) -> list[dict[str, Any]]:
    """Train every (model, method, seed) not yet finished, in that order (seed-major per model).

    A run is finished when ``<results_dir>/<scale>/<run>/summary.json`` exists (copied from
    the workdir) or its workdir has a ``summary.json``; a run that diverged has a
    ``failed.json`` there and is skipped unless ``retry_failed``. Otherwise
    ``train_and_evaluate`` resumes it from its workdir's latest checkpoint. ``on_run_done``
    (e.g. ``write_report``) is called after each run that trained.
    """
    import jax

    from anode_jax.training import TrainingError, train_and_evaluate

    seeds = (CPU_SEEDS if scale == "cpu" else PAPER_SEEDS) if seeds is None else seeds
    done = []
    for model in sorted(models, key=lambda m: RUN_ORDER.index(m) if m in RUN_ORDER else 99):
        for seed in seeds:
            for method in methods:
                name = run_name(model, method, seed)
                workdir = os.path.join(runs_dir, scale, name)
                dest = os.path.join(results_dir, scale, name)
                if os.path.exists(os.path.join(dest, "summary.json")):
                    continue
                if os.path.exists(os.path.join(dest, "failed.json")) and not retry_failed:
                    continue
                if os.path.exists(os.path.join(workdir, "summary.json")):
                    _copy_results(workdir, dest)
                    continue
                config = run_config(scale, model, method, seed, data_dir, **overrides)
                log(f"[{time.strftime('%H:%M:%S')}] {scale} {name}: training in {workdir}")
                try:
                    summary = train_and_evaluate(config, workdir)
                except TrainingError as error:  # e.g. NaN loss: a result, recorded as such
                    os.makedirs(dest, exist_ok=True)
                    _copy_results(workdir, dest)
                    with open(os.path.join(dest, "failed.json"), "w") as f:
                        json.dump({"error": str(error), "config": config.to_dict()}, f, indent=1)
                    log(f"{name}: failed: {error}")
                    summary = None
                else:
                    _copy_results(workdir, dest)
                    if check_bn:
                        bn_check(scale, runs_dir=runs_dir, results_dir=results_dir, log=log)
                    log(
                        f"{name}: final test accuracy {summary['final_test_accuracy']:.4f}, "
                        f"{summary['wall_time_s']:.0f} s"
                    )
                done.append({"run": name, "summary": summary})
                jax.clear_caches()
                if on_run_done is not None:
                    on_run_done()
    return done


def load_runs(scale: str, results_dir: str = RESULTS) -> dict[str, dict[str, Any]]:
    """``{run name: {"summary", "records", "failed"}}`` from the committed results."""
    base = os.path.join(results_dir, scale)
    runs = {}
    if not os.path.isdir(base):
        return runs
    for name in sorted(os.listdir(base)):
        d = os.path.join(base, name)
        entry = {"summary": None, "records": [], "failed": None, "bn": None}
        if os.path.exists(os.path.join(d, "bn_check.json")):
            with open(os.path.join(d, "bn_check.json")) as f:
                entry["bn"] = json.load(f)
        if os.path.exists(os.path.join(d, "summary.json")):
            with open(os.path.join(d, "summary.json")) as f:
                entry["summary"] = json.load(f)
        if os.path.exists(os.path.join(d, "failed.json")):
            with open(os.path.join(d, "failed.json")) as f:
                entry["failed"] = json.load(f)
        if os.path.exists(os.path.join(d, "metrics.jsonl")):
            with open(os.path.join(d, "metrics.jsonl")) as f:
                entry["records"] = [json.loads(line) for line in f if line.strip()]
        if entry["summary"] or entry["failed"]:
            runs[name] = entry
    return runs


def plot_curves(scale: str, runs: dict[str, dict[str, Any]], out_dir: str) -> list[str]:
    """One figure per model: test accuracy per epoch and train loss per step, all methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "baseline": "tab:gray",
        "backsolve": "tab:red",
        "anode": "tab:blue",
        "anodev2": "tab:green",
    }
    styles = ["-", "--", ":", "-."]
    paths = []
    for model in TABLE_MODELS:
        names = [n for n in runs if n.startswith(model + "-") and runs[n]["records"]]
        if not names:
            continue
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
        for name in names:
            _, method, seed = name.rsplit("-", 2)
            style = styles[int(seed[1:]) % len(styles)]
            recs = runs[name]["records"]
            test = [r for r in recs if r["split"] == "test"]
            train = [r for r in recs if r["split"] == "train"]
            label = f"{method} {seed}"
            ax_acc.plot(
                [r["epoch"] for r in test],
                [r["accuracy"] for r in test],
                style,
                color=colors[method],
                marker="o",
                ms=3,
                label=label,
            )
            ax_loss.plot(
                [r["step"] for r in train],
                [r["loss"] for r in train],
                style,
                color=colors[method],
                label=label,
            )
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("test accuracy")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("train loss")
        ax_loss.set_yscale("log")
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
        ax_acc.legend(fontsize=7, ncol=2)
        fig.suptitle(f"CIFAR-10 {model} ({scale} scale)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{model}_curves.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def bn_check(
    scale: str,
    *,
    runs_dir: str = os.path.join(ROOT, "runs", "reproduce"),
    results_dir: str = RESULTS,
    batch: int = 1000,
    log=print,
) -> dict[str, Any]:
    """Test accuracy of each finished run's final checkpoint with BatchNorm's running
    averages (what the trainer reports) and with the statistics of each test batch of
    ``batch`` images. A large difference means the network's behaviour depends on
    statistics the running averages do not capture. Needs the run's workdir (checkpoints);
    writes ``bn_check.json`` next to the run's committed ``summary.json``.
    """
    import jax
    import jax.numpy as jnp
    import ml_collections

    from anode_jax.data import normalize
    from anode_jax.training import restore

    out = {}
    for name, entry in load_runs(scale, results_dir).items():
        dest = os.path.join(results_dir, scale, name, "bn_check.json")
        workdir = os.path.join(runs_dir, scale, name)
        if entry["summary"] is None or os.path.exists(dest):
            continue
        if not os.path.isdir(os.path.join(workdir, "checkpoints")):
            continue
        restored = restore(ml_collections.ConfigDict(entry["summary"]["config"]), workdir)
        ds, model, state = restored.dataset, restored.model, restored.state
        batch = min(batch, len(ds.test_labels))
        variables = {"params": state.params, "batch_stats": state.batch_stats}

        def make_correct(train: bool):
            def correct(images, labels):
                x = normalize(images, pixel_scale=ds.pixel_scale, mean=ds.mean, std=ds.std)
                if train:
                    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
                else:
                    logits = model.apply(variables, x, train=False)
                return jnp.sum(jnp.argmax(logits, -1) == labels)

            return jax.jit(correct)

        result = {}
        for mode, train in (("running_averages", False), ("batch_statistics", True)):
            correct = make_correct(train)
            hits, count = 0, 0
            for i in range(0, len(ds.test_labels) - batch + 1, batch):
                hits += int(correct(ds.test_images[i : i + batch], ds.test_labels[i : i + batch]))
                count += batch
            result[f"test_accuracy_{mode}"] = hits / count
        result["batch"] = batch
        result["step"] = restored.step
        with open(dest, "w") as f:
            json.dump(result, f, indent=1)
        out[name] = result
        log(f"{name}: {result}")
        jax.clear_caches()
    return out


# --------------------------------------------------------------------------------------------
# Part 3: time per epoch of the paper recipe on this machine


def time_paper(
    data_dir: str,
    *,
    models=TABLE_MODELS,
    method: str = "anode",
    steps: int = 3,
    runs_dir: str = os.path.join(ROOT, "runs", "reproduce", "paper_timing"),
    out_path: str = os.path.join(RESULTS, "paper_timing.json"),
    log=print,
) -> dict[str, Any]:
    """Seconds per full-CIFAR-10 epoch of the paper config, from ``steps`` trainer steps.

    Runs ``train_and_evaluate`` with the unchanged paper config (batch 256, width 1) on
    ``steps`` batches of the local data (``data.train_size = 256·steps``, one epoch) and a
    log line per step; the first step includes compilation and is excluded by the
    trainer's ``train_images_per_sec_median``. Epoch time = 50,000 / that rate.
    """
    import jax

    from anode_jax.training import train_and_evaluate

    results = {}
    if os.path.exists(out_path):
        with open(out_path) as f:
            results = json.load(f).get("models", {})
    for model in models:
        if model in results:
            continue
        c = run_config("paper", model, method, 0, data_dir, epochs=1)
        c.data.train_size = c.batch_size * steps
        c.data.test_size = c.eval_batch_size
        c.log_every_steps = 1
        c.plots = False
        workdir = os.path.join(runs_dir, model)
        shutil.rmtree(workdir, ignore_errors=True)
        log(f"[{time.strftime('%H:%M:%S')}] timing paper recipe: {model}-{method}, {steps} steps")
        summary = train_and_evaluate(c, workdir)
        ips = summary["train_images_per_sec_median"]
        results[model] = {
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": round(os.getloadavg()[0], 2),
            "method": method,
            "solver": c.model.solver,
            "batch_size": c.batch_size,
            "timed_steps": steps - 1,
            "train_images_per_sec_median": ips,
            "seconds_per_full_epoch": PAPER_FULL_TRAIN / ips,
            "hours_for_350_epochs": 350 * PAPER_FULL_TRAIN / ips / 3600,
            "param_count": summary["param_count"],
            "backend": summary["backend"],
        }
        log(f"{model}: {ips:.1f} images/s -> {PAPER_FULL_TRAIN / ips:.0f} s per epoch")
        from benchmarks._common import machine

        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump({"machine": machine(), "models": results}, f, indent=1)
        jax.clear_caches()
    return results
