"""From a comparison's runs to a recommendation a team can act on (pure; no Ray, no files).

Quality is phi(x) = f(x, y*(x)) on held-out data (``eval/phi``, see
:mod:`bilevel_ray.runtime.compare_trial`). Per method, over its seeds: the median final phi and
its spread, the median time to reach a *target* (within 5% of the best method's median final
phi, a number the table states), steps per second, solver-state bytes and peak memory. Then:

* the best quality: the lowest median final loss;
* the soonest to the target, and at what memory;
* PBGD-Free against the best corrected method: the difference of medians d, with the standard
  error se = sqrt(s_pf^2 / n_pf + s_c^2 / n_c) from the seeds. PBGD-Free is *as good* when
  d <= max(5% of |L_c|, 2 se): it is then the recommendation (one copy of y, the cheapest
  step), with its speed stated; otherwise the best corrected method is, with PBGD-Free's bias
  stated;
* whether that agrees with the flatness verdict on the same start;
* the next command to run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["TARGET_SLACK", "method_table", "recommend", "time_to_target"]

TARGET_SLACK = 0.05  # the target: within 5% of the best median final loss
AS_GOOD = 0.05  # PBGD-Free is as good within 5% of the corrected method's loss (or 2 se)


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _std(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else 0.0


def time_to_target(curve: Sequence[Mapping[str, Any]], target: float) -> float:
    """The first (method) time at which a run's phi is at or below ``target`` (inf if
    never)."""
    for row in curve:
        if row["eval/phi"] <= target:
            return float(row["wall_s"])
    return math.inf


def method_table(
    runs: Sequence[Mapping[str, Any]], curves: Mapping[tuple[str, int], Sequence[Mapping]]
) -> tuple[list[dict[str, Any]], float]:
    """One row per method (medians over its seeds) and the target loss."""
    ok = [r for r in runs if r["status"] == "completed"]
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for run in ok:
        by_method.setdefault(run["method"], []).append(run)
    medians = {m: _median([r["final_phi"] for r in rs]) for m, rs in by_method.items()}
    finite = [v for v in medians.values() if math.isfinite(v)]
    best = min(finite) if finite else math.nan
    target = best + TARGET_SLACK * abs(best) if math.isfinite(best) else math.nan
    rows = []
    for method, rs in by_method.items():
        times = [time_to_target(curves.get((method, r["seed"]), ()), target) for r in rs]
        rows.append(
            {
                "method": method,
                "seeds": len(rs),
                "final_phi": medians[method],
                "final_std": _std([r["final_phi"] for r in rs]),
                "best_phi": _median([r["best_phi"] for r in rs]),
                "final_upper_loss": _median([r["final_upper_loss"] for r in rs]),
                "lower_gap": _median([r["lower_gap"] for r in rs]),
                "time_to_target_s": statistics.median(times),
                "steps_per_s": _median([r["steps"] / r["wall_s"] for r in rs if r["wall_s"] > 0]),
                "state_bytes": _median([float(r["state_bytes"]) for r in rs]),
                "peak_rss_mb": _median([r["peak_rss_mb"] for r in rs]),
            }
        )
    rows.sort(key=lambda r: (not math.isfinite(r["final_phi"]), r["final_phi"]))
    return rows, target


def _speed(free: Mapping[str, Any], other: Mapping[str, Any]) -> str:
    """PBGD-Free's speed against ``other``: to the target when both reach it, else in steps."""
    mine, theirs = free["time_to_target_s"], other["time_to_target_s"]
    steps = f"{free['steps_per_s'] / other['steps_per_s']:.2g}x the steps per second"
    if math.isfinite(mine) and math.isfinite(theirs):
        ratio = theirs / mine
        when = f"{ratio:.2g}x sooner" if ratio >= 1 else f"{1 / ratio:.2g}x later"
        return f"it reaches the target in {mine:.3g} s against {theirs:.3g} s ({when}; {steps})"
    if math.isfinite(mine):
        return f"it reaches the target in {mine:.3g} s and {other['method']} does not ({steps})"
    return f"it takes {steps} of {other['method']}"


