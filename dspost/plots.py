"""PNG curves of a run's metrics: one figure per metric group (the part before '/')."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path


def plot_run(root: str | os.PathLike) -> list[Path]:
    from dspost.rundir import read_metrics

    rows = read_metrics(root)
    series: dict[str, dict[str, tuple[list, list]]] = defaultdict(dict)
    for row in rows:
        for key, value in row.items():
            if key == "step" or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            group = key.split("/")[0]
            xs, ys = series[group].setdefault(key, ([], []))
            xs.append(row["step"])
            ys.append(value)
    if not series:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(root) / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for group, curves in sorted(series.items()):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, (xs, ys) in sorted(curves.items()):
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key)
        ax.set_xlabel("step")
        ax.set_title(group)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{group}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
