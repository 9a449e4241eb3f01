"""Ray Tune sweeps: search-space checks, ranking, results, divergence, resume, report."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.evaluation import evaluate
from bilevel_ray.runtime.local.ranking import FAILED, INFEASIBLE, rank_trials, search_score
from bilevel_ray.runtime.tune.space import (
    check_search_space,
    decode,
    default_search_space,
    space_from_json,
)

ROOT = Path(__file__).resolve().parents[1]


# --- pure parts (no Ray started) -----------------------------------------------------------


def test_default_space_keeps_the_two_time_scale_prior():
    space = default_search_space("pbgd_free")
    assert set(space) == {"gamma", "lr_y", "lr_ratio", "optimizer", "inner_steps"}
    for _ in range(50):
        point = {k: v.sample() for k, v in space.items()}
        options = decode(point)
        assert options["lr_x"] <= options["lr_y"] and 1 <= options["gamma"] <= 100
        assert options["optimizer"] == "adam"
    assert "gamma" not in default_search_space("bome")


def test_the_default_space_leaves_out_what_the_user_fixed():
    assert set(default_search_space("pbgd_free", {"optimizer": "sgd", "gamma": 5.0})) == {
        "lr_y",
        "lr_ratio",
        "inner_steps",
    }
    # lr_x = lr_y * lr_ratio: a fixed step size takes the ratio out too.
    assert set(default_search_space("pbgd_free", {"lr_y": 0.01})) == {
        "gamma",
        "optimizer",
        "inner_steps",
    }


def test_decode_builds_a_pbgd_ramp():
    options = decode({"lr_y": 0.1, "gamma_init": 1.0, "gamma_max": 10.0, "gamma_argmax_step": 9})
    assert options["gamma"] == br.schedules.pbgd_ramp(1.0, 10.0, 9)
    assert br.SolverConfig(**options).to_dict()["gamma"]["kind"] == "linear"


@pytest.mark.parametrize(
    ("space", "match"),
    [
        ({"gama": 1.0}, r"unknown key\(s\) \['gama'\]; the allowed ones are: .*lr_ratio"),
        ({"gamma_init": 1.0}, r"a pbgd_ramp needs all of"),
        ({"gamma": 1, "gamma_init": 1, "gamma_max": 2, "gamma_argmax_step": 3}, "both gamma and"),
        ({"lr_y": 0.1, "lr_ratio": 0.5, "lr_x": 0.1}, "both lr_x and lr_ratio"),
        ({"lr_ratio": 0.5}, "lr_ratio without lr_y"),
        ({}, "must be a non-empty dict"),
    ],
)
def test_search_space_is_checked_before_launch(space, match):
    with pytest.raises(br.ConfigError, match=match):
        check_search_space(space, "pbgd_free", {})


def test_keys_that_do_not_apply_to_the_method_are_refused():
    with pytest.raises(br.ConfigError, match=r"\['gamma'\] do not apply to method='bome'"):
        check_search_space({"gamma": 3.0}, "bome", {})


def test_space_from_json():
    space = space_from_json(
        {"gamma": {"loguniform": [1, 10]}, "optimizer": {"choice": ["sgd"]}, "inner_steps": 2}
    )
    gamma = space["gamma"].sample()
    assert gamma >= 1 and gamma <= 10 and space["optimizer"].sample() == "sgd"
    assert space["inner_steps"] == 2
    with pytest.raises(br.ConfigError, match="give one distribution, one of loguniform"):
        space_from_json({"gamma": {"normal": [0, 1]}})


def test_ranking_prefers_low_upper_loss_within_the_gap_tolerance():
    rows = [
        {"trial_id": "a", "status": "completed", "eval/upper_loss": 0.5, "eval/lower_gap": 0.01},
        {"trial_id": "b", "status": "completed", "eval/upper_loss": 0.1, "eval/lower_gap": 0.9},
        {"trial_id": "c", "status": "stopped", "eval/upper_loss": 0.3, "eval/lower_gap": 0.05},
        {"trial_id": "d", "status": "diverged", "eval/upper_loss": math.inf},
        {"trial_id": "e", "status": "completed", "eval/upper_loss": 0.2, "eval/lower_gap": 0.5},
    ]
    assert [r["trial_id"] for r in rank_trials(rows, gap_tol=0.1)] == ["c", "a", "e", "b", "d"]
    assert [r["trial_id"] for r in rank_trials(rows, gap_tol=1.0)][:2] == ["b", "e"]


def test_the_search_score_orders_trials_as_the_ranking_does():
    rows = [
        {"trial_id": "a", "eval/upper_loss": 0.5, "eval/lower_gap": 0.01},
        {"trial_id": "b", "eval/upper_loss": 0.1, "eval/lower_gap": 0.9},
        {"trial_id": "c", "eval/upper_loss": 0.3, "eval/lower_gap": 0.05},
        {"trial_id": "d", "status": "diverged", "eval/upper_loss": math.inf},
        {"trial_id": "e", "eval/upper_loss": 0.2, "eval/lower_gap": 0.5},
        {"trial_id": "f", "eval/upper_loss": -3.0, "eval/lower_gap": 0.1},
    ]

    def score(row, tol):
        return search_score(row["eval/upper_loss"], row.get("eval/lower_gap", math.nan), tol)

    for tol in (0.0, 0.1, 1.0):
        by_score = [r["trial_id"] for r in sorted(rows, key=lambda r: score(r, tol))]
        assert by_score == [r["trial_id"] for r in rank_trials(rows, gap_tol=tol)]
    # Within the tolerance (its bound included) the score is the loss; beyond it, the gap
    # orders the trials after every feasible one; a loss that is not finite is a failure.
    assert search_score(-3.0, 0.1, 0.1) == -3.0
    assert search_score(0.1, 0.9, 0.1) == INFEASIBLE + 0.9
    assert search_score(1e8, 0.0, 0.1) < search_score(0.0, 1e-6, 0.0) < FAILED
    assert search_score(math.nan, 0.0, 0.1) == search_score(math.inf, 0.0, 0.1) == FAILED
    assert search_score(0.1, math.inf, 0.1) == FAILED
    # A row between reports has no gap yet: its loss is all the search knows.
    assert search_score(0.7, math.nan, 0.1) == 0.7


def test_evaluate_scores_upper_loss_and_lower_gap_on_the_quadratic():
    q = br.problems.QuadraticProblem(seed=0)
    x = {"x": torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)}
    at_solution = evaluate(q, x, q.lower_solution(x), br.BilevelBatch(None, None))
    assert at_solution["eval/lower_gap"] < 1e-12
    away = {"y": q.lower_solution(x)["y"] + 0.5}
    # g is quadratic in y: the exact gap is 1/2 d'Ad with d = 0.5 * ones; 200 Adam steps find it.
    d = torch.full((4,), 0.5, dtype=torch.float64)
    exact = float(0.5 * d @ q.A @ d)
    scores = evaluate(q, x, away, br.BilevelBatch(None, None), gap_steps=400, gap_lr=0.05)
    assert scores["eval/lower_gap"] == pytest.approx(exact, rel=1e-3)
    assert scores["eval/upper_loss"] == pytest.approx(float(q.upper_loss(x, away, None)))


def test_report_of_a_solve_folder_prints_a_table_and_writes_a_plot(tmp_path, capsys):
    assert main(["solve", "toy-negative", "--steps", "300", "--out", str(tmp_path), "--quiet"]) == 0
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pbgd_free" in out and "upper/loss" in out
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_report_without_matplotlib_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    assert main(["solve", "toy-negative", "--steps", "10", "--out", str(tmp_path), "--quiet"]) == 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["report", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "matplotlib is not installed (pip install 'bilevel_ray[plot]')" in err
    assert not (tmp_path / "report.png").exists()


def test_report_of_a_folder_without_runs_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no history.parquet" in capsys.readouterr().err


# --- sweeps on Ray ------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_with_diverging_configs_finishes_and_marks_them(ray_2cpu, tmp_path):
    from ray import tune

    result = br.tune(
        "toy-negative",
        search_space={"lr_y": tune.grid_search([0.1, 5.0]), "lr_ratio": tune.choice([0.1])},
        num_samples=2,
        steps=400,
        report_every=50,
        scheduler=None,
        storage_path=tmp_path,
        name="div",
    )
    rows = result.trials.to_pylist()
    assert len(rows) == 4
    by_lr = {}
    for row in rows:
        by_lr.setdefault(row["config/lr_y"], set()).add(row["status"])
    assert by_lr == {0.1: {"completed"}, 5.0: {"diverged"}}
    # The searcher saw each trial's search/score: the loss if the gap is in tolerance (or
    # the worse score if not), and a failure's score for a diverged trial.
    for row in rows:
        if row["status"] == "diverged":
            assert row["search/score"] == FAILED
        else:
            expected = search_score(row["eval/upper_loss"], row["eval/lower_gap"], 0.1)
            assert row["search/score"] == expected < FAILED
    assert result.best_config["lr_y"] == 0.1
    assert (tmp_path / "div" / "trials.parquet").is_file()
    history = pq.read_table(tmp_path / "div" / "history.parquet")
    assert set(history["trial_id"].to_pylist()) == {r["trial_id"] for r in rows}


@pytest.mark.ray
@pytest.mark.slow
def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(tmp_path):
    """The driver (a CLI process with its own Ray) is killed while its second wave of trials
    runs; --resume completes the sweep, and the trials that had ended are not run again."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [
        sys.executable,
        "-m",
        "bilevel_ray",
        "tune",
        "quadratic",
        "--samples",
        "6",
        "--max-steps",
        "8000",
        "--report-every",
        "2000",
        "--scheduler",
        "fifo",
        "--out",
        str(tmp_path),
        "--space",
        'gamma={"loguniform": [1, 100]}',
        "--space",
        'lr_y={"choice": [0.2]}',
        "--space",
        'lr_ratio={"choice": [0.25]}',
    ]
    sweep = subprocess.Popen(
        cli,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    ended: list[str] = []
    deadline = time.time() + 240
    for line in sweep.stdout:
        if " completed at step" in line:
            ended.append(line.split()[1])
        if len(ended) >= 2 or time.time() > deadline:
            break
    time.sleep(1.5)  # the controller persists the sweep state at most every second
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sweep.pid, signal.SIGKILL)  # the driver and the Ray it started
    sweep.wait()
    assert len(ended) >= 2, "the sweep did not get going"

    done = subprocess.run(
        [*cli, "--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-2000:]
    trials = pq.read_table(tmp_path / "sweep" / "trials.parquet").to_pylist()
    assert len(trials) == 6 and {t["status"] for t in trials} == {"completed"}
    restarted = [line.split()[1] for line in done.stderr.splitlines() if " started:" in line]
    assert restarted, "the kill came after the sweep had finished: nothing was resumed"
    assert not set(ended) & set(restarted), "a finished trial was run again"
    best = json.loads(done.stdout.split("best config: ", 1)[1].splitlines()[0])
    assert set(best) >= {"gamma", "lr_x", "lr_y"}


@pytest.mark.ray
@pytest.mark.slow
def test_a_multi_worker_trial_runs_a_train_worker_group(ray_2cpu, tmp_path):
    from ray import tune

    result = br.tune(
        "regression",
        problem_config={"n": 400, "batch_size": 20},
        search_space={"lr_y": tune.choice([0.1]), "lr_ratio": tune.choice([0.2])},
        num_samples=1,
        steps=40,
        report_every=10,
        scheduler=None,
        num_workers=2,
        resources_per_worker={"CPU": 0.5},
        storage_path=tmp_path,
        name="multi",
    )
    (trial,) = result.trials.to_pylist()
    assert trial["status"] == "completed" and trial["step"] == 40
    assert math.isfinite(trial["eval/upper_loss"]) and trial["eval/lower_gap"] >= 0
    expected = search_score(trial["eval/upper_loss"], trial["eval/lower_gap"], 0.1)
    assert trial["search/score"] == expected
    assert result.history.num_rows == 4


@pytest.mark.ray
def test_a_trial_that_cannot_fit_the_cluster_is_refused(ray_2cpu, tmp_path):
    with pytest.raises(br.ConfigError, match=r"one trial needs 4.25 CPUs .* cluster has 2"):
        br.tune("regression", num_samples=1, num_workers=4, storage_path=tmp_path)
