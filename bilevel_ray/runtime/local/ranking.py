"""How a sweep ranks its trials (no Ray needed: ``report`` uses it too).

**Rule.** Trials that did not diverge and whose final lower-level gap ``eval/lower_gap`` is at most
``gap_tol`` come first, by their final held-out upper loss ``eval/upper_loss``; then the trials
outside the tolerance, by their gap (a low upper loss reached with a y far from argmin g is not a
bilevel solution); diverged and failed trials last.

**Search.** Tune's searchers and schedulers (TPE, ASHA, PBT) see ``search/score``, one number
that orders trials the same way: the held-out upper loss where the lower gap is within
``gap_tol`` (or not yet measured: a row between reports), ``INFEASIBLE`` plus the gap where it
is not, ``FAILED`` for a diverged or failed trial. A searcher shown the bare upper loss chases
low losses reached with y far from argmin g, which the ranking then discards: on
``representation`` (NLSY79) 36 TPE trials ended 1.03x-1.08x the 360-point grid's best that way,
against 1.02x-1.04x when they see this score (``benchmarks/tune_quality.py``). The scores are
finite (not +inf): ASHA's rung cutoff is a percentile, which one infinite score can drag to
infinity (that rung then stops nothing), and PB2 fits a Gaussian process to their differences.
An upper loss above ``INFEASIBLE`` would be mis-ordered by the search, not by the ranking.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["FAILED", "GAP", "INFEASIBLE", "METRIC", "SCORE", "rank_trials", "search_score"]

METRIC = "eval/upper_loss"
GAP = "eval/lower_gap"
SCORE = "search/score"
INFEASIBLE = 1e9
FAILED = 1e10


def search_score(loss: float, gap: float, gap_tol: float) -> float:
    """``search/score`` of a row: ``loss`` if ``gap <= gap_tol`` or the gap is unknown (NaN),
    ``INFEASIBLE + gap`` (at most ``FAILED``) if it exceeds it, ``FAILED`` if ``loss`` is not
    finite."""
    if not math.isfinite(loss):
        return FAILED
    if math.isnan(gap) or gap <= gap_tol:
        return loss
    return min(INFEASIBLE + gap, FAILED)


def rank_trials(rows: list[dict[str, Any]], gap_tol: float) -> list[dict[str, Any]]:
    """Trials best first, by the module's ranking rule."""

    def key(row: dict[str, Any]) -> tuple[int, float, float]:
        loss, gap = row.get(METRIC, math.nan), row.get(GAP, math.nan)
        if row.get("status") in ("diverged", "error") or not math.isfinite(loss):
            return (3, math.inf, math.inf)
        if math.isfinite(gap) and gap <= gap_tol:
            return (0, loss, gap)
        return (1, gap if math.isfinite(gap) else math.inf, loss)

    return sorted(rows, key=key)
