"""From a comparison's ranking to a recommendation a team can act on (pure; no Ray, no files).

The ranking (:mod:`bilevel_ray.runtime.compare.rank`) reads each method at its best held-out
point (early stopping) and at its final point; the recommendation uses ``ranking.rank_by``
(default "best") and says when the other point ranks the methods otherwise (overfitting):

* the best quality: the lowest median phi among the methods none of whose seeds diverged;
* the soonest to the target, and at what memory;
* PBGD-Free against the best corrected method: the difference of medians d, with the standard
  error se = sqrt(s_pf^2 / n_pf + s_c^2 / n_c) from the seeds. PBGD-Free is *as good* when
  d <= tau = RTOL * max(phi(x0) - min(phi_pf, phi_c), 0) + Z * se + ATOL: the flatness
  verdict's tolerance (5% of the achievable improvement from the problem's start, plus the
  seeds' noise), which does not move when a constant is added to f. It is then the
  recommendation (one copy of y, the cheapest step), with its speed stated; otherwise the best
  corrected method is, with PBGD-Free's bias stated;
* a method with a diverged seed is named and never recommended;
* whether that agrees with the flatness verdict on the same start;
* the next command to run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from bilevel_ray.runtime.compare.rank import RTOL, Ranking, method_table, time_to_target, within

__all__ = ["method_table", "recommend", "time_to_target"]

_POINT = {"best": "best held-out point", "final": "final point"}


def _speed(free: Mapping[str, Any], other: Mapping[str, Any], p: str) -> str:
    """PBGD-Free's speed against ``other``: to the target when both reach it, else in steps."""
    mine, theirs = free[f"to_target_{p}_s"], other[f"to_target_{p}_s"]
    steps = f"{free['steps_per_s'] / other['steps_per_s']:.2g}x the steps per second"
    if math.isfinite(mine) and math.isfinite(theirs):
        ratio = theirs / mine if mine > 0 else math.inf
        when = f"{ratio:.2g}x sooner" if ratio >= 1 else f"{1 / ratio:.2g}x later"
        return f"it reaches the target in {mine:.3g} s against {theirs:.3g} s ({when}; {steps})"
    if math.isfinite(mine):
        return f"it reaches the target in {mine:.3g} s and {other['method']} does not ({steps})"
    return f"it takes {steps} of {other['method']}"


def _decide(ranking: Ranking, p: str) -> tuple[str | None, dict[str, Any] | None, list[str]]:
    """The method chosen at point ``p``, PBGD-Free's gap to the best corrected method, and the
    sentences that say why."""
    key, std = f"phi_{p}", f"std_{p}"
    rows = sorted(
        (r for r in ranking.rows if math.isfinite(r[key])), key=lambda r: (r[key], r["method"])
    )
    sound = [r for r in rows if not r["diverged"]]
    sentences = [
        f"{r['method']} diverged on {r['diverged']} of {r['seeds'] + r['diverged']} seeds: not "
        "recommended."
        for r in rows
        if r["diverged"]
    ]
    if not sound:
        return None, None, [*sentences, "No method completed every seed without diverging."]
    best, free = sound[0], next((r for r in sound if r["method"] == "pbgd_free"), None)
    corrected = [r for r in sound if r["method"] != "pbgd_free"]
    sentences.insert(
        0,
        f"Best quality: {best['method']} (median held-out phi = f(x, y*(x)) at the "
        f"{_POINT[p]} {best[key]:.5g} ± {best[std]:.2g} over {best['seeds']} seeds).",
    )
    if free is None or not corrected:
        return best["method"], None, sentences
    other = corrected[0]
    d = free[key] - other[key]
    se = math.sqrt(free[std] ** 2 / free["seeds"] + other[std] ** 2 / other["seeds"])
    tau = within(ranking.start, free[key], d, se)
    gap = {"method": other["method"], "difference": d, "se": se, "tolerance": tau}
    scale = (
        f"{RTOL:.0%} of the improvement from phi(x0) = {ranking.start:.5g}"
        if math.isfinite(ranking.start)
        else f"{RTOL:.0%} of |phi| (phi(x0) unmeasured)"
    )
    if d <= tau:
        sentences.append(
            f"PBGD-Free is {'better than' if d < -tau else 'as good as'} the best corrected "
            f"method {other['method']} (difference {d:+.3g} ± {se:.2g}; as good means within "
            f"tau = {tau:.3g}: {scale}, plus two standard errors), {_speed(free, other, p)}, "
            f"with {free['state_bytes'] / 2**20:.3g} MiB of solver state against "
            f"{other['state_bytes'] / 2**20:.3g} MiB."
        )
        return "pbgd_free", gap, sentences
    where = "it ends at" if p == "final" else "at its best point,"
    sentences.append(
        f"PBGD-Free is biased here: {where} phi = {free[key]:.5g}, {d:.3g} ± {se:.2g} worse "
        f"than {other['method']}, beyond tau = {tau:.3g} ({scale}, plus two standard errors)."
    )
    return other["method"], gap, sentences


