"""``compare.png``: held-out phi = f(x, y*(x)) against the methods' wall time, one colour per
method, its median over seeds as a line and the seeds' range as a band, the target as a dashed
line. Needs matplotlib (an optional extra); without it nothing is drawn."""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bilevel_ray.runtime.checkpoint import atomic_write

__all__ = ["plot_compare"]

GRID_POINTS = 60


def _value_at(curve: Sequence[Mapping[str, Any]], t: float) -> float:
    """A run's phi at time t: its last logged value at or before t."""
    value = math.nan
    for row in curve:
        if row["wall_s"] > t:
            break
        value = row["eval/phi"]
    return value


def plot_compare(
    curves: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]],
    target: float,
    problem: str,
    path: Path,
) -> Path | None:
    """Draw the figure to ``path``; None when matplotlib is not installed or nothing ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by_method: dict[str, list[Sequence[Mapping[str, Any]]]] = {}
    for (method, _), curve in sorted(curves.items()):
        if curve:
            by_method.setdefault(method, []).append(curve)
    if not by_method:
        return None
    end = max(row["wall_s"] for runs in by_method.values() for c in runs for row in c)
    grid = [end * (i + 1) / GRID_POINTS for i in range(GRID_POINTS)]
    figure, axis = plt.subplots(figsize=(8, 5))
    positive = True
    for method, runs in by_method.items():
        values = [[_value_at(c, t) for c in runs] for t in grid]
        keep = [i for i, v in enumerate(values) if any(math.isfinite(x) for x in v)]
        times = [grid[i] for i in keep]
        finite = [[x for x in values[i] if math.isfinite(x)] for i in keep]
        median = [statistics.median(v) for v in finite]
        low, high = [min(v) for v in finite], [max(v) for v in finite]
        positive = positive and all(v > 0 for v in low)
        (line,) = axis.plot(times, median, label=f"{method} (median of {len(runs)} seeds)")
        axis.fill_between(times, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if math.isfinite(target):
        axis.axhline(target, color="black", linestyle="--", linewidth=1, label="target")
        positive = positive and target > 0
    if positive:
        axis.set_yscale("log")
    axis.set_xlabel("wall time of the method's steps (s)")
    axis.set_ylabel("held-out upper loss at the lower solution, f(x, y*(x))")
    title = f"{problem}: every method under the same budget (band: range over seeds)"
    axis.set_title(textwrap.fill(title, 80), fontsize=10)
    axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)
    return path
