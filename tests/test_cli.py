"""The bilevel-ray command: results, exit codes and one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from bilevel_ray.cli import main


def test_solve_prints_the_result_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "solve",
            "toy-negative",
            "--steps",
            "2000",
            "--set",
            "gamma=15",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "pbgd_free on toy-negative: 2000 steps" in printed and "x[x] = [0.0]" in printed
    history = pq.read_table(out / "history.parquet")
    assert history["step"].to_pylist()[-1] == 2000
    result = torch.load(out / "result.pt", weights_only=True)
    assert abs(float(result["x"]["x"])) < 1e-3
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["gamma"] == 15 and run["settings"]["method"] == "pbgd_free"


def test_method_and_problem_config_reach_the_solver(capsys):
    code = main(
        [
            "solve",
            "toy-negative",
            "--method",
            "alt_pbgd",
            "--set",
            "inner_steps=10",
            "--config",
            "x0=1.0",
            "--quiet",
        ]
    )
    assert code == 0
    assert "x[x] = [-5.0]" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["solve", "toy-negative", "--set", "gamma"], "--set 'gamma': expected KEY=VALUE"),
        (["solve", "toy-negative", "--set", "gama=3"], "unknown keyword(s) ['gama']"),
        (["solve", "toy-negative", "--method", "sgd"], "method='sgd': unknown"),
        (["solve", "no-such-problem"], "problem 'no-such-problem': not a built-in"),
        (["solve", "toy-negative", "--steps", "0"], "steps=0: must be an integer >= 1"),
        (["solve", "toy-negative", "--steps", "ten"], "argument --steps: invalid int value"),
        (["solve"], "the following arguments are required: problem"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unwritable_out_is_refused_before_the_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["solve", "toy-negative", "--out", str(blocker / "sub"), "--quiet"]) == 2
    err = capsys.readouterr()
    assert "is not writable" in err.err and "steps" not in err.out


def test_divergence_exits_1(capsys):
    assert main(["solve", "toy-negative", "--set", "lr_y=5", "--quiet"]) == 1
    assert "diverged at step" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["solve", "train", "tune", "diagnose", "report"])
def test_help_shows_examples(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert "examples:" in shown and f"bilevel-ray {command}" in shown
    if command != "report":  # report reads files: it needs no cluster
        assert "--address" in shown


def test_python_dash_m_and_console_script(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for cmd in (
        [sys.executable, "-m", "bilevel_ray"],
        [os.path.join(os.path.dirname(sys.executable), "bilevel-ray")],
    ):
        done = subprocess.run(
            [*cmd, "solve", "toy-negative", "--steps", "10", "--quiet"],
            capture_output=True,
            text=True,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert "10 steps" in done.stdout


def test_train_with_one_worker_runs_in_process_and_resumes_by_name(tmp_path, capsys):
    argv = [
        "train",
        "regression",
        "--workers",
        "1",
        "--out",
        str(tmp_path),
        "--name",
        "r",
        "--report-every",
        "50",
    ]
    assert main([*argv, "--steps", "100"]) == 0
    assert main([*argv, "--steps", "200"]) == 0
    printed = capsys.readouterr().out
    assert "pbgd_free on regression: 200 steps" in printed
    assert "run 'r': rerun with --name r" in printed
    history = pq.read_table(tmp_path / "r" / "history.parquet")  # in the run's own folder
    assert history["step"].to_pylist() == [50, 100, 150, 200]  # one history across both calls
    assert json.loads((tmp_path / "r" / "run.json").read_text())["command"] == "train"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "regression"], "the following arguments are required: --workers"),
        (["train", "regression", "--workers", "0"], "num_workers=0: must be an integer >= 1"),
        (["train", "regression", "--workers", "1", "--gpu", "maybe"], "invalid choice: 'maybe'"),
        (
            ["train", "regression", "--workers", "1", "--checkpoint-every", "30"],
            "checkpoint_every=30 must be a multiple of report_every=100",
        ),
    ],
)
def test_train_user_errors_exit_2(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["tune", "toy-negative", "--space", 'gama={"loguniform": [1, 10]}'],
            "search_space has unknown key(s) ['gama']",
        ),
        (["tune", "toy-negative", "--space", 'gamma={"normal": [1, 10]}'], "give one distribution"),
        (["tune", "toy-negative", "--samples", "0"], "num_samples=0: must be an integer >= 1"),
    ],
)
def test_tune_user_errors_exit_2_before_ray_starts(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
