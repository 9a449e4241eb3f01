"""``compare.png``: held-out phi = f(x, y*(x)) (the test half of the held-out rows) against the
methods' own wall time, one colour per method: its median over seeds as a line, the seeds'
range as a band, each seed's best held-out point (chosen on the validation half) as a dot, and
the ranked point's target as a dashed line. The legend sits outside the axes, to their right,
so that it never covers a curve, and names every method that did not run or diverged, with
the reason. Needs matplotlib (an optional extra); without it nothing is drawn."""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bilevel_ray.runtime.compare.rank import best_row, scored
from bilevel_ray.runtime.local.output_files import atomic_write

__all__ = ["draw_compare", "plot_compare"]

GRID_POINTS = 60
REASON_CHARS = 60  # a failed method's reason, cut to this in the legend


def _value_at(curve: Sequence[Mapping[str, Any]], t: float) -> float:
    """A run's phi at time t: its last scored value at or before t (an unscored point's f at
    an unsolved y_hat is not phi: not drawn)."""
    value = math.nan
    for row in curve:
        if row["wall_s"] > t:
            break
        if scored(row):
            value = row["eval/phi"]
    return value


def _short(reason: str) -> str:
    reason = " ".join(str(reason).split())
    return reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 3] + "..."


def draw_compare(
    curves: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]],
    target: float,
    problem: str,
    failed: Mapping[str, str] | None = None,
    rank_by: str = "best",
) -> Any:
    """The figure (matplotlib's), or None when nothing ran and nothing failed. ``curves`` are
    the runs to draw (diverged runs left out by the caller); ``failed``: method -> why it did
    not run or diverged, each a legend entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    failed = dict(failed or {})
    by_method: dict[str, list[Sequence[Mapping[str, Any]]]] = {}
    for (method, _), curve in sorted(curves.items()):
        if curve:
            by_method.setdefault(method, []).append(sorted(curve, key=lambda r: r["wall_s"]))
    if not by_method and not failed:
        return None
    figure, axis = plt.subplots(figsize=(11, 5))
    positive = True
    end = max((r["wall_s"] for rs in by_method.values() for c in rs for r in c), default=1.0)
    grid = [end * (i + 1) / GRID_POINTS for i in range(GRID_POINTS)]
    for method, runs in by_method.items():
        values = [[_value_at(c, t) for c in runs] for t in grid]
        keep = [i for i, v in enumerate(values) if any(math.isfinite(x) for x in v)]
        times = [grid[i] for i in keep]
        finite = [[x for x in values[i] if math.isfinite(x)] for i in keep]
        median = [statistics.median(v) for v in finite]
        low, high = [min(v) for v in finite], [max(v) for v in finite]
        positive = positive and all(v > 0 for v in low)
        label = f"{method} (median of {len(runs)} seeds)"
        if method in failed:  # some seeds diverged: the others are drawn
            label += f"; {_short(failed.pop(method))}"
        (line,) = axis.plot(times, median, label=label)
        axis.fill_between(times, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        best = [b for b in (best_row(c) for c in runs) if b is not None]
        axis.plot(
            [b["wall_s"] for b in best],
            [b["eval/phi"] for b in best],
            "o",
            color=line.get_color(),
            markersize=4,
        )
    for method, why in failed.items():  # nothing to draw: named all the same
        axis.plot(
            [], [], color="grey", marker="x", linestyle="none", label=f"{method} ({_short(why)})"
        )
    if math.isfinite(target):
        axis.axhline(
            target, color="black", linestyle="--", linewidth=1, label=f"target ({rank_by} point)"
        )
        positive = positive and target > 0
    axis.plot([], [], "o", color="grey", markersize=4, label="a seed's best held-out point")
    if positive and by_method:
        axis.set_yscale("log")
    axis.set_xlabel("wall time of the method's steps (s)")
    axis.set_ylabel("held-out f(x, y*(x)) (test rows)")
    title = f"{problem}: every method under the same budget (band: range over seeds)"
    axis.set_title(textwrap.fill(title, 70), fontsize=10)
    # Outside the axes, to their right: a legend inside would cover curves.
    axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    figure.tight_layout()
    return figure


def plot_compare(
    curves: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]],
    target: float,
    problem: str,
    path: Path,
    failed: Mapping[str, str] | None = None,
    rank_by: str = "best",
) -> Path | None:
    """Draw the figure to ``path``; None when matplotlib is not installed or nothing ran."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure = draw_compare(curves, target, problem, failed, rank_by)
    if figure is None:
        return None
    # bbox_inches="tight" keeps the legend beside the axes inside the picture.
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png", bbox_inches="tight"))
    plt.close(figure)
    return path
