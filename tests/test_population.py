"""Population-based training: lineages, the schedule they become, its replay, and resume."""

from __future__ import annotations

import contextlib
import json
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
from bilevel_ray.problems import build_spec
from bilevel_ray.runtime.local.checkpoint import load_checkpoint
from bilevel_ray.runtime.local.ranking import search_score
from bilevel_ray.runtime.tune.lineage import (
    extend_lineage,
    lineage_schedule,
    read_schedule_file,
    write_best_schedule,
)

ROOT = Path(__file__).resolve().parents[1]
A = {"method": "pbgd_free", "gamma": 10.0, "lr_y": 0.1, "lr_x": 0.01, "optimizer": "adam"}


# --- lineages and schedules (no Ray) -------------------------------------------------------


def test_an_exploit_appends_a_segment_and_equal_settings_do_not():
    lineage = extend_lineage([], 0, "t1", A)
    assert extend_lineage(lineage, 40, "t1", A) == lineage  # a resume with the same settings
    b = {**A, "gamma": 12.0}
    two = extend_lineage(lineage, 40, "t2", b)
    assert [(s["from_step"], s["trial_id"]) for s in two] == [(0, "t1"), (40, "t2")]
    # Two exploits at one step: the first ran no step and leaves no segment.
    c = {**A, "gamma": 8.0}
    assert [s["settings"]["gamma"] for s in extend_lineage(two, 40, "t3", c)] == [10.0, 8.0]


def test_a_lineage_becomes_piecewise_constant_schedules_of_what_changed():
    lineage = [
        {"from_step": 0, "trial_id": "a", "settings": A},
        {"from_step": 40, "trial_id": "b", "settings": {**A, "gamma": 12.0, "lr_y": 0.08}},
        {"from_step": 80, "trial_id": "b", "settings": {**A, "gamma": 14.4, "lr_y": 0.08}},
    ]
    settings = lineage_schedule(lineage)
    gamma = br.schedules.from_dict(settings["gamma"])
    assert [gamma(t) for t in (0, 39, 40, 79, 80, 1000)] == [10.0, 10.0, 12.0, 12.0, 14.4, 14.4]
    lr_y = br.schedules.from_dict(settings["lr_y"])
    assert [lr_y(t) for t in (39, 40, 80)] == [0.1, 0.08, 0.08]
    assert settings["lr_x"] == 0.01 and settings["optimizer"] == "adam"


def test_a_lineage_that_cannot_be_a_schedule_is_refused():
    with pytest.raises(br.ConfigError, match="an empty lineage has no settings"):
        lineage_schedule([])
    changed = [
        {"from_step": 0, "trial_id": "a", "settings": A},
        {"from_step": 5, "trial_id": "b", "settings": {**A, "optimizer": "sgd"}},
    ]
    with pytest.raises(br.ConfigError, match="'optimizer' changed along the lineage"):
        lineage_schedule(changed)


def _sweep_file(folder: Path) -> Path:
    lineage = [
        {"from_step": 0, "trial_id": "a", "settings": {**A, "gamma": 1.0}},
        {"from_step": 30, "trial_id": "b", "settings": {**A, "gamma": 3.0}},
    ]
    sweep = {"problem": "toy-negative", "problem_config": {}, "method": "pbgd_free"}
    trial = {"trial_id": "b", "eval/upper_loss": 1.5, "eval/lower_gap": float("nan")}
    return write_best_schedule(folder, trial, lineage, {**sweep, "steps": 60, "seed": 4})


def test_a_best_schedule_file_reads_back_as_solver_settings(tmp_path):
    document = read_schedule_file(_sweep_file(tmp_path))
    assert (document["steps"], document["seed"], document["method"]) == (60, 4, "pbgd_free")
    assert document["eval/lower_gap"] is None  # JSON has no NaN
    gamma = document["settings"]["gamma"]
    assert isinstance(gamma, br.schedules.piecewise_constant) and gamma(30) == 3.0


