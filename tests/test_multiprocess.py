"""Multi-process training on JAX's distributed runtime, really executed: several CPU
processes on this host started by ``python -m anode_jax.launch``, connected by
``jax.distributed`` through a loopback coordinator, with gloo cross-process collectives.

End-to-end runs use a tiny digits config (256 images, batch 32: 8 steps per epoch,
2 epochs, a checkpoint every 5 steps). One 1-process run and one 2-process run are shared
by the tests of this module (and by the xdist workers) as references.

Tolerance: a 2-process step computes the same function as a 1-process step over the same
global batch, but the cross-process all-reduce adds the per-device partial sums in another
order, so float32 results differ by round-off (~1e-7 relative at the first steps). Training
amplifies it: once a pre-activation near a ReLU kink lands on the other side, the
difference jumps to ~1e-5 and grows (2 processes x 2 devices, measured: gradient norms
equal to 1e-8 for 7 steps, 1e-3 apart by step 10; parameters up to 1.3e-3 apart after 16
steps; 2 x 1 devices stayed within 3e-7). Hence: final parameters and BatchNorm statistics
within `PARAM_ATOL`, losses within `LOSS_ATOL`, accuracies within `ACC_ATOL` (one example
of a 32-image batch), the first metrics line (4 steps) within `FIRST_LINE_ATOL`. A resumed
2-process run must equal the uninterrupted 2-process run exactly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from anode_jax.data import TrainOrder, load_dataset
from anode_jax.launch import Job, process_env
from anode_jax.training import restore
from anode_jax.training.checkpoints import DAMAGED_DIRNAME
from anode_jax.training.distributed import cluster_from_env, process_rows, put_rows
from anode_jax.training.errors import ConfigError
from tests._training_helpers import (
    DETERMINISTIC,
    PY,
    REPO,
    TINY_DIGITS,
    cli_args,
    records,
    subprocess_env,
    tiny_digits,
)

OVERRIDES = {**TINY_DIGITS, "num_epochs": 2}  # 8 steps/epoch
TOTAL_STEPS = 16
TRAIN = ["train.py", "--config=configs/default.py", *cli_args(OVERRIDES)]
DIST = ["--config.distributed=True"]
COUPLED = {"model.method": "anodev2", "model.adjoint": "checkpointed:2"}
PARAM_ATOL = 5e-3  # parameters and BatchNorm statistics after 16 steps (float32)
LOSS_ATOL = 1e-3  # train (window mean) and test losses
ACC_ATOL = 1 / 32  # accuracies: one example of a batch
FIRST_LINE_ATOL = 1e-5  # the loss of the first 4 steps, before round-off is amplified
SURVIVOR_BOUND_S = 60.0

SHARED_CIFAR10 = Path("/work/shared/data/cifar10")
for _cand in (REPO.parent / "shared" / "data" / "cifar10", SHARED_CIFAR10):
    if (_cand / "cifar-10-batches-py" / "test_batch").exists():
        SHARED_CIFAR10 = _cand
        break


# ------------------------------------------------------------------ helpers and fixtures


def _shared_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "multiprocess"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(cache_dir=_shared_root(tmp_path_factory) / "jax_cache")


def launch_cmd(workdir: Path, *, processes: int = 2, devices: int = 0, extra=(), grace_s=10):
    own = [f"--num_processes={processes}", f"--grace_s={grace_s}"]
    if devices:
        own.append(f"--devices_per_process={devices}")
    return [PY, "-m", "anode_jax.launch", *own, "--", *TRAIN, *DIST, *extra, f"--workdir={workdir}"]


def run(cmd, env, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return r


def run_ok(cmd, env) -> subprocess.CompletedProcess:
    r = run(cmd, env)
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


def _shared_run(tmp_path_factory, name: str, cmd_for) -> Path:
    """A run made once per session (xdist workers wait for it, then reuse it)."""
    root = _shared_root(tmp_path_factory)
    root.mkdir(parents=True, exist_ok=True)
    w = root / name
    with open(root / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if not (w / "summary.json").exists():
            shutil.rmtree(w, ignore_errors=True)
            r = run_ok(cmd_for(w), _env_for(tmp_path_factory))
            (root / f"{name}.out").write_text(r.stdout + "\n--- stderr\n" + r.stderr)
    return w


def _env_for(tmp_path_factory):
    return subprocess_env(cache_dir=_shared_root(tmp_path_factory) / "jax_cache")


def single_cmd(w: Path, extra=()):
    return [PY, *TRAIN, *extra, f"--workdir={w}"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """1 process, 1 device, the same global batch."""
    return _shared_run(tmp_path_factory, "single", single_cmd)


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> Path:
    """2 processes x 1 device, uninterrupted (read-only: copy before changing anything)."""
    return _shared_run(tmp_path_factory, "multi", launch_cmd)


def final_state(workdir: Path, **overrides):
    r = restore(tiny_digits(**{"num_epochs": 2, **overrides}), str(workdir))
    assert r.step == TOTAL_STEPS
    return jax.device_get({"params": r.state.params, "batch_stats": r.state.batch_stats})


def assert_equivalent(ref: Path, got: Path, **overrides) -> None:
    """Same metrics lines and final parameters/BN statistics, to the module's tolerances."""
    ra, rb = records(ref), records(got)
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb]
    np.testing.assert_allclose(rb[0]["loss"], ra[0]["loss"], rtol=0, atol=FIRST_LINE_ATOL)
    for a, b in zip(ra, rb):
        for k, tol in (("loss", LOSS_ATOL), ("accuracy", ACC_ATOL), ("lr", 1e-7)):
            np.testing.assert_allclose(b[k], a[k], rtol=0, atol=tol, err_msg=f"{k}: {a}")
        assert (
            a.get("num_examples")
            == b.get("num_examples")
            == (360 if a["split"] == "test" else None)
        )
    sa, sb = final_state(ref, **overrides), final_state(got, **overrides)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    worst = 0.0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(sa), jax.tree.leaves(sb)):
        np.testing.assert_allclose(
            b, a, rtol=0, atol=PARAM_ATOL, err_msg=jax.tree_util.keystr(path)
        )
        worst = max(worst, float(np.max(np.abs(np.asarray(b) - np.asarray(a)))))
    print(f"max |difference| of parameters and BN statistics: {worst:.3g}")


