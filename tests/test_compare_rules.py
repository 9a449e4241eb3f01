"""``br.compare``'s rules, on hand-built runs and curves (no Ray): the flatness verdict's
tolerance for "as good", the divergence rule, the final and the best held-out points, strict
JSON, the plan line and the picture's legend (issue section 4)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bilevel_ray as br
import bilevel_ray.runtime.compare.driver as compare_module
from bilevel_ray.runtime.compare.outcome import write_outcome
from bilevel_ray.runtime.compare.rank import best_row, divergence, method_table, time_to_target
from bilevel_ray.runtime.compare.trial import CURVES
from bilevel_ray.runtime.compare.verdict import recommend


def _refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


def _run(method, seed, phi, status="completed", **extra):
    return {
        "method": method,
        "seed": seed,
        "status": status,
        "reason": None,
        "final_phi": phi,
        "final_upper_loss": phi,
        "lower_gap": 0.0,
        "steps": 100,
        "wall_s": 1.0,
        "state_bytes": 16,
        "peak_rss_mb": 100.0,
        **extra,
    }


def _curve(points):
    """(time, test phi) or (time, test phi, validation phi) rows."""
    return [
        {"wall_s": p[0], "eval/phi": p[1], "eval/phi_val": p[-1], "eval/upper_loss": p[1]}
        for p in points
    ]


def _pair(free_phi, alt_phi, start):
    """PBGD-Free and alt_pbgd, two seeds each, both from phi(x0) = start."""
    runs = [_run("pbgd_free", s, free_phi) for s in (0, 1)]
    runs += [_run("alt_pbgd", s, alt_phi) for s in (0, 1)]
    curves = {("pbgd_free", s): _curve([(0.5, start), (1.0, free_phi)]) for s in (0, 1)}
    curves |= {("alt_pbgd", s): _curve([(0.5, start), (1.0, alt_phi)]) for s in (0, 1)}
    return runs, curves


# --- one tolerance rule: the verdict's, 5% of the achievable improvement ---------------------


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_adding_a_constant_to_f_does_not_change_the_recommendation(offset):
    # PBGD-Free 0.5 worse than alt_pbgd, both from phi(x0) = 5: tau = 5% of 5 = 0.25 < 0.5.
    # The former rule (5% of |phi|) allowed 50.0 once 1000 was added, and kept PBGD-Free.
    runs, curves = _pair(0.5 + offset, 0.0 + offset, 5.0 + offset)
    advice = recommend(method_table(runs, curves, 5.0 + offset), None, "p", {})
    assert advice["method"] == "alt_pbgd"
    gap = advice["pbgd_free_vs_corrected"]
    assert gap["difference"] == pytest.approx(0.5) and gap["tolerance"] == pytest.approx(
        0.25, abs=1e-5
    )
    assert "PBGD-Free is biased here: at its best point, phi = " in advice["text"]
    assert "beyond tau = 0.25 (5% of the improvement from phi(x0) = " in advice["text"]


def test_pbgd_free_within_5_percent_of_the_improvement_is_recommended():
    # The case: a shortfall of 0.186 at phi ~ 0.19 from phi(x0) = 10. 5% of |phi|
    # (0.0093) called it biased; 5% of the improvement (0.49) calls it as good.
    runs, curves = _pair(0.372, 0.186, 10.0)
    assert 0.372 - 0.186 > 0.05 * 0.186  # the former rule would have switched
    advice = recommend(method_table(runs, curves, 10.0), {"verdict": "suitable"}, "p", {})
    assert advice["method"] == "pbgd_free"
    assert (
        "PBGD-Free is as good as the best corrected method alt_pbgd (difference +0.186 ± 0; as "
        "good means within tau = 0.491: 5% of the improvement from phi(x0) = 10, plus two "
        "standard errors)" in advice["text"]
    )
    assert "which agrees" in advice["text"]


# --- a run whose phi explodes is diverged, never completed, never recommended -----------------


def test_the_divergence_rule():
    run = _run("pbgd", 0, 0.0)
    exploded = divergence(run, _curve([(0.1, 2.0), (1.0, 5.2e10)]), 1.0)
    assert exploded == (
        "phi exploded: final held-out phi 5.2e+10 against 1 at the start (a run is diverged "
        "above start + 1000 max(|start|, 1))"
    )
    assert divergence(run, _curve([(1.0, 1000.0)]), 1.0) is None  # <= 1 + 1000
    assert divergence(run, _curve([(1.0, 1002.0)]), 1.0) is not None
    assert divergence(run, _curve([(1.0, math.inf)]), 1.0) == (
        "phi exploded: final held-out phi inf, f inf (not finite)"
    )
    # phi(x0) unmeasured: the run's first scored phi stands in (2 + 1000 * 2 = 2002).
    assert divergence(run, _curve([(0.1, 2.0), (1.0, 2001.0)]), math.nan) is None
    assert divergence(run, _curve([(0.1, 2.0), (1.0, 2003.0)]), math.nan) is not None
    # No curve: the run's own final numbers.
    assert divergence(_run("pbgd", 0, math.nan), (), 1.0) is not None


def _write_curves(folder: Path, curves) -> None:
    (folder / CURVES).mkdir(parents=True)
    for (method, seed), rows in curves.items():
        rows = [{"method": method, "seed": seed, "step": i, **r} for i, r in enumerate(rows)]
        pq.write_table(pa.Table.from_pylist(rows), folder / CURVES / f"{method}-{seed}.parquet")


def test_an_exploded_run_is_listed_as_diverged_and_not_recommended(tmp_path):
    # V-PBGD (pbgd) ends at phi = 5.2e10 on one seed: listed "diverged", and although its
    # other seed is the best, it is not recommended.
    runs = [_run("pbgd", 0, 0.1), _run("pbgd", 1, 5.2e10), _run("alt_pbgd", 0, 0.3)]
    curves = {
        ("pbgd", 0): _curve([(0.5, 1.0), (1.0, 0.1)]),
        ("pbgd", 1): _curve([(0.5, 1.0), (1.0, 5.2e10)]),
        ("alt_pbgd", 0): _curve([(0.5, 1.0), (1.0, 0.3)]),
    }
    _write_curves(tmp_path, curves)
    result = write_outcome(runs, tmp_path, None, "p", {}, start=2.0)
    statuses = {(r["method"], r["seed"]): r["status"] for r in result.runs.to_pylist()}
    assert statuses == {
        ("pbgd", 0): "completed",
        ("pbgd", 1): "diverged",
        ("alt_pbgd", 0): "completed",
    }
    row = next(r for r in result.table if r["method"] == "pbgd")
    assert row["seeds"] == 1 and row["diverged"] == 1
    assert result.recommendation["method"] == "alt_pbgd"
    assert "pbgd diverged on 1 of 2 seeds: not recommended." in result.recommendation["text"]
    saved = json.loads((tmp_path / "compare.json").read_text(), parse_constant=_refuse)
    assert saved["failed"]["pbgd"].startswith("diverged: phi exploded: final held-out phi 5.2e+10")


def test_a_method_that_diverged_on_every_seed_is_named_not_ranked():
    runs = [_run("pbgd", 0, 1.0, status="diverged", reason="phi exploded")]
    runs += [_run("alt_pbgd", 0, 0.3)]
    advice = recommend(method_table(runs, {}, 2.0), None, "p", {"pbgd": "diverged: phi exploded"})
    assert advice["method"] == "alt_pbgd"
    assert "Not ranked: pbgd (diverged: phi exploded)." in advice["text"]


def test_no_method_without_a_diverged_seed_recommends_nothing():
    runs = [_run("alt_pbgd", 0, 0.3), _run("alt_pbgd", 1, 9.0, status="diverged")]
    advice = recommend(method_table(runs, {}, 2.0), None, "p", {})
    assert advice["method"] is None
    assert "No method completed every seed without diverging." in advice["text"]
    assert "Next:" not in advice["text"]


# --- the final and the best held-out points ---------------------------------------------------


def test_the_best_point_is_chosen_on_the_validation_rows_and_reported_on_the_test_rows():
    curve = _curve([(1.0, 0.9, 0.3), (2.0, 0.2, 0.5)])  # (time, test phi, validation phi)
    assert best_row(curve)["wall_s"] == 1.0
    runs = [_run("alt_pbgd", 0, 0.2)]
    row = method_table(runs, {("alt_pbgd", 0): curve}, 2.0).rows[0]
    assert (row["phi_best"], row["best_at_s"], row["phi_final"]) == (0.9, 1.0, 0.2)


def test_to_target_uses_the_ranked_point_a_touched_target_is_not_reached():
    curve = _curve([(1.0, 1.0), (2.0, 0.5), (3.0, 0.9)])
    assert time_to_target(curve, 0.6, "final") == math.inf  # touched at 2 s, left it
    assert time_to_target(curve, 0.6, "best") == 2.0  # early stopping keeps the 2 s point
    assert time_to_target(_curve([(1.0, 0.5), (2.0, 0.9), (3.0, 0.55)]), 0.6) == 3.0


def _overfitting_case():
    # alt_pbgd bottoms out at 2 s and rises (0.5 -> 0.9); pbgd goes on down to 0.7.
    runs = [_run(m, s, 0.0) for m in ("alt_pbgd", "pbgd") for s in (0, 1)]
    curves = {("alt_pbgd", s): _curve([(1.0, 1.0), (2.0, 0.5), (3.0, 0.9)]) for s in (0, 1)}
    curves |= {("pbgd", s): _curve([(1.0, 1.0), (2.0, 0.8), (3.0, 0.7)]) for s in (0, 1)}
    return runs, curves


def test_both_points_are_in_the_table_and_the_overfitting_is_said():
    runs, curves = _overfitting_case()
    ranking = method_table(runs, curves, 3.0)
    assert ranking.order == {"best": ["alt_pbgd", "pbgd"], "final": ["pbgd", "alt_pbgd"]}
    alt = ranking.rows[0]
    assert (alt["method"], alt["phi_best"], alt["phi_final"], alt["overfits"]) == (
        "alt_pbgd",
        0.5,
        0.9,
        True,
    )
    # Each point's "to target" is against that point's target (best 0.625, final 0.815).
    assert ranking.targets == pytest.approx({"best": 0.625, "final": 0.815}, abs=1e-5)
    assert (alt["to_target_best_s"], alt["to_target_final_s"]) == (2.0, math.inf)
    advice = recommend(ranking, None, "p", {})
    assert advice["method"] == "alt_pbgd" and advice["method_at_other_point"] == "pbgd"
    text = advice["text"]
    assert (
        "The ranking changes between the best held-out and the final points (best: alt_pbgd, "
        "pbgd; final: pbgd, alt_pbgd): ranked here at the best held-out point." in text
    )
    assert (
        "Overfitting: the held-out phi rises after its best point for alt_pbgd (0.5 at 2 s, 0.9 "
        "at the end); stop early" in text
    )
    assert "Judged at the final point, the recommendation would be pbgd." in text
    final = recommend(method_table(runs, curves, 3.0, rank_by="final"), None, "p", {})
    assert final["method"] == "pbgd"
    assert (
        "Judged at the best held-out point, the recommendation would be alt_pbgd."
        in (final["text"])
    )


def test_the_same_ranking_at_both_points_says_nothing_of_a_change():
    runs, curves = _pair(0.5, 0.0, 5.0)
    text = recommend(method_table(runs, curves, 5.0), None, "p", {})["text"]
    assert "ranking changes" not in text and "Overfitting" not in text


# --- strict JSON, and what reruns a comparison ------------------------------------------------


def test_compare_json_is_strict_and_never_writes_infinity(tmp_path):
    # pbgd never reaches the target (inf), its lower gap is NaN: both become null.
    runs = [_run("alt_pbgd", 0, 0.1), _run("pbgd", 0, 3.0, lower_gap=math.nan)]
    runs.append({"method": "bome", "seed": None, "status": "not applicable", "reason": "no"})
    curves = {("alt_pbgd", 0): _curve([(1.0, 0.1)]), ("pbgd", 0): _curve([(1.0, 3.0)])}
    _write_curves(tmp_path, curves)
    write_outcome(runs, tmp_path, None, "p", {"bome": "no"}, start=5.0, meta={"budget_s": 1.0})
    text = (tmp_path / "compare.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    saved = json.loads(text, parse_constant=_refuse)
    pbgd = next(r for r in saved["methods"] if r["method"] == "pbgd")
    assert pbgd["to_target_final_s"] is None and pbgd["lower_gap"] is None
    assert saved["budget_s"] == 1.0 and saved["failed"]["bome"] == "not applicable: no"
    assert saved["rules"]["divergence"].startswith("final phi or f not finite")


def test_compare_json_records_what_reruns_it(tmp_path, monkeypatch, capsys):
    """The plan comes first on stderr (before the diagnostic and the runs), and compare.json
    holds the budget, the seeds, each method's settings and the command that reruns it."""

    def no_ray(plan, methods, seeds, storage, name, where, watch, extra):
        Path(plan.folder).mkdir(parents=True, exist_ok=True)
        return [_run(m, s, 0.1 if m == "alt_pbgd" else 0.2) for m in methods for s in range(seeds)]

    monkeypatch.setattr(compare_module, "_run_all", no_ray)
    result = br.compare(
        "toy-negative",
        methods=["pbgd_free", "alt_pbgd"],
        budget_s=2,
        seeds=2,
        storage_path=str(tmp_path),
        name="c",
        lr_x=0.02,
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[0].startswith(
        "[compare] plan: 2 method(s) (alt_pbgd, pbgd_free) x 2 seed(s) (0-1) = 4 runs of 2 s of "
        "the method's own steps each"
    )
    assert "first the flatness diagnostic on the same start (about " in lines[0]
    assert "ranked at each run's final point" in lines[0]  # the toy has no rows to split
    assert "Estimated wall time: about " in lines[0] and "(an estimate;" in lines[0]
    done = [i for i, line in enumerate(lines) if line.startswith("[compare] diagnostic: done in")]
    assert done and done[0] > 0 and lines[-1].startswith("[compare] done in ")
    saved = json.loads((tmp_path / "c" / "compare.json").read_text(), parse_constant=_refuse)
    assert saved["budget_s"] == 2.0 and saved["seeds"] == [0, 1]
    assert saved["settings"]["alt_pbgd"]["lr_x"] == 0.02
    assert saved["rerun"]["command"] == (
        f"bilevel-ray compare toy-negative --methods pbgd_free,alt_pbgd --budget 2 --seeds 2 "
        f"--set lr_x=0.02 --out {tmp_path} --name c-rerun"
    )
    assert saved["rerun"]["arguments"]["fixed"] == {"lr_x": 0.02}
    assert saved["plan"]["total_s"] > 0 and saved["plan"]["took_s"] > 0
    assert saved["rank_by"] == "final" and result.ranking.rank_by == "final"


def test_quiet_prints_no_plan(tmp_path, monkeypatch, capsys):
    def no_ray(plan, methods, seeds, storage, name, where, watch, extra):
        Path(plan.folder).mkdir(parents=True, exist_ok=True)
        return [_run(m, 0, 0.1) for m in methods]

    monkeypatch.setattr(compare_module, "_run_all", no_ray)
    br.compare(
        "toy-negative",
        methods=["alt_pbgd"],
        budget_s=1,
        seeds=1,
        storage_path=str(tmp_path),
        progress=False,
    )
    assert "[compare]" not in capsys.readouterr().err
