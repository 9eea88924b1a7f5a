"""Trainer: config validation, end-to-end runs, resume after SIGKILL, NaN stop, sharding."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from anode_jax.data import normalize
from anode_jax.training import (
    ConfigError,
    MetricsLog,
    TrainingError,
    evaluate,
    make_lr_schedule,
    make_optimizer,
    restore,
    train_and_evaluate,
    validate_config,
)
from tests._training_helpers import (
    DETERMINISTIC,
    PY,
    REPO,
    RESUME_CMD,
    RESUME_STEPS,
    load_config,
    resume_env,
    resume_reference,
    subprocess_env,
    tiny_digits,
)
from tests._training_helpers import records as _records

SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"


# ------------------------------------------------------------------ configs and validation


@pytest.mark.parametrize(
    "name,arg",
    [
        ("default", None),
        ("cifar10", "resnet4-anode"),
        ("cifar10", "sqnxt-backsolve"),
        ("cifar100", "alexnet-anodev2"),
        ("cifar100", "resnet10-baseline"),
        ("cifar10", None),
    ],
)
def test_shipped_configs_validate(name, arg):
    c = load_config(name, arg)
    validate_config(c, num_devices=1)
    for key in ("seed", "batch_size", "num_epochs", "checkpoint_every_steps"):
        assert key in c
    for key in ("dir", "train_size", "test_size"):
        assert key in c.data
    for key in ("num_steps", "solver", "adjoint", "name", "method"):
        assert key in c.model


def test_cifar_config_follows_the_paper():
    c = load_config("cifar10", "resnet4-anode")
    assert (c.optim.name, c.optim.momentum, c.optim.weight_decay, c.optim.learning_rate) == (
        "sgd",
        0.9,
        5e-4,
        0.1,
    )
    assert (c.num_epochs, c.batch_size, c.eval_batch_size, c.model.num_steps) == (350, 256, 128, 2)
    assert c.data.augment and c.data.crop_padding == 4 and c.data.flip
    sched = make_lr_schedule(c, steps_per_epoch=10)
    for epoch, lr in ((0, 0.1), (149, 0.1), (150, 0.01), (249, 0.01), (250, 0.001), (349, 0.001)):
        np.testing.assert_allclose(float(sched(epoch * 10)), lr, rtol=1e-6)
    assert load_config("cifar10", "sqnxt-backsolve").model.adjoint == "backsolve"
    v2 = load_config("cifar100", "resnet-anodev2")
    assert (v2.model.method, v2.model.q, v2.data.name) == ("anodev2", "rda", "cifar100")


def _bad(key, value):
    def edit(d):  # d: the config as a plain dict (ConfigDict would refuse some bad types)
        node = d
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value

    return edit


BAD_CONFIGS = [
    (_bad("data.nmae", "x"), r"unknown config key\(s\) config.data.nmae; valid keys: .*data.name"),
    (
        _bad("model.name", "vgg"),
        r"config.model.name='vgg'.*small, resnet, resnet4, resnet10, alexnet, sqnxt",
    ),
    (
        _bad("model.method", "node"),
        r"config.model.method='node'.*baseline, backsolve, anode, anodev2",
    ),
    (_bad("model.solver", "rk45"), r"config.model.solver='rk45'.*euler, midpoint, heun, rk4"),
    (
        _bad("model.adjoint", "adjoint"),
        r"config.model.adjoint='adjoint'.*direct, anode, backsolve, checkpointed:K",
    ),
    (
        _bad("model.adjoint", "checkpointed:0"),
        r"config.model.adjoint='checkpointed:0'.*checkpointed:K",
    ),
    (
        _bad("model.adjoint", "backsolve"),
        r"adjoint='backsolve'.*with config.model.method='backsolve'",
    ),
    (_bad("model.q", "mlp"), r"config.model.q='mlp'.*none, rda, conv"),
    (_bad("data.name", "mnist"), r"config.data.name='mnist'.*digits, cifar10, cifar100"),
    (_bad("optim.name", "lbfgs"), r"config.optim.name='lbfgs'.*sgd, adamw"),
    (_bad("optim.schedule", "poly"), r"config.optim.schedule='poly'.*step, cosine, constant"),
    (_bad("batch_size", 0), r"config.batch_size=0 must be positive"),
    (_bad("eval_batch_size", -8), r"config.eval_batch_size=-8 must be positive"),
    (_bad("num_epochs", 0), r"config.num_epochs=0 must be positive"),
    (_bad("checkpoint_every_steps", 0), r"config.checkpoint_every_steps=0 must be positive"),
    (_bad("model.num_steps", 0), r"config.model.num_steps=0 must be positive"),
    (_bad("data.train_size", -1), r"config.data.train_size=-1 must be >= 0"),
    (_bad("data.train_size", 10), r"train_size=10 is smaller than config.batch_size"),
    (_bad("model.width", 0.0), r"config.model.width=0.0 must be positive"),
    (_bad("optim.learning_rate", -0.1), r"config.optim.learning_rate=-0.1 must be positive"),
    (_bad("batch_size", 2.5), r"config.batch_size=2.5 must be an integer"),
]


@pytest.mark.parametrize(
    "edit,pattern", BAD_CONFIGS, ids=[p.split("=")[0].split(";")[0][:40] for _, p in BAD_CONFIGS]
)
def test_each_config_error_is_clear(edit, pattern):
    d = load_config("default").to_dict()
    edit(d)
    with pytest.raises(ConfigError, match=pattern) as e:
        validate_config(d, num_devices=1)
    assert "\n" not in str(e.value)


def test_backsolve_method_requires_backsolve_adjoint():
    c = load_config("cifar10", "resnet-backsolve")
    c.model.adjoint = "anode"
    with pytest.raises(
        ConfigError, match="method='backsolve' needs config.model.adjoint='backsolve'"
    ):
        validate_config(c, num_devices=1)
    c = load_config("cifar10", "resnet-anodev2")
    c.model.adjoint = "checkpointed:2"  # any valid non-backsolve adjoint may be chosen
    validate_config(c, num_devices=1)


def test_batch_not_divisible_by_devices():
    c = load_config("default")
    c.batch_size = 36
    with pytest.raises(ConfigError, match="config.batch_size=36 is not divisible by the 8 devices"):
        validate_config(c, num_devices=8)
    c.num_devices = 64
    with pytest.raises(ConfigError, match="config.num_devices=64 but only"):
        validate_config(c)


def test_bad_config_arg():
    with pytest.raises(ConfigError, match=r"'resnet4-foo' is not MODEL-METHOD.*resnet, sqnxt"):
        load_config("cifar10", "resnet4-foo")
    with pytest.raises(ConfigError, match="'small-anode' is not MODEL-METHOD"):
        load_config("cifar100", "small-anode")


def test_cli_errors_are_one_line(tmp_path):
    """train.py reports config and data problems as one line, without a traceback."""
    cases = [
        (["--config=configs/cifar10.py:resnet4-nope"], "is not MODEL-METHOD"),
        (
            ["--config=configs/default.py", "--config.model.solvr=rk4"],
            "unknown config key(s) config.model.solvr",
        ),
        (["--config=configs/default.py", "--config.model.solver=rk5"], "config.model.solver='rk5'"),
        (
            ["--config=configs/cifar10.py:resnet4-anode", f"--config.data.dir={tmp_path}"],
            "holds no cifar10 data",
        ),
    ]
    for args, expected in cases:
        r = subprocess.run(
            [PY, str(REPO / "train.py"), f"--workdir={tmp_path / 'w'}", *args],
            cwd=REPO,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 1, (args, r.stderr[-2000:])
        err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and expected in err[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr


# ------------------------------------------------------------------ metrics log


def test_metrics_log_truncation_drops_later_and_torn_lines(tmp_path):
    log = MetricsLog(str(tmp_path / "m.jsonl"))
    for s in (4, 8, 8, 12):
        log.write({"step": s, "split": "train", "loss": 1.0 / s})
    with open(log.path, "a") as f:
        f.write('{"step": 16, "spl')  # killed mid-write
    assert [r["step"] for r in log.read()] == [4, 8, 8, 12]
    assert log.truncate_after(8) == 2
    assert [r["step"] for r in log.read()] == [4, 8, 8]
    assert Path(log.path).read_text().endswith("\n")


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_digits_end_to_end_and_eval_only(tmp_path):
    c = tiny_digits(num_epochs=2, plots=True)
    summary = train_and_evaluate(c, str(tmp_path))
    recs = _records(tmp_path)
    for r in recs:
        for key in (
            "step",
            "epoch",
            "split",
            "loss",
            "accuracy",
            "lr",
            "images_per_sec",
            "wall_time_s",
        ):
            assert key in r
    test = [r for r in recs if r["split"] == "test"]
    assert [r["step"] for r in test] == [8, 16] and [r["epoch"] for r in test] == [1, 2]
    train_steps = [r["step"] for r in recs if r["split"] == "train"]
    assert train_steps == [4, 5, 8, 10, 12, 15, 16]  # log_every=4, checkpoints every 5, epochs
    assert sum(r["num_steps"] for r in recs if r["split"] == "train") == 16
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "final_test_accuracy",
        "best_test_accuracy",
        "final_train_loss",
        "param_count",
        "steps",
        "wall_time_s",
        "config",
    ):
        assert key in on_disk
    assert on_disk["steps"] == 16 and on_disk["config"]["model"]["name"] == "small"
    assert on_disk["final_test_accuracy"] == test[-1]["accuracy"] == summary["final_test_accuracy"]
    assert on_disk["final_test_accuracy"] > 0.3  # 16 steps lift 10-way digits well above chance
    for png in ("loss.png", "accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 16
    out = evaluate(c, str(tmp_path))  # --eval_only on the latest checkpoint
    assert out["step"] == 16
    np.testing.assert_allclose(out["accuracy"], test[-1]["accuracy"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(out["loss"], test[-1]["loss"], rtol=1e-5)
    with pytest.raises(TrainingError, match="no checkpoints in"):
        evaluate(c, str(tmp_path / "elsewhere"))
    # restore(): the same checkpoint for analysis; its model reproduces the eval accuracy.
    restored = restore(c, str(tmp_path))
    assert restored.step == 16
    ds = restored.dataset
    x = normalize(ds.test_images, pixel_scale=ds.pixel_scale, mean=ds.mean, std=ds.std)
    variables = {"params": restored.state.params, "batch_stats": restored.state.batch_stats}
    logits = restored.model.apply(variables, x, train=False)
    accuracy = float(np.mean(np.argmax(logits, -1) == ds.test_labels))
    # Same predictions: one image changes the accuracy by 1/360; 1e-6 allows only the
    # float32 accumulation of the trainer's mean.
    np.testing.assert_allclose(accuracy, out["accuracy"], rtol=0, atol=1e-6)
    with pytest.raises(TrainingError, match="restore: no checkpoints in"):
        restore(c, str(tmp_path / "elsewhere"))


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED_CIFAR10 / "cifar-10-batches-py" / "test_batch").exists(),
    reason="shared CIFAR-10 subset not found at ../shared/data/cifar10 "
    "(see /work/shared/data/README.md)",
)
def test_cifar10_slice_end_to_end(tmp_path):
    c = load_config("cifar10", "resnet4-anode")
    c.data.dir = str(SHARED_CIFAR10)
    c.data.train_size, c.data.test_size = 64, 64
    c.batch_size, c.eval_batch_size, c.num_epochs = 32, 32, 1
    c.model.width, c.progress_bar, c.plots = 0.25, False, False
    summary = train_and_evaluate(c, str(tmp_path))
    assert summary["steps"] == 2 and np.isfinite(summary["final_train_loss"])
    restored = restore(c, str(tmp_path))  # recount the 64 test images outside the trainer
    ds, variables = restored.dataset, {"params": restored.state.params}
    variables["batch_stats"] = restored.state.batch_stats
    x = normalize(ds.test_images, pixel_scale=ds.pixel_scale, mean=ds.mean, std=ds.std)
    logits = restored.model.apply(variables, x, train=False)
    recount = float(np.mean(np.argmax(logits, -1) == ds.test_labels))
    assert summary["final_test_accuracy"] == pytest.approx(recount, abs=1e-6)
    test = [r for r in _records(tmp_path) if r["split"] == "test"]
    assert len(test) == 1 and test[0]["num_examples"] == 64


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tmp_path_factory):
    """Kill a run mid-way (after a random delay past its first checkpoint), rerun the same
    command, and compare with an uninterrupted run: identical summary metrics and lines.
    The uninterrupted run (and the compilation cache) is the session's one, shared with
    tests/test_fault_tolerance.py: the same command, made once."""
    cmd = RESUME_CMD
    env = resume_env(tmp_path_factory)
    reference = resume_reference(tmp_path_factory)  # also fills the compilation cache

    def run(workdir):
        r = subprocess.run(
            cmd + [f"--workdir={workdir}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    wb = tmp_path / "b"
    proc = subprocess.Popen(
        cmd + [f"--workdir={wb}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckdir = wb / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckdir.is_dir() and any(p.name.isdigit() for p in ckdir.iterdir()):
            break
        time.sleep(0.01)
    # Seeded: a failure replays with the same delay (ANODE_KILL_SEED picks another one).
    time.sleep(random.Random(int(os.environ.get("ANODE_KILL_SEED", "0"))).uniform(0.0, 0.4))
    assert proc.poll() is None, "run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
    assert done and done[-1] < RESUME_STEPS

    r = run(wb)  # same command: resumes
    assert f"resumed from {ckdir}" in r.stdout

    sa = json.loads((reference / "summary.json").read_text())
    sb = json.loads((wb / "summary.json").read_text())
    for key in (
        "final_test_accuracy",
        "best_test_accuracy",
        "final_test_loss",
        "final_train_loss",
        "final_train_accuracy",
        "param_count",
        "steps",
    ):
        assert sa[key] == sb[key], key
    ra = [{k: r.get(k) for k in DETERMINISTIC} for r in _records(reference)]
    rb = [{k: r.get(k) for k in DETERMINISTIC} for r in _records(wb)]
    assert ra == rb


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    c = tiny_digits(num_epochs=1, checkpoint_every_steps=1, log_every_steps=1)
    c.optim.name, c.optim.learning_rate, c.optim.momentum = "sgd", 1e30, 0.0
    c.optim.schedule, c.optim.warmup_epochs, c.optim.weight_decay = "constant", 0.0, 0.0
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step (\d+)") as e:
        train_and_evaluate(c, str(tmp_path))
    bad_step = int(e.value.args[0].split(" at step ")[1].split()[0])
    ck = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert ck and ck[-1] == bad_step - 1  # everything before the bad step, nothing after
    assert f"latest checkpoint: step {bad_step - 1}" in str(e.value)
    # The kept checkpoint restores, its parameters are finite and all logged losses are.
    kept = restore(c, str(tmp_path))
    assert kept.step == bad_step - 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(kept.state.params))
    assert all(np.isfinite(r["loss"]) for r in _records(tmp_path))


# ------------------------------------------------------------------ sharding

SHARDED_SCRIPT = textwrap.dedent("""
    import jax, numpy as np, optax
    assert jax.device_count() == 8, jax.devices()
    import importlib.util
    spec = importlib.util.spec_from_file_location("cfg", "configs/default.py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    from anode_jax.data import load_dataset
    import anode_jax.training as tr
    c = m.get_config(); c.model.width = 0.5
    ds = load_dataset("digits", train_size=256, test_size=64)
    model = tr.build_model(c, ds.num_classes)
    sched = tr.make_lr_schedule(c, 8)
    tx = tr.make_optimizer(c, sched)
    state0 = jax.device_get(tr.init_state(model, tx, 0, ds.image_shape, tr.make_mesh(1)))
    idx = np.random.default_rng(0).permutation(256)
    batches = [(ds.train_images[idx[i*32:(i+1)*32]], ds.train_labels[idx[i*32:(i+1)*32]])
               for i in range(3)]
    results = {}
    for n in (1, 8):
        mesh = tr.make_mesh(n)
        train_step, eval_step = tr.compile_steps(model, tx, ds, c.data, mesh, sched)
        state = jax.device_put(state0, tr.replicated(mesh))
        losses = []
        for x, y in batches:
            state, mt = train_step(state, *tr.put_batch((x, y), tr.batch_sharded(mesh)))
            losses.append(float(mt["loss"]))
        mask = np.ones(64, np.float32)
        ev = eval_step(state, *tr.put_batch((ds.test_images, ds.test_labels, mask),
                                             tr.batch_sharded(mesh)))
        if n == 8:
            leaf = jax.tree.leaves(state.params)[0]
            assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated
        results[n] = (losses, jax.tree.map(np.asarray, (state.params, state.batch_stats)),
                      float(ev["loss_sum"]))
    (l1, p1, e1), (l8, p8, e8) = results[1], results[8]
    np.testing.assert_allclose(l1, l8, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(e1, e8, rtol=1e-5)
    print("OK", l1, l8)
""")


@pytest.mark.slow
def test_eight_device_step_equals_single_device():
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run(
        [PY, "-c", SHARDED_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


# ------------------------------------------------------------------ optimizer semantics


def test_sgd_matches_pytorch_update_and_keeps_momentum():
    """SGD with weight decay is PyTorch's: buf = m*buf + (g + wd*p); p -= lr*buf, and the
    one optimizer keeps its momentum buffer across epochs (no re-creation)."""
    c = load_config("cifar10", "resnet-anode")
    sched = make_lr_schedule(c, steps_per_epoch=2)
    tx = make_optimizer(c, sched)
    p = {"w": np.array([1.0, -2.0], np.float32)}
    st = tx.init(p)
    buf = np.zeros(2)
    pt = p["w"].astype(np.float64)
    for step in range(5):  # crosses two epoch boundaries
        g = np.array([0.5, 0.25]) * (step + 1)
        upd, st = tx.update({"w": g.astype(np.float32)}, st, {"w": pt.astype(np.float32)})
        buf = 0.9 * buf + (g + 5e-4 * pt)
        new = pt - 0.1 * buf
        np.testing.assert_allclose(pt + np.asarray(upd["w"]), new, rtol=1e-5)
        pt = new
