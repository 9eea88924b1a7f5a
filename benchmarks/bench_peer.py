"""The papers' networks against the original PyTorch ANODE code: one training step, batch 128,
both sides measured in the same run on the running machine.

    .venv/bin/python benchmarks/bench_peer.py                       # resnet and sqnxt
    .venv/bin/python benchmarks/bench_peer.py --models=sqnxt --repeats=3
    .venv/bin/python benchmarks/bench_peer.py --peer_dir=/path/to/anode   # the original code

Setting (both sides): CIFAR-sized inputs (batch 128 × 32 × 32 × 3, random), 10 classes,
cross-entropy, ODE blocks with Euler and Nt = 2, one SGD step (learning rate 0.1, momentum
0.9) in train mode, BatchNorm statistics updated; float32.

Rows per network:

* anode-jax (`anode_jax.models.create_model`): `adjoint="anode"` with the loop-safe
  convolution (the default; backward formulations chosen by measurement on the running
  machine), `adjoint="direct"` with the same convolution, and `adjoint="anode"` with
  `lax.conv_general_dilated` (`--convs`);
* PyTorch: the original ANODE code (github:amirgholami/anode, MIT; its directory is
  `--peer_dir`, default `../shared/peers/anode` from the repository root; nothing of it is
  copied here), its `ResNet18` / `SqNxt_23_1x` built with an ODE block as its train.py builds
  them (options `{"Nt": 2, "method": "Euler"}`, its `conv_init`), the block's forward being
  one of: `odesolver_adjoint` (the original ANODE gradient), `torch.utils.checkpoint` around
  `odesolver` (`use_reentrant=False`), or `odesolver` with plain autograd. torch runs with
  `torch.set_num_threads(2)` and `OMP_WAIT_POLICY=PASSIVE` unless set (spin-waiting OpenMP
  threads stall on a shared machine; see docs/bench_torch_core.md), default (NCHW) tensors
  as the original code; the code's construction-time prints are silenced. One change at run
  time: the original SqueezeNext transition block adds its shortcut in place into a ReLU
  output, whose backward current torch refuses; the same sum is computed out of place.

The PyTorch side runs in its own subprocess (so its threads never compete with XLA's), driven
step by step from this process: every round times one step of each row, anode-jax and
PyTorch alike, back to back in a rotating order while the other process waits; one warm-up
step of each row first. Time: median of `--repeats` rounds, least in brackets. Ratio
(anode-jax ÷ each PyTorch row): the median over the rounds of the two steps' ratio within a
round, the range in brackets; only figures of this run. The load average (1 min) is recorded
at the start and end of each network and of the run. The three PyTorch rows start from the
same weights and batch, so their losses must agree at every step (recorded: equal gradients).
Without torch or without the peer code the script says so in one line and writes the
anode-jax rows only. `--keep_previous` keeps the runs already in docs/bench_peer.json as
"other runs" of the new file (each with its own machine header).

Figures and the verdict against issue 23 on the 2-core AMD EPYC (AVX2, no AVX-512) of
2026-11-30: docs/benchmarks.md, section "The papers' networks against the original PyTorch
code" (sqnxt no slower than the original code, resnet 1.11-1.26x slower).

Writes docs/bench_peer.json and docs/bench_peer.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PEER_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "peers", "anode"))
BATCH = 128
NUM_STEPS = 2
LEARNING_RATE = 0.1
MOMENTUM = 0.9
MODELS = ("resnet", "sqnxt")
CONVS = ("loop_safe", "lax")
#: PyTorch rows: the ODE block's forward in the original code.
TORCH_VARIANTS = {
    "original": "original ANODE (`odesolver_adjoint`)",
    "checkpoint": "`torch.utils.checkpoint` around `odesolver`",
    "direct": "plain autograd through `odesolver`",
}
TORCH_THREADS = 2
#: Lines of the PyTorch worker's protocol start with this (the peer code may print).
PREFIX = "@bench_peer "


# ----------------------------------------------------------------------------- PyTorch worker


def sqnxt_block_forward(self, input):
    """The original SqueezeNext block's forward with its shortcut added out of place: the
    original adds it in place (`output += ...`) into the output of a ReLU, which current
    torch's ReLU saves for its backward, so the backward fails ("modified by an inplace
    operation"). The same sum; patched onto `models.sqnxt.BasicBlock` by the torch sides."""
    import torch

    relu = torch.nn.functional.relu
    output = relu(self.bn1(self.conv1(input)))
    output = relu(self.bn2(self.conv2(output)))
    output = relu(self.bn3(self.conv3(output)))
    output = relu(self.bn4(self.conv4(output)))
    output = relu(self.bn5(self.conv5(output)))
    return relu(output + relu(self.shortcut(input)))


