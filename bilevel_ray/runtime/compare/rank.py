"""A comparison's runs, ranked (pure; no Ray, no files).

Quality is phi(x) = f(x, y*(x)) on the *test* half of the problem's held-out upper rows
(``eval/phi``; :mod:`bilevel_ray.runtime.compare.trial` scores each logged point at a y_hat
solved for its x). A point whose lower solve had not settled (``eval/solved`` False) is
*unscored* (:func:`scored`): f at an unsolved y_hat is not phi, and can lie below every value
phi takes. It is never a best point, its phi is NaN where it is the final point, and it neither
reaches nor leaves a target. Each run is read at two points:

* ``final``: its last scored point (where the budget ended it);
* ``best``: early stopping, the scored point with the lowest phi on the *validation* half of the
  held-out rows (``eval/phi_val``; the earliest on a tie), reported by its test phi. The point is
  chosen on rows the ranking is not reported on, so its phi is not the minimum of a noisy curve.
  A problem whose held-out rows cannot be split (a deterministic toy: no rows at all) has one
  phi, which chooses and reports.

One tolerance rule, the flatness verdict's (:func:`bilevel_ray.diagnostics.verdict.tolerance`):
a shortfall s of a value v against a better one is within

    tau = RTOL * max(phi(x0) - min(v, v - s), 0) + Z * se + ATOL,

5% of the *achievable improvement* from the problem's start x0 (measured once, on the same test
rows) plus two standard errors over the seeds. Unlike 5% of |phi| it does not move when a
constant is added to f.

Per method (medians over its completed seeds) and per point p: phi_p, its spread, and the time
to the target (the best method's median phi_p plus tau): the first scored time from which the
run's point p (final: the current point; best: the point early stopping would return by then)
stays at or below the target to the end of the run. "To target" thus uses the point the ranking
uses: a run that touches the target and leaves it has not reached it.

A completed run *diverged* (:func:`divergence`) when its final phi or f is not finite, or its
final phi exceeds phi(x0) + EXPLODE * max(|phi(x0)|, 1) (a run ending at 5.2e10 from a start of
O(1)); it is then not ranked, and its method is not recommended.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bilevel_ray.diagnostics.verdict import tolerance

__all__ = [
    "ATOL",
    "EXPLODE",
    "POINTS",
    "RTOL",
    "Ranking",
    "Z",
    "best_row",
    "divergence",
    "method_table",
    "phi_at",
    "scored",
    "time_to_target",
    "within",
]

RTOL = 0.05  # br.diagnose's rtol: the tolerated share of the achievable improvement
ATOL = 1e-6  # br.diagnose's atol
Z = 2.0  # br.diagnose's z: standard errors of the seeds' spread a shortfall may hide in
EXPLODE = 1e3  # a final phi above phi(x0) + EXPLODE * max(|phi(x0)|, 1) has diverged
POINTS = ("best", "final")


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _std(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else 0.0


def _value(row: Mapping[str, Any], key: str) -> float:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


def within(reference: float, value: float, shortfall: float, se: float) -> float:
    """tau for ``shortfall`` of ``value`` (module docstring): the verdict's tolerance with the
    seeds' Z * se as the runs' own jitter."""
    return tolerance(reference, value, shortfall, RTOL, ATOL, Z * se if math.isfinite(se) else 0)


def divergence(
    run: Mapping[str, Any], curve: Sequence[Mapping[str, Any]], start: float
) -> str | None:
    """Why a completed run counts as diverged (module docstring), or None. ``start`` is phi(x0)
    (NaN when unmeasured: the run's first scored phi stands in)."""
    last = max(curve, key=lambda r: r["wall_s"]) if curve else run
    phi_key, upper_key = (
        ("eval/phi", "eval/upper_loss") if curve else ("final_phi", "final_upper_loss")
    )
    phi, upper = _value(last, phi_key), _value(last, upper_key)
    if not math.isfinite(phi) or (upper_key in last and not math.isfinite(upper)):
        return f"phi exploded: final held-out phi {phi:.3g}, f {upper:.3g} (not finite)"
    if not math.isfinite(start) and curve:
        start = _value(min(curve, key=lambda r: r["wall_s"]), "eval/phi")
    if math.isfinite(start) and phi > start + EXPLODE * max(abs(start), 1.0):
        return (
            f"phi exploded: final held-out phi {phi:.3g} against {start:.3g} at the start (a "
            f"run is diverged above start + {EXPLODE:g} max(|start|, 1))"
        )
    return None


def scored(row: Mapping[str, Any]) -> bool:
    """Whether the point's phi was read at a solved y_hat (``eval/solved``; a row without the
    flag, hand-built or from an older comparison, counts as scored)."""
    return row.get("eval/solved", True) is not False


def phi_at(row: Mapping[str, Any] | None) -> float:
    """The point's test phi, NaN where it is unscored."""
    return _value(row, "eval/phi") if row is not None and scored(row) else math.nan


def best_row(curve: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The early-stopping point: the lowest validation phi among the scored points (the
    earliest on a tie)."""
    key = "eval/phi_val" if any("eval/phi_val" in r for r in curve) else "eval/phi"
    rows = [r for r in curve if scored(r) and math.isfinite(_value(r, key))]
    return min(rows, key=lambda r: (_value(r, key), r["wall_s"])) if rows else None


def _series(curve: Sequence[Mapping[str, Any]], point: str) -> list[tuple[float, float]]:
    """(time, test phi of the point the run would give at that time): the current point, or
    the best validation point so far. An unscored point is left out (it says nothing of
    the target), except the last: a run whose final point is unscored has not reached the
    final point's target."""
    rows = sorted(curve, key=lambda r: r["wall_s"])
    out, chosen = [], None
    for i, row in enumerate(rows):
        if not scored(row) and i < len(rows) - 1:
            continue
        if point == "best":
            chosen = best_row([chosen, row] if chosen is not None else [row]) or chosen
        else:
            chosen = row
        out.append((float(row["wall_s"]), phi_at(chosen)))
    return out


def time_to_target(
    curve: Sequence[Mapping[str, Any]], target: float, point: str = "final"
) -> float:
    """The first scored time from which the run's ``point`` stays at or below ``target`` to the
    end of the run (inf if its last value is above it)."""
    reached = math.inf
    for wall, phi in _series(curve, point):
        # Above the target again: the point has not reached it (yet).
        reached = min(reached, wall) if phi <= target else math.inf
    return reached


@dataclass
class Ranking:
    """``rows``: one per method with a completed seed, ordered by ``rank_by``'s phi;
    ``targets`` and ``order`` per point; ``start``: phi(x0) on the test rows."""

    rows: list[dict[str, Any]]
    targets: dict[str, float]
    start: float
    rank_by: str = "best"
    order: dict[str, list[str]] = field(default_factory=dict)


def _run_values(run: Mapping[str, Any], curve: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One run's phi at each point, and when its best point was scored."""
    if not curve:  # a hand-built run without a curve: its own reported numbers
        final = _value(run, "final_phi") if run.get("final_solved", True) is not False else math.nan
        best = _value(run, "best_phi")
        return {"final": final, "best": best if math.isfinite(best) else final, "at": math.nan}
    chosen = best_row(curve)
    return {
        "final": phi_at(max(curve, key=lambda r: r["wall_s"])),
        "best": phi_at(chosen),
        "at": _value(chosen or {}, "wall_s"),
    }


def method_table(
    runs: Sequence[Mapping[str, Any]],
    curves: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]],
    start: float = math.nan,
    rank_by: str = "best",
) -> Ranking:
    """The per-method table (module docstring), ranked by ``rank_by`` ("best" or "final")."""
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    diverged: dict[str, int] = {}
    for run in runs:
        if run["status"] == "completed":
            by_method.setdefault(run["method"], []).append(run)
        elif run["status"] == "diverged":
            diverged[run["method"]] = diverged.get(run["method"], 0) + 1
    values = {
        m: [_run_values(r, curves.get((m, r["seed"]), ())) for r in rs]
        for m, rs in by_method.items()
    }
    medians = {p: {m: _median([v[p] for v in vs]) for m, vs in values.items()} for p in POINTS}
    targets = {}
    for p in POINTS:
        best = min((v for v in medians[p].values() if math.isfinite(v)), default=math.nan)
        targets[p] = best + within(start, best, 0.0, 0.0) if math.isfinite(best) else math.nan
    rows = []
    for method, rs in by_method.items():
        vs = values[method]
        rises = [v["final"] - v["best"] for v in vs]
        rise = _median(rises)
        row: dict[str, Any] = {"method": method, "seeds": len(rs)}
        row["diverged"] = diverged.get(method, 0)
        for p in POINTS:
            times = [
                time_to_target(curves.get((method, r["seed"]), ()), targets[p], p)
                if curves.get((method, r["seed"]))
                else (0.0 if v[p] <= targets[p] else math.inf)
                for r, v in zip(rs, vs)
            ]
            row[f"phi_{p}"] = medians[p][method]
            row[f"std_{p}"] = _std([v[p] for v in vs])
            row[f"to_target_{p}_s"] = statistics.median(times)
        se = _std(rises) / math.sqrt(len(rises))
        tau = within(start, row["phi_final"], rise, se)
        row.update(
            best_at_s=_median([v["at"] for v in vs]),
            rise=rise,
            overfits=bool(math.isfinite(rise) and rise > tau),
            final_upper_loss=_median([_value(r, "final_upper_loss") for r in rs]),
            lower_gap=_median([_value(r, "lower_gap") for r in rs]),
            steps_per_s=_median([r["steps"] / r["wall_s"] for r in rs if r["wall_s"] > 0]),
            wall_s=_median([_value(r, "wall_s") for r in rs]),
            run_wall_s=_median([_value(r, "run_wall_s") for r in rs]),
            scoring_s=_median([_value(r, "scoring_s") for r in rs]),
            state_bytes=_median([float(r["state_bytes"]) for r in rs]),
            peak_rss_mb=_median([r["peak_rss_mb"] for r in rs]),
        )
        # The names the command line's table has printed since the first version: final point.
        row.update(
            final_phi=row["phi_final"],
            final_std=row["std_final"],
            best_phi=row["phi_best"],
            time_to_target_s=row["to_target_final_s"],
        )
        rows.append(row)
    order = {p: _order(rows, p) for p in POINTS}
    rows.sort(key=lambda r: order[rank_by].index(r["method"]))
    return Ranking(rows, targets, start, rank_by, order)


def _order(rows: Sequence[Mapping[str, Any]], point: str) -> list[str]:
    """The methods by their median phi at ``point`` (no value last)."""
    key = f"phi_{point}"
    ranked = sorted(rows, key=lambda r: (not math.isfinite(r[key]), r[key], r["method"]))
    return [r["method"] for r in ranked]
