"""What ``br.compare`` settles before anything runs: each method's settings (checked with one
step), the start's held-out score, the estimate, and, for a resume, the runs the folder holds
(:mod:`~bilevel_ray.runtime.compare.resume`), the estimate revised to the runs left."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilevel_ray.config import METHOD_OPTIONS, SolverConfig
from bilevel_ray.errors import ConfigError
from bilevel_ray.runtime.compare.claim import Claimed
from bilevel_ray.runtime.compare.plan import Estimate, Heartbeat, estimate_for
from bilevel_ray.runtime.compare.resume import Resumed, read_runs
from bilevel_ray.runtime.compare.trial import start_phi
from bilevel_ray.runtime.tune.preflight import first_step

__all__ = ["Ready", "method_settings", "prepare", "read_resumed"]


@dataclass
class Ready:
    """The plan of a comparison, settled before anything runs."""

    settings: dict[str, dict[str, Any]]  # the methods that run, with their keywords
    failed: dict[str, str]  # the methods that cannot, with the reason
    storage: Path
    folder: Path
    start: float  # held-out phi at the start
    split: bool  # whether the held-out upper rows split into validation and report halves
    estimate: Estimate  # revised as the runs go (the CPUs Ray has)
    planned: dict[str, Any]  # the estimate as first said, for compare.json
    key: str = ""  # the comparison's key (finished.comparison_key), once its record is written


def prepare(
    spec: Any,
    methods: list[str],
    fixed: dict[str, Any],
    claimed: Claimed,
    seeds: int,
    budget_s: float,
    gap_steps: int,
    address: str | None,
    progress: bool,
) -> Ready:
    """Each method's settings, the start's score and the estimate (``claimed``: the folder)."""
    # The plan needs measurements (each method's first step, the scoring's time): on a large
    # problem they take a while, said every few seconds; on a small one the plan comes first.
    prepared = time.monotonic()
    beat = Heartbeat(
        lambda: f"preparing the plan: {time.monotonic() - prepared:.0f} s", not progress
    )
    with beat:
        settings, failed = method_settings(spec, methods, fixed)
    storage, folder = claimed.storage, claimed.folder
    with Heartbeat(beat.message, not progress):
        start, score_s, split = start_phi(spec)
        estimate = estimate_for(spec, settings, seeds, budget_s, gap_steps, score_s, address)
    return Ready(settings, failed, storage, folder, start, split, estimate, estimate.to_dict())


def method_settings(
    spec: Any, methods: list[str], fixed: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Each method's keywords (the problem's suggestions, then the user's, where they apply),
    checked with one step; the methods that cannot run, with the reason."""
    specific = {k for knobs in METHOD_OPTIONS.values() for k in knobs}
    settings, failed = {}, {}
    for method in methods:
        suggested = SolverConfig.applicable(method, spec.defaults)
        suggested.pop("steps", None)
        given = {k: v for k, v in fixed.items() if k not in specific or k in METHOD_OPTIONS[method]}
        options = {**suggested, **given}
        try:
            first_step(spec, method, options, {}, seed=0)
        except ConfigError as err:
            failed[method] = "; ".join(err.problems)
            continue
        settings[method] = options
    if not settings:
        raise ConfigError(
            "no method can run on this problem: "
            + "; ".join(f"{m}: {why}" for m, why in failed.items())
        )
    return settings, failed


def read_resumed(ready: Ready, seeds: int, resume: bool) -> Resumed | None:
    """A resume's finished runs, read from the folder (None: a new comparison); the estimate
    revised to the runs left."""
    if not resume:
        return None
    resumed = read_runs(ready.folder, ready.key, sorted(ready.settings), seeds)
    ready.estimate.runs = len(resumed.todo)
    ready.planned = ready.estimate.to_dict()
    return resumed
