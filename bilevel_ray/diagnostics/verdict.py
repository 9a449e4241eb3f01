"""A verdict on PBGD-Free for a problem, and the tolerance every rule judges a shortfall by.

:class:`Verdict` is what ``diagnose``, the end-of-run certificate
(:mod:`~bilevel_ray.diagnostics.end_check`) and the early price's rule
(:mod:`~bilevel_ray.diagnostics.price_rule`) return. :func:`tolerance` is their one scale: rtol
of the achievable improvement (f at the problem's reference point, its own start, less the
better end), plus the run's jitter and atol. Unlike rtol |f| it does not move when a constant is
added to f or collapse where f ends near 0 (a DPO loss ends at ~1e-5 from log 2), and unlike the
run's own progress it does not grow with a far start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Verdict",
    "decide_problems",
    "rtol_problem",
    "threshold_problem",
    "tolerance",
]


@dataclass(frozen=True)
class Verdict:
    """Whether PBGD-Free's dropped term is negligible, why (one sentence with the numbers), the
    aggregated estimates, what to do, and the method to switch to when unsuitable."""

    suitable: bool
    verdict: str
    reason: str
    stats: dict[str, float]
    recommendation: str
    fallback: str | None = None
    held_out: str | None = None  # the held-out comparison, a line of its own beside the verdict
    prediction: str | None = None  # the early price's verdict, where one was taken

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values; a non-finite statistic becomes None."""
        return {
            "suitable": self.suitable,
            "verdict": self.verdict,
            "reason": self.reason,
            "recommendation": self.recommendation,
            "fallback": self.fallback,
            "held_out": self.held_out,
            "prediction": self.prediction,
            "stats": {k: (float(v) if math.isfinite(v) else None) for k, v in self.stats.items()},
        }


def threshold_problem(problems: list[str], name: str, value: Any, low: float, hint: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not low <= value < math.inf
    ):
        problems.append(f"{name}={value!r}: must be a finite number >= {low:g}; {hint}")


def decide_problems(rho_ok: Any, rho_bad: Any, atol: Any, max_residual: Any) -> list[str]:
    """Every rule the thresholds of :func:`decide` break, one message each (empty if none)."""
    problems: list[str] = []
    threshold_problem(problems, "rho_ok", rho_ok, 0, "e.g. rho_ok=0.1")
    threshold_problem(problems, "rho_bad", rho_bad, 0, "e.g. rho_bad=0.3")
    if not problems and rho_ok >= rho_bad:
        problems.append(f"rho_ok={rho_ok!r} must be < rho_bad={rho_bad!r}; e.g. 0.1 and 0.3")
    threshold_problem(problems, "atol", atol, 0, "e.g. atol=1e-6")
    threshold_problem(problems, "max_residual", max_residual, 0, "e.g. max_residual=1e-3")
    return problems


def rtol_problem(problems: list[str], rtol: Any) -> None:
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1:
        problems.append(
            f"rtol={rtol!r}: must be a finite number in [0, 1), the tolerated share of the "
            "achievable improvement, e.g. 0.05"
        )


def tolerance(
    reference: float,
    upper: float,
    gap: float,
    rtol: float,
    atol: float,
    noise: float = 0.0,
) -> float:
    """The tolerance of a shortfall ``gap`` below PBGD-Free's end value ``upper``: rtol times the
    achievable improvement, f at the problem's reference point (``reference``: its own start)
    less the better end (min(upper, upper - gap): the corrected method's when gap > 0), plus the
    run's own jitter ``noise`` and ``atol``. It does not change when a constant is added to f,
    nor with the start a run takes (the reference is the problem's, not the run's), and it does
    not collapse where f ends near 0 (a DPO loss). Without a reference (NaN: a hand-built
    estimate) the scale is |f| at the larger end. diagnose_panel's truth uses this function."""
    best = min(upper, upper - gap) if math.isfinite(gap) else upper
    if math.isfinite(reference) and math.isfinite(best):
        scale = max(reference - best, 0.0)
    else:
        scale = max((abs(v) for v in (upper, upper - gap) if math.isfinite(v)), default=0.0)
    return rtol * scale + max(noise, 0.0) + atol