def recommend(
    table: Sequence[Mapping[str, Any]],
    target: float,
    verdict: Mapping[str, Any] | None,
    problem: str,
    failed: Mapping[str, str],
) -> dict[str, Any]:
    """The recommendation as plain values, with ``text``: one paragraph."""
    if not table:
        reasons = "; ".join(f"{m}: {why}" for m, why in failed.items()) or "no run completed"
        return {"method": None, "text": f"No method completed a run ({reasons})."}
    best = table[0]
    soonest = min(table, key=lambda r: r["time_to_target_s"])
    by_name = {r["method"]: r for r in table}
    corrected = [r for r in table if r["method"] != "pbgd_free"]
    free = by_name.get("pbgd_free")
    sentences = [
        f"Best quality: {best['method']} (median final held-out phi = f(x, y*(x)) of "
        f"{best['final_phi']:.5g} ± {best['final_std']:.2g} over {best['seeds']} seeds).",
    ]
    if math.isfinite(soonest["time_to_target_s"]):
        sentences.append(
            f"Soonest to the target ({target:.5g}, within {TARGET_SLACK:.0%} of the best): "
            f"{soonest['method']} in {soonest['time_to_target_s']:.3g} s, with "
            f"{soonest['state_bytes'] / 2**20:.3g} MiB of solver state and "
            f"{soonest['peak_rss_mb']:.0f} MB peak memory."
        )
    chosen, gap = best["method"], None
    if free is not None and corrected:
        other = corrected[0]
        d = free["final_phi"] - other["final_phi"]
        se = math.sqrt(
            free["final_std"] ** 2 / free["seeds"] + other["final_std"] ** 2 / other["seeds"]
        )
        margin = max(AS_GOOD * abs(other["final_phi"]), 2 * se)
        gap = {"method": other["method"], "difference": d, "se": se, "margin": margin}
        if d <= margin:
            chosen = "pbgd_free"
            sentences.append(
                f"PBGD-Free is {'better than' if d < -margin else 'as good as'} the best "
                "corrected "
                f"method {other['method']} (difference {d:+.3g} ± {se:.2g}; as good means "
                f"within {margin:.3g}), {_speed(free, other)}, with "
                f"{free['state_bytes'] / 2**20:.3g} MiB of solver state against "
                f"{other['state_bytes'] / 2**20:.3g} MiB."
            )
        else:
            chosen = other["method"]
            sentences.append(
                f"PBGD-Free is biased here: it ends at phi = {free['final_phi']:.5g}, "
                f"{d:.3g} ± {se:.2g} worse than {other['method']} "
                f"({d / abs(other['final_phi']):.1%}), beyond the {margin:.3g} that seeds "
                "and a 5% tolerance explain."
            )
    elif free is None and "pbgd_free" in failed:
        sentences.append(f"PBGD-Free did not run: {failed['pbgd_free']}.")
    if verdict is not None and free is not None:
        agrees = (verdict.get("verdict") == "suitable") == (chosen == "pbgd_free")
        if verdict.get("verdict") == "uncertain":
            sentences.append("The flatness diagnostic was uncertain on this start.")
        else:
            sentences.append(
                f"The flatness diagnostic said '{verdict.get('verdict')}' on the same start, "
                + ("which agrees." if agrees else "which this measurement contradicts.")
            )
    flag = "" if chosen == "pbgd_free" else f" --method {chosen}"
    sentences.append(
        f"Next: bilevel-ray tune {problem}{flag} (search its step sizes"
        f"{' and gamma' if chosen != 'bome' and chosen != 'implicit_cg' else ''}), then "
        f"bilevel-ray train {problem}{flag} --workers N."
    )
    return {
        "method": chosen,
        "best_quality": best["method"],
        "soonest": soonest["method"],
        "target": target,
        "pbgd_free_vs_corrected": gap,
        "text": " ".join(sentences),
    }
