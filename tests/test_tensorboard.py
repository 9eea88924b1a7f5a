"""TensorBoard event files: the same scalars at the same steps as metrics.jsonl, also after
a resume, read back with TensorBoard's own reader."""

import json
import os
import shutil

import numpy as np
import pytest

from anode_jax.training import (
    SCALARS,
    TensorBoardWriter,
    event_files,
    get_config,
    read_scalars,
    train_and_evaluate,
    truncate_events_after,
)

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def tensorboard_scalars(logdir, *, purge_orphaned_data):
    """{tag: [(step, value)]} as TensorBoard itself loads the directory."""
    acc = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={"scalars": 0}, purge_orphaned_data=purge_orphaned_data
    )
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl_scalars(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for rec in map(json.loads, f):
            for key, name in SCALARS[rec["split"]].items():
                out.setdefault(f"{rec['split']}/{name}", []).append((rec["step"], rec[key]))
    return out


def assert_same(tb, jl, *, keys=None):
    assert sorted(tb) == sorted(jl)
    for tag in keys or jl:
        assert [s for s, _ in tb[tag]] == [s for s, _ in jl[tag]], tag
        np.testing.assert_allclose(
            [v for _, v in tb[tag]], [v for _, v in jl[tag]], rtol=1e-6, err_msg=tag
        )


def test_truncate_drops_later_steps_and_a_torn_tail(tmp_path):
    with TensorBoardWriter(str(tmp_path)) as w:
        for step in range(1, 6):
            w.write({"split": "train", "step": step, "loss": 1.0 / step, "lr": 0.1})
            w.write({"split": "test", "step": step, "loss": 2.0 / step, "accuracy": 0.5})
    (path,) = event_files(str(tmp_path))
    with open(path, "ab") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00\x01\x02")  # killed mid-record
    assert truncate_events_after(str(tmp_path), 3) == 2 * (2 + 2)  # steps 4, 5: 4 tags each
    tb = tensorboard_scalars(tmp_path, purge_orphaned_data=False)
    assert sorted(tb) == ["test/accuracy", "test/loss", "train/learning_rate", "train/loss"]
    for tag, values in tb.items():
        assert [s for s, _ in values] == [1, 2, 3], tag
    assert tb["train/loss"][2][1] == pytest.approx(1.0 / 3)
    assert read_scalars(str(tmp_path)) == {
        tag: [(s, pytest.approx(v)) for s, v in values] for tag, values in tb.items()
    }
    assert truncate_events_after(str(tmp_path), 3) == 0  # idempotent


@pytest.mark.slow
def test_training_writes_the_metrics_and_stays_consistent_after_resume(tmp_path):
    c = get_config("default")
    c.data.train_size, c.data.test_size = 256, 64  # 4 steps per epoch
    c.batch_size, c.eval_batch_size, c.num_epochs = 64, 64, 3
    c.log_every_steps, c.checkpoint_every_steps, c.keep_checkpoints = 2, 4, 10
    c.model.width, c.progress_bar, c.plots = 0.25, False, False

    wa = tmp_path / "a"
    train_and_evaluate(c, str(wa))
    jl = jsonl_scalars(wa)
    assert [s for s, _ in jl["train/loss"]] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in jl["test/accuracy"]] == [4, 8, 12]
    assert_same(tensorboard_scalars(wa, purge_orphaned_data=False), jl)

    # A run that got to step 12 but whose checkpoints after step 4 were lost (killed before
    # they were written): the rerun restores step 4 and must not leave steps 6..12 twice.
    wb = tmp_path / "b"
    shutil.copytree(wa, wb)
    for step in ("8", "12"):
        shutil.rmtree(wb / "checkpoints" / step)
    train_and_evaluate(c, str(wb))
    assert len(event_files(str(wb))) == 2  # the first run's file, truncated, and the rerun's
    tb = tensorboard_scalars(wb, purge_orphaned_data=False)  # no reader-side clean-up
    # Losses and accuracies are deterministic; throughput and wall times are not.
    deterministic = [t for t in jl if not t.endswith("images_per_sec")]
    assert_same(tb, jsonl_scalars(wb))
    assert_same(tb, jl, keys=deterministic)
