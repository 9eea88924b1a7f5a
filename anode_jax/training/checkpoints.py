"""Orbax checkpoints of the full training state under ``<workdir>/checkpoints``.

Each checkpoint holds ``state`` (params, batch_stats, opt_state, step, rng) and ``meta``
(JSON: step, epoch, batch index within the epoch, steps per epoch, cumulative wall time,
resolved config). Orbax writes to a temporary folder and renames it when complete, so a
process killed mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from anode_jax.training.train_state import TrainState


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, state: TrainState, meta: dict[str, Any]) -> None:
        step = int(meta["step"])
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state.to_dict()),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(
        self, template: TrainState, step: int | None = None
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restore into the structure and shardings of ``template``."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            template.to_dict(),
        )
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return TrainState(**out["state"]), dict(out["meta"])

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
