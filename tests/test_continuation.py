"""Honest continuation: a run resumed or extended under its name, a sweep resumed and a schedule
replayed are compared with the manifest before any work; a change to the problem, the data, the
method or a setting that steers the steps is refused with each difference named and the way
out; more steps (and how often to log) may change; other code is allowed with a warning; a
record that does not verify is not continued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_manifest import FACTORY

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.records.manifest import MANIFEST, finish, new_manifest, read_manifest


def train(tmp: Path, *extra: str, config: tuple[str, ...] = ("n=100",)) -> int:
    argv = ["train", "regression", "--workers", "1", "--out", str(tmp / "runs"), "--name", "r"]
    argv += [w for c in config for w in ("--config", c)]
    return main([*argv, "--steps", "4", "--report-every", "2", "--quiet", *extra])


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_the_resume_on_other_data_is_refused_with_every_difference_named(tmp_path, capsys):
    """The issue's case: 20 steps with n=400, then n=800, seed=5 and 40 steps."""
    run = ["train", "regression", "--workers", "1", "--out", str(tmp_path), "--name", "q"]
    assert main([*run, "--config", "n=400", "--steps", "20", "--quiet"]) == 0
    before = files(tmp_path / "q")
    capsys.readouterr()
    again = [*run, "--config", "n=800", "--config", "seed=5", "--steps", "40", "--quiet"]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: run ")
    for named in (
        "was started with other settings or data, and continuing it would change its trajectory",
        "problem config n: 400 -> 800",
        "problem config seed: (not given) -> 5",
        "data (data, eval_data, x0 differ: sha256 ",
        "Use a new --name (name=...) for a run with these settings, or rerun the run's own "
        "command with only --steps changed to extend it",
    ):
        assert named in err
    assert files(tmp_path / "q") == before  # refused before any work: nothing written
    assert json.loads((tmp_path / "q" / "run.json").read_text())["problem_config"] == {"n": 400}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("--method", "alt_pbgd"), "method: 'pbgd_free' -> 'alt_pbgd'"),
        (("--set", "lr_x=0.5"), "solver.lr_x: 0.02 -> 0.5"),
        (("--set", "optimizer=adam"), "solver.optimizer: 'sgd' -> 'adam'"),
        (("--seed", "3"), "run.seed: 0 -> 3"),
        (("--set", "gamma=20"), "solver.gamma: 10.0 -> 20"),
    ],
)
def test_each_change_that_steers_the_steps_is_refused(tmp_path, capsys, change, named):
    assert train(tmp_path) == 0
    before = files(tmp_path / "runs" / "r")
    capsys.readouterr()
    assert train(tmp_path, *change) == 2
    err = capsys.readouterr().err
    assert named in err and "Use a new --name" in err
    assert files(tmp_path / "runs" / "r") == before


def test_another_problem_config_is_refused(tmp_path, capsys):
    assert train(tmp_path) == 0
    assert train(tmp_path, config=("n=100", "ridge=0.5")) == 2
    assert "problem config ridge: (not given) -> 0.5" in capsys.readouterr().err


def test_a_changed_data_file_is_refused_though_the_config_is_the_same(tmp_path):
    (tmp_path / "csv_problem.py").write_text(FACTORY)
    (tmp_path / "values.txt").write_text("1 2 3\n")
    factory = f"{tmp_path / 'csv_problem.py'}:make"
    config = {"csv": str(tmp_path / "values.txt")}
    br.train(factory, problem_config=config, storage_path=tmp_path, name="c")
    (tmp_path / "values.txt").write_text("1 2 5\n")
    with pytest.raises(br.ConfigError) as refused:
        br.train(factory, problem_config=config, storage_path=tmp_path, name="c")
    assert f"data (data, file {tmp_path / 'values.txt'} differ: sha256 " in str(refused.value)


def test_more_steps_extend_the_run_and_are_recorded(tmp_path, capsys):
    assert train(tmp_path) == 0
    assert train(tmp_path, "--steps", "8", "--report-every", "4") == 0
    manifest = read_manifest(tmp_path / "runs" / "r", "run")
    assert manifest["outcome"] == {"status": "completed", "step": 8}
    assert manifest["settings"]["steps"] == 8 and manifest["replay"]["runs"][0]["steps"] == 8
    (entry,) = manifest["continuations"]
    assert entry["from_step"] == 4 and entry["code"] is None
    assert entry["changed"] == {"steps": [4, 8], "run.report_every": [2, 4]}
    assert entry["invocation"]["command"].endswith("--steps 8 --report-every 4")
    assert torch.load(tmp_path / "runs" / "r" / "result.pt", weights_only=True)["x"]


def test_other_code_continues_with_a_warning_and_is_recorded(tmp_path, capsys, monkeypatch):
    import bilevel_ray.records.manifest as manifest_module

    assert train(tmp_path) == 0
    real = manifest_module.code_identity()
    monkeypatch.setattr(
        manifest_module, "code_identity", lambda: {**real, "source_sha256": "0" * 64}
    )
    capsys.readouterr()
    assert train(tmp_path, "--steps", "6") == 0
    err = capsys.readouterr().err
    assert "warning: run " in err and "was started with other code" in err
    entry = read_manifest(tmp_path / "runs" / "r", "run")["continuations"][-1]
    assert entry["code"]["then"]["source_sha256"] == real["source_sha256"]
    assert entry["code"]["now"]["source_sha256"] == "0" * 64


