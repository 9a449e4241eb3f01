"""The manifest of one run (``solve`` or ``train``): its settings in the form a continuation
is compared on and ``rerun`` replays, and its outcome read from the run's result."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from bilevel_ray.records.manifest import new_manifest

__all__ = [
    "PARAMS",
    "diverged_outcome",
    "replay_entry",
    "run_manifest",
    "run_outcome",
    "solver_dict",
]

PARAMS = "result.pt"  # a run's final x and y: {"x": {...}, "y": {...}}


def solver_dict(config: Any) -> dict[str, Any]:
    """A ``SolverConfig``'s settings in force as keywords: its method's own defaults filled in
    where none was given, the method apart, a user-written schedule (which cannot be replayed)
    by its ``repr``."""
    from bilevel_ray.config import METHOD_OPTIONS

    settings = dict(config.to_dict(strict=False))
    for name in METHOD_OPTIONS.get(config.method, {}):
        if settings.get(name) is None:
            settings[name] = config.option(name)
    settings.pop("method", None)
    return settings


def replay_entry(
    label: str,
    method: str,
    steps: int,
    solver: Mapping[str, Any],
    run: Mapping[str, Any],
    params: str,
    threads: int | None = None,
) -> dict[str, Any]:
    """One run ``rerun`` executes from scratch: its method, steps, solver settings, run
    settings (keywords of ``br.solve``), the file of its final parameters and, where it ran
    with other torch threads than its manifest's process, their number (a sum's order, and so
    its last bits, may depend on it)."""
    return {
        "label": label,
        "method": method,
        "steps": int(steps),
        "solver": dict(solver),
        "run": {k: v for k, v in run.items() if k != "progress"},
        "params": params,
        "threads": threads,
    }


def run_manifest(
    entry_point: str,
    *,
    problem: Any,
    problem_config: Mapping[str, Any],
    fingerprint: Mapping[str, Any] | None,
    method: str,
    steps: int,
    solver: Mapping[str, Any],
    run: Mapping[str, Any],
    placement: Mapping[str, Any] | None = None,
    keywords: Mapping[str, Any] | None = None,
    started: str | None = None,
) -> dict[str, Any]:
    """A run's manifest as it starts: ``solver`` the solver settings after the problem's
    defaults, ``run`` the run settings (``seed``, ``report_every``, the flatness watch's, ...),
    ``placement`` its workers (``train``)."""
    settings: dict[str, Any] = {
        "method": method,
        "steps": int(steps),
        "solver": dict(solver),
        "run": dict(run),
    }
    if placement is not None:
        settings["placement"] = dict(placement)
    manifest = new_manifest(
        entry_point,
        problem=problem,
        problem_config=problem_config,
        data=fingerprint,
        settings=settings,
        seeds={"run": run.get("seed", 0), "problem": problem_config.get("seed")},
        keywords=keywords,
        started=started,
    )
    manifest["replay"] = {"runs": [replay_entry("run", method, steps, solver, run, PARAMS)]}
    return manifest


def run_outcome(result: Any, method: str) -> dict[str, Any]:
    """A finished run's outcome: completed, or stopped by the flatness verdict
    (``unsuitable``); the step it ended at; where it fell back to another method, the step and
    the method; the flatness verdict."""
    rows = result.history.to_pylist()
    step = int(result.state.step)
    outcome: dict[str, Any] = {
        "status": "stopped" if result.status == "unsuitable" else "completed"
    }
    outcome["step"] = step
    if result.status == "unsuitable":
        outcome["reason"] = "the flatness verdict found PBGD-Free unsuitable (on_unsuitable=stop)"
    for before, row in itertools.pairwise(rows):
        if before.get("method") == method and row.get("method") != method:
            outcome["fell_back"] = {"at_step": int(before["step"]), "to": row.get("method")}
            break
    if result.verdict is not None:
        outcome["flatness"] = {
            k: result.verdict.get(k)
            for k in ("verdict", "reason", "fallback")
            if k in result.verdict
        }
    return outcome


def diverged_outcome(err: Any) -> dict[str, Any]:
    """The outcome of a run whose losses went non-finite (a ``DivergenceError``)."""
    return {"status": "diverged", "step": int(err.step), "reason": str(err).split(";")[0]}
