"""How a sweep ranks its trials (no Ray needed: ``report`` uses it too).

**Rule.** Trials that did not diverge and whose final lower-level gap ``eval/lower_gap`` is at most
``gap_tol`` come first, by their final held-out upper loss ``eval/upper_loss``; then the trials
outside the tolerance, by their gap (a low upper loss reached with a y far from argmin g is not a
bilevel solution); diverged and failed trials last.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["GAP", "METRIC", "rank_trials"]

METRIC = "eval/upper_loss"
GAP = "eval/lower_gap"


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
