"""The flatness diagnostic beside ``br.compare``'s runs: PBGD-Free's verdict on the same start,
taken before the runs when PBGD-Free is among the methods."""

from __future__ import annotations

import inspect
import time
from typing import Any

from bilevel_ray.runtime.compare.plan import Estimate, Heartbeat, say

__all__ = ["flatness_verdict", "run_diagnostic"]


def run_diagnostic(
    factory: Any, problem_config: dict[str, Any], estimate: Estimate, progress: bool
) -> tuple[dict[str, Any] | None, float]:
    """The verdict (None when it cannot run) and the seconds it took; with ``progress``, a line
    when it ends with the runs' estimate still to come."""
    took = time.monotonic()
    verdict = flatness_verdict(factory, problem_config, progress, estimate.diagnostic_steps)
    took = time.monotonic() - took
    if progress:
        shown = verdict.get("verdict") if verdict else "none"
        say(
            f"diagnostic: done in {took:.0f} s ({shown}); the runs: about "
            f"{estimate.runs_s:.0f} s more (an estimate)"
        )
    return verdict, took


def flatness_verdict(
    factory: Any, problem_config: dict[str, Any], progress: bool, steps: int | None = None
) -> dict[str, Any] | None:
    """The flatness diagnostic on the same start (None, with a note, when it cannot run), with
    its own progress lines, or ours every few seconds where br.diagnose has none. ``steps``:
    the horizon judged (the steps a run reaches within the budget; None: the problem's
    suggested steps)."""
    from bilevel_ray.diagnostics import diagnose
    from bilevel_ray.runtime.local.diagnose_named import diagnose_problem

    own = "progress" in inspect.signature(diagnose).parameters
    began = time.monotonic()
    beat = Heartbeat(
        lambda: f"diagnostic: running, {time.monotonic() - began:.0f} s", own or not progress
    )
    try:
        with beat:
            options = {} if steps is None else {"steps": steps}
            verdict, _ = diagnose_problem(
                factory, problem_config, None, progress=progress, **options
            )
    except Exception as err:  # the verdict is an aside: the comparison goes on without it
        if progress:
            say(f"no flatness verdict: {err}")
        return None
    return verdict.to_dict()