def torch_worker(peer_dir: str, model: str, batch: int) -> None:
    """Runs in the subprocess: builds the three PyTorch networks, then answers one command a
    line on stdin (`warmup`, `step <variant>`, `quit`) with one `PREFIX` JSON line."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import torch.nn as nn
    import torch.utils.checkpoint

    torch.set_num_threads(TORCH_THREADS)
    sys.path.insert(0, peer_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        import models.sqnxt
        from anode import odesolver, odesolver_adjoint
        from models.resnet import ResNet18
        from models.sqnxt import SqNxt_23_1x

    models.sqnxt.BasicBlock.forward = sqnxt_block_forward

    options = {"Nt": NUM_STEPS, "method": "Euler"}

    def block_class(variant):
        class ODEBlock(nn.Module):
            """The original train.py's ODE block, its forward chosen by `variant`."""

            def __init__(self, odefunc):
                super().__init__()
                self.odefunc = odefunc
                self.options = dict(options)

            def forward(self, x):
                if variant == "original":
                    return odesolver_adjoint(self.odefunc, x, self.options)
                if variant == "checkpoint":
                    return torch.utils.checkpoint.checkpoint(
                        odesolver, self.odefunc, x, self.options, use_reentrant=False
                    )
                return odesolver(self.odefunc, x, self.options)

        return ODEBlock

    def conv_init(m):  # as the original train.py initialises its network
        name = m.__class__.__name__
        if "Conv" in name and m.bias is not None:
            nn.init.xavier_uniform_(m.weight, gain=2**0.5)
            nn.init.constant_(m.bias, 0)
        elif "BatchNorm" in name:
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)

    def build(variant):
        torch.manual_seed(0)
        with contextlib.redirect_stdout(io.StringIO()):
            block = block_class(variant)
            net = ResNet18(block) if model == "resnet" else SqNxt_23_1x(10, block)
            net.apply(conv_init)
        net.train()
        return net, torch.optim.SGD(net.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)

    nets = {v: build(v) for v in TORCH_VARIANTS}
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    criterion = nn.CrossEntropyLoss()

    def step(variant):
        net, opt = nets[variant]
        start = time.perf_counter()
        opt.zero_grad()
        loss = criterion(net(images), labels)
        loss.backward()
        opt.step()
        return time.perf_counter() - start, loss.item()

    def reply(**fields):
        sys.stdout.write(PREFIX + json.dumps(fields) + "\n")
        sys.stdout.flush()

    reply(
        ready=True,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        mkldnn=torch.backends.mkldnn.is_available(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
        params=sum(p.numel() for p in nets["original"][0].parameters()),
    )
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        if command[0] == "warmup":
            losses = {v: step(v)[1] for v in TORCH_VARIANTS}
            reply(losses=losses)
        elif command[0] == "step":
            seconds, loss = step(command[1])
            reply(seconds=seconds, loss=loss)


class TorchPeer:
    """The PyTorch worker subprocess of one network, driven one step at a time."""

    def __init__(self, peer_dir: str, model: str, batch: int):
        # stderr into a file (a full pipe would block the worker); closed by `close`
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--torch_worker", model,
             f"--peer_dir={peer_dir}", f"--batch={batch}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )  # fmt: skip
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])
        self.process.wait(timeout=60)
        self.stderr.seek(0)
        error = self.stderr.read().strip().splitlines()
        raise SystemExit(
            "bench_peer.py: the PyTorch worker stopped: " + (error[-1] if error else "no output")
        )

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        self.process.wait(timeout=60)
        self.stderr.close()


