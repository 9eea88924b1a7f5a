"""Fills the figures the docs quote from the result files the scripts write.

    .venv/bin/python scripts/update_doc_figures.py          # rewrite README.md and docs/*.md
    .venv/bin/python scripts/update_doc_figures.py --check  # exit 1 (naming the files) if stale

A figure in Markdown is a marked span, inline or spanning lines:

    final test accuracy <!-- figure: default_run final -->99.72 %<!-- /figure -->

    <!-- figure: default_run table -->
    | seed | ... |
    <!-- /figure -->

The text between the markers is generated; edit the words around it, not the figure. The
marker names a figure function below and its arguments (split like a shell command line, so
`"ode rk4 anode"` is one argument). Each function reads a JSON result file in docs/ written by
a script (`scripts/run_default.py` -> `docs/default_run.json`, `benchmarks/bench_*.py` ->
`docs/bench_*.json`). `tests/test_doc_figures.py` fails when the docs differ from what this
script generates.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
MARKDOWN = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
SPAN = re.compile(r"<!-- figure: (?P<spec>.+?) -->(?P<body>.*?)<!-- /figure -->", re.S)

FIGURES: dict[str, Callable[..., str]] = {}


class FigureError(ValueError):
    """A marker names an unknown figure, bad arguments or a missing result."""


def figure(name: str):
    def register(fn):
        FIGURES[name] = fn
        return fn

    return register


@functools.cache
def result(stem: str) -> dict:
    path = DOCS / f"{stem}.json"
    if not path.exists():
        raise FigureError(f"result file {path.relative_to(REPO)} not found")
    return json.loads(path.read_text())


def pct(fraction: float) -> str:
    return f"{100 * fraction:.2f} %"


def ratio(x: float) -> str:
    return f"{x:.2f}×"


# ------------------------------------------------------------------ default run


def _default_run(seed: int = 0) -> dict:
    for run in result("default_run")["runs"]:
        if run["seed"] == seed:
            return run
    raise FigureError(f"docs/default_run.json has no run with seed {seed}")


def _correct(run: dict, key: str) -> str:
    n = run["test_images"]
    return f"{round(run[key] * n)}/{n}"


def machine_line(machine: dict, date: str, load: str = "") -> str:
    avx = "AVX-512" if machine.get("avx512") else "no AVX-512"
    flags = machine.get("xla_flags") or "unset"
    return (
        f"{machine.get('cpu_model', 'CPU model not recorded')} ({avx}), "
        f"{machine.get('cpu_count')} cores shared with other jobs{load}; jax "
        f"{machine.get('jax')}, jaxlib {machine.get('jaxlib')}, XLA_FLAGS {flags}; {date}"
    )


@figure("default_run")
def default_run_figure(what: str, seed: str = "0", *extra: str) -> str:
    """final | best | final_correct | final_loss | seeds (the other seeds' final accuracies) |
    command_s | train_s | target | machine | table [seed]; variant NAME final|best|loss."""
    doc = result("default_run")
    if what == "variant":
        run, others = None, []
    else:
        run = _default_run(int(seed))
        others = [r for r in doc["runs"] if r["seed"] != int(seed)]
    if what == "final":
        return pct(run["final_test_accuracy"])
    if what == "best":
        return f"{pct(run['best_test_accuracy'])} (epoch {run['best_test_epoch']})"
    if what == "final_correct":
        return _correct(run, "final_test_accuracy")
    if what == "seeds":
        seeds = " and ".join(str(r["seed"]) for r in others)
        values = ", ".join(pct(r["final_test_accuracy"]) for r in others)
        return f"seeds {seeds}: {values}"
    if what == "command_s":
        return f"{run['command_s']:.0f} s"
    if what == "train_s":
        return f"{run['wall_time_s']:.0f} s"
    if what == "target":
        return pct(doc["target_test_accuracy"])
    if what == "machine":
        loads = [r["load_avg_1min"] for r in doc["runs"]]
        load = f", load average {min(loads):.1f}-{max(loads):.1f}"
        return machine_line(doc["machine"], doc["date"], load)
    if what == "variant":  # default_run variant NAME final|best|loss: docs/core.md's comparison
        name, field = seed, extra[0] if extra else "final"
        runs = doc.get("variants", {}).get("runs", {})
        if name not in runs:
            raise FigureError(f"docs/default_run.json has no variant {name!r}")
        v = runs[name]
        return {
            "final": pct(v["final_test_accuracy"]),
            "best": pct(v["best_test_accuracy"]),
            "loss": f"{v['final_test_loss']:.4f}",
        }[field]
    if what == "final_loss":
        return f"{run['final_test_loss']:.4f}"
    if what == "table":
        rows = [
            "| seed | whole command | training loop (`wall_time_s`) | final test accuracy "
            "| best test accuracy | load avg |",
            "|---|---|---|---|---|---|",
        ]
        for r in doc["runs"]:
            rows.append(
                f"| {r['seed']}{' (shipped)' if r['seed'] == 0 else ''} | {r['command_s']:.1f} s "
                f"| {r['wall_time_s']:.1f} s | {pct(r['final_test_accuracy'])} "
                f"({_correct(r, 'final_test_accuracy')}) | {pct(r['best_test_accuracy'])} "
                f"(epoch {r['best_test_epoch']}) | {r['load_avg_1min']:.1f} |"
            )
        rows.append("")
        rows.append(f"Measured by `scripts/run_default.py`: {default_run_figure('machine')}.")
        return "\n".join(rows)
    raise FigureError(f"default_run: unknown figure {what!r}")


# ------------------------------------------------------------------ network benchmark


def _model_row(model: str, config: str) -> dict:
    for row in result("bench_models")["rows"]:
        if row["model"] == model and row["config"] == config:
            return row
    raise FigureError(f"docs/bench_models.json has no row {model!r} / {config!r}")


@figure("bench_models")
def bench_models_figure(model: str, numerator: str, denominator: str, what: str) -> str:
    """The ratio numerator / denominator of one network's training step: `time` (step
    seconds) or `memory` (compiled temp bytes)."""
    key = {"time": "step_s", "memory": "temp_bytes"}.get(what)
    if key is None:
        raise FigureError(f"bench_models: {what!r} is neither 'time' nor 'memory'")
    return ratio(_model_row(model, numerator)[key] / _model_row(model, denominator)[key])


@figure("machine")
def machine_figure(stem: str) -> str:
    """The machine, versions and date a benchmark result file records."""
    doc = result(stem)
    m = doc.get("machine", {})
    cpu = m.get("cpu_model") or "CPU model not recorded"
    avx = {True: " (AVX-512)", False: " (no AVX-512)"}.get(m.get("avx512"), "")
    return (
        f"{cpu}{avx}, {m.get('cpu_count')} cores; jax {m.get('jax')}; "
        f"{m.get('date') or doc.get('date')}"
    )


# ------------------------------------------------------------------ rendering


def render_span(spec: str) -> str:
    try:
        name, *args = shlex.split(spec)
    except ValueError as e:
        raise FigureError(f"figure marker {spec!r}: {e}") from None
    if name not in FIGURES:
        raise FigureError(f"unknown figure {name!r}; known: {', '.join(sorted(FIGURES))}")
    try:
        text = FIGURES[name](*args)
    except TypeError as e:
        raise FigureError(f"figure {spec!r}: {e}") from None
    return text


def render(text: str, where: str = "<text>") -> str:
    """`text` with every figure span regenerated (block spans keep their line breaks)."""

    def fill(match: re.Match) -> str:
        try:
            value = render_span(match["spec"])
        except FigureError as e:
            line = text.count("\n", 0, match.start()) + 1
            raise FigureError(f"{where}:{line}: {e}") from None
        if "\n" in value or match["body"].startswith("\n"):
            value = f"\n{value}\n"
        return f"<!-- figure: {match['spec']} -->{value}<!-- /figure -->"

    return SPAN.sub(fill, text)


def stale_files() -> list[Path]:
    return [p for p in MARKDOWN if render(p.read_text(), str(p)) != p.read_text()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    try:
        stale = stale_files()
    except FigureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        for p in stale:
            print(f"stale figures: {p.relative_to(REPO)}")
        return 1 if stale else 0
    for p in stale:
        p.write_text(render(p.read_text(), str(p)))
        print(f"updated {p.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
