"""``br.compare``'s outputs without Ray: the printed table, the plan's estimate, progress lines,
strict JSON values, the rerun manifest, the held-out split and the picture's legend."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

import bilevel_ray.runtime.compare.plan as compare_plan
from bilevel_ray.problems import build_spec
from bilevel_ray.runtime.compare.output import format_table, manifest, strict, strict_json
from bilevel_ray.runtime.compare.plan import Estimate, Heartbeat, plan_line
from bilevel_ray.runtime.compare.plot import draw_compare
from bilevel_ray.runtime.compare.rank import method_table
from bilevel_ray.runtime.compare.trial import split_rows, start_phi
from bilevel_ray.runtime.compare.verdict import recommend


def _curve(points):
    return [{"wall_s": t, "eval/phi": phi, "eval/phi_val": phi} for t, phi in points]


def _run(method, seed, phi):
    return {
        "method": method,
        "seed": seed,
        "status": "completed",
        "reason": None,
        "final_phi": phi,
        "final_upper_loss": phi,
        "lower_gap": 0.0,
        "steps": 100,
        "wall_s": 1.0,
        "run_wall_s": 2.5,
        "state_bytes": 16,
        "peak_rss_mb": 100.0,
    }


def test_strict_turns_every_non_finite_number_into_null():
    value = {"a": math.inf, "b": [math.nan, -math.inf, 1.5], "c": (1, "x"), "d": torch.tensor(2.0)}
    assert strict(value) == {"a": None, "b": [None, None, 1.5], "c": [1, "x"], "d": 2.0}
    assert "Infinity" not in strict_json({"x": math.inf})


def test_the_manifest_names_the_command_or_says_there_is_none():
    arguments = {
        "methods": ["alt_pbgd"],
        "budget_s": 30.0,
        "seeds": 3,
        "rank_by": "best",
        "storage_path": "/r",
        "name": "c",
    }
    named = manifest("my file.py:factory", {"n": 5}, arguments, {"gamma": 20})
    assert named["command"] == (
        "bilevel-ray compare 'my file.py:factory' --config n=5 --methods alt_pbgd --budget 30 "
        "--seeds 3 --set gamma=20 --rank-by best --out /r --name c-rerun"
    )

    def factory(config):  # a function in a function: no command can name it
        return None

    unnamed = manifest(factory, {}, arguments, {})
    assert unnamed["command"] is None and unnamed["problem"] is None
    assert unnamed["arguments"]["budget_s"] == 30.0


def test_the_table_says_which_column_is_which_point():
    runs = [_run("alt_pbgd", 0, 0.2), _run("pbgd", 0, 5.0)]
    curves = {
        ("alt_pbgd", 0): _curve([(1.0, 0.1), (2.0, 0.2)]),
        ("pbgd", 0): _curve([(1.0, 6.0), (2.0, 5.0)]),
    }
    ranking = method_table(runs, curves, 10.0)
    result = SimpleNamespace(
        table=ranking.rows,
        recommendation=recommend(ranking, None, "p", {}),
        runs=pa.Table.from_pylist([{"status": "completed"}]),
        budget_s=2.0,
    )
    lines = format_table(result).splitlines()
    assert lines[0].split() == [
        "method",
        "*",
        "best",
        "phi",
        "±",
        "std",
        "at",
        "s",
        "to",
        "target",
        "final",
        "phi",
        "±",
        "std",
        "to",
        "target",
        "steps/s",
        "method",
        "s",
        "run",
        "s",
        "state",
        "MiB",
        "peak",
        "MB",
    ]
    pbgd = lines[2].split()
    assert pbgd[0] == "pbgd" and pbgd[4] == "-"  # never at the target: "-", not inf
    assert lines[1].split()[10] == "2.5"  # the run's wall time beside the method's 1 s
    assert "best: the point with the lowest phi on the validation half" in lines[-1]
    assert "budget 2 s of each method's own steps (method s), run s: the whole run" in lines[-1]


def test_the_plan_states_runs_budget_and_an_estimate():
    estimate = Estimate.of(12, 2, 30.0, 0.1, 50, True, 20.0)
    # per run: 30 s + 3 * (40 + 2 + 1) * 0.1 s of scoring + 6 s start; 6 waves; Ray 10 s.
    assert estimate.per_run_s == pytest.approx(48.9)
    assert estimate.runs_s == pytest.approx(10 + 6 * 48.9)
    assert estimate.total_s == pytest.approx(estimate.runs_s + 20.0)
    line = plan_line(["alt_pbgd", "pbgd_free"], 6, estimate, "best")
    assert line.startswith(
        "plan: 2 method(s) (alt_pbgd, pbgd_free) x 6 seed(s) (0-5) = 12 runs of 30 s of the "
        "method's own steps each (their settings go to compare.json), 2 at a time; first the "
        "flatness diagnostic on the same start (about 20 s); "
    )
    assert line.endswith("Estimated wall time: about 323 s (an estimate; the runs 303 s).")
    assert "ranked at each run's best held-out point (early stopping" in line


def test_the_heartbeat_speaks_every_few_seconds_and_not_when_quiet(monkeypatch, capsys):
    monkeypatch.setattr(compare_plan, "PROGRESS_EVERY_S", 0.3)
    with Heartbeat(lambda: "tick"):
        time.sleep(1.1)
    ticks = capsys.readouterr().err.splitlines()
    assert 2 <= len(ticks) <= 4 and set(ticks) == {"[compare] tick"}
    with Heartbeat(lambda: "tick", quiet=True):
        time.sleep(0.5)
    assert capsys.readouterr().err == ""


def test_a_run_end_line_says_diverged_when_phi_explodes(capsys):
    from bilevel_ray.runtime.compare.progress import RunProgress

    watch = RunProgress(Estimate.of(2, 1, 1.0, 0.01, 50, False, None), start=1.0)
    trial = SimpleNamespace(
        trial_id="t1",
        config={"method": "pbgd", "seed": 0},
        last_result={"status": "completed", "final_phi": 5.2e10, "final_upper_loss": 1.0},
    )
    watch.on_trial_start(0, [], trial)
    assert watch.message().startswith("runs: 0 of 2 ended, running pbgd seed 0 for 0 s; ")
    watch.on_trial_complete(0, [], trial)
    assert capsys.readouterr().err.startswith(
        "[compare] pbgd seed 0: diverged: phi exploded: final held-out phi 5.2e+10 against 1"
    )


def test_the_held_out_rows_split_in_two():
    inputs, labels = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    validate, test = split_rows((inputs, labels))
    assert validate[1].tolist() == [0, 2, 4] and test[1].tolist() == [1, 3]
    assert split_rows(None) is None
    assert split_rows((torch.zeros(3), torch.zeros(4))) is None  # mixed lengths
    assert split_rows(torch.zeros(1)) is None
    phi, score_s, split = start_phi(build_spec("regression", {"device": "cpu"}))
    assert split and math.isfinite(phi) and phi > 0 and score_s > 0
    assert start_phi(build_spec("toy-negative", {"device": "cpu"}))[::2] == (
        pytest.approx(14.0, abs=1e-3),
        False,
    )


def test_the_legend_is_outside_the_axes_and_names_a_method_that_could_not_run():
    curves = {("alt_pbgd", s): _curve([(0.5, 2.0), (1.0, 1.0)]) for s in (0, 1)}
    failed = {
        "bome": "failed: ValueError: the lower loss returned a NaN at step 3 of the run",
        "pbgd_free": "not applicable: upper_loss does not depend on x",
    }
    figure = draw_compare(curves, 1.05, "p", failed, "best")
    axis = figure.axes[0]
    legend = axis.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert "alt_pbgd (median of 2 seeds)" in texts
    assert "bome (failed: ValueError: the lower loss returned a NaN at step...)" in texts
    assert "pbgd_free (not applicable: upper_loss does not depend on x)" in texts
    renderer = figure.canvas.get_renderer()
    figure.canvas.draw()
    # The legend sits right of the axes: it covers no curve.
    box, frame = legend.get_window_extent(renderer), axis.get_window_extent(renderer)
    assert box.x0 >= frame.x1
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_nothing_ran_still_draws_the_failed_methods(tmp_path):
    figure = draw_compare({}, math.nan, "p", {"bome": "failed: boom"}, "final")
    texts = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert "bome (failed: boom)" in texts
    import matplotlib.pyplot as plt

    plt.close(figure)