def test_an_edited_manifest_is_not_continued(tmp_path, capsys):
    assert train(tmp_path) == 0
    path = tmp_path / "runs" / "r" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["settings"]["solver"]["lr_x"] = 0.5  # the command now "matches" the record
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert train(tmp_path, "--set", "lr_x=0.5") == 2
    err = capsys.readouterr().err
    assert "does not match its manifest (manifest.json was edited after it was written" in err
    assert "start a new result under a new --name" in err


def test_a_changed_output_is_not_continued(tmp_path, capsys):
    assert train(tmp_path) == 0
    torch.save({"x": {}, "y": {}}, tmp_path / "runs" / "r" / "result.pt")
    capsys.readouterr()
    assert train(tmp_path, "--steps", "8") == 2
    assert "output result.pt changed since it was written" in capsys.readouterr().err


def test_a_run_from_before_manifests_resumes_with_a_note(tmp_path, capsys):
    assert train(tmp_path) == 0
    (tmp_path / "runs" / "r" / MANIFEST).unlink()
    capsys.readouterr()
    assert train(tmp_path, "--steps", "6") == 0
    assert "it predates manifests, so this call could not be checked" in capsys.readouterr().err
    manifest = read_manifest(tmp_path / "runs" / "r", "run")
    assert manifest["outcome"]["step"] == 6
    assert manifest["continuations"][0]["note"].startswith("continued a result from before")


# --- a sweep resumed (before Ray starts) ---------------------------------------------------------

SWEEP_FACTORY = FACTORY.replace(
    '{"steps": 4})', '{"steps": 4}, eval_data=br.BilevelBatch(data, data))'
)


def test_a_resumed_sweep_on_changed_data_or_an_edited_record_is_refused(tmp_path, no_ray):
    (tmp_path / "csv_problem.py").write_text(SWEEP_FACTORY)
    (tmp_path / "values.txt").write_text("1 2 3\n")
    call = dict(
        problem_config={"csv": str(tmp_path / "values.txt")},
        search_space={"gamma": {"grid_search": [5.0]}},
        num_samples=1,
        steps=4,
        storage_path=tmp_path,
        name="s",
        progress=False,
    )
    factory = f"{tmp_path / 'csv_problem.py'}:make"
    with pytest.raises(no_ray):  # the sweep's record is written, then Ray would start
        br.tune(factory, **call)
    assert read_manifest(tmp_path / "s", "sweep")["outcome"]["status"] == "failed"
    (tmp_path / "values.txt").write_text("1 2 9\n")
    with pytest.raises(br.ConfigError, match=r"continuing it would change its trajectory: data"):
        br.tune(factory, resume=True, **call)
    (tmp_path / "values.txt").write_text("1 2 3\n")
    path = tmp_path / "s" / MANIFEST
    path.write_text(path.read_text().replace('"num_samples": 1', '"num_samples": 2'))
    with pytest.raises(br.ConfigError, match=r"manifest\.json was edited after it was written"):
        br.tune(factory, resume=True, **call)


# --- a schedule replayed -------------------------------------------------------------------------


@pytest.fixture
def sweep(tmp_path):
    """A sweep's folder as tune leaves it: its best schedule and the manifest recording it."""
    from bilevel_ray.records.fingerprint import fingerprinted_spec

    folder = tmp_path / "sweep"
    folder.mkdir()
    schedule = {
        "format": "bilevel_ray.best_schedule/1",
        "problem": "regression",
        "problem_config": {"n": 100},
        "method": "pbgd_free",
        "steps": 4,
        "seed": 0,
        "settings": {"lr_x": 0.01},
    }
    (folder / "best_schedule.json").write_text(json.dumps(schedule))
    _, data = fingerprinted_spec("regression", {"n": 100})
    manifest = new_manifest(
        "tune",
        problem="regression",
        problem_config={"n": 100},
        data=data,
        settings={},
        seeds={},
    )
    finish(manifest, folder, {"status": "completed"}, ["best_schedule.json"])
    return folder / "best_schedule.json"


def test_a_schedule_replays_on_its_sweeps_data(sweep, capsys):
    assert main(["solve", "regression", "--schedule", str(sweep), "--quiet"]) == 2
    assert "learned with the problem config {n=100}" in capsys.readouterr().err
    assert main(["solve", "regression", "--schedule", str(sweep), "--schedule-config"]) == 0


def test_a_schedule_on_other_data_is_refused(sweep, capsys):
    argv = ["solve", "regression", "--schedule", str(sweep), "--config", "n=100"]
    assert main([*argv, "--config", "batch_size=50", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: the schedule was learned on other data than this run's (data differ" in err
    assert "replay it on the sweep's data, or tune again on this data" in err


def test_an_edited_schedule_is_refused(sweep, capsys):
    sweep.write_text(sweep.read_text().replace('"lr_x": 0.01', '"lr_x": 0.05'))
    assert main(["solve", "regression", "--schedule", str(sweep), "--schedule-config"]) == 2
    err = capsys.readouterr().err
    assert "does not match its manifest (output best_schedule.json changed" in err
    assert "restore it, or run the sweep again" in err


def test_the_code_warning_names_what_differs():
    from bilevel_ray.records.continuation import _code_difference

    same = "a" * 64
    code = {
        "then": {"bilevel_ray": "0.9", "source_sha256": same, "git": {"commit": "b" * 40}},
        "now": {
            "bilevel_ray": "0.9",
            "source_sha256": same,
            "git": {"commit": "c" * 40, "dirty": True},
        },
    }
    assert _code_difference(code) == "git bbbbbbbbbbbb -> cccccccccccc (dirty)"
    code["now"]["source_sha256"] = "d" * 64
    assert _code_difference(code).startswith("source aaaaaaaaaaaa -> dddddddddddd; git ")
