"""``metrics.jsonl`` (one JSON object per line) and ``summary.json``.

Lines: ``{"step", "epoch", "split": "train"|"test", "loss", "accuracy", "lr",
"images_per_sec", "wall_time_s", ...}``. ``step`` counts completed optimizer steps.
On resume from the checkpoint at step ``s`` every line with ``step > s`` (and any torn
last line) is dropped, so the file reads as if the run had never been interrupted. ``s``
is the step actually restored: when the newest checkpoint is damaged and an older one is
used, the lines after the older one go too; with no checkpoint (``s = 0``) all go.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any


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
        """Keep only records with ``record["step"] <= step``; returns how many were dropped."""
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
