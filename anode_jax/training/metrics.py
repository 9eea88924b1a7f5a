"""`metrics.jsonl` (one JSON object per line), `summary.json`, and the one writer of records.

`RecordWriter` hands each record to every output (metrics.jsonl, TensorBoard, the
progress bar); `train_record` turns a window of per-step metrics into a `train` record,
refusing a non-finite loss.

Lines: `{"step", "epoch", "split": "train"|"test", "loss", "accuracy", "lr",
"images_per_sec", "wall_time_s", ...}`. `step` counts completed optimizer steps.
On resume from the checkpoint at step `s` every line with `step > s` (and any torn
last line) is dropped, so the file reads as if the run had never been interrupted. `s`
is the step actually restored: when the newest checkpoint is damaged and an older one is
used, the lines after the older one go too; with no checkpoint (`s = 0`) all go.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


class MetricsLog:
    def __init__(self, path: str):
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        records = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn final line (process killed mid-write)
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                    records.append(rec)
        return records

    def truncate_after(self, step: int) -> int:
        """Keep only records with `record["step"] <= step`; returns how many were dropped."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path, encoding="utf-8") as f:
            n_lines = sum(1 for _ in f)
        kept = [r for r in self.read() if r["step"] <= step]
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(_dumps(r) + "\n" for r in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError:
            # e.g. a full disk: the original file is untouched (the swap is atomic); leave
            # no partial copy behind, and let the trainer report the error in one line.
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return n_lines - len(kept)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(_dumps(record) + "\n")
            f.flush()


def _dumps(rec: dict[str, Any]) -> str:
    return json.dumps({k: _jsonable(v) for k, v in rec.items()}, sort_keys=False)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Summary figures from metrics records (so they survive a resume exactly)."""
    records = list(records)
    train = [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    out: dict[str, Any] = {}
    if test:
        out["final_test_accuracy"] = test[-1]["accuracy"]
        out["final_test_loss"] = test[-1]["loss"]
        out["best_test_accuracy"] = max(r["accuracy"] for r in test)
        out["best_test_epoch"] = max(test, key=lambda r: r["accuracy"])["epoch"]
    if train:
        last_epoch = train[-1]["epoch"]
        last = [r for r in train if r["epoch"] == last_epoch]
        w = [r["num_steps"] for r in last]
        out["final_train_loss"] = sum(r["loss"] * n for r, n in zip(last, w)) / sum(w)
        out["final_train_accuracy"] = sum(r["accuracy"] * n for r, n in zip(last, w)) / sum(w)
        # Throughput excluding the first window (which includes compilation).
        ips = [r["images_per_sec"] for r in train[1:]] or [train[0]["images_per_sec"]]
        out["train_images_per_sec_median"] = sorted(ips)[len(ips) // 2]
    return out


class NonFiniteLoss(ArithmeticError):
    """A window's loss is NaN or infinite at `step` (the loop turns it into a `TrainingError`)."""

    def __init__(self, loss: float, step: int):
        super().__init__(f"loss became {loss} at step {step}")
        self.loss, self.step = loss, step


def train_record(
    window: Sequence[dict[str, Any]],
    *,
    first_step: int,
    epoch: int,
    batch_size: int,
    seconds: float,
    wall_time_s: float,
) -> dict[str, Any]:
    """The `train` record of a window of host metrics of steps `first_step + 1 ...`.

    Raises `NonFiniteLoss` naming the first step whose loss is not finite.
    """
    losses = np.asarray([v["loss"] for v in window], np.float64)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise NonFiniteLoss(float(losses[bad[0]]), first_step + int(bad[0]) + 1)
    return {
        "step": first_step + len(window),
        "epoch": epoch,
        "split": "train",
        "loss": float(losses.mean()),
        "accuracy": float(np.mean([v["accuracy"] for v in window])),
        "grad_norm": float(np.mean([v["grad_norm"] for v in window])),
        "lr": float(window[-1]["lr"]),
        "num_steps": len(window),
        "images_per_sec": len(window) * batch_size / max(seconds, 1e-9),
        "wall_time_s": wall_time_s,
    }


class RecordWriter:
    """One record -> `metrics.jsonl`, TensorBoard scalars and the progress bar.

    Only the main process writes files (`is_main`); every process keeps a (disabled) bar so
    the loop is the same everywhere. `train` records update the bar's postfix, `test`
    records print one line above it.
    """

    def __init__(
        self,
        workdir: str,
        *,
        is_main: bool,
        tensorboard: bool,
        progress_bar: bool,
        total_steps: int,
        start_step: int,
        num_epochs: int,
        desc: str,
    ):
        with warnings.catch_warnings():  # in Jupyter without ipywidgets: a warning, then text
            warnings.simplefilter("ignore")
            from tqdm.auto import tqdm

        from anode_jax.training.tensorboard import TensorBoardWriter

        self.is_main, self.num_epochs = is_main, num_epochs
        self.log = MetricsLog(os.path.join(workdir, "metrics.jsonl"))
        self.tb = TensorBoardWriter(workdir) if is_main and tensorboard else None
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
            disable=not (progress_bar and is_main),
            desc=desc,
        )

    def write(self, record: dict[str, Any]) -> None:
        if self.is_main:
            self.log.write(record)
            if self.tb:
                self.tb.write(record)
        if record["split"] == "train":
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                acc=f"{record['accuracy']:.3f}",
                img_s=f"{record['images_per_sec']:.0f}",
                refresh=False,
            )
        elif self.is_main:
            self.bar.write(
                f"epoch {record['epoch']}/{self.num_epochs} step {record['step']}: test "
                f"accuracy {record['accuracy']:.4f} loss {record['loss']:.4f}"
            )

    def step(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.tb:
            self.tb.close()
