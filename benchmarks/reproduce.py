"""Reproduce the ANODE / ANODEv2 papers: the gradient-error figure and the CIFAR-10 table.

One command per part; every part writes into ``docs/reproduction/`` (committed results)
and regenerates ``docs/reproduction.md`` from what is there::

    # 1. gradient consistency (no training; resumable; hours on 2 shared CPU cores,
    #    dominated by compilation of the Nt = 16/32 RK4 cases)
    python benchmarks/reproduce.py gradients
    python benchmarks/reproduce.py gradients --sensitivity   # ResNet block, loss sum z(1)

    # 2. CIFAR-10 table at CPU scale (shared 10k/10k subset; resumable, rerun to continue)
    python benchmarks/reproduce.py train --scale=cpu --data-dir=../shared/data/cifar10

    # 2'. the papers' full recipe on full CIFAR-10 (GPU), unchanged
    python benchmarks/reproduce.py train --scale=paper --data-dir=/path/to/cifar10

    # backsolve's error on the training gradient of the CPU-scale networks (at init)
    python benchmarks/reproduce.py network-gradients --data-dir=../shared/data/cifar10

    # test accuracy of finished runs with batch-statistics BN (run after each training run)
    python benchmarks/reproduce.py bn-check --scale=cpu

    # time per epoch of the paper recipe on this machine (a few steps, extrapolated)
    python benchmarks/reproduce.py time-paper --data-dir=../shared/data/cifar10

    # regenerate docs/reproduction.md (tables + figures) from docs/reproduction/
    python benchmarks/reproduce.py report

Training runs go through :func:`anode_jax.training.train_and_evaluate` in one workdir per
run (``runs/reproduce/<scale>/<model>-<method>-s<seed>``): a finished run (its
``summary.json`` exists) is skipped, an interrupted one resumes from its last checkpoint.
After each run its ``summary.json`` and ``metrics.jsonl`` are copied to
``docs/reproduction/<scale>/<run>/`` and the figures and the document are regenerated, so
the committed folder always holds every finished run. Nothing in the document is typed by
hand: every figure is read from those files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.reproduction.common import DOC_PATH, RESULTS  # noqa: E402
from benchmarks.reproduction.gradients import (  # noqa: E402
    EXACT_STRATEGIES,
    GRAD_DTYPES,
    GRAD_FIELDS,
    GRAD_NTS,
    GRAD_SOLVERS,
    GradSetup,
    network_gradients,
    plot_gradients,
    run_gradients,
)
from benchmarks.reproduction.report import gradient_section, write_report  # noqa: E402
from benchmarks.reproduction.table import (  # noqa: E402
    CPU_EPOCHS,
    TABLE_METHODS,
    TABLE_MODELS,
    bn_check,
    run_config,
    run_table,
    scaled_milestones,
    time_paper,
)

__all__ = [  # what tests and notebooks use of the driver
    "CPU_EPOCHS",
    "DOC_PATH",
    "EXACT_STRATEGIES",
    "RESULTS",
    "GradSetup",
    "bn_check",
    "gradient_section",
    "main",
    "network_gradients",
    "run_config",
    "run_gradients",
    "run_table",
    "scaled_milestones",
    "time_paper",
    "write_report",
]


# --------------------------------------------------------------------------------------------
# Command line


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v for v in value.split(",") if v)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    g = sub.add_parser("gradients", help="gradient consistency (no training)")
    g.add_argument("--fields", type=_csv, default=GRAD_FIELDS)
    g.add_argument("--solvers", type=_csv, default=GRAD_SOLVERS)
    g.add_argument("--nts", type=lambda v: tuple(int(x) for x in _csv(v)), default=GRAD_NTS)
    g.add_argument("--dtypes", type=_csv, default=GRAD_DTYPES)
    g.add_argument(
        "--sensitivity",
        action="store_true",
        help="the ResNet block with loss sum(z(1)) at the anchor's Nt (gradients_ones.json)",
    )
    t = sub.add_parser("train", help="the CIFAR-10 table (resumable)")
    t.add_argument("--scale", choices=("cpu", "paper"), required=True)
    t.add_argument("--data-dir", required=True, help="CIFAR-10 in an official layout")
    t.add_argument("--models", type=_csv, default=TABLE_MODELS)
    t.add_argument("--methods", type=_csv, default=TABLE_METHODS)
    t.add_argument("--seeds", type=lambda v: tuple(int(x) for x in _csv(v)), default=None)
    t.add_argument("--epochs", type=int, default=None, help="override the scale's epochs")
    t.add_argument("--width", type=float, default=None, help="override the scale's width")
    t.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "reproduce"))
    t.add_argument("--retry-failed", action="store_true")
    p = sub.add_parser("time-paper", help="time per epoch of the paper recipe here")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--models", type=_csv, default=TABLE_MODELS)
    p.add_argument("--steps", type=int, default=3)
    n = sub.add_parser("network-gradients", help="backsolve's error in the table's networks")
    n.add_argument("--data-dir", required=True)
    n.add_argument("--models", type=_csv, default=TABLE_MODELS)
    b = sub.add_parser("bn-check", help="test accuracy with running vs batch BN statistics")
    b.add_argument("--scale", choices=("cpu", "paper"), default="cpu")
    b.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "reproduce"))
    sub.add_parser("report", help="regenerate docs/reproduction.md")
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, flush=True)
    if args.part == "gradients":
        if args.sensitivity:
            run_gradients(
                ("resnet",),
                ("euler", "midpoint"),
                (1, 2, 8, 32),
                ("float32",),
                (1.0,),
                GradSetup(cotangent="ones"),
                log=log,
                name="gradients_ones",
            )
        else:
            run_gradients(args.fields, args.solvers, args.nts, args.dtypes, log=log)
    elif args.part == "train":
        run_table(
            args.scale,
            args.data_dir,
            models=args.models,
            methods=args.methods,
            seeds=args.seeds,
            runs_dir=args.runs_dir,
            retry_failed=args.retry_failed,
            epochs=args.epochs,
            width=args.width,
            log=log,
            on_run_done=write_report,  # the document always shows every finished run
        )
    elif args.part == "bn-check":
        bn_check(args.scale, runs_dir=args.runs_dir, log=log)
    elif args.part == "network-gradients":
        network_gradients(args.data_dir, models=args.models, log=log)
    elif args.part == "time-paper":
        time_paper(args.data_dir, models=args.models, steps=args.steps, log=log)
    grad_json = os.path.join(RESULTS, "gradients.json")
    if args.part == "report" and os.path.exists(grad_json):  # figures with this code
        with open(grad_json) as f:
            plot_gradients(json.load(f), RESULTS)
    write_report()
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
