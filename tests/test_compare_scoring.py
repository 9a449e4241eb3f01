"""``br.compare``'s scoring: every phi that ranks is f(x, y_hat) at a y_hat solved for its x,
or the point is unscored. The audit's case: on the negative toy (min phi = -35) bome's first
point read phi = -52.3 at a y_hat left where the run's y was (Adam moves ~lr a step), and made
bome "soonest to the target"."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from bilevel_ray.config import SolverConfig
from bilevel_ray.problems import build_spec
from bilevel_ray.runtime.compare.rank import best_row, method_table, phi_at, time_to_target
from bilevel_ray.runtime.compare.trial import (
    TRACK_STEPS,
    ComparePlan,
    _BudgetSink,
    _LowerSolution,
    settle,
)
from bilevel_ray.runtime.compare.verdict import recommend
from bilevel_ray.runtime.local.run_spec import RunSpec
from bilevel_ray.runtime.local.solve import run_spec_local, solver_config

START = 14.0  # phi(x0) on the negative toy: 10 (x0 - 1) + x0^2 at x0 = 2
MIN_PHI = -35.0  # phi(-5)
TOL = settle(START, MIN_PHI)  # 0.1 of the ranking's tau at the minimum: 0.245


def _phi(x: float) -> float:
    """The negative toy's phi(x) = f(x, y*(x)) = 10 (x - 1) + x^2."""
    return 10.0 * (x - 1.0) + x * x


def _toy():
    return build_spec("toy-negative", {"device": "cpu"})


def _xy(x: float, y: float):
    like = {"dtype": torch.float64}
    return {"x": torch.tensor([x], **like)}, {"y": torch.tensor([y], **like)}


# --- one point's lower solve ------------------------------------------------------------------


def test_a_y_far_from_the_lower_solution_is_solved_before_phi_is_read():
    spec = _toy()
    x, y = _xy(-3.0, -3.0 - 1.0 - 5.0)  # y five below y*(x) = x - 1
    # The former rule, TRACK_STEPS Adam steps: y_hat moves ~0.5 and f reads ~45 below phi.
    old = _LowerSolution(spec.problem, spec.eval_data).scores(x, y, TRACK_STEPS)
    assert old["eval/phi"] < _phi(-3.0) - 40
    new = _LowerSolution(spec.problem, spec.eval_data).scores(x, y, TRACK_STEPS, START)
    assert new["eval/solved"] is True and new["eval/lower_steps"] > TRACK_STEPS
    assert new["eval/phi"] == pytest.approx(_phi(-3.0), abs=TOL)


def test_a_point_that_does_not_settle_is_flagged_unscored(monkeypatch):
    import bilevel_ray.runtime.compare.trial as trial

    monkeypatch.setattr(trial, "SETTLE_ROUNDS", 2)  # too few rounds to travel 50 in y
    spec = _toy()
    x, y = _xy(0.0, -51.0)
    out = _LowerSolution(spec.problem, spec.eval_data).scores(x, y, TRACK_STEPS, START)
    assert out["eval/solved"] is False and out["eval/lower_steps"] == 3 * TRACK_STEPS


def test_a_tracked_point_costs_one_round():
    spec = _toy()
    lower = _LowerSolution(spec.problem, spec.eval_data)
    x, y = _xy(-5.0, -6.0)  # at the solution: nothing to move
    lower.scores(x, y, TRACK_STEPS, START)
    again = lower.scores(x, y, TRACK_STEPS, START)
    assert again["eval/solved"] is True and again["eval/lower_steps"] == TRACK_STEPS


# --- a whole run's points, without Ray -------------------------------------------------------


@pytest.mark.parametrize("method", ["bome", "alt_pbgd"])
def test_no_scored_point_of_a_run_reads_phi_below_what_its_x_achieves(method, tmp_path):
    spec = _toy()
    options = SolverConfig.applicable(method, spec.defaults)
    options.pop("steps", None)
    plan = ComparePlan(
        "toy-negative", {}, {method: options}, budget_s=1.5, max_steps=10**6, report_every=30,
        gap_steps=50, folder=str(tmp_path), start=START,
    )  # fmt: skip
    sink = _BudgetSink(spec, plan, method, 0)
    xs, scores = [], sink.lower.scores

    def scored_at(x, y, steps, start):  # each scored point's x, for its true phi
        xs.append(float(x["x"]))
        return scores(x, y, steps, start)

    sink.lower.scores = scored_at
    run_spec_local(spec, solver_config(method, options), RunSpec(10**6, 0, 30), also=sink)
    # How many points a time budget holds depends on the machine's load: at least one.
    assert len(sink.rows) == len(xs) >= 1
    for row, x in zip(sink.rows, xs):
        if row["eval/solved"]:
            assert row["eval/phi"] == pytest.approx(_phi(x), abs=TOL), row
            assert row["eval/phi"] >= MIN_PHI - TOL
    assert sink.rows[-1]["eval/solved"]


