"""The flatness judge: it collects a run's estimates (per run id) and decides once; a sweep's or
a worker group's judge is the same class inside a named Ray actor
(:mod:`bilevel_ray.runtime.train.judge_actor`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from bilevel_ray.diagnostics.price_rule import decide
from bilevel_ray.diagnostics.verdict import Verdict

__all__ = ["RUN_DECIDE_OPTIONS", "FlatnessJudge", "verdict_columns"]

# decide() accepting points solved to the watch's loose tolerance (watch.RUN_ESTIMATOR_OPTIONS).
RUN_DECIDE_OPTIONS: dict[str, Any] = {"max_residual": 2e-2}


class FlatnessJudge:
    """Collects estimates per run id and, once asked, decides (the verdict is then fixed)."""

    def __init__(self, decide_options: Mapping[str, Any] | None = None):
        self._stats: dict[str, list[dict[str, float]]] = {}
        self._reference: dict[str, float] = {}  # f at each run's first estimate
        self._verdicts: dict[str, dict[str, Any]] = {}
        self._decide_options = {**RUN_DECIDE_OPTIONS, **(decide_options or {})}

    def add(self, run_id: str, step: int, stats: Mapping[str, float]) -> None:
        """Keep one estimate. Its ``start_upper`` (f at the run's start, which the watch
        measures) is the reference point the achievable improvement is measured from; an
        estimate without one gets the run's first estimate's f, so that a recheck on late
        estimates alone keeps the same tolerance."""
        points = self._stats.setdefault(run_id, [])
        upper = stats.get("flatness/upper", math.nan)
        if not points and isinstance(upper, (int, float)):
            self._reference[run_id] = float(upper)
        reference = {"flatness/start_upper": self._reference.get(run_id, math.nan)}
        points.append({**reference, **stats, "step": float(step)})

    def verdict(self, run_id: str) -> dict[str, Any]:
        """The run's verdict as plain values (``Verdict.to_dict()``), decided on first call."""
        if run_id not in self._verdicts:
            stats = self._stats.get(run_id)
            if stats:
                verdict = decide(stats, **self._decide_options)
            else:  # e.g. a judge actor restarted after its estimates were sent
                reason = f"no flatness estimate of run {run_id!r} reached the judge"
                verdict = Verdict(False, "uncertain", reason, {}, "compare with alt_pbgd")
            self._verdicts[run_id] = verdict.to_dict()
        return self._verdicts[run_id]

    def recheck(self, run_id: str, since: int) -> dict[str, Any]:
        """A later verdict on the estimates taken after step ``since`` (the window's end): it
        replaces the run's verdict only when it finds PBGD-Free unsuitable (a verdict acted on
        stays); returns the run's verdict either way."""
        current = self.verdict(run_id)
        later = [p for p in self._stats.get(run_id, []) if p["step"] > since]
        if current["verdict"] != "unsuitable" and later:
            # The latest two estimates: where the run is now, not where it was at W.
            fresh = decide(later[-2:], **self._decide_options).to_dict()
            if fresh["verdict"] == "unsuitable":
                fresh["stats"]["flatness/decided_at"] = later[-1]["step"]
                self._verdicts[run_id] = fresh
        return self._verdicts[run_id]

    def verdicts(self) -> dict[str, dict[str, Any]]:
        return dict(self._verdicts)


def verdict_columns(verdict: Mapping[str, Any] | None) -> dict[str, Any]:
    """A verdict, once given, as report columns (a sweep's trials.parquet keeps them)."""
    if verdict is None:
        return {}
    return {"flatness/verdict": verdict["verdict"], "flatness/reason": verdict["reason"]}
