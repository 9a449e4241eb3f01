"""What a sweep ended with: one row per trial, every logged row, the best configuration among
the trials that completed, and an honest count of the ones that did not.

A trial's status is ``completed``, ``stopped`` (a scheduler ended it early), ``unsuitable`` (the
flatness watch stopped it), ``diverged`` or ``error`` (its code raised, or its process died:
"killed: out of memory ..."; the one-line reason is in ``trials.parquet``'s ``error`` column).
Only the first three are results: a sweep with none of them has no best configuration, and its
status says so ("no trial finished: ...").
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bilevel_ray.runtime.local.ranking import GAP, METRIC, SCORE, rank_trials
from bilevel_ray.runtime.tune.deaths import death_reason
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

    @property
    def status(self) -> str:
        """ "completed" (a best configuration was found), else "no trial finished: k of n
        failed, first reason: ..." (or "no trial finished: the sweep ran no trial")."""
        if self.best_config is not None:
            return "completed"
        if not self.num_trials:
            return "no trial finished: the sweep ran no trial"
        first = next(
            (r["error"] for r in self.trials.to_pylist() if r["status"] in FAILED and r["error"]),
            None,
        )
        said = f", first reason: {first}" if first else ""
        return f"no trial finished: {self.num_failed} of {self.num_trials} failed{said}"

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
    time. A trial whose process died before its first report has no metrics: its id and
    config come from its folder."""
    trials = []
    for result in grid:
        metrics = dict(result.metrics or {})
        folder = Path(result.path)
        trial_id = metrics.get("trial_id") or _trial_id(folder.name)
        status = metrics.get("status", "error" if result.error else "unknown")
        if status == "running":
            status = "stopped"  # ended by the scheduler before its last step
        reason = metrics.get("error")
        if result.error is not None and reason is None:
            status = "error"
            reason = death_reason(result.error) or one_line(result.error)
        if status == "diverged":
            how = metrics.get("diverged_how") or "a loss was not finite"
            reason = f"diverged at step {metrics.get('diverged_at_step')}: {how}"
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
        config = result.config or _started_with(folder)
        row.update({f"config/{k}": _plain(v) for k, v in config.items()})
        trials.append(row)
    # Every column of every row: Arrow infers a table's columns from its first row alone, and
    # a trial killed before its first report has no config, lineage or held-out numbers.
    columns = list(dict.fromkeys(key for row in trials for key in row))
    return pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in trials])


def _trial_id(folder: str) -> str:
    """A trial's id from its folder's name, ``run_trial_<id>_<index>_<config>_<date>``: Tune's
    own ids (``3b1f0_00002``) or a searcher's (``0c652abc``)."""
    found = re.match(r"^run_trial_([0-9a-f]{5}_\d{5}|[0-9a-f]{8})_\d+(?:_|$)", folder)
    return found.group(1) if found else folder


def _started_with(folder: Path) -> dict[str, Any]:
    """The config a trial started with, from Tune's ``params.json`` in its folder."""
    try:
        config = json.loads((folder / "params.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


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
