"""Loss / accuracy curves from metrics.jsonl as PNG files.

Drawn on plain `matplotlib.figure.Figure` objects (no pyplot): the caller's backend is
left alone, so a notebook that trains keeps its inline figures, and no window opens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def plot_curves(records: Sequence[dict[str, Any]], workdir: str, title: str = "") -> list[str]:
    from matplotlib.figure import Figure

    paths = []
    for metric in ("loss", "accuracy"):
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        for split, style in (("train", "-"), ("test", "o-")):
            rs = [r for r in records if r["split"] == split and isinstance(r[metric], float)]
            if rs:
                ax.plot(
                    [r["step"] for r in rs],
                    [r[metric] for r in rs],
                    style,
                    label=split,
                    markersize=3,
                )
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        if metric == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(title)
        fig.tight_layout()
        path = os.path.join(workdir, f"{metric}.png")
        fig.savefig(path)
        paths.append(path)
    return paths