def assert_same_results(ref: Path, got: Path) -> None:
    """Exactly the same metrics.jsonl lines (timing fields aside) and summary metrics."""
    ra = [{k: r.get(k) for k in DETERMINISTIC} for r in records(ref)]
    rb = [{k: r.get(k) for k in DETERMINISTIC} for r in records(got)]
    assert ra == rb
    sa = json.loads((ref / "summary.json").read_text())
    sb = json.loads((got / "summary.json").read_text())
    keys = [k for k in sa if k.startswith(("final_", "best_"))] + ["steps", "param_count"]
    assert {k: sa[k] for k in keys} == {k: sb[k] for k in keys}


def trainer_pids(workdir: Path, n: int = 2) -> list[int]:
    """The trainers' pids, from the per-process workdir lock files they write."""
    out = []
    for i in range(n):
        text = (workdir / f"trainer.lock.process-{i}").read_text()
        out.append(int(re.match(r"process (\d+) ", text).group(1)))
    return out


def start_launch(cmd, env, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def wait_for_step(workdir: Path, target: int, proc: subprocess.Popen, timeout=300.0) -> None:
    deadline = time.time() + timeout
    path = workdir / "metrics.jsonl"
    while True:
        if path.exists() and any(r["step"] >= target for r in records(workdir)):
            return
        assert proc.poll() is None, f"the launch ended (status {proc.returncode}) before {target}"
        assert time.time() < deadline, f"timed out waiting for step {target}"
        time.sleep(0.02)


# ------------------------------------------------------------------ data sharding


def _assert_epoch_covered_once(num_examples: int, batch: int, processes: int) -> None:
    order = TrainOrder(num_examples, batch, seed=3)
    spe = order.steps_per_epoch
    for epoch in (0, 1):
        seen = []
        for step in range(epoch * spe, (epoch + 1) * spe):
            idx = order.indices(step)
            parts = [idx[process_rows(batch, p, processes)] for p in range(processes)]
            assert all(len(q) == batch // processes for q in parts)
            np.testing.assert_array_equal(np.concatenate(parts), idx)  # shards = global batch
            seen.extend(np.concatenate(parts).tolist())
        counts = np.bincount(seen, minlength=num_examples)
        assert counts.max() == 1  # nothing twice across processes and steps
        # every example once; the incomplete final batch (num_examples % batch) is dropped
        assert (counts == 1).sum() == spe * batch == num_examples - num_examples % batch


@pytest.mark.parametrize("processes", [2, 4])
def test_an_epoch_covers_every_digit_once_across_processes(processes):
    ds = load_dataset("digits")
    _assert_epoch_covered_once(ds.num_train, 128, processes)  # 1437 = 11 * 128 + 29
    _assert_epoch_covered_once(1024, 128, processes)  # a multiple: every example once


@pytest.mark.skipif(
    not (SHARED_CIFAR10 / "cifar-10-batches-py" / "test_batch").exists(),
    reason="shared CIFAR-10 subset not found",
)
@pytest.mark.parametrize("layout", ["python", "binary"])
def test_cifar_shards_cover_every_example_once(layout, tmp_path):
    from tests.test_data import write_cifar10_binary

    ds = load_dataset("cifar10", str(SHARED_CIFAR10))
    if layout == "binary":  # the same images written in the binary layout
        write_cifar10_binary(
            tmp_path,
            [(ds.train_images, ds.train_labels)],
            (ds.test_images, ds.test_labels),
        )
        ds_bin = load_dataset("cifar10", str(tmp_path))
        np.testing.assert_array_equal(ds_bin.train_images, ds.train_images)
        ds = ds_bin
    _assert_epoch_covered_once(ds.num_train, 128, 2)
    # put_rows (one process) builds exactly the global batch it indexes
    order = TrainOrder(ds.num_train, 128, seed=0)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x, y = put_rows((ds.train_images, ds.train_labels), order.indices(5), sharding)
    np.testing.assert_array_equal(np.asarray(x), ds.train_images[order.indices(5)])
    np.testing.assert_array_equal(np.asarray(y), ds.train_labels[order.indices(5)])


def test_process_rows_refuses_an_indivisible_batch():
    with pytest.raises(ConfigError, match="batch size 30 is not divisible by the 4 processes"):
        process_rows(30, 0, 4)


# ------------------------------------------------------------------ cluster variables


def test_cluster_variables_are_read_and_checked():
    ok = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2"}
    assert cluster_from_env({}) is None
    assert cluster_from_env({**ok, "JAX_PROCESS_ID": "1"}) == ("127.0.0.1:1234", 2, 1)
    with pytest.raises(ConfigError, match="missing JAX_PROCESS_ID"):
        cluster_from_env(ok)
    with pytest.raises(ConfigError, match="must be in 0..JAX_NUM_PROCESSES-1"):
        cluster_from_env({**ok, "JAX_PROCESS_ID": "2"})
    with pytest.raises(ConfigError, match="must be integers"):
        cluster_from_env({**ok, "JAX_PROCESS_ID": "one"})
    with pytest.raises(ConfigError, match="is not host:port"):
        cluster_from_env({**ok, "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "localhost"})


# ------------------------------------------------------------------ the launcher (no JAX)


# Job forks from this (JAX-importing) test process; the child only calls prctl and execs.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def _job(code: str, n: int, tmp_path: Path, **kw):
    # the job's reader threads write these after this returns; closed with tmp_path
    out = open(tmp_path / "out", "w+")  # noqa: SIM115
    err = open(tmp_path / "err", "w+")  # noqa: SIM115
    job = Job([sys.executable, "-c", code], n, stdout=out, stderr=err, **kw).start()
    return job, out, err


def _read(f) -> list[str]:
    f.flush()
    f.seek(0)
    return f.read().splitlines()


def test_launcher_sets_the_cluster_variables_and_prefixes_output(tmp_path):
    code = (
        "import os, sys; e = os.environ; "
        "print(e['JAX_PROCESS_ID'], e['JAX_NUM_PROCESSES'], e['JAX_COORDINATOR_ADDRESS'], "
        "e['JAX_CPU_COLLECTIVES_IMPLEMENTATION'], e.get('JAX_NUM_CPU_DEVICES')); "
        "print('to stderr', file=sys.stderr)"
    )
    job, out, err = _job(code, 3, tmp_path, devices_per_process=2, port=23456)
    assert job.wait() == 0
    assert sorted(_read(out)) == [f"[{i}] {i} 3 127.0.0.1:23456 gloo 2" for i in range(3)]
    assert sorted(_read(err)) == [f"[{i}] to stderr" for i in range(3)]
    env = process_env(
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --x"},
        port=1,
        num_processes=2,
        process_id=1,
        devices_per_process=2,
    )
    assert env["XLA_FLAGS"] == "--x" and env["JAX_NUM_CPU_DEVICES"] == "2"


def test_launcher_stops_the_others_when_one_fails(tmp_path):
    code = (
        "import os, sys, time\n"
        "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
        "time.sleep(600)\n"
    )
    t = time.monotonic()
    job, out, err = _job(code, 2, tmp_path, grace_s=1)
    assert job.wait() == 3
    assert time.monotonic() - t < 30
    lines = _read(err)
    assert len(lines) == 1, lines
    assert re.fullmatch(
        r"error: process 1 of 2 \(pid \d+\) exited with status 3; stopping process\(es\) 0 "
        r"\(SIGTERM in 1 s unless they stop\)",
        lines[0],
    )
    assert job.procs[0].returncode == -signal.SIGTERM


def test_launcher_forwards_signals(tmp_path):
    code = (
        "import signal, sys, time\n"
        "def h(s, f): print('got', s, flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, h); print('ready', flush=True); time.sleep(600)\n"
    )
    script = tmp_path / "child.py"
    script.write_text(code)
    p = subprocess.Popen(
        [PY, "-m", "anode_jax.launch", "--num_processes=2", "--", str(script)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = []
    while sum("ready" in x for x in lines) < 2:
        lines.append(p.stdout.readline())
        assert p.poll() is None, p.stderr.read()
    p.send_signal(signal.SIGTERM)
    rest, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    assert sorted(x for x in rest.splitlines() if "got" in x) == [
        f"[0] got {int(signal.SIGTERM)}",
        f"[1] got {int(signal.SIGTERM)}",
    ]


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_two_processes_equal_one_process(single, multi):
    """2 processes x 1 device vs 1 process x 1 device, same global batch: metrics, eval
    sums (360 test images counted once), parameters and BatchNorm statistics."""
    assert_equivalent(single, multi)
    s = json.loads((multi / "summary.json").read_text())
    assert s["num_devices"] == 2 and s["steps"] == TOTAL_STEPS
    out = (multi.parent / "multi.out").read_text()
    assert "[0] model small" in out and "[1] model small" not in out


@pytest.mark.slow
def test_metrics_and_event_files_are_written_once(single, multi):
    assert len(records(multi)) == len(records(single))
    keys = [(r["step"], r["split"]) for r in records(multi)]
    assert len(keys) == len(set(keys))
    assert len(list(multi.glob("events.out.tfevents.*"))) == 1
    # one committed checkpoint per step (no per-process copies), no leftovers
    ckpt = sorted(p.name for p in (multi / "checkpoints").iterdir())
    assert ckpt == ["15", "16"], ckpt
    out = (multi.parent / "multi.out").read_text()
    assert out.count("final test accuracy") == 1


@pytest.mark.slow
def test_two_processes_of_two_devices_equal_one_process(single, env, tmp_path):
    w = tmp_path / "w"
    run_ok(launch_cmd(w, devices=2), env)
    assert json.loads((w / "summary.json").read_text())["num_devices"] == 4
    assert_equivalent(single, w)


@pytest.mark.slow
def test_coupled_checkpointed_model_on_two_processes_equals_one_process(env, tmp_path):
    """ANODEv2 (coupled weight ODE) with the "checkpointed:2" gradient."""
    extra = cli_args(COUPLED)
    run_ok(single_cmd(tmp_path / "one", extra), env)
    run_ok(launch_cmd(tmp_path / "two", extra=extra), env)
    assert_equivalent(tmp_path / "one", tmp_path / "two", **COUPLED)


@pytest.mark.slow
def test_sigkill_every_process_then_rerun_equals_uninterrupted(multi, env, tmp_path):
    rng = random.Random(22)
    w = tmp_path / "w"
    moments = []
    for i in range(2):
        target = rng.randint(4, 12)
        delay = rng.uniform(0.0, 0.5)
        proc = start_launch(launch_cmd(w), env, tmp_path / f"kill{i}.log")
        try:
            wait_for_step(w, target, proc)
            time.sleep(delay)
            pids = trainer_pids(w)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # PR_SET_PDEATHSIG was faster
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        moments.append((target, round(delay, 3), max(r["step"] for r in records(w))))
    print("kills (target step, delay s, last metrics step):", moments)
    assert moments[-1][2] < TOTAL_STEPS, "the run ended before it was killed"
    r = run_ok(launch_cmd(w), env)
    assert "resumed from" in r.stdout
    assert_same_results(multi, w)


@pytest.mark.slow
def test_sigkill_one_process_stops_the_other_and_rerun_resumes(multi, env, tmp_path):
    w = tmp_path / "w"
    log = tmp_path / "launch.log"
    proc = start_launch(launch_cmd(w), env, log)
    try:
        wait_for_step(w, 8, proc)
        while not (w / "checkpoints" / "5").is_dir():  # committed (saves are asynchronous)
            assert proc.poll() is None, "the launch ended before checkpoint 5 was committed"
            time.sleep(0.02)
        pids = trainer_pids(w)
        os.kill(pids[1], signal.SIGKILL)
        t_kill = time.monotonic()
        proc.wait(timeout=SURVIVOR_BOUND_S + 30)
        stopped_after = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"the launch ended {stopped_after:.1f} s after process 1 was killed")
    assert stopped_after <= SURVIVOR_BOUND_S
    assert proc.returncode == 128 + signal.SIGKILL
    text = log.read_text()
    lost = [x for x in text.splitlines() if x.startswith("error: process")]
    assert len(lost) == 1 and lost[0].startswith(
        f"error: process 1 of 2 (pid {pids[1]}) was killed by SIGKILL"
    ), text[-3000:]
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # the survivor is gone too
    r = run_ok(launch_cmd(w), env)
    assert "resumed from" in r.stdout
    assert_same_results(multi, w)


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped_by_every_process(multi, env, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(multi, w)
    for p in (w / "checkpoints" / "16").rglob("*"):
        if p.is_file():
            os.truncate(p, p.stat().st_size // 2)
    r = run_ok(launch_cmd(w), env)
    notes = [x for x in r.stdout.splitlines() if "cannot be read" in x]
    assert len(notes) == 1 and notes[0].startswith("[0] checkpoint step 16 in "), r.stdout
    assert f"moved it to {w / DAMAGED_DIRNAME / '16'} and resumed from step 15" in notes[0]
    assert "[0] resumed from" in r.stdout and "[1] resumed from" not in r.stdout
    assert sorted(p.name for p in (w / "checkpoints").iterdir()) == ["15", "16"]
    assert_same_results(multi, w)
