"""Faults: kill -9 at random moments, a second trainer on a busy workdir, damaged
checkpoints, a full disk. Every end-to-end case is compared with one uninterrupted run.

The end-to-end runs are ``train.py`` processes on a tiny digits config (512 images, batch
32: 16 steps per epoch, 4 epochs, a checkpoint every 5 steps). The signals go to the
trainer process itself, never to a wrapper.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from anode_jax.training import (
    DAMAGED_DIRNAME,
    Checkpointer,
    CheckpointReadError,
    CheckpointWriteError,
    MetricsLog,
    TrainingError,
    TrainState,
    WorkdirBusyError,
    WorkdirLock,
    evaluate,
    train_and_evaluate,
)
from tests._training_helpers import (
    DETERMINISTIC,
    PY,
    REPO,
    RESUME_CMD,
    RESUME_STEPS,
    records,
    resume_env,
    resume_reference,
    subprocess_env,
    tiny_digits,
)

TOTAL_STEPS = RESUME_STEPS
CMD = RESUME_CMD
SUMMARY_KEYS = (
    "final_test_accuracy",
    "best_test_accuracy",
    "best_test_epoch",
    "final_test_loss",
    "final_train_loss",
    "final_train_accuracy",
    "param_count",
    "steps",
)


# ------------------------------------------------------------------ helpers and fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return resume_env(tmp_path_factory)


def run_cli(workdir: Path, env: dict, cmd=CMD, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*cmd, f"--workdir={workdir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(workdir: Path, env: dict, out: Path) -> subprocess.Popen:
    with open(out, "w") as f:  # the child keeps its own descriptor
        return subprocess.Popen(
            [*CMD, f"--workdir={workdir}"], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT
        )


def saving_now(workdir: Path) -> bool:
    """Whether a checkpoint save is in progress (orbax writes into `<step>.orbax-checkpoint-tmp`
    and renames it when complete)."""
    folder = workdir / "checkpoints"
    return folder.is_dir() and any(
        p.name.endswith(".orbax-checkpoint-tmp") for p in folder.iterdir()
    )


def wait_until(pred, proc: subprocess.Popen, what: str, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not pred():
        assert proc.poll() is None, f"the trainer exited (status {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Workdir of the uninterrupted run (read-only: copy it before changing anything); one
    per session, shared with tests/test_training.py."""
    return resume_reference(tmp_path_factory)


def assert_same_results(reference: Path, workdir: Path) -> None:
    """Identical summary metrics and metrics.jsonl lines (timing fields aside)."""
    sa = json.loads((reference / "summary.json").read_text())
    sb = json.loads((workdir / "summary.json").read_text())
    assert {k: sa[k] for k in SUMMARY_KEYS} == {k: sb[k] for k in SUMMARY_KEYS}
    ra = [{k: r.get(k) for k in DETERMINISTIC} for r in records(reference)]
    rb = [{k: r.get(k) for k in DETERMINISTIC} for r in records(workdir)]
    assert ra == rb


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, r.stderr[-3000:]
    return err[0]


def steps_on_disk(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``root``: (size, mtime_ns, contents)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, p.read_bytes())
    return out


def truncate_files(folder: Path) -> list[str]:
    """Cut every file under ``folder`` to half its size (a partial copy); their names."""
    names = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            os.truncate(p, p.stat().st_size // 2)
            names.append(str(p.relative_to(folder)))
    return names


# ------------------------------------------------------------------ the workdir lock


def test_workdir_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [
            PY,
            "-c",
            "import sys, time\n"
            "from anode_jax.training import WorkdirLock\n"
            "WorkdirLock(sys.argv[1]).acquire()\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n",
            str(tmp_path),
        ],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            WorkdirBusyError, match=rf"--workdir {tmp_path} is in use by process {holder.pid} on "
        ) as e:
            WorkdirLock(str(tmp_path)).acquire()
        assert "\n" not in str(e.value)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # The lock file outlives the killed holder; the kernel lock does not.
    assert (tmp_path / "trainer.lock").exists()
    lock = WorkdirLock(str(tmp_path)).acquire()
    assert (tmp_path / "trainer.lock").read_text().startswith(f"process {os.getpid()} on ")
    with pytest.raises(WorkdirBusyError):  # a second open file in the same process is refused too
        WorkdirLock(str(tmp_path)).acquire()
    # Multi-process runs: one lock per process index.
    other = WorkdirLock(str(tmp_path), process_index=1, process_count=2).acquire()
    assert other.path.endswith("trainer.lock.process-1")
    other.release()
    lock.release()
    WorkdirLock(str(tmp_path)).acquire().release()


