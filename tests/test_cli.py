"""The bilevel-ray command: results, exit codes and one-line errors without tracebacks."""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
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


# --- what a newcomer reads: help texts, summaries, progress, verdicts ---------------------------


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_each_command_describes_its_own_out(capsys):
    tune = _help(capsys, "tune")
    assert "--out DIR write the sweep (trials.parquet, history.parquet" in tune
    assert "result.pt" not in tune  # solve's text, which tune used to show
    assert "--out DIR write history.parquet, result.pt and run.json to DIR" in _help(
        capsys, "solve"
    )
    assert "to DIR/NAME" in _help(capsys, "train")


@pytest.mark.parametrize("command", ["solve", "train", "tune", "diagnose", "compare"])
def test_verbose_is_accepted_and_quiet_where_there_is_progress(capsys, command):
    shown = _help(capsys, command)
    assert "--verbose also show Ray's own log lines (sets BILEVEL_RAY_VERBOSE=1)" in shown
    assert "--quiet" in shown  # every long-running command has progress lines to silence


@pytest.mark.parametrize(
    "argv",
    [
        ["solve", "toy-negative", "--steps", "10", "--quiet", "--verbose"],
        ["--verbose", "solve", "toy-negative", "--steps", "10", "--quiet"],
    ],
)
def test_verbose_sets_the_environment_for_ray(argv, monkeypatch):
    monkeypatch.delenv("BILEVEL_RAY_VERBOSE", raising=False)
    assert main(argv) == 0
    assert os.environ["BILEVEL_RAY_VERBOSE"] == "1"


def test_without_verbose_the_environment_is_left_alone(monkeypatch):
    monkeypatch.delenv("BILEVEL_RAY_VERBOSE", raising=False)
    assert main(["solve", "toy-negative", "--steps", "10", "--quiet"]) == 0
    assert "BILEVEL_RAY_VERBOSE" not in os.environ


@pytest.mark.parametrize(
    ("omp", "flag", "expected"),
    [("1", None, 1), ("3", None, 3), ("2,1", None, 2), (None, None, 1), ("3", "2", 2)],
)
def test_torch_threads_follow_the_flag_then_omp_num_threads_else_the_problems_size(
    omp, flag, expected, monkeypatch
):
    # A one-variable toy is a small problem: one thread unless told otherwise.
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    torch.set_num_threads(5)
    argv = ["solve", "toy-negative", "--steps", "10", "--quiet"]
    assert main(argv + (["--threads", flag] if flag else [])) == 0
    assert torch.get_num_threads() == expected


def test_a_bad_threads_flag_exits_2(capsys):
    assert main(["solve", "toy-negative", "--steps", "10", "--threads", "0"]) == 2
    assert "threads=0: must be a whole number in [1, 1024]" in capsys.readouterr().err