def _overfitting(ranking: Ranking, chosen: str | None, other_choice: str | None) -> list[str]:
    """What the two points say together: the ranking at each when they differ, the methods
    whose held-out phi rises after their best point, and a choice that would change."""
    p = ranking.rank_by
    q = "final" if p == "best" else "best"
    out = []
    if ranking.order[p] != ranking.order[q]:
        out.append(
            f"The ranking changes between the best held-out and the final points (best: "
            f"{', '.join(ranking.order['best'])}; final: {', '.join(ranking.order['final'])}): "
            f"ranked here at the {_POINT[p]}."
        )
    rising = [r for r in ranking.rows if r["overfits"]]
    if rising:
        out.append(
            "Overfitting: the held-out phi rises after its best point for "
            + ", ".join(
                f"{r['method']} ({r['phi_best']:.4g} at {r['best_at_s']:.3g} s, "
                f"{r['phi_final']:.4g} at the end)"
                for r in rising
            )
            + "; stop early (at the best point) or regularise the upper level."
        )
    if other_choice != chosen:
        out.append(f"Judged at the {_POINT[q]}, the recommendation would be {other_choice}.")
    return out


def recommend(
    ranking: Ranking,
    verdict: Mapping[str, Any] | None,
    problem: str,
    failed: Mapping[str, str],
) -> dict[str, Any]:
    """The recommendation as plain values, with ``text``: one paragraph."""
    table, p = ranking.rows, ranking.rank_by
    if not table:
        reasons = "; ".join(f"{m}: {why}" for m, why in failed.items()) or "no run completed"
        return {"method": None, "text": f"No method completed a run ({reasons})."}
    chosen, gap, sentences = _decide(ranking, p)
    other_choice, _, _ = _decide(ranking, "final" if p == "best" else "best")
    target = ranking.targets[p]
    sound = [r for r in table if not r["diverged"]]
    soonest = min(sound or table, key=lambda r: r[f"to_target_{p}_s"])
    if math.isfinite(soonest[f"to_target_{p}_s"]):
        sentences.insert(
            1,
            f"Soonest to the target ({target:.5g} at the {_POINT[p]}, within tau of the best): "
            f"{soonest['method']} in {soonest[f'to_target_{p}_s']:.3g} s, with "
            f"{soonest['state_bytes'] / 2**20:.3g} MiB of solver state and "
            f"{soonest['peak_rss_mb']:.0f} MB peak memory.",
        )
    free = next((r for r in table if r["method"] == "pbgd_free"), None)
    if free is None and "pbgd_free" in failed:
        sentences.append(f"PBGD-Free is not recommended ({failed['pbgd_free']}).")
    ranked = {r["method"] for r in table}
    unranked = [f"{m} ({why})" for m, why in failed.items() if m not in ranked | {"pbgd_free"}]
    if unranked:
        sentences.append(f"Not ranked: {'; '.join(unranked)}.")
    sentences += _overfitting(ranking, chosen, other_choice)
    if verdict is not None and free is not None and chosen is not None:
        agrees = (verdict.get("verdict") == "suitable") == (chosen == "pbgd_free")
        if verdict.get("verdict") == "uncertain":
            sentences.append("The flatness diagnostic was uncertain on this start.")
        else:
            sentences.append(
                f"The flatness diagnostic said '{verdict.get('verdict')}' on the same start, "
                + ("which agrees." if agrees else "which this measurement contradicts.")
            )
    if chosen is not None:
        flag = "" if chosen == "pbgd_free" else f" --method {chosen}"
        sentences.append(
            f"Next: bilevel-ray tune {problem}{flag} (search its step sizes"
            f"{' and gamma' if chosen not in ('bome', 'implicit_cg') else ''}), then "
            f"bilevel-ray train {problem}{flag} --workers N."
        )
    return {
        "method": chosen,
        "ranked_at": p,
        "method_at_other_point": other_choice,
        "best_quality": sound[0]["method"] if sound else None,
        "soonest": soonest["method"],
        "target": target,
        "targets": dict(ranking.targets),
        "pbgd_free_vs_corrected": gap,
        "text": " ".join(sentences),
    }
