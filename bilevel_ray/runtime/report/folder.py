"""``bilevel-ray report DIR``: a table of the runs in DIR and a plot of loss against time and step.

DIR is a sweep's folder (``trials.parquet`` + ``history.parquet``, one curve per trial) or a
``solve`` / ``train`` output folder (``history.parquet``, one curve per method: a run that
switched to its fallback shows both, and a dashed line at the switch). Each logged row is a
marked point when a curve has few of them, so that two rows do not read as a measured straight
line; the title says how to get more. The loss axis is logarithmic when every value is
positive. The plot needs matplotlib, an optional extra (``pip install 'bilevel_ray[plot]'``);
without it the table is still printed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bilevel_ray.errors import ConfigError
from bilevel_ray.runtime.local.output_files import atomic_write, check_output_path
from bilevel_ray.runtime.report.sweep import (
    kept_settings_note,
    printable,
    read_best_schedule,
    settings_label,
    status_counts,
    sweep_figure,
)
from bilevel_ray.runtime.tune.lineage import BEST_SCHEDULE

__all__ = ["report"]

COLUMNS = ("trial_id", "status", "eval/upper_loss", "eval/lower_gap", "step", "wall_s")
FEW_POINTS = 20  # a curve with at most this many logged rows is drawn with markers


def report(folder: str | Path, gap_tol: float = 0.1) -> tuple[str, Path | None, str | None]:
    """(the table as text, the plot's path or None, a note when the plot was not written)."""
    folder = Path(folder)
    if isinstance(gap_tol, bool) or not isinstance(gap_tol, (int, float)):
        raise ConfigError(f"gap_tol={gap_tol!r}: must be a number >= 0")
    if not (math.isfinite(gap_tol) and gap_tol >= 0):
        raise ConfigError(f"gap_tol={gap_tol}: must be a finite number >= 0, e.g. 0.1")
    history_path = folder / "history.parquet"
    if not history_path.is_file():
        raise ConfigError(
            f"{str(folder)!r} holds no history.parquet: give a folder written by "
            "'bilevel-ray tune --out', 'solve --out' or 'train --out'"
        )
    # Checked before anything is read or drawn: the plot replaces report.png by a rename.
    check_output_path(folder / "report.png", "report.png")
    sweep = (folder / "trials.parquet").is_file()
    history = _rows(
        history_path, ("trial_id",) if sweep else ("step", "upper/loss", "time/elapsed_s")
    )
    if sweep:
        from bilevel_ray.runtime.local.ranking import rank_trials

        trials = _rows(folder / "trials.parquet", ("trial_id",))
        known = {r["trial_id"] for r in history}
        if not any(t["trial_id"] in known for t in trials):
            raise ConfigError(
                f"{str(folder / 'trials.parquet')!r} names no trial of history.parquet: the two "
                "files come from different sweeps; rerun the command that wrote them"
            )
        trials = rank_trials(trials, gap_tol)
        verdicts = ("flatness/verdict",) if any("flatness/verdict" in t for t in trials) else ()
        configs = tuple(k for k in trials[0] if k.startswith("config/"))
        counts = status_counts(trials)
        table = _format(trials, COLUMNS + verdicts + configs) + f"\n{counts}"
        curves = {
            t["trial_id"]: [r for r in history if r["trial_id"] == t["trial_id"]] for t in trials
        }
        metric = "eval/upper_loss"
    else:
        last = history[-1]
        table = _format([last], ("method", "step", "upper/loss", "lower/loss", "time/elapsed_s"))
        curves, switches = _by_method(history)
        if switches:
            methods = list(curves)
            steps = ", ".join(f"{m} from step {s}" for s, m in switches)
            table += f"\n(started with {methods[0]}; {steps})"
        metric = "upper/loss"
        runs = [history]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            table,
            None,
            (
                "report.png not written: matplotlib is not installed "
                "(pip install 'bilevel_ray[plot]')"
            ),
        )
    if sweep:
        best, value = trials[0], trials[0].get(metric)
        title = f"sweep {folder.name}: {counts}"
        if best.get("status") == "completed" and isinstance(value, float):
            title += f"; best held-out upper loss {value:.4g} ({settings_label(best)})"
        if note := kept_settings_note(trials):
            title += f"; {note}"
        schedule = read_best_schedule(folder / BEST_SCHEDULE)
        fig = sweep_figure(plt, trials, curves, gap_tol, title, schedule)
    else:
        fig = _run_figure(plt, curves, runs, switches, metric)
    out = folder / "report.png"
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return table, out, None


