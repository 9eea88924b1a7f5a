"""The workdir check, before anything is written: a run never overwrites a user's files.

The trainer writes `config.json`, `metrics.jsonl`, `summary.json`, `eval.json`, the
plots, TensorBoard event files, `trainer.lock` (`trainer.lock.process-<i>` in a
multi-process run) and `checkpoints/` into its workdir, and on
a resume truncates `metrics.jsonl` and the event files to the restored step. So it only
starts in a workdir that is new, empty, or holds a run of this trainer that it can resume
(a `checkpoints/` folder). Everything else is refused with one line, and nothing in it is
touched:

* an empty `--workdir=` (it would mean the current folder);
* a folder holding anything the trainer does not write: a source checkout (`.git`,
  `pyproject.toml`), the current folder with the user's own files, a parent of runs;
* a run's files (`config.json`, `metrics.jsonl`, `summary.json`, plots ...) without the
  `checkpoints/` folder the trainer creates first, or a finished run's results whose
  checkpoints were deleted: a new run would replace them.
"""

from __future__ import annotations

import fnmatch
import os

from anode_jax.training.checkpoints import DAMAGED_DIRNAME
from anode_jax.training.errors import TrainingError

#: Names the trainer writes into a workdir (`*` as in `fnmatch`).
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "metrics.jsonl.tmp",
    "summary.json",
    "summary.json.tmp",
    "eval.json",
    "eval.json.tmp",
    "loss.png",
    "accuracy.png",
    "trainer.lock",
    "trainer.lock.process-*",
    "checkpoints",
    DAMAGED_DIRNAME,
    "events.out.tfevents.*",
)


class WorkdirError(TrainingError):
    """The workdir holds files the trainer would overwrite (one line; nothing was written)."""


def is_run_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILES)


def check_workdir(workdir: str) -> None:
    """Raise `WorkdirError` unless training may write into `workdir` (see the module doc).

    Reads the folder's listing only; creates and writes nothing.
    """
    if not workdir or not workdir.strip():
        raise WorkdirError(
            "--workdir is empty; name a folder for this run's checkpoints and metrics, "
            "e.g. --workdir=runs/default"
        )
    path = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise WorkdirError(f"--workdir={workdir} is a file, not a folder; choose a new folder")
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir} cannot be read ({e.strerror or e})") from None
    foreign = [name for name in entries if not is_run_file(name)]
    if foreign:
        checkout = {".git", "pyproject.toml", "setup.py"} & set(entries)
        what = "a source checkout" if checkout else "files this trainer did not write"
        shown = ", ".join(foreign[:4]) + (
            f" and {len(foreign) - 4} more" if len(foreign) > 4 else ""
        )
        raise WorkdirError(
            f"--workdir={workdir} ({path}) holds {what} ({shown}); nothing was written: "
            "choose a new or empty folder, e.g. --workdir=runs/NAME"
        )
    # The trainer creates checkpoints/ before it writes any other file (trainer.lock aside):
    # without it, these files are not a run to resume but results a new run would replace.
    files = [
        name
        for name in entries
        if name != "checkpoints" and not fnmatch.fnmatchcase(name, "trainer.lock*")
    ]
    if files and not _has_checkpoints(path, finished="summary.json" in entries):
        raise WorkdirError(
            f"--workdir={workdir} holds {', '.join(files)} but no checkpoint to resume from, "
            "and a new run would replace them; nothing was written: move them away or choose "
            "a new --workdir"
        )


def _has_checkpoints(path: str, *, finished: bool) -> bool:
    """A run to resume: a `checkpoints/` folder, holding a step when the run had finished
    (an unfinished run killed before its first checkpoint restarts from step 0)."""
    ckpt = os.path.join(path, "checkpoints")
    if not os.path.isdir(ckpt):
        return False
    return not finished or any(name.isdigit() for name in os.listdir(ckpt))
