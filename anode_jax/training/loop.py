"""The training loop: ``train_and_evaluate(config, workdir)`` and ``evaluate(...)``.

Order of work at a global step ``s`` (``s`` = optimizer steps completed):

1. train step on batch ``s - 1`` of the deterministic order (see anode_jax.data.pipeline);
2. at a log point (every ``log_every_steps``, at epoch ends, at checkpoint steps and at
   the end) the window's per-step losses are fetched, checked for NaN/Inf and one
   ``train`` line is written to ``metrics.jsonl``;
3. at an epoch end the test split is evaluated and a ``test`` line is written;
4. at a checkpoint step (every ``checkpoint_every_steps`` and at the end) the state is saved.

Because checkpoints fall on log points and lines are written before the checkpoint,
a run restored from step ``s`` truncates ``metrics.jsonl`` to ``step <= s`` and then
writes exactly the lines an uninterrupted run would have written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import warnings
from typing import Any

import jax
import ml_collections
import numpy as np

from anode_jax.data import Dataset, TrainOrder, eval_batches, load_dataset, pad_batch
from anode_jax.training import distributed
from anode_jax.training import sharding as shd
from anode_jax.training.checkpoints import Checkpointer
from anode_jax.training.config_validation import validate_config
from anode_jax.training.errors import ConfigError, TrainingError
from anode_jax.training.metrics import MetricsLog, summarize
from anode_jax.training.steps import make_eval_step, make_train_step
from anode_jax.training.tensorboard import TensorBoardWriter, truncate_events_after
from anode_jax.training.train_state import (
    TrainState,
    build_model,
    create_train_state,
    make_lr_schedule,
    make_optimizer,
    param_count,
)
from anode_jax.training.workdir_lock import WorkdirLock

# Keys that must match between a checkpoint and the config resuming it.
_RESUME_MUST_MATCH = (
    "seed",
    "batch_size",
    "data.name",
    "data.dir",
    "data.train_size",
    "data.augment",
    "data.crop_padding",
    "data.flip",
    "model.name",
    "model.method",
    "model.num_steps",
    "model.q",
    "model.norm",
    "model.width",
    "optim.name",
)


@dataclasses.dataclass
class _Setup:
    config: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    dataset: Dataset
    order: TrainOrder
    steps_per_epoch: int
    total_steps: int
    model: Any
    schedule: Any
    tx: Any
    state: TrainState
    checkpointer: Checkpointer
    restored_meta: dict[str, Any] | None
    is_main: bool
    lock: WorkdirLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _log(setup_or_flag, msg: str) -> None:
    is_main = setup_or_flag if isinstance(setup_or_flag, bool) else setup_or_flag.is_main
    if is_main:
        print(msg, flush=True)


def _flat(config) -> dict[str, Any]:
    out = {}

    def rec(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                rec(v, prefix + k + ".")
            else:
                out[prefix + k] = list(v) if isinstance(v, tuple) else v

    rec(config.to_dict() if hasattr(config, "to_dict") else config, "")
    return out


def _setup(config, workdir: str) -> _Setup:
    if config.distributed:
        validate_config(config, num_devices=1)  # names and sizes, before touching devices
        distributed.initialize()  # reads JAX_NUM_PROCESSES/JAX_PROCESS_ID (JAX does not)
    validate_config(config)
    is_main = jax.process_index() == 0
    # Before anything in the workdir is written: a second trainer must change nothing.
    lock = WorkdirLock(
        workdir, process_index=jax.process_index(), process_count=jax.process_count()
    ).acquire()
    try:
        return _setup_locked(config, workdir, is_main, lock)
    except BaseException:
        lock.release()
        raise


def _setup_locked(config, workdir: str, is_main: bool, lock: WorkdirLock) -> _Setup:
    mesh = shd.make_mesh(config.num_devices)
    if jax.process_count() > 1:
        distributed.check_mesh_layout(mesh)
    dataset = load_dataset(
        config.data.name, config.data.dir, config.data.train_size, config.data.test_size
    )
    if config.batch_size > dataset.num_train:
        raise ConfigError(
            f"config.batch_size={config.batch_size} exceeds the {dataset.num_train} training "
            f"examples of {dataset.name}; lower it or raise config.data.train_size"
        )
    order = TrainOrder(dataset.num_train, config.batch_size, config.seed)
    spe = order.steps_per_epoch
    model = build_model(config, dataset.num_classes)
    schedule = make_lr_schedule(config, spe)
    tx = make_optimizer(config, schedule)

    state = init_state(model, tx, config.seed, dataset.image_shape, mesh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    restored, meta, notes = ckpt.restore_latest(
        state, check_meta=lambda m: _check_resume_config(m, config, ckpt)
    )
    for note in notes:  # damaged checkpoints skipped (moved aside), one line each
        _log(is_main, note)
    if restored is not None:
        state = restored
    return _Setup(
        config,
        workdir,
        mesh,
        dataset,
        order,
        spe,
        config.num_epochs * spe,
        model,
        schedule,
        tx,
        state,
        ckpt,
        meta,
        is_main,
        lock,
    )


def init_state(model, tx, seed: int, image_shape, mesh) -> TrainState:
    """``create_train_state`` jit-compiled with a replicated output on ``mesh``.

    Initialization runs once: on CPU it is compiled without LLVM optimizations (~10x
    faster to compile, e.g. 0.4 s instead of 4.4 s for `small`; the values are the same
    deterministic function of the seed on every run).
    """

    def init_train_state():
        return create_train_state(model, tx, seed, image_shape)

    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    return (
        jax.jit(init_train_state, out_shardings=shd.replicated(mesh))
        .lower()
        .compile(compiler_options=opts)()
    )


def _check_resume_config(meta, config, ckpt) -> None:
    old = meta.get("config")
    if not old:
        return
    new = _flat(config)
    diffs = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in _RESUME_MUST_MATCH
        if old.get(k) != new.get(k)
    ]
    if diffs:
        raise TrainingError(
            f"{ckpt.directory} holds step {meta['step']} of a run with a different config "
            f"({'; '.join(diffs)}); resume with the same config or use a new --workdir"
        )


def _to_host(tree):
    """Fetch (replicated) results to numpy; works with multi-process arrays too."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def _evaluate(setup: _Setup, eval_step, state) -> dict[str, float]:
    cfg, ds = setup.config, setup.dataset
    bsh = shd.batch_sharded(setup.mesh)
    tot = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    outs = []
    t = time.perf_counter()
    for lo, hi in eval_batches(ds.num_test, cfg.eval_batch_size):
        x, y, mask = pad_batch(ds.test_images[lo:hi], ds.test_labels[lo:hi], cfg.eval_batch_size)
        outs.append(eval_step(state, *shd.put_batch((x, y, mask), bsh)))
    for o in _to_host(outs):
        for k in tot:
            tot[k] += float(o[k])
    dt = time.perf_counter() - t
    return {
        "loss": tot["loss_sum"] / tot["count"],
        "accuracy": tot["correct"] / tot["count"],
        "images_per_sec": tot["count"] / max(dt, 1e-9),
        "num_examples": int(tot["count"]),
    }