@pytest.mark.parametrize(
    "text, match",
    [
        (None, "cannot be read"),
        ("{not json", "is not JSON"),
        ('{"gamma": 3}', "is not a best_schedule.json"),
        ('{"format": "bilevel_ray.best_schedule/1", "method": "pbgd_free"}', "lacks"),
    ],
)
def test_a_bad_schedule_file_is_named_with_the_fix(tmp_path, text, match):
    path = tmp_path / "best_schedule.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(br.ConfigError, match=match):
        read_schedule_file(path)


def test_solve_replays_a_schedule_file_and_refuses_another_problem(tmp_path, capsys):
    path = _sweep_file(tmp_path)
    out = tmp_path / "replay"
    assert main(["solve", "toy-negative", "--schedule", str(path), "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["seed"], run["steps"]) == (4, 60)
    assert run["settings"]["gamma"]["kind"] == "piecewise_constant"
    assert main(["solve", "quadratic", "--schedule", str(path)]) == 2
    err = capsys.readouterr().err
    assert "was learned on 'toy-negative'" in err and "solve toy-negative --schedule" in err
    assert main(["solve", "toy-negative", "--schedule", str(path), "--method", "bome"]) == 2
    assert "holds settings of pbgd_free; leave --method out" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, match",
    [
        ({"num_workers": 2}, "use num_workers=1"),
        ({"pbt_interval": 30}, "multiple of report_every=20"),
        ({"pbt_interval": 200}, "below steps=200"),
        ({"pbt_interval": 0}, "must be an integer >= 1"),
        ({"search_alg": "optuna"}, "cannot be combined with it"),
        ({"num_samples": 8, "max_concurrent_trials": 2}, "runs all at once"),
        # More trials than this machine holds (its memory and CPUs), refused on the driver.
        ({"num_samples": 100_000}, r"num_samples=100000 does not fit: .* use num_samples=\d+"),
        (
            {"search_space": {"optimizer": {"grid_search": ["sgd"]}}},
            "the search space draws none of them",
        ),
        ({"search_space": "ramp"}, "learns gamma's schedule itself"),
    ],
)
def test_population_settings_are_refused_before_ray_starts(no_ray, tmp_path, options, match):
    from ray import tune

    if options.get("search_space") == "ramp":
        options["search_space"] = {
            "gamma_init": tune.loguniform(1, 10),
            "gamma_max": tune.loguniform(10, 100),
            "gamma_argmax_step": tune.choice([100]),
            "lr_y": tune.loguniform(1e-3, 1e-1),
        }
    with pytest.raises(br.ConfigError, match=match):
        br.tune(
            "quadratic",
            scheduler="pbt",
            steps=200,
            report_every=20,
            storage_path=tmp_path,
            **options,
        )


def test_pbt_interval_without_a_population_is_refused(no_ray, tmp_path):
    with pytest.raises(br.ConfigError, match="applies to scheduler='pbt' or 'pb2' only"):
        br.tune("quadratic", pbt_interval=20, storage_path=tmp_path)


def test_pb2_without_its_packages_says_how_to_get_them(no_ray, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if it were not installed
    with pytest.raises(br.ConfigError, match=r"pip install 'bilevel_ray\[pb2\]'"):
        br.tune("quadratic", scheduler="pb2", steps=200, report_every=20, storage_path=tmp_path)


# --- sweeps (Ray) --------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_a_pbt_sweep_learns_a_schedule_that_replays_its_trials_exactly(ray_2cpu, tmp_path):
    """Every trial whose state came through exploits is replayed from the sweep's start with
    its lineage's schedules: the same final x and y (float64), to 1e-6. The trials run long
    enough (several seconds each) to overlap: a trial that ended is no rival to exploit."""
    steps = 6000
    result = br.tune(
        "regression",
        num_samples=4,
        steps=steps,
        report_every=500,
        scheduler="pbt",
        pbt_interval=1000,
        storage_path=tmp_path,
        name="pbt",
        seed=3,
        progress=False,
    )
    folder = tmp_path / "pbt"
    assert result.best_config is not None and (folder / "best_schedule.json").is_file()
    best = read_schedule_file(folder / "best_schedule.json")
    assert best["trial_id"] == result.best_metrics["trial_id"] and best["seed"] == 3
    spec = build_spec("regression", {})
    exploited = 0
    for trial in result.trials.to_pylist():
        lineage = json.loads(trial["lineage"])
        if len(lineage) == 1 and trial["trial_id"] != best["trial_id"]:
            continue
        exploited += len(lineage) > 1
        settings = {k: v for k, v in lineage_schedule(lineage).items() if k != "method"}
        settings = {
            k: br.schedules.from_dict(v) if isinstance(v, dict) else v for k, v in settings.items()
        }
        replay = br.solve(
            spec.problem, spec.x0, spec.y0, steps=steps, seed=3, data=spec.data, **settings
        )
        final = _final_state(folder, trial["trial_id"])
        assert final["step"] == steps
        for level, params in (("x", replay.x), ("y", replay.y)):
            for name, value in params.items():
                assert value.dtype == torch.float64
                torch.testing.assert_close(value, final[level][name], rtol=0, atol=1e-6)
    assert exploited, "no trial exploited another: the population did not evolve"
    history = pq.read_table(folder / "history.parquet").to_pylist()
    assert {"from_step", "trial_id"} <= set(history[0])
    # Each exploit is decided on a checkpoint's report, which carries the gap and the
    # search/score that the ranking would give it.
    checkpoints = [r for r in history if r["step"] % 1000 == 0]
    assert checkpoints
    for row in checkpoints:
        assert row["eval/lower_gap"] >= 0
        expected = search_score(row["eval/upper_loss"], row["eval/lower_gap"], 0.1)
        assert row["search/score"] == expected


def _final_state(folder: Path, trial_id: str) -> dict:
    checkpoints = sorted(folder.glob(f"run_trial_{trial_id}_*/checkpoint_*/trial.pt"))
    return load_checkpoint(checkpoints[-1])["state"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_pbt_sweep_resumes_from_its_checkpoints(tmp_path):
    """The driver (a CLI process with its own Ray) is killed once the population has saved
    checkpoints; --resume completes the sweep, every trial continuing from a checkpoint (its
    rows before the kill kept) instead of from step 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "bilevel_ray", "tune", "regression", "--samples", "2"]
    cli += ["--max-steps", "10000", "--report-every", "500", "--scheduler", "pbt"]
    cli += ["--pbt-interval", "1000", "--out", str(tmp_path), "--quiet"]
    sweep = subprocess.Popen(cli, env=env, cwd=ROOT, start_new_session=True)
    deadline = time.time() + 240
    folder = tmp_path / "sweep"
    while time.time() < deadline and sweep.poll() is None:
        if len(list(folder.glob("run_trial_*/checkpoint_000001"))) >= 2:
            break
        time.sleep(0.2)
    time.sleep(1.5)  # the controller persists the sweep state at most every second
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sweep.pid, signal.SIGKILL)  # the driver and the Ray it started
    sweep.wait()
    assert len(list(folder.glob("run_trial_*/checkpoint_000001"))) >= 2, "no checkpoints"
    assert not (folder / "trials.parquet").exists(), "the kill came after the sweep had ended"

    done = subprocess.run(
        [*cli, "--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-2000:]
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    assert len(trials) == 2 and {t["status"] for t in trials} == {"completed"}
    history = pq.read_table(folder / "history.parquet").to_pylist()
    for trial in trials:
        starts = {r["from_step"] for r in history if r["trial_id"] == trial["trial_id"]}
        assert 0 in starts and max(starts) > 0, f"{trial['trial_id']} restarted from step 0"
    assert (folder / "best_schedule.json").is_file()
