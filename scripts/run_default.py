"""Runs the shipped default config end to end and records its results in docs/default_run.json.

    .venv/bin/python scripts/run_default.py [--seeds 0 1 2]   # the shipped config per seed
    .venv/bin/python scripts/run_default.py --variants         # other solvers / gradients

Each seed runs the command a user runs (`train.py --config=configs/default.py`, with
`--config.seed=S` for S != 0) in a fresh temporary workdir, timed as a whole (imports, data
loading, compilation and training). The result file keeps each run's summary figures and the
machine: CPU model, whether it has AVX-512, cores, jax/jaxlib versions, XLA_FLAGS, the load
average during the runs and the date. `scripts/update_doc_figures.py` fills the figures the
docs quote from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "docs" / "default_run.json"
SUMMARY_KEYS = (
    "final_test_accuracy",
    "best_test_accuracy",
    "best_test_epoch",
    "final_test_loss",
    "final_train_loss",
    "steps",
    "epochs",
    "param_count",
    "wall_time_s",
    "train_images_per_sec_median",
)


def machine() -> dict:
    """The facts a timing needs next to it."""
    import jax
    import jaxlib

    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu_model": model,
        "avx512": "avx512f" in flags,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "platform": platform.platform(),
    }


# Variants of the default run (seed 0) that docs/core.md compares: name -> config overrides.
VARIANTS = {
    "rk4-anode": ["--config.model.solver=rk4"],
    "reversible_rk4-reversible": [
        "--config.model.solver=reversible:rk4",
        "--config.model.adjoint=reversible",
    ],
}


def run_seed(seed: int, overrides=()) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, "train.py", "--config=configs/default.py", f"--workdir={workdir}"]
        if seed:
            cmd.append(f"--config.seed={seed}")
        cmd.extend(overrides)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        command_s = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"seed {seed}: train.py exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        summary = json.loads((Path(workdir) / "summary.json").read_text())
    row = {"seed": seed, "command_s": round(command_s, 2), "load_avg_1min": os.getloadavg()[0]}
    row.update({k: summary[k] for k in SUMMARY_KEYS})
    row["test_images"] = int(summary["dataset"].split(" / ")[1].split()[0])
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variants", action="store_true", help=f"run {', '.join(VARIANTS)} (seed 0) instead"
    )
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    payload = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    if args.variants:
        variants = {}
        for name, overrides in VARIANTS.items():
            variants[name] = {**run_seed(0, overrides), "overrides": overrides}
            print(name, json.dumps(variants[name]))
        payload["variants"] = {"date": started, "machine": machine(), "runs": variants}
    else:
        runs = []
        for seed in args.seeds:
            runs.append(run_seed(seed))
            print(json.dumps(runs[-1]))
        payload.update(
            command="python train.py --config=configs/default.py --workdir=runs/default",
            target_test_accuracy=0.97,
            date=started,
            machine=machine(),
            runs=runs,
        )
    RESULT.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {RESULT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
