"""The training loop: `train_and_evaluate(config, workdir)` and `evaluate(...)`.

Order of work at a global step `s` (`s` = optimizer steps completed):

1. train step on batch `s - 1` of the deterministic order (see anode_jax.data.pipeline);
2. at a log point (every `log_every_steps`, at epoch ends, at checkpoint steps and at
   the end) the window's per-step losses are fetched, checked for NaN/Inf and one
   `train` line is written to `metrics.jsonl`;
3. at an epoch end the test split is evaluated and a `test` line is written;
4. at a checkpoint step (every `checkpoint_every_steps` and at the end) the state is saved.

Because checkpoints fall on log points and lines are written before the checkpoint,
a run restored from step `s` truncates `metrics.jsonl` to `step <= s` and then
writes exactly the lines an uninterrupted run would have written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from anode_jax.data import Dataset, TrainOrder, eval_batches, load_dataset, pad_batch
from anode_jax.training import distributed
from anode_jax.training import sharding as shd
from anode_jax.training.checkpoints import Checkpointer
from anode_jax.training.config_validation import (
    INT32_MAX,
    divergence_hints,
    flat_config,
    validate_config,
)
from anode_jax.training.errors import ConfigError, TrainingError
from anode_jax.training.metrics import (
    MetricsLog,
    NonFiniteLoss,
    RecordWriter,
    summarize,
    train_record,
)
from anode_jax.training.steps import compile_steps
from anode_jax.training.tensorboard import truncate_events_after
from anode_jax.training.train_state import (
    TrainState,
    build_model,
    init_state,
    make_lr_schedule,
    make_optimizer,
    param_count,
)
from anode_jax.training.workdir import check_workdir
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


def _setup(config, workdir: str) -> _Setup:
    # Everything that can be checked without data or devices, before anything is written.
    notes = validate_config(config, num_devices=1 if config.distributed else None)
    check_workdir(workdir)
    if config.distributed:
        distributed.initialize()  # reads JAX_NUM_PROCESSES/JAX_PROCESS_ID (JAX does not)
        validate_config(config)  # the batch split over the devices of all processes
    is_main = jax.process_index() == 0
    for note in notes:
        _log(is_main, f"warning: {note}")
    dataset = load_dataset(
        config.data.name, config.data.dir, config.data.train_size, config.data.test_size
    )
    if config.batch_size > dataset.num_train:
        raise ConfigError(
            f"config.batch_size={config.batch_size} exceeds the {dataset.num_train} training "
            f"examples of {dataset.name}; lower it or raise config.data.train_size"
        )
    order = TrainOrder(dataset.num_train, config.batch_size, config.seed)
    if config.num_epochs * order.steps_per_epoch > INT32_MAX:
        raise ConfigError(
            f"config.num_epochs={config.num_epochs} makes {config.num_epochs} x "
            f"{order.steps_per_epoch} steps, more than the step counter holds ({INT32_MAX}); "
            f"an integer in [1, {INT32_MAX // order.steps_per_epoch}]"
        )
    # Before anything in the workdir is written: a second trainer must change nothing.
    lock = WorkdirLock(
        workdir, process_index=jax.process_index(), process_count=jax.process_count()
    ).acquire()
    try:
        return _setup_locked(config, workdir, is_main, lock, dataset, order)
    except BaseException:
        lock.release()
        raise


def _setup_locked(
    config, workdir: str, is_main: bool, lock: WorkdirLock, dataset: Dataset, order: TrainOrder
) -> _Setup:
    mesh = shd.make_mesh(config.num_devices)
    if jax.process_count() > 1:
        distributed.check_mesh_layout(mesh)
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


def _check_resume_config(meta, config, ckpt) -> None:
    old = meta.get("config")
    if not old:
        return
    new = flat_config(config)
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
    # A batch larger than the test split is clamped to it (rounded up to the devices).
    n = len(setup.mesh.devices.flat)
    batch = min(cfg.eval_batch_size, -(-ds.num_test // n) * n)
    tot = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    outs = []
    t = time.perf_counter()
    for lo, hi in eval_batches(ds.num_test, batch):
        x, y, mask = pad_batch(ds.test_images[lo:hi], ds.test_labels[lo:hi], batch)
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


def _compile_steps(setup: _Setup):
    return compile_steps(
        setup.model, setup.tx, setup.dataset, setup.config.data, setup.mesh, setup.schedule
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train `config` in `workdir` (resuming from its latest checkpoint); return the summary.

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
    workdir, cfg, ds, order = setup.workdir, setup.config, setup.dataset, setup.order
    spe, total, ckpt = setup.steps_per_epoch, setup.total_steps, setup.checkpointer
    state = setup.state
    start_step = int(_to_host(state.step))
    wall_offset = float((setup.restored_meta or {}).get("wall_time_s", 0.0))
    n_params = param_count(state.params)
    dropped = _prepare_outputs(setup, start_step)
    _log(setup, ds.describe())
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
        meta = {"step": step, "epoch": epoch, "batch_in_epoch": batch, "steps_per_epoch": spe}
        ckpt.save(state, {**meta, "wall_time_s": wall(), "config": flat_config(cfg)})

    writer = RecordWriter(
        workdir,
        is_main=setup.is_main,
        tensorboard=cfg.tensorboard,
        progress_bar=cfg.progress_bar,
        total_steps=total,
        start_step=start_step,
        num_epochs=cfg.num_epochs,
        desc=f"{cfg.model.name}-{cfg.model.method}",
    )
    window: list[dict[str, jax.Array]] = []
    win_t0, win_step0, last_lr = time.perf_counter(), start_step, None
    try:
        for step in range(start_step, total):
            idx = order.indices(step)
            images, labels = distributed.put_rows((ds.train_images, ds.train_labels), idx, bsh)
            state, m = train_step(state, images, labels)
            window.append(m)
            done, epoch = step + 1, step // spe + 1
            epoch_end = done % spe == 0
            ckpt_due = done % cfg.checkpoint_every_steps == 0 or done == total
            if done % cfg.log_every_steps == 0 or epoch_end or ckpt_due:
                try:
                    rec = train_record(
                        _to_host(window),
                        first_step=win_step0,
                        epoch=epoch,
                        batch_size=cfg.batch_size,
                        seconds=time.perf_counter() - win_t0,
                        wall_time_s=wall(),
                    )
                except NonFiniteLoss as e:
                    raise _diverged(setup, e, epoch) from None
                writer.write(rec)
                last_lr = rec["lr"]
                window, win_t0, win_step0 = [], time.perf_counter(), done
            if epoch_end and (epoch % cfg.eval_every_epochs == 0 or done == total):
                ev = _evaluate(setup, eval_step, state)
                writer.write(_test_record(ev, done, epoch, last_lr, wall()))
                win_t0 = time.perf_counter()  # keep eval time out of train throughput
            if ckpt_due:
                save(done)
            writer.step()
    finally:
        writer.close()
    if ckpt.latest_step() != total:
        save(total)  # e.g. a run whose final state predates this code path
    ckpt.close()
    if not setup.is_main:
        return {}
    return _write_summary(setup, n_params, int(_to_host(state.step)), wall())


def _prepare_outputs(setup: _Setup, start_step: int) -> int:
    """Drop metrics and events after `start_step`, write config.json; lines dropped."""
    if not setup.is_main:
        return 0
    dropped = MetricsLog(os.path.join(setup.workdir, "metrics.jsonl")).truncate_after(start_step)
    truncate_events_after(setup.workdir, start_step)  # TensorBoard: same steps as metrics.jsonl
    with open(os.path.join(setup.workdir, "config.json"), "w") as f:
        json.dump(setup.config.to_dict(), f, indent=2, default=list)
    return dropped


def _test_record(ev: dict[str, Any], step: int, epoch: int, lr, wall_time_s: float) -> dict:
    return {
        "step": step,
        "epoch": epoch,
        "split": "test",
        "loss": ev["loss"],
        "accuracy": ev["accuracy"],
        "lr": lr,
        "images_per_sec": ev["images_per_sec"],
        "num_examples": ev["num_examples"],
        "wall_time_s": wall_time_s,
    }


def _diverged(setup: _Setup, e: NonFiniteLoss, epoch: int) -> TrainingError:
    ckpt = setup.checkpointer
    ckpt.wait()
    last = ckpt.latest_step()
    hints = divergence_hints(setup.config)
    advice = (
        f"settings outside their usual range: {', '.join(hints)}; lower them or set "
        "optim.grad_clip_norm"
        if hints
        else "lower optim.learning_rate or set optim.grad_clip_norm"
    )
    return TrainingError(
        f"loss became {e.loss} at step {e.step} (epoch {epoch}); training stopped and nothing "
        f"after the last good checkpoint was saved (latest checkpoint: "
        f"{'step ' + str(last) if last is not None else 'none'} in {ckpt.directory}); {advice}"
    )


def _write_summary(setup: _Setup, n_params: int, steps: int, wall_time_s: float) -> dict:
    cfg, workdir = setup.config, setup.workdir
    records = MetricsLog(os.path.join(workdir, "metrics.jsonl")).read()
    summary = summarize(records)
    summary.update(
        {
            "param_count": n_params,
            "steps": steps,
            "epochs": cfg.num_epochs,
            "steps_per_epoch": setup.steps_per_epoch,
            "wall_time_s": wall_time_s,
            "num_devices": len(setup.mesh.devices.flat),
            "backend": jax.default_backend(),
            "dataset": setup.dataset.describe(),
            "config": cfg.to_dict(),
        }
    )
    _write_json(os.path.join(workdir, "summary.json"), summary)
    plots = []
    if cfg.plots:
        from anode_jax.training.plots import plot_curves

        title = f"{cfg.data.name} {cfg.model.name}-{cfg.model.method}"
        plots = plot_curves(records, workdir, title=title)
    _log(
        setup,
        f"final test accuracy {summary.get('final_test_accuracy', float('nan')):.4f} "
        f"(best {summary.get('best_test_accuracy', float('nan')):.4f}), "
        f"{summary['steps']} steps, {summary['wall_time_s']:.1f} s",
    )
    files = ["metrics.jsonl", "summary.json"] + [os.path.basename(p) for p in plots]
    _log(setup, f"results in {os.path.abspath(workdir)}: {', '.join(files)}, checkpoints/")
    return summary


@dataclasses.dataclass(frozen=True)
class Restored:
    """A workdir's latest checkpoint with the model and data it was trained on.

    `model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
    train=False)` evaluates it; `dataset` is the run's dataset (test split included,
    normalization constants in `mean`/`std`/`pixel_scale`); `step` the checkpoint's.
    """

    config: ml_collections.ConfigDict
    model: Any
    state: TrainState
    dataset: Dataset
    step: int


def restore(config: ml_collections.ConfigDict, workdir: str) -> Restored:
    """The latest checkpoint in `workdir`, restored exactly as a resume would (same config
    checks, same errors), for analysis: nothing is trained or written, and the workdir lock
    is released before returning. Raises `TrainingError` when there is no checkpoint.
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
    """Evaluate the latest checkpoint in `workdir` on the test split (`--eval_only`)."""
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
