"""``bilevel-ray rerun DIR``: a manifest's run executed again from scratch into a new folder;
the built-in problems reproduce bitwise in float64 on CPU."""

from __future__ import annotations

import json

import pytest
import torch

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.records.manifest import MANIFEST, read_manifest
from bilevel_ray.records.replay import compare_params


@pytest.mark.parametrize(
    "argv",
    [
        ["quadratic", "--steps", "200"],
        ["regression", "--config", "n=300", "--steps", "100", "--set", "optimizer=adam"],
        ["toy-positive", "--steps", "200", "--method", "alt_pbgd"],
        ["toy-negative", "--steps", "300", "--on-unsuitable", "fallback"],
        ["quadratic", "--steps", "50", "--method", "implicit_cg", "--seed", "4"],
    ],
    ids=["quadratic", "regression-adam", "toy-positive", "toy-negative-fallback", "implicit-cg"],
)
def test_a_solve_reruns_bitwise(tmp_path, capsys, argv):
    extra = ["--diagnose-window", "100"] if "--on-unsuitable" in argv else []
    assert main(["solve", *argv, *extra, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["rerun", str(tmp_path / "a"), "--quiet"]) == 0
    assert "run: reproduced: the final parameters are bitwise identical" in capsys.readouterr().out
    record = read_manifest(tmp_path / "a-rerun", "rerun")
    assert record["kind"] == "rerun" and record["outcome"]["status"] == "reproduced"
    assert record["settings"]["of_digest"] == read_manifest(tmp_path / "a", "run")["digest"]
    checks = json.loads((tmp_path / "a-rerun" / "rerun.json").read_text())["runs"]
    assert checks == [
        {"label": "run", "params": "result.pt", "bitwise": True, "max_abs_diff": 0.0, "where": None}
    ]


def test_an_extended_train_run_reruns_bitwise_from_scratch(tmp_path, capsys):
    options = dict(problem_config={"n": 200}, report_every=5, checkpoint_every=5)
    br.train("regression", steps=10, storage_path=tmp_path, name="t", **options)
    br.train("regression", steps=25, storage_path=tmp_path, name="t", **options)
    assert main(["rerun", str(tmp_path / "t"), "--out", str(tmp_path / "again")]) == 0
    assert "bitwise identical" in capsys.readouterr().out
    rerun = read_manifest(tmp_path / "again", "run")
    assert rerun["entry_point"] == "train" and rerun["outcome"]["step"] == 25
    assert rerun["continuations"] == [] and "rerun.json" in rerun["outputs"]


@pytest.fixture
def solved(tmp_path):
    assert main(["solve", "quadratic", "--steps", "20", "--out", str(tmp_path / "a")]) == 0
    return tmp_path / "a"


@pytest.mark.parametrize(
    ("setup", "extra", "match"),
    [
        (
            lambda a: (a / MANIFEST).unlink(),
            [],
            r"no manifest\.json there; give the folder of a result written with one",
        ),
        (
            lambda a: (a / MANIFEST).write_text((a / MANIFEST).read_text().replace("200", "201")),
            [],
            r"does not match its manifest \(manifest\.json was edited.*no trustworthy record",
        ),
        (
            lambda a: (a.parent / "full").mkdir() or (a.parent / "full" / "x").write_text("x"),
            ["--out", "{tmp}/full"],
            r"already exists and is not an empty folder: a rerun goes into a new folder",
        ),
    ],
    ids=["no-manifest", "edited", "out-not-empty"],
)
def test_rerun_refuses_before_any_work(solved, capsys, setup, extra, match):
    import re

    setup(solved)
    capsys.readouterr()
    argv = ["rerun", str(solved), *(e.replace("{tmp}", str(solved.parent)) for e in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(match, err), err
    assert not (solved.parent / "a-rerun").exists()


def test_rerun_refuses_when_the_data_changed(tmp_path, capsys):
    from test_manifest import FACTORY

    (tmp_path / "csv_problem.py").write_text(FACTORY)
    (tmp_path / "values.txt").write_text("1 2 3\n")
    factory = f"{tmp_path / 'csv_problem.py'}:make"
    out = tmp_path / "a"
    argv = ["solve", factory, "--config", f"csv={tmp_path / 'values.txt'}", "--out", str(out)]
    assert main(argv) == 0
    (tmp_path / "values.txt").write_text("1 2 4\n")
    capsys.readouterr()
    assert main(["rerun", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the problem's data changed since the result was made (data, file " in err
    assert "restore the data it recorded to reproduce it" in err


def test_rerun_of_a_diagnosis_says_there_is_nothing_to_rerun(tmp_path, capsys):
    argv = ["diagnose", "quadratic", "--steps", "40", "--check-steps", "10", "--replicas", "1"]
    main([*argv, "--out", str(tmp_path / "d"), "--quiet"])
    capsys.readouterr()
    assert main(["rerun", str(tmp_path / "d")]) == 2
    assert "nothing to rerun: a diagnosis keeps no parameters" in capsys.readouterr().err


def test_parameters_are_compared_bitwise_else_by_the_largest_difference():
    a = {"x": {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}, "y": {}}
    assert compare_params(a, a) == {"bitwise": True, "max_abs_diff": 0.0, "where": None}
    b = {"x": {"w": torch.tensor([1.0, 2.5], dtype=torch.float64)}, "y": {}}
    assert compare_params(a, b) == {"bitwise": False, "max_abs_diff": 0.5, "where": "x[w]"}
    c = {"x": {"w": torch.tensor([1.0, 2.0])}, "y": {}}  # float32: another dtype
    assert compare_params(a, c)["max_abs_diff"] == float("inf")
    assert compare_params(a, {"x": {}, "y": {"v": torch.zeros(1)}})["where"] in ("x[w]", "y[v]")


def _rewrite(folder, edit):
    """The folder's manifest edited, with its digest written again (a record that verifies)."""
    from bilevel_ray.records.manifest import write_manifest

    manifest = read_manifest(folder, "run")
    edit(manifest)
    write_manifest(folder, manifest)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda m: m["replay"]["runs"][0].pop("solver"),
            r"a replay entry lacks \['solver'\]; the manifest was not written by this bilevel_ray",
        ),
        (
            lambda m: m["replay"]["runs"][0].update(params="../elsewhere.pt"),
            r"replay params '\.\./elsewhere\.pt' must be a path inside the folder",
        ),
        (
            lambda m: m["replay"]["runs"][0].update(params="missing.pt"),
            r"missing\.pt is gone: nothing to compare with",
        ),
        (
            lambda m: m.update(replay=None),
            r"nothing to rerun: it records no run to replay",
        ),
    ],
    ids=["entry-lacks-a-field", "params-outside", "params-gone", "no-replay"],
)
def test_rerun_refuses_a_replay_it_cannot_execute(solved, capsys, edit, match):
    import re

    _rewrite(solved, edit)
    capsys.readouterr()
    assert main(["rerun", str(solved)]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"not a torch file", r"cannot be read \(\w+\); it is not a result\.pt bilevel_ray wrote"),
        (None, r"is not a result\.pt \(\{'x': \.\.\., 'y': \.\.\.\}\)"),
    ],
)
def test_parameters_that_are_not_a_result_file_are_refused(tmp_path, content, match):
    from bilevel_ray.records.replay import load_params

    path = tmp_path / "result.pt"
    if content is None:
        torch.save({"x": 1}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(br.ConfigError, match=r"^the recorded parameters '.*result\.pt' " + match):
        load_params(path, "the recorded parameters")
