"""``bilevel-ray report DIR``: a table of the runs in DIR and a plot of loss against time and step.

DIR is a sweep's folder (``trials.parquet`` + ``history.parquet``, one curve per trial) or a
``solve`` / ``train`` output folder (``history.parquet``, one curve). The plot needs matplotlib,
an optional extra (``pip install 'bilevel_ray[plot]'``); without it the table is still printed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bilevel_ray.errors import ConfigError

__all__ = ["report"]

COLUMNS = ("trial_id", "status", "eval/upper_loss", "eval/lower_gap", "step", "wall_s")


def report(folder: str | Path, gap_tol: float = 0.1) -> tuple[str, Path | None, str | None]:
    """(the table as text, the plot's path or None, a note when the plot was not written)."""
    folder = Path(folder)
    history_path = folder / "history.parquet"
    if not history_path.is_file():
        raise ConfigError(
            f"{str(folder)!r} holds no history.parquet: give a folder written by "
            "'bilevel-ray tune --out', 'solve --out' or 'train --out'"
        )
    history = _rows(history_path)
    if (folder / "trials.parquet").is_file():
        from bilevel_ray.runtime.ranking import rank_trials

        trials = rank_trials(_rows(folder / "trials.parquet"), gap_tol)
        verdicts = ("flatness/verdict",) if any("flatness/verdict" in t for t in trials) else ()
        configs = tuple(k for k in trials[0] if k.startswith("config/"))
        table = _format(trials, COLUMNS + verdicts + configs)
        curves = {
            t["trial_id"]: [r for r in history if r["trial_id"] == t["trial_id"]] for t in trials
        }
        metric = "eval/upper_loss"
    else:
        last = history[-1]
        table = _format([last], ("method", "step", "upper/loss", "lower/loss", "time/elapsed_s"))
        curves = {str(last.get("method", "run")): history}
        metric = "upper/loss"
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
    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in curves.items():
        rows = [r for r in rows if isinstance(r.get(metric), float) and math.isfinite(r[metric])]
        if rows:
            by_time.plot(
                [r["time/elapsed_s"] for r in rows], [r[metric] for r in rows], label=label
            )
            by_step.plot([r["step"] for r in rows], [r[metric] for r in rows], label=label)
    for axis, xlabel in ((by_time, "wall time (s)"), (by_step, "step")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(metric)
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    by_step.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    out = folder / "report.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return table, out, None


def _rows(path: Path) -> list[dict[str, Any]]:
    """A results file's rows; a damaged file is a ConfigError naming it (pyarrow reads data
    only: nothing in the file is executed)."""
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(
            f"{str(path)!r} cannot be read ({err}): it is corrupted; rerun the command that "
            "wrote it"
        ) from None


def _format(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