# ------------------------------------------------------------------ restore fallback (unit)


def _state(step: int, scale: float = 1.0, extra: bool = False) -> TrainState:
    params = {"w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3) * scale}
    if extra:
        params["v"] = jnp.ones(3, jnp.float32)
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        batch_stats={"mean": jnp.full(3, scale, jnp.float32)},
        opt_state={"mu": jnp.zeros((2, 3), jnp.float32)},
        rng=jnp.asarray([0, step], jnp.uint32),
    )


def _saved(directory: Path, damage_newest=None) -> Checkpointer:
    ck = Checkpointer(str(directory), max_to_keep=3, async_save=False)
    for s in (1, 2, 3):
        ck.save(_state(s, scale=float(s)), {"step": s, "config": {"seed": 0}})
    ck.close()
    if damage_newest is not None:
        damage_newest(directory / "3")
    return Checkpointer(str(directory), max_to_keep=3, async_save=False)


def _garbage(rel: str):
    def damage(step_dir: Path) -> None:
        (step_dir / rel).write_text("{not json")

    return damage


def _remove_largest_state_file(step_dir: Path) -> None:
    """A partial copy: the largest array data file is missing."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    max(files, key=lambda p: p.stat().st_size).unlink()


def _other_tree(step_dir: Path) -> None:
    """Replace checkpoint 3 by one of a different model (an extra parameter)."""
    tmp = step_dir.parent.parent / "other"
    ck = Checkpointer(str(tmp), async_save=False)
    ck.save(_state(3, extra=True), {"step": 3, "config": {"seed": 0}})
    ck.close()
    shutil.rmtree(step_dir)
    shutil.move(tmp / "3", step_dir)


def _meta_names_other_step(step_dir: Path) -> None:
    (step_dir / "meta" / "metadata").write_text('{"step": 7, "config": {"seed": 0}}')


DAMAGES = {
    "truncated files": truncate_files,
    "missing state file": _remove_largest_state_file,
    "meta does not parse": _garbage("meta/metadata"),
    "state metadata does not parse": _garbage("state/_METADATA"),
    "tree does not match": _other_tree,
    "meta names another step": _meta_names_other_step,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_restore_skips_a_damaged_newest_checkpoint_and_keeps_it_aside(tmp_path, damage):
    ck = _saved(tmp_path / "checkpoints", DAMAGES[damage])
    files_before = sorted(p.name for p in (tmp_path / "checkpoints" / "3").rglob("*"))
    state, meta, notes = ck.restore_latest(_state(0))
    assert meta["step"] == 2 and int(state.step) == 2
    np.testing.assert_array_equal(state.params["w"], np.arange(6.0).reshape(2, 3) * 2.0)
    np.testing.assert_array_equal(state.batch_stats["mean"], np.full(3, 2.0))
    kept = tmp_path / DAMAGED_DIRNAME / "3"
    assert len(notes) == 1 and "\n" not in notes[0]
    assert notes[0].startswith(f"checkpoint step 3 in {tmp_path / 'checkpoints'} cannot be read (")
    assert notes[0].endswith(f"moved it to {kept} and resumed from step 2")
    assert sorted(p.name for p in kept.rglob("*")) == files_before  # moved, not deleted
    assert steps_on_disk(tmp_path) == [1, 2] and ck.all_steps() == [1, 2]
    ck.save(_state(3, scale=9.0), {"step": 3, "config": {"seed": 0}})  # the number is free again
    ck.close()
    again, meta, notes = Checkpointer(str(tmp_path / "checkpoints")).restore_latest(_state(0))
    assert meta["step"] == 3 and not notes
    np.testing.assert_array_equal(again.params["w"], np.arange(6.0).reshape(2, 3) * 9.0)


def test_checkpoints_of_another_variable_tree_are_refused_with_the_reason(tmp_path):
    """Every checkpoint holds another model's tree (e.g. written before ODE blocks kept
    per-time BatchNorm statistics): nothing is moved and the message names the cause."""
    d = tmp_path / "checkpoints"
    ck = Checkpointer(str(d), async_save=False)
    ck.save(_state(1, extra=True), {"step": 1, "config": {"seed": 0}})
    ck.close()
    before = tree_snapshot(tmp_path)
    with pytest.raises(CheckpointReadError) as e:
        Checkpointer(str(d), async_save=False).restore_latest(_state(0))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"no readable checkpoint in {d} (step 1: state: ")
    assert "different variable tree than this model" in msg and "per-time BatchNorm" in msg
    assert tree_snapshot(tmp_path) == before


def test_no_readable_checkpoint_changes_nothing_and_says_what_to_do(tmp_path):
    d = tmp_path / "checkpoints"
    ck = _saved(d)
    truncate_files(d / "3")
    _remove_largest_state_file(d / "2")
    _garbage("meta/metadata")(d / "1")
    before = tree_snapshot(tmp_path)
    with pytest.raises(CheckpointReadError) as e:
        ck.restore_latest(_state(0))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"no readable checkpoint in {d} (step 3: ")
    assert "step 2: state: " in msg and "step 1: meta: JSONDecodeError" in msg
    assert msg.endswith(
        "to start over move that folder aside (nothing was changed in it) or use a new --workdir"
    )
    assert tree_snapshot(tmp_path) == before


def test_a_config_mismatch_is_not_damage(tmp_path):
    """A checkpoint of another config is the user's mistake: the error propagates and the
    checkpoint stays where it is (it would read fine with the right config)."""
    ck = _saved(tmp_path / "checkpoints")

    def refuse(meta):
        raise TrainingError(f"step {meta['step']} is of another run")

    with pytest.raises(TrainingError, match="step 3 is of another run"):
        ck.restore_latest(_state(0), check_meta=refuse)
    assert steps_on_disk(tmp_path) == [1, 2, 3] and not (tmp_path / DAMAGED_DIRNAME).exists()
    assert ck.restore_latest(_state(0))[1]["step"] == 3


def test_a_failed_save_names_the_intact_checkpoint(tmp_path):
    ck = _saved(tmp_path / "checkpoints")

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path))

    ck._mngr.save = enospc  # the orbax boundary
    with pytest.raises(CheckpointWriteError) as e:
        ck.save(_state(4), {"step": 4})
    assert str(e.value) == (
        f"writing to {tmp_path} failed (OSError: [Errno 28] No space left on device: "
        f"'{tmp_path}'); the latest complete checkpoint, step 3 in {tmp_path / 'checkpoints'}, "
        "is intact and the same command resumes from it once space is freed or permissions fixed"
    )


def test_a_save_that_never_commits_is_an_error(tmp_path):
    """Orbax only logs some background failures; the missing step folder gives them away."""
    ck = _saved(tmp_path / "checkpoints")
    ck._mngr.save = lambda *args, **kwargs: True  # "saved", but nothing reaches the disk
    ck.save(_state(4), {"step": 4})
    with pytest.raises(CheckpointWriteError, match=r"\(RuntimeError: checkpoint step 4 was not"):
        ck.wait()


def test_eval_only_also_needs_the_lock(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    busy = f"is in use by process {os.getpid()} "
    with WorkdirLock(str(tmp_path)), pytest.raises(WorkdirBusyError, match=busy):
        evaluate(tiny_digits(), str(tmp_path))


def test_an_unwritable_metrics_file_is_one_line_and_frees_the_lock(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()  # any OSError on the metrics file (root ignores modes)
    (tmp_path / "checkpoints").mkdir()  # a run of ours (else the workdir check refuses it first)
    with pytest.raises(CheckpointWriteError) as e:
        train_and_evaluate(tiny_digits(num_epochs=1), str(tmp_path))
    assert str(e.value) == (
        f"writing to {tmp_path} failed (IsADirectoryError: [Errno 21] Is a directory: "
        f"'{tmp_path / 'metrics.jsonl'}'); no checkpoint was completed in "
        f"{tmp_path / 'checkpoints'}; a rerun starts from step 0"
    )
    WorkdirLock(str(tmp_path)).acquire().release()  # released on the way out


# ------------------------------------------------------------------ end to end (train.py)


@pytest.mark.slow
def test_kill9_at_random_moments_then_resume_equals_uninterrupted(reference, env, tmp_path):
    """Three SIGKILLs at seeded random moments of one run (each after the first train line
    at or past a drawn step, plus a drawn delay: inside steps, asynchronous saves or
    evaluations), then the same command to the end."""
    rng = random.Random(20240611)
    w = tmp_path / "w"
    log = MetricsLog(str(w / "metrics.jsonl"))
    last_seen = 0
    moments = []
    for i, (lo, hi) in enumerate(((3, 14), (20, 36), (40, 52))):
        target = max(rng.randint(lo, hi), last_seen + 1)  # lines of this session, not the last
        delay = rng.uniform(0.0, 0.3)
        proc = start_cli(w, env, tmp_path / f"kill{i}.log")
        try:
            wait_until(
                lambda: any(r["step"] >= target for r in log.read()),
                proc,
                f"a metrics line at step >= {target}",
            )
            if i == 1:  # the second kill lands inside an asynchronous save, by construction
                wait_until(lambda: saving_now(w), proc, "a checkpoint save in progress")
            else:
                time.sleep(delay)
            assert proc.poll() is None, "the run ended before it could be killed; make it longer"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        last_seen = max(r["step"] for r in log.read())
        saving = saving_now(w)  # orbax's temporary folder left behind: killed mid-save
        moments.append((target, round(delay, 3), last_seen, steps_on_disk(w), saving))
    print("kills (target step, delay s, last line step, checkpoints, mid-save):", moments)
    assert moments[1][4], f"the second kill missed the save it waited for: {moments}"
    assert last_seen < TOTAL_STEPS

    r = run_cli(w, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {w / 'checkpoints'} at step " in r.stdout
    assert "Traceback" not in r.stderr
    assert_same_results(reference, w)


@pytest.mark.slow
def test_second_trainer_on_a_busy_workdir_refuses_and_changes_nothing(reference, env, tmp_path):
    w = tmp_path / "w"
    first = start_cli(w, env, tmp_path / "first.log")
    lock_file = w / "trainer.lock"
    try:
        wait_until(
            lambda: (
                lock_file.exists() and lock_file.read_text().startswith(f"process {first.pid} ")
            ),
            first,
            "the first trainer to take the lock",
        )
        second = run_cli(w, env)
        running = first.poll() is None
    except BaseException:
        os.kill(first.pid, signal.SIGKILL)
        raise
    finally:
        first.wait(timeout=600)
    err = one_error_line(second)
    assert err.startswith(f"error: --workdir {w} is in use by process {first.pid} on host "), err
    assert running, "the first trainer ended before the second was refused"
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert_same_results(reference, w)

    # Byte for byte: hold the finished workdir ourselves and start a trainer on it.
    with WorkdirLock(str(w)):
        before = tree_snapshot(w)
        err = one_error_line(run_cli(w, env))
        assert f"is in use by process {os.getpid()} on host " in err
        assert tree_snapshot(w) == before


@pytest.mark.slow
def test_truncated_newest_checkpoint_resumes_from_the_previous_one(reference, env, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(reference, w)
    assert steps_on_disk(w) == [60, 64]
    names = truncate_files(w / "checkpoints" / "64")
    r = run_cli(w, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    kept = w / DAMAGED_DIRNAME / "64"
    assert f"checkpoint step 64 in {w / 'checkpoints'} cannot be read (" in r.stdout
    assert f"moved it to {kept} and resumed from step 60" in r.stdout
    assert f"resumed from {w / 'checkpoints'} at step 60/64" in r.stdout
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == names
    assert steps_on_disk(w) == [60, 64]  # 64 written anew
    assert_same_results(reference, w)


@pytest.mark.slow
def test_no_readable_checkpoint_is_one_line(reference, env, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(reference, w)
    truncate_files(w / "checkpoints" / "64")
    _remove_largest_state_file(w / "checkpoints" / "60")
    before = tree_snapshot(w / "checkpoints")
    err = one_error_line(run_cli(w, env))
    assert err.startswith(f"error: no readable checkpoint in {w / 'checkpoints'} (step 64: ")
    assert "; step 60: state: " in err and "move that folder aside" in err
    assert tree_snapshot(w / "checkpoints") == before
    assert not (w / DAMAGED_DIRNAME).exists()


# Runs train.py with orbax's CheckpointManager.save failing on its third call (step 15)
# with ENOSPC, as a full disk would; used where no tmpfs can be mounted.
INJECT_ENOSPC = """
import errno, runpy, sys
import orbax.checkpoint as ocp
real_save, calls = ocp.CheckpointManager.save, []
def save(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) == 3:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
    return real_save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _mount_tmpfs(mnt: Path, size_kib: int) -> str | None:
    """Mount a size-limited tmpfs on ``mnt``; None, or why not (needs root / CAP_SYS_ADMIN)."""
    if os.environ.get("ANODE_TEST_NO_TMPFS"):  # exercises the fallback where mounting works
        return "ANODE_TEST_NO_TMPFS is set"
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
        )
    except OSError as e:  # no mount binary
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exited {r.returncode}")