def _run_figure(
    plt: Any,
    curves: dict[str, list[dict[str, Any]]],
    runs: list[list[dict[str, Any]]],
    switches: list[tuple[int, str]],
    metric: str,
) -> Any:
    """A solve or train folder's figure: the loss against wall time and step, per method."""
    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(11, 4))
    plotted = {
        label: [r for r in rows if isinstance(r.get(metric), float) and math.isfinite(r[metric])]
        for label, rows in curves.items()
    }
    finite = [
        [r for r in rows if isinstance(r.get(metric), float) and math.isfinite(r[metric])]
        for rows in runs
    ]
    fewest = min((len(rows) for rows in finite if rows), default=0)
    style: dict[str, Any] = {}
    if 0 < fewest <= FEW_POINTS:
        style = {"marker": "o", "markersize": 4}
    if 0 < fewest <= 3:  # a line through two or three rows would pass for a measured curve
        style["linestyle"] = ":"
    positive = True
    for label, rows in plotted.items():
        if rows:
            values = [r[metric] for r in rows]
            positive = positive and min(values) > 0
            label = printable(str(label))  # a trial id is data: no control characters
            by_time.plot([r["time/elapsed_s"] for r in rows], values, label=label, **style)
            by_step.plot([r["step"] for r in rows], values, label=label, **style)
    for step, method in switches:
        by_step.axvline(step, color="0.4", linestyle="--", linewidth=1, label=f"switch to {method}")
    for axis, xlabel in ((by_time, "wall time (s)"), (by_step, "step")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(metric)
        axis.set_yscale("log" if positive else "linear")
        axis.grid(alpha=0.3)
    by_step.legend(fontsize=7, loc="upper right")
    if 0 < fewest <= 3:
        every = _spacing(next(rows for rows in finite if rows))
        hint = f", logged every {every} steps" if every else ""
        fig.suptitle(
            f"{metric}: only {fewest} logged row(s) per run{hint} (points, not a curve): rerun "
            "with a smaller --report-every for more",
            fontsize=9,
        )
    fig.tight_layout()
    return fig


def _by_method(history: list[dict[str, Any]]) -> tuple[dict[str, list], list[tuple[int, str]]]:
    """A run's rows as one curve per method, in order, and the (step, new method) of each switch.
    The row logged at a switch ends the first curve and starts the next, so the curves join."""
    curves: dict[str, list[dict[str, Any]]] = {}
    switches: list[tuple[int, str]] = []
    method = None
    for row in history:
        name = str(row.get("method") or "run")
        if method is not None and name != method:
            switches.append((int(curves[method][-1]["step"]), name))
            curves.setdefault(name, []).append(curves[method][-1])
        curves.setdefault(name, []).append(row)
        method = name
    return curves, switches


def _spacing(rows: list[dict[str, Any]]) -> int | None:
    """The steps between logged rows (None with fewer than two rows)."""
    if len(rows) < 2:
        return None
    return int(rows[1]["step"]) - int(rows[0]["step"])


def _rows(path: Path, needs: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """A results file's rows; a damaged file, one without rows or without the columns
    ``needs`` is a ConfigError naming it (pyarrow reads data only: nothing in the file is
    executed)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(
            f"{str(path)!r} cannot be read ({printable(str(err))}): it is corrupted; rerun the "
            "command that wrote it"
        ) from None
    missing = [c for c in needs if c not in table.column_names]
    if missing:
        raise ConfigError(
            f"{str(path)!r} lacks the column(s) {missing}: it was not written by bilevel-ray "
            "(or by another version); give a folder written by 'bilevel-ray tune/solve/train "
            "--out'"
        )
    if table.num_rows == 0:
        raise ConfigError(
            f"{str(path)!r} holds no rows: the run logged nothing; rerun it with a smaller "
            "--report-every"
        )
    return table.to_pylist()


def _format(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else printable(str(value))

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
