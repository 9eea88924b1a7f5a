"""TensorBoard event files next to `metrics.jsonl` (`tensorboard --logdir runs/`).

The trainer mirrors every `metrics.jsonl` record into TensorBoard scalars in
`<workdir>`: one event per record and key, at the record's `step`:

    train/loss  train/accuracy  train/grad_norm  train/learning_rate  train/images_per_sec
    test/loss   test/accuracy   test/images_per_sec

Events are written with tensorboardX (a maintained writer that needs neither TensorFlow
nor PyTorch). Each writer opens its own file (`events.out.tfevents.<time>.<host>.<id>`).

Consistency after a resume: a run restored from step `s` calls
`truncate_events_after` `(workdir, s)` when it truncates `metrics.jsonl`; every
event file in `workdir` is rewritten without the scalars of steps `> s` (and without
a torn last record of a killed run). The resumed run then writes exactly the steps an
uninterrupted run would have written, so the event files hold the same steps as
`metrics.jsonl` (tested by reading them back with TensorBoard's own reader).
"""

from __future__ import annotations

import glob
import os
import struct
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

#: metrics.jsonl key -> TensorBoard tag suffix, per split.
SCALARS = {
    "train": {
        "loss": "loss",
        "accuracy": "accuracy",
        "grad_norm": "grad_norm",
        "lr": "learning_rate",
        "images_per_sec": "images_per_sec",
    },
    "test": {"loss": "loss", "accuracy": "accuracy", "images_per_sec": "images_per_sec"},
}

_EVENT_GLOB = "events.out.tfevents.*"


class TensorBoardWriter:
    """Writes `metrics.jsonl` records as TensorBoard scalars into `logdir`."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        os.makedirs(logdir, exist_ok=True)
        # A unique suffix: two writers opened in the same second (a quick resume) must not
        # share a file name.
        self._writer = SummaryWriter(
            logdir, flush_secs=30, filename_suffix=f".{uuid.uuid4().hex[:8]}"
        )

    def write(self, record: Mapping[str, Any]) -> None:
        """Adds the scalars of one `metrics.jsonl` record and flushes them to disk."""
        split, step = record["split"], int(record["step"])
        for key, name in SCALARS.get(split, {}).items():
            if key in record and record[key] is not None:
                self._writer.add_scalar(f"{split}/{name}", float(record[key]), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- TFRecord framing: uint64 length, masked crc32c(length), data, masked crc32c(data) ---


def _masked_crc(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data) & 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path: str) -> Iterator[bytes]:
    """The complete, checksum-valid records of a TFRecord file; stops at a torn tail."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + 12 <= len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        end = pos + 12 + length + 4
        if header_crc != _masked_crc(header) or end > len(data):
            return
        body = data[pos + 12 : pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[end - 4 : end])
        if body_crc != _masked_crc(body):
            return
        yield body
        pos = end


def _frame(body: bytes) -> bytes:
    header = struct.pack("<Q", len(body))
    return (
        header
        + struct.pack("<I", _masked_crc(header))
        + body
        + struct.pack("<I", _masked_crc(body))
    )


def event_files(logdir: str) -> list[str]:
    """The TensorBoard event files directly in `logdir`, oldest first."""
    return sorted(glob.glob(os.path.join(logdir, _EVENT_GLOB)))


def truncate_events_after(logdir: str, step: int) -> int:
    """Drops every summary event with `step > step` from the event files in `logdir`.

    Call it where a restored run truncates `metrics.jsonl` (the loop does, right after
    `MetricsLog.truncate_after`). Files are rewritten atomically (temporary file +
    rename); a torn last record is dropped too. Returns the number of events dropped.
    """
    from tensorboardX.proto.event_pb2 import Event

    dropped = 0
    for path in event_files(logdir):
        kept, total = [], 0
        with open(path, "rb") as f:
            size = len(f.read())
        consumed = 0
        for body in _records(path):
            total += 1
            consumed += len(body) + 16
            event = Event.FromString(body)
            if event.HasField("summary") and event.step > step:
                continue
            kept.append(body)
        torn = consumed != size
        if len(kept) == total and not torn:
            continue
        dropped += total - len(kept)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(_frame(b) for b in kept))
        os.replace(tmp, path)
    return dropped


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """`{tag: [(step, value), ...]}` from the event files in `logdir` (no TensorBoard).

    For notebooks and quick checks; `tensorboard --logdir` is the real viewer.
    """
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(logdir):
        for body in _records(path):
            event = Event.FromString(body)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((int(event.step), value.simple_value))
    return out
