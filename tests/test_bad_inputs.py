"""Every bad input: one `error:` line before anything is written, and no user file lost.

The family follows the kinds of the bad-input table (docs/training.md, "Bad inputs"):
the workdir is checked before anything is written; non-finite numbers; numbers without an
upper bound; settings that do nothing for the chosen dataset/model/optimizer; malformed
CIFAR files; `config.distributed=True` without a cluster; command-line type and config-file
errors. Most members run in-process through the function that makes the decision
(`validate_config`, `check_override`, `check_workdir`, `load_dataset`); a representative
member of each kind runs `train.py` as a subprocess and asserts the exit status, a single
`error:` line on stderr, nothing on stdout (the trainer prints the dataset and the model
only after validation), the time (no data read or program compiled: a few seconds), and
that the workdir and the current folder are byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from anode_jax.data import DataError, load_dataset
from anode_jax.training import (
    ConfigError,
    TrainingError,
    check_distributed_environment,
    check_override,
    check_workdir,
    divergence_hints,
    get_config,
    make_lr_schedule,
    validate_config,
)
from tests._training_helpers import PY, REPO, subprocess_env

# ------------------------------------------------------------------ helpers


def tree_digest(root: Path) -> dict[str, str]:
    """`{relative path: sha256 of the content}` of every file and folder under `root`."""
    out = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def bad(key: str, value, base: str = "default"):
    """The named config as a plain dict with `key` set to `value` (any type)."""
    d = get_config(base).to_dict()
    node = d
    *path, leaf = key.split(".")
    for p in path:
        node = node[p]
    node[leaf] = value
    return d


def one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, msg
    return msg


def user_files(folder: Path) -> None:
    """What a user may keep in the folder they run from."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"mine": true}\n')
    (folder / "metrics.jsonl").write_text('{"step": 1, "my": "numbers"}\n' * 3)
    (folder / "notes.txt").write_text("experiment log\n")


