"""What a sweep ended with: one row per trial, every logged row, the best configuration among
the trials that completed, and an honest count of the ones that did not.

A trial's status is ``completed``, ``stopped`` (a scheduler ended it early), ``unsuitable`` (the
flatness watch stopped it), ``diverged`` or ``error`` (its code raised; the one-line reason is
in ``trials.parquet``'s ``error`` column). Only the first three are results: a sweep whose
trials all failed has no best configuration.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bilevel_ray.runtime.local.ranking import GAP, METRIC, SCORE, rank_trials
from bilevel_ray.runtime.tune.space import decode

__all__ = [
    "FAILED",
    "HISTORIES",
    "TuneResult",
    "history_table",
    "one_line",
    "outcome",
    "trials_table",
]

FAILED = ("error", "diverged")
HISTORIES = "histories"  # a sweep's folder of per-trial history files


@dataclass
class TuneResult:
    """The best configuration (as solver keywords; None when no trial completed), its final
    metrics, the sweep's tables, its folder, the trials per status and the failures per
    reason."""

    best_config: dict[str, Any] | None
    best_metrics: dict[str, Any]
    trials: pa.Table
    history: pa.Table
    path: Path
    counts: dict[str, int]
    failures: dict[str, int]

    @property
    def num_failed(self) -> int:
        return sum(self.counts.get(status, 0) for status in FAILED)

    @property
    def num_trials(self) -> int:
        return sum(self.counts.values())

    def failure_summary(self) -> str | None:
        """ "k of n trials failed: <reason> (x m); ...", or None when none failed."""
        if not self.num_failed:
            return None
        reasons = "; ".join(
            f"{reason} (x{count})" if count > 1 else reason
            for reason, count in sorted(self.failures.items(), key=lambda kv: -kv[1])
        )
        return f"{self.num_failed} of {self.num_trials} trials failed: {reasons}"

    def __repr__(self) -> str:
        return (
            f"TuneResult(best_config={self.best_config}, counts={self.counts}, "
            f"path={str(self.path)!r})"
        )


def trials_table(grid: Any) -> pa.Table:
    """One row per trial: config, final metrics, status (and the reason of a failure), wall
    time."""
    trials = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        status = metrics.get("status", "error" if result.error else "unknown")
        if status == "running":
            status = "stopped"  # ended by the scheduler before its last step
        reason = metrics.get("error")
        if result.error is not None and reason is None:
            status, reason = "error", one_line(result.error)
        if status == "diverged":
            reason = f"diverged at step {metrics.get('diverged_at_step')}: a loss was not finite"
        row = {
            "trial_id": trial_id,
            "status": status,
            "error": reason,
            "wall_s": float(metrics.get("time_total_s", math.nan)),
            METRIC: float(metrics.get(METRIC, math.nan)),
            GAP: float(metrics.get(GAP, math.nan)),
            SCORE: float(metrics.get(SCORE, math.nan)),
            "step": int(metrics.get("step", 0) or 0),
        }
        for key in ("flatness/verdict", "flatness/reason", "lineage"):
            if key in metrics:
                row[key] = metrics[key]
        # The problem's own held-out numbers (a language model's reward accuracy, perplexity).
        row.update(
            {k: float(v) for k, v in metrics.items() if k.startswith("eval/") and k not in row}
        )
        row.update({f"config/{k}": _plain(v) for k, v in (result.config or {}).items()})
        trials.append(row)
    return pa.Table.from_pylist(trials)


def history_table(path: Path, trials: pa.Table) -> pa.Table:
    """Every logged row of every trial of this sweep, from the trials' own history files."""
    tables = []
    for trial_id in trials.column("trial_id").to_pylist() if trials.num_rows else []:
        file = path / HISTORIES / f"{trial_id}.parquet"
        if file.is_file():
            table = pq.read_table(file)
            if table.num_rows:
                tables.append(table)
    if not tables:
        return pa.table({"trial_id": pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="default")


def outcome(
    trials: pa.Table, history: pa.Table, path: Path, base: dict[str, Any], gap_tol: float
) -> TuneResult:
    """The sweep's result: the best trial that did not fail (by the ranking rule), counts."""
    rows = trials.to_pylist()
    counts = dict(Counter(row["status"] for row in rows))
    failures = dict(Counter(row["error"] for row in rows if row["status"] in FAILED))
    ranked = [row for row in rank_trials(rows, gap_tol) if row["status"] not in FAILED]
    if not ranked or not math.isfinite(ranked[0].get(METRIC, math.nan)):
        return TuneResult(None, {}, trials, history, path, counts, failures)
    best = ranked[0]
    config = {k.removeprefix("config/"): v for k, v in best.items() if k.startswith("config/")}
    return TuneResult({**base, **decode(config)}, best, trials, history, path, counts, failures)


def one_line(error: BaseException) -> str:
    """A failure's one-line reason: the error's type and first line, looking through Ray's and
    Tune's wrappers to the error they carry."""
    cause = error
    while type(cause).__module__.startswith("ray."):
        inner = getattr(cause, "cause", None) or cause.__cause__
        if inner is None:
            break
        cause = inner
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:500]


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)
