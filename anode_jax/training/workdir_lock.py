"""One trainer per workdir: an exclusive `flock` on `<workdir>/trainer.lock`.

Two trainers writing one workdir corrupt each other (orbax removes the other's temporary
checkpoint folders at start-up, `metrics.jsonl` interleaves both runs' lines). The lock
is taken before anything in the workdir is written and is held for the life of the run.

`flock` locks belong to the open file, so the kernel drops them when the process dies
for any reason (`kill -9` included): a leftover `trainer.lock` file never blocks a
resume. The file's text (`pid ... on host ...`) only serves to name the holder in the
refusal; the lock itself is the kernel's.

Multi-process runs (`config.distributed`) lock one file per process,
`trainer.lock.process-<i>`: every process of a run writes the shared workdir, so every
process of a second run must be refused, and process `i` of two runs meet on the same
file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time

from anode_jax.training.errors import TrainingError


class WorkdirBusyError(TrainingError):
    """Another live process holds the workdir."""


class WorkdirLock:
    """Exclusive, non-blocking lock on a workdir; `release()` or process exit frees it."""

    def __init__(self, workdir: str, *, process_index: int = 0, process_count: int = 1):
        self.workdir = os.path.abspath(workdir)
        name = "trainer.lock" if process_count == 1 else f"trainer.lock.process-{process_index}"
        self.path = os.path.join(self.workdir, name)
        self._fd: int | None = None
        self.enforced = True  # False where the filesystem offers no flock (see acquire)

    def acquire(self) -> WorkdirLock:
        """Take the lock or raise `WorkdirBusyError` (one line) without writing anything.

        Creates the workdir and the lock file if missing. An existing lock file is opened
        without truncation and only rewritten once the lock is ours, so a refused trainer
        leaves the workdir byte-for-byte as it found it.
        """
        try:
            os.makedirs(self.workdir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise TrainingError(
                f"cannot use --workdir {self.workdir}: {e.strerror or e}; choose a writable folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _read_holder(fd)
                os.close(fd)
                raise WorkdirBusyError(
                    f"--workdir {self.workdir} is in use by {holder} (lock "
                    f"{self.path}); wait for it to finish or stop it, or use another --workdir"
                ) from None
            # e.g. ENOLCK on a network filesystem without lock support: train unguarded
            # rather than refuse every run there; the docs say so.
            self.enforced = False
            print(
                f"warning: cannot lock {self.path} ({e.strerror}); nothing stops a second "
                "trainer from writing this workdir at the same time",
                flush=True,
            )
        self._fd = fd
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        text = f"process {os.getpid()} on host {socket.gethostname()} (since {stamp})\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)
        except OSError:
            pass  # the text is informative only; the kernel lock is what excludes
        return self

    def release(self) -> None:
        # The file stays: unlinking a flock'ed file races with a trainer that has just
        # opened it (both would then "own" different inodes of one path).
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "another process"