def finished_results(folder: Path) -> None:
    """A finished run whose checkpoints/ was deleted to save space."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}\n")
    (folder / "metrics.jsonl").write_text('{"step": 8, "split": "test", "accuracy": 0.9}\n')
    (folder / "summary.json").write_text('{"final_test_accuracy": 0.9}\n')
    (folder / "loss.png").write_bytes(b"\x89PNG fake")


# ------------------------------------------------------------------ kind: non-finite numbers

NAN, INF = float("nan"), float("inf")

NON_FINITE = [
    ("optim.grad_clip_norm", NAN),
    ("optim.momentum", NAN),
    ("optim.b1", NAN),
    ("optim.b2", -INF),
    ("optim.weight_decay", INF),
    ("optim.lr_gamma", INF),
    ("optim.learning_rate", INF),
    ("optim.learning_rate", NAN),
    ("model.width", INF),
    ("optim.warmup_epochs", NAN),
    ("optim.warmup_epochs", INF),
]


@pytest.mark.parametrize("key,value", NON_FINITE, ids=[f"{k}={v}" for k, v in NON_FINITE])
def test_non_finite_numbers_are_refused(key, value):
    with pytest.raises(ConfigError) as e:
        validate_config(bad(key, value), num_devices=1)
    msg = one_line_error(e)
    assert f"config.{key}={value}" in msg and "finite" in msg, msg


def test_non_finite_milestone_is_refused():
    with pytest.raises(ConfigError, match=r"config.optim.lr_milestones=.*finite"):
        validate_config(bad("optim.lr_milestones", (150, NAN)), num_devices=1)


# ------------------------------------------------------------------ kind: no upper bounds

OUT_OF_RANGE = [
    ("optim.momentum", 5, r"\[0, 1\)"),
    ("optim.momentum", 1.0, r"\[0, 1\)"),
    ("optim.b1", 1.0, r"\[0, 1\)"),
    ("optim.b2", 2, r"\[0, 1\)"),
    ("optim.b2", -0.5, r"\[0, 1\)"),
    ("data.crop_padding", 1000000, "below the image size"),
    ("data.crop_padding", 8, "below the image size"),  # digits are 8x8
    ("model.num_steps", 10**9, r"\[1, "),
    ("eval_batch_size", 10**8, "test split"),
    ("seed", 2**63, r"\[0, "),
    ("seed", -1, r"\[0, "),
    ("optim.warmup_epochs", 1e9, "num_epochs"),
    ("batch_size", 2**40, r"\[1, "),
    ("num_epochs", 10**12, r"\[1, "),
    ("checkpoint_every_steps", 2**40, r"\[1, "),
    ("model.width", 1e6, r"\[0.03125, "),
]


@pytest.mark.parametrize(
    "key,value,pattern", OUT_OF_RANGE, ids=[f"{k}={v}" for k, v, _ in OUT_OF_RANGE]
)
def test_out_of_range_numbers_are_refused(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        validate_config(bad(key, value), num_devices=1)
    assert f"config.{key}={value}" in one_line_error(e)


def test_a_milestone_beyond_the_run_never_fires():
    c = get_config("cifar10")  # lr 0.1, x0.1 at each milestone
    c.optim.lr_milestones = (150, 1e12)  # the second one is far beyond int32 steps
    validate_config(c, num_devices=1)
    sched = make_lr_schedule(c, steps_per_epoch=10)
    np.testing.assert_allclose(
        [float(sched(s)) for s in (0, 1500, 3499)], [0.1, 0.01, 0.01], rtol=1e-6
    )


def test_padding_bound_follows_the_dataset():
    validate_config(bad("data.crop_padding", 31, "cifar10"), num_devices=1)  # 32x32 images
    with pytest.raises(ConfigError, match="below the image size 32"):
        validate_config(bad("data.crop_padding", 32, "cifar10"), num_devices=1)


# ------------------------------------------------------------------ kind: settings that do nothing


def test_data_dir_with_digits_is_refused():
    with pytest.raises(ConfigError, match=r"config.data.dir='/nonexistent'.*digits") as e:
        validate_config(bad("data.dir", "/nonexistent"), num_devices=1)
    one_line_error(e)


@pytest.mark.parametrize("width", [0.001, 0.02])
def test_degenerate_width_is_refused(width):
    with pytest.raises(ConfigError, match=rf"config.model.width={width} must be .*0.03125"):
        validate_config(bad("model.width", width), num_devices=1)


INAPPLICABLE = [  # (base config, key, value, phrase of the warning)
    ("default", "optim.momentum", 0.5, "optim.name='adamw'"),  # default uses adamw
    ("default", "optim.nesterov", True, "optim.name='adamw'"),
    ("cifar10", "optim.b1", 0.8, "optim.name='sgd'"),
    ("default", "optim.lr_milestones", (5, 10), "optim.schedule='cosine'"),
    ("default", "data.crop_padding", 2, "data.augment=False"),
    ("cifar10", "model.q", "conv", "model.method='anode'"),
]


@pytest.mark.parametrize(
    "base,key,value,phrase", INAPPLICABLE, ids=[f"{b}:{k}" for b, k, _, _ in INAPPLICABLE]
)
def test_settings_that_do_nothing_are_warned_about(base, key, value, phrase):
    notes = validate_config(bad(key, value, base), num_devices=1)
    assert len(notes) == 1 and f"config.{key}=" in notes[0] and phrase in notes[0], notes
    assert "\n" not in notes[0]
    assert validate_config(get_config(base).to_dict(), num_devices=1) == []


# ------------------------------------------------------------------ kind: types (config and CLI)

WRONG_TYPES = [
    ("batch_size", "abc", "integer"),
    ("batch_size", 64.5, "integer"),
    ("data.flip", 2, "True or False"),
    ("optim.learning_rate", "fast", "number"),
    ("model.name", 5, "string"),
    ("model.name", "résnet", "choose one of"),
    ("model.solver", "", "choose one of"),
]


@pytest.mark.parametrize(
    "key,value,phrase", WRONG_TYPES, ids=[f"{k}={v!r}" for k, v, _ in WRONG_TYPES]
)
def test_wrong_types_name_key_value_and_choices(key, value, phrase):
    with pytest.raises(ConfigError) as e:
        validate_config(bad(key, value), num_devices=1)
    msg = one_line_error(e)
    assert f"config.{key}={value!r}" in msg and phrase in msg, msg


CLI_TYPES = [
    ("batch_size", "abc", r"config.batch_size='abc' must be an integer in \[1, "),
    ("batch_size", "64.5", r"config.batch_size='64.5' must be an integer"),
    ("data.flip", "2", r"config.data.flip='2' must be true or false"),
    ("optim.learning_rate", "fast", r"config.optim.learning_rate='fast' must be a number"),
    ("seed", "", r"config.seed='' must be an integer"),
]


@pytest.mark.parametrize("key,text,pattern", CLI_TYPES, ids=[f"{k}={t}" for k, t, _ in CLI_TYPES])
def test_command_line_values_of_the_wrong_type(key, text, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        check_override(key, text)
    one_line_error(e)


@pytest.mark.parametrize(
    "key,text", [("batch_size", "64"), ("data.flip", "false"), ("optim.momentum", "0.5")]
)
def test_command_line_values_of_the_right_type_pass(key, text):
    check_override(key, text)


# ------------------------------------------------------------------ kind: the workdir


WORKDIR_CASES = [
    "empty",
    "checkout",
    "cwd_user_files",
    "cwd_config_and_metrics",
    "cwd_only_config_json",
    "parent_of_runs",
    "results_no_ckpt",
    "results_empty_ckpt",
    "file",
]


@pytest.mark.parametrize("case", WORKDIR_CASES)
def test_workdirs_that_would_lose_files_are_refused(tmp_path, monkeypatch, case):
    home = tmp_path / "home"
    user_files(home)
    if case == "cwd_config_and_metrics":
        (home / "notes.txt").unlink()
    if case == "cwd_only_config_json":
        (home / "notes.txt").unlink()
        (home / "metrics.jsonl").unlink()
    monkeypatch.chdir(home)
    target = {
        "empty": "",
        "checkout": str(REPO),
        "parent_of_runs": str(tmp_path),
        "results_no_ckpt": str(tmp_path / "old_run"),
        "results_empty_ckpt": str(tmp_path / "old_run"),
        "file": str(home / "config.json"),
    }.get(case, ".")
    if case.startswith("results"):
        finished_results(tmp_path / "old_run")
    if case == "results_empty_ckpt":
        (tmp_path / "old_run" / "checkpoints").mkdir()
    before = tree_digest(tmp_path)
    with pytest.raises(TrainingError) as e:
        check_workdir(target)
    msg = one_line_error(e)
    assert "--workdir" in msg or "workdir" in msg
    assert tree_digest(tmp_path) == before


def test_usable_workdirs_pass(tmp_path):
    check_workdir(str(tmp_path / "new"))  # created later by the trainer
    (tmp_path / "empty").mkdir()
    check_workdir(str(tmp_path / "empty"))
    run = tmp_path / "interrupted"  # an interrupted run of ours: resumed, not refused
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    (run / "config.json").write_text("{}")
    (run / "trainer.lock").write_text("")
    check_workdir(str(run))
    # A multi-process run leaves one lock file per process, before and after checkpoints.
    multi = tmp_path / "multi_process"
    multi.mkdir()
    for i in range(2):
        (multi / f"trainer.lock.process-{i}").write_text("")
    check_workdir(str(multi))
    (multi / "checkpoints").mkdir()
    (multi / "summary.json").write_text("{}")
    (multi / "checkpoints" / "12").mkdir()
    check_workdir(str(multi))


# ------------------------------------------------------------------ kind: malformed CIFAR data


def _cifar10(root: Path, *, train=None, test=None, protocol=2) -> str:
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)

    def batch(n):
        return {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
        }

    for name, edit in (("data_batch_1", train), ("test_batch", test)):
        b = batch(8)
        if edit is not None:
            edit(b)
        with open(d / name, "wb") as f:
            pickle.dump(b, f, protocol=protocol)
    return str(root)


def _labels(value):
    def edit(b):
        b[b"labels"] = value

    return edit


def _rows(n):
    def edit(b):
        b[b"data"] = b[b"data"][:n]
        b[b"labels"] = b[b"labels"][:n]

    return edit


DAMAGED = [
    ("train", _labels([2**70] + [0] * 7), "labels"),
    ("train", _labels([1.0] * 8), "integers"),
    ("train", _labels([1.5] * 8), "integers"),
    ("test", _labels(["3"] * 8), "integers"),
    ("test", _labels(np.ones(8, np.float32)), "integers"),
    ("train", _labels([True] * 8), "integers"),
    ("test", _labels([0] * 7), "shape"),
    ("test", _labels(None), "integers"),
    ("test", _rows(0), "test split is empty"),
    ("train", _rows(0), "train split is empty"),
]


@pytest.mark.parametrize("split,edit,phrase", DAMAGED, ids=[f"{s}-{p}" for s, _, p in DAMAGED])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malformed_cifar_batches_are_one_line_data_errors(tmp_path, split, edit, phrase, protocol):
    root = _cifar10(tmp_path, **{split: edit}, protocol=protocol)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root)
    msg = one_line_error(e)
    assert phrase in msg and "malicious" not in msg, msg


# ------------------------------------------------------------------ kind: multi-host without a cluster


def test_distributed_without_cluster_variables_names_what_to_set():
    with pytest.raises(ConfigError) as e:
        check_distributed_environment({"HOME": "/root"})
    msg = one_line_error(e)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        assert name in msg
    check_distributed_environment(
        {"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    )
    check_distributed_environment({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"})
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID"):  # half a description
        check_distributed_environment({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})


# ------------------------------------------------------------------ kind: the NaN stop's hint


def test_divergence_hint_names_every_suspicious_hyperparameter():
    c = get_config("cifar10")
    c.optim.learning_rate, c.optim.momentum, c.optim.lr_gamma = 50.0, 0.999, 2.0
    hints = divergence_hints(c)
    text = "; ".join(hints)
    for key in ("optim.learning_rate=50.0", "optim.momentum=0.999", "optim.lr_gamma=2.0"):
        assert key in text, text
    assert divergence_hints(get_config("cifar10")) == []


# ------------------------------------------------------------------ train.py, one member per kind


def _write_bad_cifar(root: Path) -> str:
    return _cifar10(root, train=_labels([2**70] + [0] * 7))


# One member per kind (the rest of each family runs in-process above): each subprocess costs
# an interpreter start and the package import, a few seconds.
SUBPROCESS = [  # (id, prior workdir content, train.py arguments; {w}: workdir, {d}: bad CIFAR)
    ("empty-workdir", None, ["--config=configs/default.py", "--workdir="]),
    ("workdir-is-cwd-with-user-files", None, ["--config=configs/default.py", "--workdir=."]),
    (
        "results-without-checkpoints",
        finished_results,
        ["--config=configs/default.py", "--workdir={w}"],
    ),
    ("nan", None, ["--config=configs/default.py", "--workdir={w}", "--config.optim.b1=nan"]),
    ("type", None, ["--config=configs/default.py", "--workdir={w}", "--config.batch_size=64.5"]),
    ("missing-config-file", None, ["--config=configs/nope.py", "--workdir={w}"]),
    ("extra-argument", None, ["--config=configs/default.py", "--workdir={w}", "extra"]),
    (
        "distributed",
        None,
        ["--config=configs/default.py", "--workdir={w}", "--config.distributed=True"],
    ),
    (
        "data",
        None,
        ["--config=configs/cifar10.py:resnet4-anode", "--workdir={w}", "--config.data.dir={d}"],
    ),
]


@pytest.mark.parametrize("prior,args", [c[1:] for c in SUBPROCESS], ids=[c[0] for c in SUBPROCESS])
def test_train_py_one_line_before_anything_is_written(tmp_path, prior, args):
    home, workdir = tmp_path / "home", tmp_path / "run"
    user_files(home)
    if prior is not None:
        prior(workdir)
    data = _write_bad_cifar(tmp_path / "data")
    args = [a.replace("{w}", str(workdir)).replace("{d}", data) for a in args]
    args = [a.replace("configs/", f"{REPO}/configs/") for a in args]
    env = subprocess_env()
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"):
        env.pop(name, None)
    before = tree_digest(tmp_path)
    start = time.perf_counter()
    r = subprocess.run(
        [PY, str(REPO / "train.py"), *args],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert r.stdout == "", r.stdout[-2000:]  # nothing about data or model: refused before
    assert seconds < 30, f"{seconds:.1f} s: more than importing the package and validating"
    assert tree_digest(tmp_path) == before