@pytest.mark.parametrize("omp", ["two", "0", "-1"])
def test_a_bad_omp_num_threads_exits_2(omp, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert main(["solve", "toy-negative", "--steps", "10", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: OMP_NUM_THREADS={omp!r}: must be a whole number >= 1 (e.g. OMP_NUM_THREADS=1), "
        "or unset to use every CPU this process may run on\n"
    )


@pytest.mark.parametrize(
    ("terminal", "quiet", "shown"),
    [(True, False, True), (True, True, False), (False, False, False)],
)
def test_progress_lines_only_on_a_terminal_and_without_quiet(
    terminal, quiet, shown, monkeypatch, capsys
):
    monkeypatch.setattr("bilevel_ray.cli.common.stderr_is_terminal", lambda: terminal)
    argv = ["solve", "toy-negative", "--steps", "300", *(["--quiet"] if quiet else [])]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert ("[pbgd_free] step 300/300" in captured.err) == shown
    assert "pbgd_free on toy-negative: 300 steps" in captured.out  # the result, in every case


def test_summary_after_a_fallback_names_the_method_used_and_the_switch(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["solve", "toy-negative", "--on-unsuitable", "fallback", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("alt_pbgd on toy-negative: 3000 steps, ")
    assert printed[1] == (
        "  switched from pbgd_free to alt_pbgd at step 200 (--on-unsuitable fallback: the "
        "flatness diagnostic found pbgd_free unsuitable)"
    )
    assert "  x[x] = [-5.0]" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "alt_pbgd" and run["switched_at_step"] == 200
    history = pq.read_table(out / "history.parquet").to_pylist()
    assert {r["method"] for r in history if r["step"] <= 200} == {"pbgd_free"}
    assert {r["method"] for r in history if r["step"] > 200} == {"alt_pbgd"}


def test_summary_without_a_switch_says_nothing_of_one(capsys):
    with pytest.warns(UserWarning, match="flatness diagnostic at step 200"):  # warn: no switch
        assert main(["solve", "toy-negative", "--on-unsuitable", "warn", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("pbgd_free on toy-negative: 3000 steps") and "switched" not in printed


def test_switch_step_reads_the_history():
    from bilevel_ray.cli.common import switch_step

    rows = [{"step": s, "method": m} for s, m in ((100, "a"), (200, "a"), (300, "b"))]
    assert switch_step(rows, "a") == 200
    assert switch_step(rows[:2], "a") is None
    assert switch_step(rows[2:], "a") is None


def test_diagnose_prints_the_settings_it_ran_with(capsys):
    argv = ["diagnose", "toy-negative", "--steps", "300", "--warmup", "20", "--every", "10"]
    assert main([*argv, "--gamma", "12", "--set", "solve_lr=0.1"]) == 3
    settings = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("  settings: ")
    )
    for shown in (
        "gamma=12",
        "steps=300",
        "check_steps=100",
        "replicas=3",
        "threads=1",
        "warmup_steps=20",
        "every=10",
        "solve_lr=0.1",
        "solve_steps=300",
    ):
        assert shown in settings


def test_uncertain_verdict_names_the_settings_used_and_the_values_to_try(capsys):
    # Two solve steps cannot converge: the early price's estimates are unusable and its
    # prediction is uncertain.
    argv = ["diagnose", "toy-negative", "--warmup", "10", "--every", "5", "--predict-only"]
    argv += ["--set", "solve_steps=2"]
    assert main(argv) == 0  # uncertain is not unsuitable
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "toy-negative: uncertain"
    reason = lines[1]
    assert reason.startswith("  prediction (the early price at step")
    tried = [int(v) for v in re.findall(r"solve_steps\s*=\s*(\d+)", reason)]
    assert 2 in tried, f"the reason does not name the solve_steps it used: {reason}"
    assert any(v > 2 for v in tried), f"the reason names no larger solve_steps to try: {reason}"
    assert "raise solve_steps or solve_lr" not in reason  # the old reason, with no values


def test_diagnose_refuses_progress_as_a_setting(capsys):
    assert main(["diagnose", "toy-negative", "--set", "progress=true"]) == 2
    assert capsys.readouterr().err == (
        "error: --set progress=...: not a setting; progress lines are on by default (on a "
        "terminal), --quiet turns them off\n"
    )


def test_diagnose_shows_progress_on_a_terminal_unless_quiet(monkeypatch, capsys):
    import bilevel_ray.diagnostics as diagnostics

    real = diagnostics.diagnose
    if "progress" not in inspect.signature(real).parameters:
        pytest.skip("this br.diagnose has no progress lines")
    monkeypatch.setattr("bilevel_ray.cli.common.stderr_is_terminal", lambda: True)
    seen: dict = {}

    @functools.wraps(real)  # the CLI reads the signature: keep the real one
    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr("bilevel_ray.runtime.local.diagnose_named.diagnose", spy)
    argv = ["diagnose", "toy-negative", "--steps", "10", "--every", "5"]
    assert main(argv) == 3
    assert seen["progress"] is True
    seen.clear()
    assert main([*argv, "--quiet"]) == 3
    assert seen["progress"] is False


@pytest.mark.parametrize(
    ("on_unsuitable", "best", "expected"),
    [
        (
            "warn",
            "unsuitable",
            "2 of 3 judged trials found PBGD-Free unsuitable, the best one included: its held-out "
            "loss is measured, but it is the best point PBGD-Free's biased updates reached, not "
            "the bilevel optimum; --method alt_pbgd (or --on-unsuitable fallback) may reach a "
            "lower one.",
        ),
        (
            "fallback",
            "unsuitable",
            "2 of 3 judged trials found PBGD-Free unsuitable, the best one included: its score "
            "comes from the alt_pbgd fallback it switched to, so the best config is a good start "
            "for that switch, not for PBGD-Free alone.",
        ),
        (
            "warn",
            "suitable",
            "2 of 3 judged trials found PBGD-Free unsuitable, but not the best one (suitable); "
            "its score is PBGD-Free's own.",
        ),
    ],
)
def test_tune_says_what_unsuitable_trials_mean_for_the_best_config(on_unsuitable, best, expected):
    from bilevel_ray.cli.tune import flatness_note

    trials = [{"flatness/verdict": v} for v in ("unsuitable", "unsuitable", "suitable", None)]
    assert flatness_note(trials, {"flatness/verdict": best}, on_unsuitable) == expected
    assert flatness_note([{"flatness/verdict": "suitable"}], {}, on_unsuitable) is None
    assert flatness_note([{}], {}, None) is None  # a sweep without the watch


def _captured_figure(monkeypatch):
    """Run `report` with savefig spied on: the figure as it was saved."""
    from matplotlib.figure import Figure

    saved = {}
    real = Figure.savefig

    def spy(self, *args, **kwargs):
        saved["figure"] = self
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def test_report_of_two_rows_draws_marked_points_and_says_so(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    assert main(["solve", "regression", "--steps", "200", "--out", str(tmp_path), "--quiet"]) == 0
    saved = _captured_figure(monkeypatch)
    assert main(["report", str(tmp_path)]) == 0
    figure = saved["figure"]
    title = figure._suptitle.get_text()
    assert "only 2 logged row(s) per run, logged every 100 steps" in title
    assert "--report-every" in title
    for axis in figure.axes:
        (line,) = axis.get_lines()
        assert line.get_marker() == "o" and line.get_linestyle() == ":"
        assert len(line.get_xdata()) == 2


def test_report_of_a_fallback_run_shows_both_methods_and_the_switch(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    argv = ["solve", "toy-negative", "--on-unsuitable", "fallback", "--quiet", "--out"]
    assert main([*argv, str(tmp_path)]) == 0
    saved = _captured_figure(monkeypatch)
    assert main(["report", str(tmp_path)]) == 0
    assert "(started with pbgd_free; alt_pbgd from step 200)" in capsys.readouterr().out
    by_time, by_step = saved["figure"].axes
    labels = [line.get_label() for line in by_step.get_lines()]
    assert labels == ["pbgd_free", "alt_pbgd", "switch to alt_pbgd"]
    pbgd_free, alt_pbgd, switch = by_step.get_lines()
    assert list(pbgd_free.get_xdata()) == [100, 200] and alt_pbgd.get_xdata()[0] == 200
    assert list(switch.get_xdata()) == [200, 200]
    # f = 10y + x^2 goes negative: a log axis would show nothing, so the axis is linear
    assert by_step.get_yscale() == "linear" and by_time.get_yscale() == "linear"
    assert saved["figure"]._suptitle is None  # 30 rows: no "few rows" note


@pytest.mark.parametrize(
    "command", [[], ["solve"], ["train"], ["tune"], ["diagnose"], ["compare"], ["report"]]
)
def test_help_answers_without_importing_torch_or_ray(command):
    # Every --help is parsed before any heavy import: it answers at once on a loaded machine.
    code = (
        "import sys\nfrom bilevel_ray.cli import main\n"
        f"try:\n    main({[*command, '--help']!r})\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'ray' in sys.modules, file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: bilevel-ray" in out.stdout
    assert out.stderr.strip().splitlines()[-1] == "False False"


def test_the_help_texts_built_in_names_are_the_registrys():
    from bilevel_ray.cli.common import BUILTIN_NAMES
    from bilevel_ray.problems import BUILTIN_PROBLEMS

    assert list(BUILTIN_NAMES) == list(BUILTIN_PROBLEMS)


def test_solve_out_is_checked_for_room_before_the_run(tmp_path, capsys, monkeypatch):
    """``solve --out`` refuses a folder without room for the run's files, as history_path is,
    before the first step (nothing written)."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 0))
    out = tmp_path / "out"
    assert main(["solve", "toy-negative", "--steps", "5", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert re.match(r"error: --out '.*out' has 0\.0 MiB free and the run's checkpoints need", err)
    assert not (out / "history.parquet").exists()