def peer_unavailable(peer_dir: str) -> str | None:
    """Why the PyTorch side cannot run (one line), or None."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install -e '.[peer]')"
    for part in ("anode/adjoint.py", "anode/odesolver.py", "models/resnet.py", "models/sqnxt.py"):
        if not os.path.isfile(os.path.join(peer_dir, part)):
            return f"the original ANODE code is not at --peer_dir={peer_dir} (no {part})"
    return None


# ----------------------------------------------------------------------------- anode-jax side


def compile_jax_step(name: str, adjoint: str, conv: str, batch: int):
    """(compiled train step, its arguments, row fields) of one anode-jax configuration."""
    import re

    import _common
    import bench_models
    import optax

    from anode_jax.models import create_model

    model = create_model(
        name,
        num_classes=10,
        block="ode",
        num_steps=NUM_STEPS,
        solver="euler",
        adjoint=adjoint,
        conv=conv,
    )
    tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
    args, params = bench_models.step_arguments(model, tx, batch, concrete=True)
    with warnings.catch_warnings():
        # the lax row is unrolled on purpose (odeint warns that lax convolutions are)
        warnings.filterwarnings("ignore", "odeint: the vector field", UserWarning)
        temp, compile_s, compiled = _common.compiled_temp_bytes(
            bench_models.make_train_step(model, tx), *args
        )
    text = compiled.as_text()
    # the formulations the autotuner chose, read off the named scopes in the program
    fwd = "+".join(sorted(set(re.findall(r"conv_forward_([a-z]+)", text))))
    inp = "+".join(sorted(set(re.findall(r"conv_input_grad_([a-z]+)", text))))
    wgt = "+".join(sorted(set(re.findall(r"conv_weight_grad_([a-z]+)", text))))
    fields = {
        "params": params,
        "compile_s": compile_s,
        "temp_bytes": temp,
        "formulations": (
            f"forward {fwd}, input {inp}, weight {wgt}" if conv == "loop_safe" else "lax"
        ),
    }
    return compiled, args, fields


# ----------------------------------------------------------------------------- timing


def measure_network(name: str, args, peer_reason: str | None) -> dict:
    """Every row of one network, timed in interleaved rounds."""
    import jax

    load_start = os.getloadavg()[0]
    calls, rows = {}, {}
    configs = [("anode", args.convs[0]), ("direct", args.convs[0])]
    configs += [("anode", conv) for conv in args.convs[1:]]
    for adjoint, conv in configs:
        label = f"anode-jax {adjoint} ({conv})"
        compiled, step_args, fields = compile_jax_step(name, adjoint, conv, args.batch)
        calls[label] = lambda c=compiled, a=step_args: jax.block_until_ready(c(*a))
        rows[label] = {"side": "anode-jax", "adjoint": adjoint, "conv": conv, **fields}
        print(f"{name} {label}: compiled in {fields['compile_s']:.1f} s", flush=True)
    peer, losses = None, {}

    def peer_step(variant):
        answer = peer.ask(f"step {variant}")
        losses.setdefault(variant, []).append(answer["loss"])
        return answer["seconds"]

    if peer_reason is None:
        peer = TorchPeer(args.peer_dir, name, args.batch)
        for variant in TORCH_VARIANTS:
            label = f"PyTorch {variant}"
            calls[label] = lambda v=variant: peer_step(v)
            rows[label] = {"side": "PyTorch", "variant": variant, "params": peer.info["params"]}
    try:
        for call in calls.values():  # warm-up (the first call of each row is not timed)
            call()
        losses.clear()
        times = {label: [] for label in calls}
        labels = list(calls)
        for r in range(args.repeats):
            order = labels[r % len(labels) :] + labels[: r % len(labels)]
            for label in order:
                start = time.perf_counter()
                seconds = calls[label]()
                wall = time.perf_counter() - start
                # PyTorch rows: the worker's own clock (excludes the pipe round trip)
                times[label].append(seconds if isinstance(seconds, float) else wall)
            print(
                f"{name} round {r + 1}/{args.repeats}: "
                + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                flush=True,
            )
    finally:
        if peer is not None:
            peer.close()
    for label, ts in times.items():
        rows[label].update(row=label, median_s=statistics.median(ts), least_s=min(ts), times_s=ts)
    result = {
        "model": name,
        "rows": list(rows.values()),
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    if peer is not None:
        result["torch"] = {k: v for k, v in peer.info.items() if k != "ready"}
        # Same initial weights and batch in every PyTorch row: equal gradients give equal losses
        # at every step (BatchNorm's running statistics, updated twice by the recomputing rows,
        # do not enter a train-mode loss).
        per_step = list(zip(*losses.values()))
        result["torch"]["losses"] = losses
        result["torch"]["loss_rel_spread"] = max(
            (max(ls) - min(ls)) / abs(statistics.mean(ls)) for ls in per_step
        )
    return result


# ----------------------------------------------------------------------------- markdown


def _ratio(row, peer) -> str:
    """The median of the per-round ratios (the two steps of a round run a few seconds apart, so
    a load change between rounds moves both), their range in brackets."""
    per_round = [a / b for a, b in zip(row["times_s"], peer["times_s"])]
    return f"{statistics.median(per_round):.2f}× ({min(per_round):.2f}–{max(per_round):.2f}) | "


def to_markdown(payload) -> str:
    lines = [
        "# The papers' networks against the original PyTorch ANODE code (same run)",
        "",
        *_run_markdown(payload, "##"),
    ]
    others = payload.get("other_runs", [])
    if others:
        lines += [
            "",
            "## Other runs on this machine",
            "",
            "Each run below is a separate measurement with its own header; its ratios are between "
            "its own rows only.",
        ]
        for run in others:
            lines += [
                "",
                f"### Run of {run['machine'].get('date', '?')}",
                "",
                *_run_markdown(run, "####"),
            ]
    return "\n".join(lines) + "\n"


def _run_markdown(payload, heading: str) -> list[str]:
    import _common

    s = payload["settings"]
    lines = [
        f"Generated by `.venv/bin/python {s['command']}`.",
        "",
        _common.machine_header(payload["machine"]),
    ]
    torch_info = next((n["torch"] for n in payload["networks"] if "torch" in n), None)
    if torch_info:
        lines[-1] += (
            f" PyTorch {torch_info['torch']} (CPU capability `{torch_info['cpu_capability']}`, "
            f"oneDNN {'yes' if torch_info['mkldnn'] else 'no'}), {torch_info['threads']} threads, "
            f"`OMP_WAIT_POLICY={torch_info['omp_wait_policy'] or 'unset'}`, in its own process."
        )
    lines += [
        "",
        f"One training step (forward, backward, SGD momentum {MOMENTUM}, BatchNorm statistics, "
        f"train mode), batch {s['batch']} × 32 × 32 × 3, ODE blocks with Euler and Nt = "
        f"{NUM_STEPS}. Time: median of {s['repeats']} interleaved rounds (order rotating; one "
        "warm-up step of each row first), least in brackets. Ratio = anode-jax time ÷ the "
        "PyTorch row's time in the same round of this run (< 1: anode-jax is faster): the "
        "median over the rounds, the range in brackets. (The ratio of the two medians can differ "
        "when the machine's speed changes between rounds: the medians may come from different "
        "rounds.)",
    ]
    if payload.get("peer_missing"):
        lines += ["", f"**PyTorch side not measured: {payload['peer_missing']}.**"]
    for net in payload["networks"]:
        rows = {r["row"]: r for r in net["rows"]}
        peers = [f"PyTorch {v}" for v in TORCH_VARIANTS if f"PyTorch {v}" in rows]
        lines += [
            "",
            f"{heading} {net['model']}",
            "",
            f"Load average (1 min) {net['load_average'][0]} at the start, "
            f"{net['load_average'][1]} at the end."
            + (
                " The PyTorch rows' losses (same initial weights and batch) agree at every timed "
                f"step to {net['torch']['loss_rel_spread']:.1e} (relative): the three gradients "
                "are the same."
                if "torch" in net
                else ""
            ),
            "",
            "| row | step (s) | images/s | "
            + "".join(f"÷ {p} | " for p in peers)
            + "params | compile (s) | temp (MiB) | conv formulations |",
            "|---|---|---|" + "---|" * len(peers) + "---|---|---|---|",
        ]
        for label, r in rows.items():
            name = label
            if r["side"] == "PyTorch":
                name = f"PyTorch: {TORCH_VARIANTS[r['variant']]}"
            ratios = "".join(
                _ratio(r, rows[p]) if r["side"] == "anode-jax" else "– | " for p in peers
            )
            compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "–"
            temp = f"{r['temp_bytes'] / 2**20:,.0f}" if "temp_bytes" in r else "–"
            lines.append(
                f"| {name} | {r['median_s']:.2f} ({r['least_s']:.2f}) | "
                f"{s['batch'] / r['median_s']:.1f} | {ratios}{r['params']:,} | {compile_s} | "
                f"{temp} | {r.get('formulations', '–')} |"
            )
    return lines


# ----------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--convs",
        default=",".join(CONVS),
        help="anode-jax convolutions: the first is timed with `anode` and `direct`, the others "
        "with `anode` only",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--peer_dir", default=DEFAULT_PEER_DIR)
    parser.add_argument(
        "--keep_previous",
        action="store_true",
        help="keep the runs stored in docs/bench_peer.json as other runs of the new file",
    )
    parser.add_argument("--torch_worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        return torch_worker(args.peer_dir, args.torch_worker, args.batch)

    models = args.models.split(",")
    for name in models:
        if name not in MODELS:
            raise SystemExit(f"--models: {name!r} is not one of {list(MODELS)}")
    args.convs = args.convs.split(",")
    for conv in args.convs:
        if conv not in CONVS:
            raise SystemExit(f"--convs: {conv!r} is not one of {list(CONVS)}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    args.peer_dir = os.path.abspath(args.peer_dir)
    peer_reason = peer_unavailable(args.peer_dir)
    if peer_reason:
        print(f"bench_peer.py: PyTorch side skipped: {peer_reason}; anode-jax rows only.")

    # this tree's anode_jax (not an installed copy), then the benchmark helpers
    sys.path[:0] = [os.path.dirname(HERE), HERE]
    import _common

    payload = {
        "machine": _common.machine(),
        "settings": {
            "command": " ".join(["benchmarks/bench_peer.py"] + sys.argv[1:]),
            "batch": args.batch,
            "repeats": args.repeats,
            "num_steps": NUM_STEPS,
            "solver": "euler",
            "learning_rate": LEARNING_RATE,
            "momentum": MOMENTUM,
            "peer_dir": args.peer_dir,
        },
        "networks": [],
    }
    if peer_reason:
        payload["peer_missing"] = peer_reason
    for name in models:
        payload["networks"].append(measure_network(name, args, peer_reason))
    if args.keep_previous:
        previous = _common.read_results("bench_peer")
        payload["other_runs"] = [
            {k: v for k, v in previous.items() if k != "other_runs"},
            *previous.get("other_runs", []),
        ]
    _common.write_results("bench_peer", payload, to_markdown)
    print(to_markdown(payload))


if __name__ == "__main__":
    main()
