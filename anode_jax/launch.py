"""Start a multi-process JAX job on this host: one command per process, one coordinator.

    python -m anode_jax.launch --num_processes=2 -- \\
        train.py --config=configs/default.py --workdir=runs/mp --config.distributed=True
    python -m anode_jax.launch --num_processes=2 --devices_per_process=2 -- train.py ...

Process `i` runs the command after `--` (a `*.py` file runs under this Python) with

* `JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>`, `JAX_NUM_PROCESSES=N`,
  `JAX_PROCESS_ID=i` (what `anode_jax.training.distributed.initialize` reads; on
  SLURM, `mpirun` or a TPU pod the same trainer command finds them by itself);
* `JAX_COORDINATOR_BIND_ADDRESS` on loopback, so the coordinator is not reachable from
  other hosts;
* `JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo` (cross-process collectives on CPU) and, with
  `--devices_per_process=K`, `JAX_NUM_CPU_DEVICES=K` (K CPU devices per process);
  `JAX_PLATFORMS=cpu` unless already set.

Each line a process prints is prefixed with `[i] ` (stdout and stderr kept apart).
SIGINT, SIGTERM and SIGHUP sent to the launcher are forwarded to every process; the
processes die with the launcher (`PR_SET_PDEATHSIG`) even when it is SIGKILLed.

When a process exits with a failure, the launcher prints one line naming it, gives the
others `--grace_s` seconds to stop by themselves (their JAX runtime notices the lost
peer), then sends SIGTERM and, 5 s later, SIGKILL. Exit status: 0 when every process
succeeded, else the first failure's status (128 + signal number for a signal).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

TERM_TO_KILL_S = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_env(
    base: dict[str, str],
    *,
    port: int,
    num_processes: int,
    process_id: int,
    devices_per_process: int = 0,
) -> dict[str, str]:
    """The environment of process `process_id` of the job."""
    env = dict(base)
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(num_processes),
        JAX_PROCESS_ID=str(process_id),
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("JAX_PLATFORMS", "cpu")
    if devices_per_process:
        env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
        # an inherited --xla_force_host_platform_device_count would override it
        flags = env.get("XLA_FLAGS", "").split()
        flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags)
    return env


try:  # loaded here, not in the forked child, which only makes the system call
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not glibc Linux: processes then outlive a SIGKILLed launcher
    _LIBC = None


def _die_with_parent() -> None:
    """In the child before exec: receive SIGKILL when the launcher dies (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pump(stream, out, prefix: str, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        with lock:
            out.write(f"{prefix}{line}\n")
            out.flush()
    stream.close()


def describe_status(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


class Job:
    """N processes of one command, started together; see the module docstring."""

    def __init__(
        self,
        command: list[str],
        num_processes: int,
        *,
        devices_per_process: int = 0,
        port: int = 0,
        grace_s: float = 10.0,
        env: dict[str, str] | None = None,
        stdout=None,
        stderr=None,
    ):
        if num_processes < 1:
            raise ValueError(f"--num_processes={num_processes}; use 1 or more")
        if devices_per_process < 0:
            raise ValueError(f"--devices_per_process={devices_per_process}; use 0 or more")
        if not command:
            raise ValueError("no command after --; e.g. -- train.py --config=... --workdir=...")
        self.command = command
        self.num_processes = num_processes
        self.devices_per_process = devices_per_process
        self.port = port or free_port()
        self.grace_s = grace_s
        self.env = dict(os.environ if env is None else env)
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.procs: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _argv(self) -> list[str]:
        cmd = list(self.command)
        if cmd[0].endswith(".py"):
            cmd = [sys.executable, *cmd]
        return cmd

    def start(self) -> Job:
        for i in range(self.num_processes):
            env = process_env(
                self.env,
                port=self.port,
                num_processes=self.num_processes,
                process_id=i,
                devices_per_process=self.devices_per_process,
            )
            p = subprocess.Popen(
                self._argv(),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # signals reach it through the launcher only
                preexec_fn=_die_with_parent,
            )
            self.procs.append(p)
            for stream, out in ((p.stdout, self.stdout), (p.stderr, self.stderr)):
                t = threading.Thread(
                    target=_pump, args=(stream, out, f"[{i}] ", self._lock), daemon=True
                )
                t.start()
                self._threads.append(t)
        return self

    def send(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    def _say(self, msg: str) -> None:
        with self._lock:
            self.stderr.write(msg + "\n")
            self.stderr.flush()

    def wait(self) -> int:
        """Wait for the job; returns its exit status (see the module docstring)."""
        first_failure: tuple[int, int] | None = None
        deadline_term = deadline_kill = None
        while True:
            codes = [p.poll() for p in self.procs]
            if first_failure is None:
                for i, c in enumerate(codes):
                    if c not in (None, 0):
                        first_failure = (i, c)
                        alive = [str(k) for k, c2 in enumerate(codes) if c2 is None]
                        self._say(
                            f"error: process {i} of {self.num_processes} (pid "
                            f"{self.procs[i].pid}) {describe_status(c)}"
                            + (
                                f"; stopping process(es) {', '.join(alive)} "
                                f"(SIGTERM in {self.grace_s:g} s unless they stop)"
                                if alive
                                else ""
                            )
                        )
                        deadline_term = time.monotonic() + self.grace_s
                        deadline_kill = deadline_term + TERM_TO_KILL_S
                        break
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            if deadline_term is not None and now >= deadline_term:
                self.send(signal.SIGTERM)
                deadline_term = None
            if deadline_kill is not None and now >= deadline_kill:
                self.send(signal.SIGKILL)
                deadline_kill = None
            time.sleep(0.05)
        for t in self._threads:
            t.join(timeout=5)
        return 0 if first_failure is None else exit_code(first_failure[1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        k = argv.index("--")
        own, command = argv[:k], argv[k + 1 :]
    else:
        own, command = argv, []
    parser = argparse.ArgumentParser(
        prog="python -m anode_jax.launch",
        description="Start N processes of one JAX program on this host (see module docstring).",
        usage="%(prog)s --num_processes=N [--devices_per_process=K] -- COMMAND [ARGS...]",
    )
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument(
        "--devices_per_process", type=int, default=0, help="CPU devices per process (0: JAX's)"
    )
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument(
        "--grace_s",
        type=float,
        default=10.0,
        help="after a process fails, seconds the others get to stop before SIGTERM",
    )
    args = parser.parse_args(own)
    try:
        job = Job(
            command,
            args.num_processes,
            devices_per_process=args.devices_per_process,
            port=args.port,
            grace_s=args.grace_s,
        )
        job.start()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: job.send(s))
    return job.wait()


if __name__ == "__main__":
    sys.exit(main())
