"""PNG curves of a run's metrics: one figure per metric group (the part of the name before the first '/'), one
axis per scale inside it, and a smoothed line over the faint per-step values.

Which curves share an axis (`assign_axes`): durations (`time/*`, `*/seconds`) share one, on a log scale when they
differ more than tenfold; counts (whole numbers, some above 1: a reward term's verdicts out of the batch, tokens)
share one; every other curve joins an axis whose curves are within a factor of 10 of its size (largest |value|),
else opens its own. So `reward/mean` (0-1) never lies flat under
`reward/math/correct` (0-128), `sync/parity_max_abs` (1e-3) is not a line at zero under
`sync/policy_change_max` (0.1), and `train/lr` (1e-4) gets its own axis beside `train/loss`.

Smoothing (`smooth`): TensorBoard's exponential moving average with a debiased start. It is causal, so the
smoothed line's last point is where the run stands now (a centred window has only half its points at the end of
the run, which is the point a user reads), and the PNG matches the `tb/` curves at the same weight. Its price is
a lag of about half the span; the weight makes the average span a tenth of the curve's points (the lag 5% of the
x axis) so 100 and 10,000-step runs look alike, and a curve that is not noisy is not smoothed at all
(`shown_line`). Series of fewer than `MIN_SMOOTHED` points (evaluations every 10 steps) are drawn as they are,
each point marked."""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from pathlib import Path

Series = tuple[list[int], list[float]]  # steps, values (finite only)

SCALE_RATIO = 10.0  # curves whose sizes differ by more than this get separate axes
MIN_SMOOTHED = 20  # fewer points than this are drawn unsmoothed
NOISY = 1.5  # measured: noisy GRPO/SFT curves 2.8-7.6, a 77-step SFT loss 1.3, a learning-rate schedule 1.0
MAX_LEGEND = 12  # a family of more curves than this (moe/layer*) gets one legend entry


def group_series(rows: list[dict]) -> dict[str, dict[str, Series]]:
    """group -> metric -> (steps, values) of the finite numbers in `rows`; a step missing a metric (evaluation
    every 10 steps) is simply absent from that metric's series."""
    groups: dict[str, dict[str, Series]] = defaultdict(dict)
    for row in rows:
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                continue
            xs, ys = groups[key.split("/")[0]].setdefault(key, ([], []))
            xs.append(row["step"])
            ys.append(float(value))
    return groups


def is_whole(values: list[float]) -> bool:
    return all(v.is_integer() for v in values)


def is_count(values: list[float]) -> bool:
    return is_whole(values) and max(values) > 1


def assign_axes(curves: dict[str, Series]) -> list[list[str]]:
    """The curves of one group split by scale: durations in seconds on one axis (phases of a step, compared with
    each other), counts on one (with the whole-valued curves beside them: a verdict count that stayed 0 or 1),
    then the others by decreasing size, a new axis whenever a curve is more than `SCALE_RATIO` times smaller
    than its axis' largest. All-zero curves join the smallest-scale axis (a line at zero reads the same on any)."""
    seconds = sorted((k for k in curves if is_seconds(k)), key=natural)
    others = [k for k in curves if k not in seconds]
    counts = sorted((k for k in others if is_whole(curves[k][1])), key=natural) \
        if any(is_count(curves[k][1]) for k in others) else []
    size = {k: max(abs(v) for v in curves[k][1]) for k in others if k not in counts}
    axes: list[list[str]] = [ks for ks in (seconds, counts) if ks]
    scaled: list[tuple[float, list[str]]] = []  # (largest size, keys)
    for key in sorted((k for k in size if size[k] > 0), key=lambda k: (-size[k], k)):
        if scaled and size[key] * SCALE_RATIO >= scaled[-1][0]:
            scaled[-1][1].append(key)
        else:
            scaled.append((size[key], [key]))
    zeros = sorted(k for k in size if size[k] == 0)
    if zeros:
        if scaled:
            scaled[-1][1].extend(zeros)
        else:
            scaled.append((0.0, zeros))
    return axes + [sorted(keys, key=natural) for _, keys in scaled]


def natural(key: str) -> list:
    """Sort key that puts layer2 before layer10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def smoothing_weight(n: int) -> float:
    """EMA weight whose average spans about n/10 points (alpha = 2 / (span + 1)), capped at 0.99."""
    span = max(1.0, n / 10)
    return min(0.99, 1 - 2 / (span + 1))


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average started at zero and divided by (1 - weight^k)
    after k points, so the first points are not pulled towards zero."""
    out, last = [], 0.0
    for k, v in enumerate(values, 1):
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**k))
    return out


