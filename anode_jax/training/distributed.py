"""Multi-process training on JAX's distributed runtime (multi-controller SPMD).

Every process runs the same trainer command. `initialize` connects it to the
coordination service (`jax.distributed.initialize`); from then on `jax.devices()` lists
the devices of all processes, the mesh of `anode_jax.training.sharding` spans them,
and XLA's cross-process collectives (gloo over TCP on CPU, NCCL on GPU, ICI on TPU) carry
the gradient all-reduce and the BatchNorm batch statistics, so the step computes the same
function as one process holding the whole global batch.

Where the process count and index come from, in order:

1. `JAX_COORDINATOR_ADDRESS` (`host:port` of process 0), `JAX_NUM_PROCESSES` and
   `JAX_PROCESS_ID`, as set by `python -m anode_jax.launch` or by hand. JAX itself only
   reads the first of the three, so they are parsed here and passed on explicitly
   (without that, `jax.distributed.initialize()` fails with "Number of processes must be
   defined").
2. Otherwise JAX's cluster detection: SLURM (`srun`), Open MPI (`mpirun`), Cloud TPU
   pods, Kubernetes.

Data: each process gathers only its rows of each global batch (`process_rows`): rows
`[p * B / P, (p + 1) * B / P)` of the global batch of `B` rows on `P` processes, which
are the rows the mesh places on process `p`'s devices (checked by
`check_mesh_layout`).

Losing a process: the coordination service declares a process dead after
`heartbeat_timeout_seconds` without a heartbeat and the survivors' runtime aborts them;
a collective whose peer died fails as soon as its TCP connection breaks. The local
launcher (`anode_jax.launch`) additionally stops the survivors itself after a short
grace period, with one line naming the lost process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys

import jax
import numpy as np

from anode_jax.training.errors import ConfigError, TrainingError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

# Seconds without a heartbeat after which the coordination service declares a process
# dead and every survivor stops (JAX's default is 100 s).
HEARTBEAT_TIMEOUT_S = 20
# Seconds process 0 waits for all processes to connect at start-up.
INITIALIZATION_TIMEOUT_S = 120


def cluster_from_env(environ=None) -> tuple[str, int, int] | None:
    """`(coordinator_address, num_processes, process_id)` from the `JAX_*` variables.

    `None` when `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` are both unset (leave it to
    JAX's cluster detection). Raises `ConfigError` (one line) when only some are set
    or a value is not a valid integer / range.
    """
    env = os.environ if environ is None else environ
    names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    vals = {k: env.get(k, "").strip() for k in names}
    if not vals[ENV_NUM_PROCESSES] and not vals[ENV_PROCESS_ID]:
        return None
    missing = [k for k in names if not vals[k]]
    if missing:
        raise ConfigError(
            f"config.distributed=True needs {', '.join(names)} together; missing "
            f"{', '.join(missing)} (or unset all three on SLURM, mpirun or a TPU pod)"
        )
    try:
        n, i = int(vals[ENV_NUM_PROCESSES]), int(vals[ENV_PROCESS_ID])
    except ValueError:
        raise ConfigError(
            f"{ENV_NUM_PROCESSES}={vals[ENV_NUM_PROCESSES]!r} and {ENV_PROCESS_ID}="
            f"{vals[ENV_PROCESS_ID]!r} must be integers"
        ) from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(
            f"{ENV_PROCESS_ID}={i} must be in 0..{ENV_NUM_PROCESSES}-1 with "
            f"{ENV_NUM_PROCESSES}={n} >= 1"
        )
    if ":" not in vals[ENV_COORDINATOR]:
        raise ConfigError(
            f"{ENV_COORDINATOR}={vals[ENV_COORDINATOR]!r} is not host:port (process 0's address)"
        )
    return vals[ENV_COORDINATOR], n, i


def initialize(
    *,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    initialization_timeout_s: int = INITIALIZATION_TIMEOUT_S,
) -> None:
    """Connect this process to the job (`jax.distributed.initialize`); call before any
    other JAX use. A no-op when already connected. Raises `ConfigError` (one line)
    when the cluster cannot be determined."""
    if jax.distributed.is_initialized():
        return
    cluster = cluster_from_env()
    kwargs = dict(
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        initialization_timeout=initialization_timeout_s,
    )
    if cluster is not None:
        address, n, i = cluster
        kwargs.update(coordinator_address=address, num_processes=n, process_id=i)
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:
        raise ConfigError(
            f"config.distributed=True but the cluster is unknown ({e}); set "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}, run under SLURM, "
            "mpirun or a TPU pod, or start it with python -m anode_jax.launch"
        ) from None
    # Registered after JAX's own exit handler, so it runs first (atexit is LIFO).
    atexit.register(_exit_now_if_failed)


_failed = False


@contextlib.contextmanager
def exit_at_once_on_error():
    """Around a multi-process run: if it raises, this process exits (status 1) as soon as
    the interpreter starts to exit, instead of waiting in JAX's shutdown barrier for peers
    that are still training (up to `shutdown_timeout_seconds`, 5 min by default). The
    error line is printed first, and the peers then learn of the loss from the
    coordination service or the launcher."""
    global _failed
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not jax.distributed.is_initialized():
            raise
        _failed = True
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise TrainingError(
            f"process {jax.process_index()} of {jax.process_count()} stopped: a step across "
            f"the processes failed ({reason}), most likely because another process died; "
            "rerun the same command to resume from the latest checkpoint"
        ) from None
    except BaseException:
        if jax.distributed.is_initialized():
            _failed = True
        raise


def _exit_now_if_failed() -> None:
    if _failed:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(1)


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    """Rows of a global batch of `batch_size` that process `process_index` feeds."""
    if batch_size % process_count:
        raise ConfigError(
            f"batch size {batch_size} is not divisible by the {process_count} processes"
        )
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def check_mesh_layout(mesh) -> None:
    """Each process's devices must hold one contiguous block of the data axis, in process
    order, and every process must have devices in the mesh (so `process_rows` is the
    set of rows its devices hold). Raises `ConfigError` otherwise."""
    procs = [d.process_index for d in mesh.devices.flat]
    blocks = [p for k, p in enumerate(procs) if k == 0 or procs[k - 1] != p]
    if blocks != list(range(jax.process_count())) or len(set(procs)) != jax.process_count():
        raise ConfigError(
            f"the mesh's devices belong to processes {procs}: every one of the "
            f"{jax.process_count()} processes needs the same number of devices in it, in "
            "process order; leave config.num_devices=0 in multi-process runs"
        )
    counts = np.bincount(procs)
    if len(set(counts.tolist())) != 1:
        raise ConfigError(
            f"processes hold unequal numbers of the mesh's devices ({counts.tolist()}); "
            "start every process with the same number of devices"
        )


def put_rows(arrays, indices: np.ndarray, sharding):
    """The global batch `arrays[k][indices]` as sharded global jax arrays, reading only
    this process's rows of it (`indices[process_rows(...)]`).

    `arrays`: a tuple of host arrays indexed along axis 0 (the whole split); `indices`:
    the global batch's example indices (length `B`). One process: a plain device_put.
    """
    if jax.process_count() == 1:
        return jax.device_put(tuple(a[indices] for a in arrays), sharding)
    rows = indices[process_rows(len(indices), jax.process_index(), jax.process_count())]
    return tuple(
        jax.make_array_from_process_local_data(sharding, a[rows], (len(indices),) + a.shape[1:])
        for a in arrays
    )


def host_value(x) -> np.ndarray:
    """A replicated (possibly not fully addressable) array as numpy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)
