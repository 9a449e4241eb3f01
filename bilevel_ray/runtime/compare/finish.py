"""The end of ``br.compare``: its record (what reruns it, the plan against the time taken) and
the outcome scored and written (:func:`~bilevel_ray.runtime.compare.outcome.write_outcome`)."""

from __future__ import annotations

from typing import Any

from bilevel_ray.runtime.compare.outcome import CompareResult, comparison_meta, write_outcome

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
    ranked: str,
    began: float,
    resumed: Any = None,
) -> CompareResult:
    """Score ``runs`` and write the comparison's files into ``ready.folder`` (``ready``: the
    driver's plan), each run at its ``ranked`` point ("best" or "final"); ``took``: the
    diagnostic's seconds, None when it did not run; ``resumed``: what a resume read from the
    folder (compare.json's ``resumed``; None for a comparison run whole)."""
    meta = comparison_meta(factory, problem_config, arguments, fixed, ready.settings, ready.split)
    meta["plan"] = {**ready.planned, "diagnostic_took_s": took}
    meta["resumed"] = resumed.to_dict() if resumed is not None else None
    label = problem_label(factory, problem_config)
    result = write_outcome(
        runs,
        ready.folder,
        verdict,
        label,
        ready.failed,
        start=ready.start,
        rank_by=ranked,
        meta=meta,
        began=began,
    )
    result.resumed = meta["resumed"]
    return result


def problem_label(factory: Any, problem_config: dict[str, Any]) -> str:
    """The problem as the next command names it: PROBLEM [--config KEY=VALUE ...]."""
    label = factory if isinstance(factory, str) else getattr(factory, "__name__", "PROBLEM")
    return " ".join([label, *(f"--config {k}={v}" for k, v in problem_config.items())])