def is_seconds(key: str) -> bool:
    return key.startswith("time/") or key.endswith("/seconds")


def variation(ys: list[float]) -> float:
    return sum(abs(b - a) for a, b in zip(ys, ys[1:]))


def shown_line(ys: list[float]) -> list[float]:
    """The line drawn bold: smoothed when there are at least `MIN_SMOOTHED` points and they are noisy (their total
    variation is more than `NOISY` times the smoothed line's), else the values themselves (`ys`, the same object):
    smoothing a schedule (`train/lr`) or a clean trend (a short SFT run's loss) would only delay it."""
    if len(ys) < MIN_SMOOTHED:
        return ys
    line = smooth(ys, smoothing_weight(len(ys)))
    return line if variation(ys) > NOISY * variation(line) else ys


def families(keys: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The keys drawn one by one, and the families of more than `MAX_LEGEND` keys that differ only in a number
    (moe/layer0/... to moe/layer60/...), drawn as one coloured band with one legend entry."""
    by_pattern: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        by_pattern[re.sub(r"\d+", "#", k)].append(k)
    big = {p: sorted(ks, key=natural) for p, ks in by_pattern.items() if len(ks) > MAX_LEGEND}
    return [k for k in keys if re.sub(r"\d+", "#", k) not in big], big


def draw_curve(ax, xs: list[int], ys: list[float], line: list[float], color, label: str, bold: bool = True) -> None:
    if line is ys:
        ax.plot(xs, ys, "o-" if len(ys) < MIN_SMOOTHED else "-", color=color, ms=3.5, lw=1.4 if bold else 0.8,
                label=label)
    else:
        ax.plot(xs, ys, color=color, lw=0.8, alpha=0.25 if bold else 0.1)
        ax.plot(xs, line, color=color, lw=1.8 if bold else 0.9, label=label)


def draw_axis(ax, group: str, keys: list[str], curves: dict[str, Series]) -> None:
    """The curves of one axis; legend entries name the metric without its group and give the last shown value,
    top to bottom in the order the curves end."""
    import matplotlib.pyplot as plt

    lines = {k: shown_line(curves[k][1]) for k in keys}
    single, big = families(keys)
    for pattern, members in big.items():
        first, last = (re.search(r"\d+", m[len(group):]).group() for m in (members[0], members[-1]))
        label = f"{pattern[len(group) + 1:].replace('#', f'{{{first}..{last}}}', 1)} (dark = {first})"
        for j, key in enumerate(members):
            draw_curve(ax, *curves[key], lines[key], plt.get_cmap("viridis")(j / (len(members) - 1)),
                       label if j == 0 else "_nolegend_", bold=False)
    for i, key in enumerate(sorted(single, key=lambda k: -lines[k][-1])):
        color = ("crimson", "black", "darkorange")[i % 3] if big else f"C{i % 10}"  # apart from the band's viridis
        draw_curve(ax, *curves[key], lines[key], color, f"{key[len(group) + 1:] or key}  {lines[key][-1]:.3g}")
    if all(is_seconds(k) for k in keys):
        ax.set_ylabel("seconds")
        sizes = [max(curves[k][1]) for k in keys]
        if min(sizes) > 0 and max(sizes) > SCALE_RATIO * min(sizes):
            ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both" if ax.get_yscale() == "log" else "major")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def plot_group(group: str, curves: dict[str, Series], path: Path) -> None:
    """One figure: the group's axes stacked over a shared step axis, written atomically to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_keys = assign_axes(curves)
    fig, axes = plt.subplots(len(axes_keys), 1, figsize=(10, 0.6 + 2.3 * len(axes_keys)), sharex=True,
                             squeeze=False)
    for ax, keys in zip(axes[:, 0], axes_keys):
        draw_axis(ax, group, keys, curves)
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(group, fontsize=12, fontweight="bold", x=0.02, ha="left")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def plot_metrics(rows: list[dict], out_dir: Path) -> list[Path]:
    """`out_dir/<group>.png` for every group, when the rows span more than one step (a one-step run, like
    eval_rm's summary at step 0, has nothing to draw over steps; its values stay in metrics.jsonl)."""
    if len({row["step"] for row in rows}) < 2:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group, curves in sorted(group_series(rows).items()):
        path = out_dir / f"{group}.png"
        plot_group(group, curves, path)
        written.append(path)
    return written


def plot_run(root: str | os.PathLike) -> list[Path]:
    """The plots of a run directory's metrics.jsonl, into `root/plots/`."""
    from dspost.rundir import read_metrics

    return plot_metrics(read_metrics(root), Path(root) / "plots")