@pytest.mark.slow
def test_full_disk_stops_with_one_line_and_the_previous_checkpoint_resumes(
    reference, env, tmp_path
):
    """A tmpfs that holds two checkpoints but not a third (the real asynchronous failure);
    where mounting is not allowed, ENOSPC injected at orbax's save instead. Either way the
    run stops with one line naming an intact checkpoint, and the same command resumes
    from it to the uninterrupted run's results."""
    ckpt_bytes = sum(p.stat().st_size for p in (reference / "checkpoints" / "64").rglob("*"))
    mnt = tmp_path / "small"
    mnt.mkdir()
    size_kib = int(2.5 * ckpt_bytes / 1024)
    no_tmpfs = _mount_tmpfs(mnt, size_kib)
    if no_tmpfs is None:
        how, cmd = f"a real {size_kib} KiB tmpfs", CMD
    else:
        how, cmd = "ENOSPC injected at orbax's CheckpointManager.save", [PY, "-c", INJECT_ENOSPC]
        cmd += CMD[1:]
        warnings.warn(f"no tmpfs ({no_tmpfs}): tested {how}", stacklevel=1)
    print(f"full disk: {how}")
    w, copy = mnt / "w", tmp_path / "copy"
    try:
        r = run_cli(w, env, cmd=cmd)
        err = one_error_line(r)
        m = re.match(
            rf"error: writing to {w} failed \(.*No space left on device.*\); the latest complete "
            rf"checkpoint, step (\d+) in {w / 'checkpoints'}, is intact",
            err,
        )
        assert m, (how, err)
        kept = int(m.group(1))
        assert kept in steps_on_disk(w) and 0 < kept < TOTAL_STEPS, (how, err)
        shutil.copytree(w, copy)  # resume where there is space
    finally:
        if no_tmpfs is None:
            subprocess.run(["umount", str(mnt)], check=True)
    r = run_cli(copy, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {copy / 'checkpoints'} at step {kept}/{TOTAL_STEPS}" in r.stdout, how
    assert_same_results(reference, copy)