def compile_steps(model, tx, dataset: Dataset, data_config, mesh, schedule=None):
    """Jit the pure train/eval steps with explicit shardings on ``mesh``.

    Train step: ``(state, images, labels) -> (state, metrics)``, state replicated and
    donated, batch sharded along the mesh's data axis. Eval step:
    ``(state, images, labels, mask) -> sums``.
    """
    repl, bsh = shd.replicated(mesh), shd.batch_sharded(mesh)
    train_step = jax.jit(
        make_train_step(
            model,
            tx,
            pixel_scale=dataset.pixel_scale,
            mean=dataset.mean,
            std=dataset.std,
            augment=data_config.augment,
            crop_padding=data_config.crop_padding,
            flip=data_config.flip,
            schedule=schedule,
        ),
        in_shardings=(repl, bsh, bsh),
        out_shardings=(repl, repl),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(model, pixel_scale=dataset.pixel_scale, mean=dataset.mean, std=dataset.std),
        in_shardings=(repl, bsh, bsh, bsh),
        out_shardings=repl,
    )
    return train_step, eval_step


def _compile_steps(setup: _Setup):
    return compile_steps(
        setup.model, setup.tx, setup.dataset, setup.config.data, setup.mesh, setup.schedule
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint); return the summary.

    Holds the workdir's lock for the whole run (see training/workdir_lock.py).
    """
    with distributed.exit_at_once_on_error():
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    setup = _setup(config, workdir)
    try:
        return _train(setup)
    except OSError as e:  # e.g. metrics.jsonl on a full disk; checkpoint writes raise their own
        with contextlib.suppress(TrainingError):
            setup.checkpointer.wait()  # a save in flight first, so the message names the latest
        raise setup.checkpointer.write_error(e) from None
    finally:
        setup.release()


def _train(setup: _Setup) -> dict[str, Any]:
    with warnings.catch_warnings():  # in Jupyter without ipywidgets: a warning, then text bars
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm

    workdir = setup.workdir
    cfg, ds, order = setup.config, setup.dataset, setup.order
    spe, total = setup.steps_per_epoch, setup.total_steps
    ckpt = setup.checkpointer
    state = setup.state
    start_step = int(_to_host(state.step))
    meta = setup.restored_meta or {}
    wall_offset = float(meta.get("wall_time_s", 0.0))
    n_params = param_count(state.params)
    log = MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    dropped = 0  # counted by process 0, which alone prints it
    if setup.is_main:
        dropped = log.truncate_after(start_step)
        truncate_events_after(workdir, start_step)  # TensorBoard: same steps as metrics.jsonl
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2, default=list)
    _log(setup, f"{ds.describe()}")
    _log(
        setup,
        f"model {cfg.model.name} ({cfg.model.method}, solver {cfg.model.solver}, "
        f"Nt={cfg.model.num_steps}, adjoint {cfg.model.adjoint}): {n_params:,} parameters; "
        f"{len(setup.mesh.devices.flat)} device(s) [{jax.default_backend()}]",
    )
    if start_step:
        _log(
            setup,
            f"resumed from {ckpt.directory} at step {start_step}/{total} (epoch "
            f"{start_step // spe}, batch {start_step % spe}); dropped {dropped} "
            "metrics line(s) written after that checkpoint",
        )

    train_step, eval_step = _compile_steps(setup)
    bsh = shd.batch_sharded(setup.mesh)
    t_session = time.perf_counter()

    def wall() -> float:
        return wall_offset + time.perf_counter() - t_session

    def save(step: int) -> None:
        epoch, batch = order.position(step)
        ckpt.save(
            state,
            {
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch,
                "steps_per_epoch": spe,
                "wall_time_s": wall(),
                "config": _flat(cfg),
            },
        )

    tb = TensorBoardWriter(workdir) if setup.is_main and cfg.tensorboard else None
    window: list[dict[str, jax.Array]] = []
    win_t0, win_step0 = time.perf_counter(), start_step
    pbar = tqdm(
        total=total,
        initial=start_step,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not (cfg.progress_bar and setup.is_main),
        desc=f"{cfg.model.name}-{cfg.model.method}",
    )
    try:
        for step in range(start_step, total):
            idx = order.indices(step)
            images, labels = distributed.put_rows((ds.train_images, ds.train_labels), idx, bsh)
            state, m = train_step(state, images, labels)
            window.append(m)
            done = step + 1
            epoch = step // spe + 1
            epoch_end = done % spe == 0
            ckpt_due = done % cfg.checkpoint_every_steps == 0 or done == total
            if done % cfg.log_every_steps == 0 or epoch_end or ckpt_due:
                vals = _to_host(window)
                losses = np.asarray([v["loss"] for v in vals], np.float64)
                bad = np.flatnonzero(~np.isfinite(losses))
                if bad.size:
                    bad_step = win_step0 + int(bad[0]) + 1
                    ckpt.wait()
                    last = ckpt.latest_step()
                    raise TrainingError(
                        f"loss became {losses[bad[0]]} at step {bad_step} (epoch {epoch}); "
                        f"training stopped and nothing after the last good checkpoint was saved "
                        f"(latest checkpoint: "
                        f"{'step ' + str(last) if last is not None else 'none'} in "
                        f"{ckpt.directory}); lower optim.learning_rate or set "
                        "optim.grad_clip_norm"
                    )
                dt = time.perf_counter() - win_t0
                rec = {
                    "step": done,
                    "epoch": epoch,
                    "split": "train",
                    "loss": float(losses.mean()),
                    "accuracy": float(np.mean([v["accuracy"] for v in vals])),
                    "grad_norm": float(np.mean([v["grad_norm"] for v in vals])),
                    "lr": float(vals[-1]["lr"]),
                    "num_steps": len(vals),
                    "images_per_sec": len(vals) * cfg.batch_size / max(dt, 1e-9),
                    "wall_time_s": wall(),
                }
                if setup.is_main:
                    log.write(rec)
                    if tb:
                        tb.write(rec)
                pbar.set_postfix(
                    loss=f"{rec['loss']:.4f}",
                    acc=f"{rec['accuracy']:.3f}",
                    img_s=f"{rec['images_per_sec']:.0f}",
                    refresh=False,
                )
                last_lr = rec["lr"]
                window, win_t0, win_step0 = [], time.perf_counter(), done
            if epoch_end and (epoch % cfg.eval_every_epochs == 0 or done == total):
                ev = _evaluate(setup, eval_step, state)
                rec = {
                    "step": done,
                    "epoch": epoch,
                    "split": "test",
                    "loss": ev["loss"],
                    "accuracy": ev["accuracy"],
                    "lr": last_lr,
                    "images_per_sec": ev["images_per_sec"],
                    "num_examples": ev["num_examples"],
                    "wall_time_s": wall(),
                }
                if setup.is_main:
                    log.write(rec)
                    if tb:
                        tb.write(rec)
                    pbar.write(
                        f"epoch {epoch}/{cfg.num_epochs} step {done}: test accuracy "
                        f"{ev['accuracy']:.4f} loss {ev['loss']:.4f}"
                    )
                win_t0 = time.perf_counter()  # keep eval time out of train throughput
            if ckpt_due:
                save(done)
            pbar.update(1)
    finally:
        pbar.close()
        if tb:
            tb.close()
    if ckpt.latest_step() != total:
        save(total)  # e.g. a run whose final state predates this code path
    ckpt.close()

    summary = {}
    if setup.is_main:
        records = log.read()
        summary = summarize(records)
        summary.update(
            {
                "param_count": n_params,
                "steps": int(_to_host(state.step)),
                "epochs": cfg.num_epochs,
                "steps_per_epoch": spe,
                "wall_time_s": wall(),
                "num_devices": len(setup.mesh.devices.flat),
                "backend": jax.default_backend(),
                "dataset": ds.describe(),
                "config": cfg.to_dict(),
            }
        )
        _write_json(os.path.join(workdir, "summary.json"), summary)
        plots = []
        if cfg.plots:
            from anode_jax.training.plots import plot_curves

            plots = plot_curves(
                records, workdir, title=f"{cfg.data.name} {cfg.model.name}-{cfg.model.method}"
            )
        _log(
            setup,
            (
                f"final test accuracy {summary.get('final_test_accuracy', float('nan')):.4f} "
                f"(best {summary.get('best_test_accuracy', float('nan')):.4f}), "
                f"{summary['steps']} steps, {summary['wall_time_s']:.1f} s"
            ),
        )
        files = ["metrics.jsonl", "summary.json"] + [os.path.basename(p) for p in plots]
        _log(setup, f"results in {os.path.abspath(workdir)}: {', '.join(files)}, checkpoints/")
    return summary


@dataclasses.dataclass(frozen=True)
class Restored:
    """A workdir's latest checkpoint with the model and data it was trained on.

    ``model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
    train=False)`` evaluates it; ``dataset`` is the run's dataset (test split included,
    normalization constants in ``mean``/``std``/``pixel_scale``); ``step`` the checkpoint's.
    """

    config: ml_collections.ConfigDict
    model: Any
    state: TrainState
    dataset: Dataset
    step: int


def restore(config: ml_collections.ConfigDict, workdir: str) -> Restored:
    """The latest checkpoint in ``workdir``, restored exactly as a resume would (same config
    checks, same errors), for analysis: nothing is trained or written, and the workdir lock
    is released before returning. Raises :class:`TrainingError` when there is no checkpoint.
    """
    setup = _setup_existing(config, workdir, "restore")
    try:
        setup.checkpointer.close()
        return Restored(
            config, setup.model, setup.state, setup.dataset, int(setup.restored_meta["step"])
        )
    finally:
        setup.release()


def _setup_existing(config, workdir: str, what: str) -> _Setup:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        validate_config(config)
        raise TrainingError(
            f"{what}: no checkpoints in {os.path.abspath(ckpt_dir)}; "
            "train first (same command without --eval_only)"
        )
    setup = _setup(config, workdir)
    if setup.restored_meta is None:
        setup.release()
        raise TrainingError(
            f"{what}: no checkpoint in {setup.checkpointer.directory}; "
            "train first (same command without --eval_only)"
        )
    return setup


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluate the latest checkpoint in ``workdir`` on the test split (``--eval_only``)."""
    setup = _setup_existing(config, workdir, "--eval_only")
    try:
        return _evaluate_restored(setup)
    finally:
        setup.release()


def _evaluate_restored(setup: _Setup) -> dict[str, Any]:
    workdir = setup.workdir
    _, eval_step = _compile_steps(setup)
    ev = _evaluate(setup, eval_step, setup.state)
    setup.checkpointer.close()
    out = {
        "step": int(setup.restored_meta["step"]),
        "split": "test",
        "loss": ev["loss"],
        "accuracy": ev["accuracy"],
        "num_examples": ev["num_examples"],
        "checkpoint": setup.checkpointer.directory,
    }
    if setup.is_main:
        _write_json(os.path.join(workdir, "eval.json"), out)
        _log(
            setup,
            f"checkpoint step {out['step']}: test accuracy {ev['accuracy']:.4f}, "
            f"loss {ev['loss']:.4f} on {ev['num_examples']} images; written to "
            f"{os.path.abspath(os.path.join(workdir, 'eval.json'))}",
        )
    return out


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
        f.write("\n")
    os.replace(tmp, path)
