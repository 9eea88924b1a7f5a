"""Orbax checkpoints of the full training state under `<workdir>/checkpoints`.

Each checkpoint holds `state` (params, batch_stats, opt_state, step, rng) and `meta`
(JSON: step, epoch, batch index within the epoch, steps per epoch, cumulative wall time,
resolved config). Orbax writes to a temporary folder and renames it when complete, so a
process killed mid-save leaves the previous checkpoint as the latest one.

Faults (see docs/training.md, "Faults"):

* `Checkpointer.restore_latest` tries the newest checkpoint first and falls back to
  older ones when one cannot be read completely; the unreadable ones are moved to
  `<workdir>/damaged_checkpoints/` (never deleted).
* A save that fails (full disk, unwritable folder), synchronously or in orbax's background
  thread, raises `CheckpointWriteError` with one line naming the latest complete
  checkpoint; orbax only deletes old checkpoints after a save has committed, so that one
  stays readable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from anode_jax.training.errors import TrainingError
from anode_jax.training.train_state import TrainState

DAMAGED_DIRNAME = "damaged_checkpoints"


class CheckpointReadError(TrainingError):
    """No checkpoint in the folder can be read."""


class CheckpointWriteError(TrainingError):
    """Writing a checkpoint (or another output of the run) failed."""


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._pending: int | None = None  # step of the save that may still be in flight
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot create or clean {self.directory}: {short_reason(e)}; free space or "
                "fix its permissions and rerun the same command"
            ) from None

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def complete_steps(self) -> list[int]:
        """Steps whose folder orbax has committed (renamed from its temporary name).

        Read from disk rather than from the manager's cache, which also lists a step whose
        asynchronous save is still running or has just failed.
        """
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def save(self, state: TrainState, meta: dict[str, Any]) -> None:
        """Start an (asynchronous) save; raises `CheckpointWriteError` when this save,
        or the previous one still finishing in the background, could not be written."""
        step = int(meta["step"])
        self.wait()
        try:
            self._mngr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state.to_dict()),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=True,
            )
        except Exception as e:  # orbax/tensorstore raise ValueError, OSError, plain Exception
            raise self.write_error(e) from None
        self._pending = step

    def write_error(self, e: BaseException) -> CheckpointWriteError:
        """One line for a failed write: the cause, and the checkpoint a rerun resumes from."""
        done = self.complete_steps()
        keep = (
            f"the latest complete checkpoint, step {done[-1]} in {self.directory}, is intact "
            "and the same command resumes from it once space is freed or permissions fixed"
            if done
            else f"no checkpoint was completed in {self.directory}; a rerun starts from step 0"
        )
        workdir = os.path.dirname(self.directory)
        return CheckpointWriteError(f"writing to {workdir} failed ({short_reason(e)}); {keep}")

    def restore(
        self, template: TrainState, step: int | None = None
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restore `step` (default: latest) into the structure and shardings of `template`.

        No fallback; see `restore_latest`.
        """
        step = self.latest_step() if step is None else step
        return self._restore_state(template, step), self._restore_meta(step)

    def restore_latest(
        self,
        template: TrainState,
        check_meta: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[TrainState | None, dict[str, Any] | None, list[str]]:
        """Restore the newest checkpoint that reads completely; `(state, meta, notes)`.

        `(None, None, [])` when the folder holds no checkpoint. A checkpoint whose meta
        or state cannot be read (missing or truncated files, JSON that does not parse, a
        tree that does not match `template`, a step that disagrees with its folder) is
        skipped for the next newest; once a readable one is found the skipped ones are
        moved to `<workdir>/damaged_checkpoints/` and `notes` holds one line for each.
        `check_meta(meta)` runs before the state is read and may raise (e.g. a config
        mismatch): that is the user's mistake, not damage, so it propagates and nothing is
        moved. If none can be read nothing is moved and `CheckpointReadError` says
        what to do.
        """
        skipped: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                meta = self._restore_meta(step)
            except Exception as e:
                skipped.append((step, f"meta: {short_reason(e)}"))
                continue
            if check_meta is not None:
                check_meta(meta)
            try:
                state = self._restore_state(template, step)
                # addressable_data: a replicated array of a multi-process run is not fully
                # addressable, and device_get would refuse it.
                restored_step = int(np.asarray(state.step.addressable_data(0)))
                if restored_step != step:
                    raise ValueError(f"its state is at step {restored_step}")
            except Exception as e:
                skipped.append((step, f"state: {short_reason(e)}"))
                continue
            return state, meta, self._move_aside(skipped, step)
        if not skipped:
            return None, None, []
        listed = "; ".join(f"step {s}: {r}" for s, r in skipped)
        hint = ""
        if any("do not match" in r for _, r in skipped):
            hint = (
                ". The checkpoints hold a different variable tree than this model: they were "
                "written with another model config, or by an anode-jax older than the per-time "
                "BatchNorm statistics of ODE blocks (docs/models.md)."
            )
        raise CheckpointReadError(
            f"no readable checkpoint in {self.directory} ({listed}); to start over move that "
            f"folder aside (nothing was changed in it) or use a new --workdir{hint}"
        )

    def _restore_meta(self, step: int) -> dict[str, Any]:
        out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = out["meta"]
        got = meta.get("step") if isinstance(meta, dict) else meta
        if got != step:
            raise ValueError(f"meta names step {got!r}")
        return dict(meta)

    def _restore_state(self, template: TrainState, step: int) -> TrainState:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            template.to_dict(),
        )
        out = self._mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return TrainState(**out["state"])

    def _move_aside(self, skipped: list[tuple[int, str]], restored: int) -> list[str]:
        """Rename the skipped step folders into `damaged_checkpoints/`; one note each."""
        if not skipped:
            return []
        dest_root = os.path.join(os.path.dirname(self.directory), DAMAGED_DIRNAME)
        notes = []
        if jax.process_index() == 0:  # one process renames; the others see it after the sync
            os.makedirs(dest_root, exist_ok=True)
            for step, reason in skipped:
                dest = os.path.join(dest_root, str(step))
                n = 1
                while os.path.exists(dest):  # an earlier damaged copy of the same step
                    n += 1
                    dest = os.path.join(dest_root, f"{step}.{n}")
                try:
                    os.rename(os.path.join(self.directory, str(step)), dest)
                except OSError as e:
                    raise CheckpointReadError(
                        f"checkpoint step {step} in {self.directory} cannot be read ({reason}) "
                        f"and moving it to {dest} failed ({short_reason(e)}); move it away by "
                        "hand and rerun"
                    ) from None
                notes.append(
                    f"checkpoint step {step} in {self.directory} cannot be read ({reason}); "
                    f"moved it to {dest} and resumed from step {restored}"
                )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("anode_jax_move_damaged_checkpoints")
        self._mngr.reload()  # forget the moved steps (a new save may reuse their numbers)
        return notes

    def wait(self) -> None:
        """Wait for the save in flight; raise `CheckpointWriteError` if it failed."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            raise self.write_error(e) from None
        step, self._pending = self._pending, None
        # Orbax re-raises most background failures above, but a failed finalization is only
        # logged; the committed folder on disk is the proof that a save is complete.
        if step is not None and jax.process_index() == 0 and step not in self.complete_steps():
            raise self.write_error(RuntimeError(f"checkpoint step {step} was not committed"))

    def close(self) -> None:
        self.wait()
        self._mngr.close()


_STRERRORS = re.compile(
    r"No space left on device|Disk quota exceeded|Permission denied|Read-only file system|"
    r"Input/output error|File too large|Too many open files"
)


def short_reason(e: BaseException) -> str:
    """A one-line, bounded description of an orbax/tensorstore/OS error.

    Tensorstore messages run to several lines with the whole store spec; the OS reason
    buried in them (e.g. "No space left on device") is what the user can act on.
    """
    text = str(e) or type(e).__name__
    m = _STRERRORS.search(text)
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    first = first.split(" See full TensorStore details")[0]
    if len(first) > 160:
        first = first[:157] + "..."
    if type(e) is not Exception and not first.startswith(type(e).__name__):
        first = f"{type(e).__name__}: {first}"
    if m and m.group(0) not in first:
        first = f"{m.group(0)}: {first}"
    return first
