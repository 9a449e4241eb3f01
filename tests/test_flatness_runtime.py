"""The flatness diagnostic inside runs: the warm-up window, the verdict, and acting on it
(fallback, stop, warn) in br.solve, the CLI, and through the judge actor in br.train / br.tune."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.problems import BUILTIN_PROBLEMS, QuadraticProblem
from bilevel_ray.runtime.local.active_solver import fallback_config
from bilevel_ray.runtime.local.judge import FlatnessJudge

NEGATIVE = {"steps": 3000, "lr_x": 0.01, "lr_y": 0.1, "gamma": 10.0, "report_every": 50}


def _negative():
    return BUILTIN_PROBLEMS["toy-negative"]({})


def _methods(history):
    return list(zip(history["step"].to_pylist(), history["method"].to_pylist()))


def test_fallback_on_the_negative_toy_ends_at_x_star_and_the_history_shows_the_switch():
    spec = _negative()
    res = br.solve(spec.problem, spec.x0, spec.y0, on_unsuitable="fallback", **NEGATIVE)
    # Without the switch PBGD-Free ends at its biased point x = 0 (tests/test_toys.py).
    assert abs(float(res.x["x"]) + 5.0) < 0.05
    assert res.verdict["verdict"] == "unsuitable" and res.verdict["fallback"] == "alt_pbgd"
    assert res.status == "completed" and res.config["method"] == "alt_pbgd"
    methods = _methods(res.history)
    assert (200, "pbgd_free") in methods and (250, "alt_pbgd") in methods
    assert {m for s, m in methods if s <= 200} == {"pbgd_free"}
    assert {m for s, m in methods if s > 200} == {"alt_pbgd"}


def test_stop_ends_the_run_at_the_window_with_status_unsuitable():
    spec = _negative()
    res = br.solve(
        spec.problem, spec.x0, spec.y0, on_unsuitable="stop", diagnose_window=120, **NEGATIVE
    )
    assert res.status == "unsuitable" and res.state.step == 120
    assert res.history["step"].to_pylist()[-1] == 120
    assert set(res.history["method"].to_pylist()) == {"pbgd_free"}


def test_a_scheduled_sgd_step_size_is_watched_like_a_constant_one():
    # Plain SGD's jitter floor reads lr_x at the estimate's step: a schedule (as a sweep's
    # best_schedule.json replays) is evaluated there, not divided as a number.
    spec = _negative()
    options = {**NEGATIVE, "optimizer": "sgd", "diagnose_window": 120}
    steps = br.schedules.piecewise_constant((100,), (0.01, 0.005))
    res = br.solve(spec.problem, spec.x0, spec.y0, on_unsuitable="stop", **options)
    scheduled = br.solve(
        spec.problem, spec.x0, spec.y0, on_unsuitable="stop", **{**options, "lr_x": steps}
    )
    assert res.status == scheduled.status == "unsuitable" and scheduled.state.step == 120


def test_warn_warns_with_the_reason_and_keeps_pbgd_free():
    spec = _negative()
    with pytest.warns(UserWarning, match=r"flatness diagnostic at step 200: PBGD-Free is biased"):
        res = br.solve(spec.problem, spec.x0, spec.y0, on_unsuitable="warn", **NEGATIVE)
    assert abs(float(res.x["x"])) < 1e-3  # PBGD-Free's biased fixed point, as without the watch
    assert res.verdict["verdict"] == "unsuitable" and res.status == "completed"


def test_a_flat_problem_keeps_pbgd_free_and_its_result(origin):
    problem = QuadraticProblem(flat=True)
    x0, y0 = origin
    options = {"steps": 400, "report_every": 50, "lr_x": 0.05, "lr_y": 0.2}
    plain = br.solve(problem, x0, y0, **options)
    watched = br.solve(problem, x0, y0, on_unsuitable="fallback", **options)
    assert watched.verdict["verdict"] == "suitable"
    assert set(watched.history["method"].to_pylist()) == {"pbgd_free"}
    # The estimates do not touch the run: the same iterates bit for bit.
    assert torch.equal(plain.x["x"], watched.x["x"]) and torch.equal(plain.y["y"], watched.y["y"])


def test_a_resumed_run_continues_with_the_fallback(tmp_path):
    spec = _negative()
    ckpt = tmp_path / "ckpt.pt"
    options = {**NEGATIVE, "on_unsuitable": "fallback"}
    whole = br.solve(spec.problem, spec.x0, spec.y0, **{**options, "steps": 600})
    options["checkpoint_every"] = 100
    br.solve(spec.problem, spec.x0, spec.y0, checkpoint_path=ckpt, **{**options, "steps": 300})
    resumed = br.solve(
        spec.problem,
        spec.x0,
        spec.y0,
        checkpoint_path=ckpt,
        resume=True,
        **{**options, "steps": 600},
    )
    assert resumed.config["method"] == "alt_pbgd" and resumed.verdict == whole.verdict
    assert torch.equal(resumed.x["x"], whole.x["x"])
    assert _methods(resumed.history) == _methods(whole.history)


def test_fallback_config_keeps_step_sizes_and_gamma_and_resets_the_knobs():
    settings = br.SolverConfig(lr_x=0.02, lr_y=0.3, gamma=12.0, inner_steps=1, optimizer="adam")
    alt = fallback_config(settings, "alt_pbgd")
    assert (alt.method, alt.lr_x, alt.lr_y, alt.gamma, alt.optimizer) == (
        "alt_pbgd",
        0.02,
        0.3,
        12.0,
        "adam",
    )
    assert alt.option("inner_steps") == 5  # alt_pbgd's own default, not PBGD-Free's K = 1


def test_the_judge_decides_once_from_what_it_collected():
    judge = FlatnessJudge()
    judge.add("a", 10, {"flatness/dropped": 10.0, "flatness/kept": 4.0, "flatness/full": 14.0})
    first = judge.verdict("a")
    judge.add("a", 20, {"flatness/dropped": 0.0, "flatness/kept": 4.0, "flatness/full": 4.0})
    assert judge.verdict("a") == first  # a verdict acted on is not revised
    assert judge.verdicts() == {"a": first}
    assert judge.verdict("never-seen")["verdict"] == "uncertain"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"on_unsuitable": "switch"}, r"on_unsuitable='switch': choose one of fallback, stop, "),
        (
            {"on_unsuitable": "stop", "method": "alt_pbgd"},
            r"on_unsuitable='stop' with method='alt_pbgd': the flatness diagnostic judges",
        ),
        ({"on_unsuitable": "stop", "diagnose_window": 0}, r"diagnose_window=0: must be an int"),
        ({"on_unsuitable": "stop", "diagnose_every": 2.5}, r"diagnose_every=2.5: must be an int"),
        (
            {"on_unsuitable": "stop", "diagnose_window": 5000},
            r"diagnose_window=5000 is longer than the run \(steps=3000\)",
        ),
        (
            {"on_unsuitable": "stop", "diagnose_options": {"solve_step": 3}},
            r"diagnose_options has unknown key\(s\) \['solve_step'\]",
        ),
        (
            {"on_unsuitable": "stop", "diagnose_options": {"solve_steps": 0}},
            r"solve_steps=0: must be an integer >= 1",
        ),
        (
            {"on_unsuitable": "stop", "diagnose_options": [1]},
            r"diagnose_options=\[1\]: must be a dict of estimator options",
        ),
    ],
)
def test_bad_diagnostic_settings_are_refused_before_any_step(options, match):
    spec = _negative()
    settings = {**NEGATIVE, **options}
    if settings.get("method") == "alt_pbgd":
        settings["inner_steps"] = 5
    with pytest.raises(br.ConfigError, match=match):
        br.solve(spec.problem, spec.x0, spec.y0, **settings)


@pytest.mark.slow
def test_cli_diagnose_exit_codes_and_verdicts(capsys):
    assert main(["diagnose", "toy-negative"]) == 3
    printed = capsys.readouterr().out
    assert "toy-negative: unsuitable" in printed and "recommendation: switch to alt_pbgd" in printed
    assert main(["diagnose", "toy-positive", "--set", "lr_y=0.01", "--set", "inner_steps=2"]) == 0
    assert "toy-positive: suitable" in capsys.readouterr().out
    assert main(["diagnose", "toy-negative", "--gamma", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: gamma=-1.0: ")


def test_cli_solve_with_on_unsuitable(capsys):
    argv = ["solve", "toy-negative", "--quiet", "--steps", "400"]
    assert main([*argv, "--on-unsuitable", "stop", "--diagnose-window", "100"]) == 3
    captured = capsys.readouterr()
    assert "flatness: unsuitable" in captured.out and "--on-unsuitable stop" in captured.err
    assert main([*argv, "--on-unsuitable", "fallback"]) == 0
    assert "flatness: unsuitable" in capsys.readouterr().out


@pytest.mark.ray
@pytest.mark.slow
def test_train_worker_group_gets_the_verdict_from_the_named_actor(ray_2cpu, tmp_path):
    res = br.train(
        "toy-negative",
        num_workers=2,
        resources_per_worker={"CPU": 0.5},
        steps=400,
        report_every=50,
        diagnose_window=100,
        on_unsuitable="fallback",
        storage_path=tmp_path,
        name="neg",
    )
    assert res.verdict["verdict"] == "unsuitable" and res.config["method"] == "alt_pbgd"
    assert {m for s, m in _methods(res.history) if s > 100} == {"alt_pbgd"}
    judge = ray_2cpu.get_actor("bilevel_ray.flatness.neg")
    assert ray_2cpu.get(judge.verdicts.remote())["neg"]["verdict"] == "unsuitable"


@pytest.mark.ray
@pytest.mark.slow
def test_tune_records_each_trials_verdict_and_stops_unsuitable_trials(ray_2cpu, tmp_path):
    from ray import tune

    result = br.tune(
        "toy-negative",
        search_space={"lr_y": tune.choice([0.05, 0.1])},
        num_samples=2,
        steps=300,
        report_every=50,
        scheduler=None,
        search_alg=None,
        on_unsuitable="stop",
        diagnose_window=100,
        storage_path=tmp_path,
        name="neg-sweep",
    )
    trials = pq.read_table(result.path / "trials.parquet").to_pylist()
    assert len(trials) == 2
    for trial in trials:
        assert trial["flatness/verdict"] == "unsuitable" and trial["status"] == "unsuitable"
        assert trial["step"] == 100 and "PBGD-Free is biased" in trial["flatness/reason"]
    history = pq.read_table(result.path / "history.parquet").to_pylist()
    for trial in trials:
        steps = [r["step"] for r in history if r["trial_id"] == trial["trial_id"]]
        assert steps == [50, 100]  # the stop step is reported once, with its status


@pytest.mark.ray
def test_cli_solve_and_diagnose_run_as_tasks_on_the_cluster_with_address(ray_2cpu, capsys):
    assert main(["diagnose", "toy-negative", "--address", "auto"]) == 3
    assert "toy-negative: unsuitable" in capsys.readouterr().out
    assert main(["solve", "toy-negative", "--steps", "50", "--quiet", "--address", "auto"]) == 0
    assert "pbgd_free on toy-negative: 50 steps" in capsys.readouterr().out
    # bad input found on the cluster comes back as the same one-line error
    assert main(["solve", "toy-negative", "--set", "lr_x=-1", "--address", "auto"]) == 2
    assert capsys.readouterr().err.startswith("error: lr_x=-1")


class _RecordingJudge(FlatnessJudge):
    def __init__(self):
        super().__init__()
        self.added = []

    def add(self, run_id, step, stats):
        self.added.append((step, dict(stats)))
        super().add(run_id, step, stats)


def test_the_watch_judges_every_in_window_estimate_from_the_runs_start():
    # Estimates at 50, 100, 150 and 200 all reach the judge, each carrying f at the run's
    # first step (x1 = 2 - 0.01 * 4 = 1.96, y_gamma = x1 - 1 - 0.5: f = 10 y_gamma + x1^2).
    from bilevel_ray.runtime.local.run_spec import RunSpec
    from bilevel_ray.runtime.local.solve import run_local
    from bilevel_ray.runtime.local.watch import watch_settings

    spec = _negative()
    judge = _RecordingJudge()
    watch = watch_settings("warn", "pbgd_free", 200, 50)
    run = RunSpec(250, 0, 50, 0, watch=watch)
    settings = br.SolverConfig(lr_x=0.01, lr_y=0.1, gamma=10.0)
    with pytest.warns(UserWarning):
        res = run_local(spec.problem, spec.x0, spec.y0, settings, run, judge=judge)
    assert [step for step, _ in judge.added[:4]] == [50, 100, 150, 200]
    x1 = 1.96
    for _, stats in judge.added:
        assert stats["flatness/start_upper"] == pytest.approx(10 * (x1 - 1.5) + x1**2, rel=1e-3)
    assert res.verdict["verdict"] == "unsuitable"


def test_a_run_that_stays_with_pbgd_free_is_certified_at_its_end():
    spec = _negative()
    with pytest.warns(UserWarning, match=r"flatness certificate at the run's end \(step 3000\)"):
        res = br.solve(spec.problem, spec.x0, spec.y0, on_unsuitable="warn", **NEGATIVE)
    stats = res.verdict["stats"]
    assert res.verdict["verdict"] == "unsuitable" and stats["flatness/decided_at"] == 3000
    assert stats["end/check_steps"] == 3000 // 40
    assert stats["end/effect"] > 5 * stats["end/tolerance"]  # 25 short (23.8 in 75 steps), of 49


def test_a_flat_run_is_certified_suitable_at_its_end(origin):
    x0, y0 = origin
    options = {"steps": 400, "report_every": 50, "lr_x": 0.05, "lr_y": 0.2}
    res = br.solve(QuadraticProblem(flat=True), x0, y0, on_unsuitable="stop", **options)
    assert res.status == "completed" and res.verdict["verdict"] == "suitable"
    assert res.verdict["stats"]["flatness/decided_at"] == 400