# --- the ranking reads only scored points ----------------------------------------------------


def _run(method, phi):
    return {
        "method": method, "seed": 0, "status": "completed", "reason": None, "final_phi": phi,
        "final_upper_loss": phi, "lower_gap": 0.0, "steps": 100, "wall_s": 1.0,
        "state_bytes": 16, "peak_rss_mb": 100.0,
    }  # fmt: skip


def _row(t, phi, solved=True):
    return {"wall_s": t, "eval/phi": phi, "eval/phi_val": phi, "eval/solved": solved}


def test_an_unscored_point_is_never_the_best_and_never_reaches_the_target():
    # The audit's bome: its first point read -52.3 at an unsolved y_hat, flagged unscored.
    early = [_row(0.05, -52.3, solved=False), _row(0.5, -34.9), _row(2.0, -35.0)]
    steady = [_row(0.1, -34.6), _row(0.2, -35.0), _row(2.0, -35.0)]
    assert best_row(early)["wall_s"] == 2.0
    assert time_to_target(early, -32.5, "best") == 0.5
    assert time_to_target(early, -32.5, "final") == 0.5
    runs = [_run("bome", -35.0), _run("alt_pbgd", -35.0)]
    curves = {("bome", 0): early, ("alt_pbgd", 0): steady}
    for point in ("best", "final"):
        ranking = method_table(runs, curves, START, point)
        assert all(r[f"phi_{point}"] >= MIN_PHI - TOL for r in ranking.rows)
        advice = recommend(ranking, None, "toy-negative", {})
        assert advice["soonest"] == "alt_pbgd"
        assert "-52" not in advice["text"]


def test_an_unscored_final_point_is_nan_and_not_at_the_target():
    curve = [_row(0.5, -35.0), _row(1.0, -60.0, solved=False)]
    assert math.isnan(phi_at(curve[-1])) and phi_at(curve[0]) == -35.0
    assert time_to_target(curve, -32.5, "final") == math.inf
    assert time_to_target(curve, -32.5, "best") == 0.5
    ranking = method_table([_run("bome", -60.0)], {("bome", 0): curve}, START, "final")
    assert math.isnan(ranking.rows[0]["phi_final"]) and ranking.rows[0]["phi_best"] == -35.0


def test_a_run_without_a_curve_whose_final_point_is_unscored():
    run = {**_run("bome", -60.0), "final_solved": False}
    ranking = method_table([run, _run("alt_pbgd", -35.0)], {}, START, "final")
    assert [r["method"] for r in ranking.rows] == ["alt_pbgd", "bome"]
    assert math.isnan(ranking.rows[1]["phi_final"])


# --- one comparison on Ray -------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_the_negative_toy_reports_no_phi_below_its_minimum(ray_2cpu, tmp_path):
    from bilevel_ray.cli import main

    code = main(
        [
            "compare", "toy-negative", "--methods", "bome,alt_pbgd,pbgd_free", "--budget", "1",
            "--seeds", "1", "--out", str(tmp_path), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "compare" / "compare.json").read_text())
    for row in summary["methods"]:
        for key in ("phi_best", "phi_final"):
            assert row[key] is None or row[key] >= MIN_PHI - TOL, row
    for run in summary["runs"]:
        assert run["phi_best"] >= MIN_PHI - TOL and run["phi_final"] >= MIN_PHI - TOL, run
    curves = pq.read_table(tmp_path / "compare" / "curves.parquet").to_pylist()
    assert all(r["eval/phi"] >= MIN_PHI - TOL for r in curves if r["eval/solved"])
    assert summary["recommendation"]["method"] in ("bome", "alt_pbgd")
