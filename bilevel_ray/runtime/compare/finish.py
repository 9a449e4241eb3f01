"""The end of ``br.compare``: its record (what reruns it, the plan against the time taken),
the outcome scored and written (:func:`~bilevel_ray.runtime.compare.outcome.write_outcome`),
and the closing line."""

from __future__ import annotations

from typing import Any

from bilevel_ray.runtime.compare.outcome import CompareResult, comparison_meta, write_outcome
from bilevel_ray.runtime.compare.plan import say

__all__ = ["finish", "problem_label"]


def finish(
    factory: Any,
    problem_config: dict[str, Any],
    fixed: dict[str, Any],
    arguments: dict[str, Any],
    ready: Any,
    runs: list[dict[str, Any]],
    verdict: dict[str, Any] | None,
    took: float | None,
    began: float,
    progress: bool,
) -> CompareResult:
    """Score ``runs`` and write the comparison's files into ``ready.folder`` (``ready``: the
    driver's plan); ``took``: the diagnostic's seconds, None when it did not run."""
    meta = comparison_meta(factory, problem_config, arguments, fixed, ready.settings, ready.split)
    meta["plan"] = {**ready.planned, "diagnostic_took_s": took}
    label = problem_label(factory, problem_config)
    result = write_outcome(
        runs,
        ready.folder,
        verdict,
        label,
        ready.failed,
        start=ready.start,
        rank_by=ready.ranked,
        meta=meta,
        began=began,
    )
    if progress:
        say(f"done in {result.plan['took_s']:.0f} s (estimated {ready.planned['total_s']:.0f} s)")
    return result


def problem_label(factory: Any, problem_config: dict[str, Any]) -> str:
    """The problem as the next command names it: PROBLEM [--config KEY=VALUE ...]."""
    label = factory if isinstance(factory, str) else getattr(factory, "__name__", "PROBLEM")
    return " ".join([label, *(f"--config {k}={v}" for k, v in problem_config.items())])
