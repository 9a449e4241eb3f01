"""The manifest beside every result: one schema for solve, train, tune, compare and diagnose, the
data's fingerprint (tensors and declared files), the environment, and ``show`` (which also
finds an edited record or a changed output)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.records import environment
from bilevel_ray.records.files import sha256_file
from bilevel_ray.records.fingerprint import fingerprint_spec, fingerprinted_spec
from bilevel_ray.records.manifest import (
    MANIFEST,
    SCHEMA,
    SCHEMA_VERSION,
    read_manifest,
    record_digest,
    verify,
)

FIELDS = {
    "schema",
    "schema_version",
    "kind",
    "entry_point",
    "invocation",
    "code",
    "environment",
    "problem",
    "data",
    "settings",
    "seeds",
    "started",
    "ended",
    "outcome",
    "outputs",
    "continuations",
    "replay",
    "digest",
    "seal",
}


def check_schema(folder: Path, kind: str, entry_point: str) -> dict:
    """The manifest of ``folder``: every field, the versions and device, a digest of its own
    content, and every output's hash that of the file."""
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest) == FIELDS
    assert manifest["schema"] == SCHEMA and manifest["schema_version"] == SCHEMA_VERSION
    assert (manifest["kind"], manifest["entry_point"]) == (kind, entry_point)
    assert manifest["code"]["bilevel_ray"] == br.__version__
    assert len(manifest["code"]["source_sha256"]) == 64
    packages = manifest["environment"]["packages"]
    assert packages["torch"] and {"ray", "transformers", "peft"} <= set(packages)
    device = manifest["environment"]["device"]
    assert device["cpu"] and device["cpu_count"] >= 1 and device["gpu_count"] >= 0
    assert len(manifest["data"]["sha256"]) == 64 and manifest["data"]["tensors"]["x0"]
    assert manifest["started"] <= manifest["ended"]
    assert manifest["outcome"]["status"] != "running"
    assert manifest["digest"] == record_digest(manifest)
    for name, recorded in manifest["outputs"].items():
        assert recorded["sha256"] == sha256_file(folder / name), name
    assert verify(folder, manifest) == []
    return manifest


# --- solve, train and diagnose (no Ray) ----------------------------------------------------------


def test_solve_writes_a_manifest_of_its_command_settings_data_and_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["solve", "regression", "--config", "n=200", "--steps", "30", "--seed", "2"]
    assert main([*argv, "--set", "lr_x=0.01", "--out", str(out), "--quiet"]) == 0
    assert "manifest.json" in capsys.readouterr().out
    manifest = check_schema(out, "run", "solve")
    assert manifest["invocation"]["command"].startswith("bilevel-ray solve regression --config")
    assert manifest["problem"] == {"name": "regression", "config": {"n": 200}}
    settings = manifest["settings"]
    assert settings["method"] == "pbgd_free" and settings["steps"] == 30
    # The solver settings in force: the user's, the problem's suggestions, the defaults.
    assert settings["solver"]["lr_x"] == 0.01 and settings["solver"]["lr_y"] == 0.1
    assert settings["solver"]["optimizer"] == "sgd" and settings["run"]["seed"] == 2
    assert manifest["seeds"] == {"run": 2, "problem": None}
    assert manifest["outcome"] == {"status": "completed", "step": 30}
    assert set(manifest["outputs"]) == {"history.parquet", "result.pt", "run.json"}
    assert manifest["replay"]["runs"][0]["params"] == "result.pt"


def test_train_writes_its_manifest_as_the_run_starts_and_ends_it(tmp_path):
    result = br.train(
        "quadratic", steps=20, report_every=10, checkpoint_every=10, storage_path=tmp_path, name="q"
    )
    folder = tmp_path / "q"
    manifest = check_schema(folder, "run", "train")
    assert manifest["invocation"] == {"api": "bilevel_ray.train", "keywords": []}
    assert manifest["settings"]["placement"]["runtime"] == "in process"
    assert set(manifest["outputs"]) == {"result.pt"}  # checkpoints are state, not results
    kept = torch.load(folder / "result.pt", weights_only=True)
    assert torch.equal(kept["x"]["x"], result.x["x"]) and result.fingerprint is not None
    assert result.fingerprint["sha256"] == manifest["data"]["sha256"]


def test_a_run_that_diverges_is_recorded_so(tmp_path):
    with pytest.raises(br.DivergenceError):
        br.train("quadratic", steps=20, lr_x=1e6, lr_y=1e6, storage_path=tmp_path, name="d")
    manifest = read_manifest(tmp_path / "d", "run")
    assert manifest["outcome"]["status"] == "diverged" and manifest["outcome"]["step"] >= 1


def test_a_run_that_falls_back_records_the_step_and_the_verdict(tmp_path, capsys):
    out = tmp_path / "fb"
    argv = ["solve", "toy-negative", "--steps", "400", "--on-unsuitable", "fallback"]
    assert main([*argv, "--diagnose-window", "100", "--out", str(out), "--quiet"]) == 0
    outcome = check_schema(out, "run", "solve")["outcome"]
    assert outcome["fell_back"]["to"] == "alt_pbgd" and outcome["fell_back"]["at_step"] == 100
    assert outcome["flatness"]["verdict"] == "unsuitable"


def test_diagnose_out_writes_the_verdict_and_a_manifest(tmp_path, capsys):
    out = tmp_path / "diag"
    argv = ["diagnose", "quadratic", "--steps", "60", "--check-steps", "20", "--replicas", "1"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 3
    manifest = check_schema(out, "diagnosis", "diagnose")
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["verdict"]["verdict"] == manifest["outcome"]["verdict"] == "unsuitable"
    assert manifest["settings"]["steps"] == 60 and "verdict.json" in manifest["outputs"]


# --- show ----------------------------------------------------------------------------------------


@pytest.fixture
def solved(tmp_path):
    out = tmp_path / "run"
    assert main(["solve", "quadratic", "--steps", "20", "--out", str(out), "--quiet"]) == 0
    return out


def test_show_prints_the_record_on_one_screen(solved, capsys):
    capsys.readouterr()
    assert main(["show", str(solved)]) == 0
    shown = capsys.readouterr().out
    assert "run (solve), completed at step 20" in shown
    for part in ("bilevel-ray solve quadratic", "sha256", "solver.lr_x=0.05", "verifies"):
        assert part in shown
    assert len(shown.splitlines()) <= 40


def test_show_finds_an_edited_setting(solved, capsys):
    manifest = json.loads((solved / MANIFEST).read_text())
    manifest["settings"]["solver"]["lr_x"] = 0.5
    (solved / MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["show", str(solved)]) == 1
    assert "edited after it was written" in capsys.readouterr().out


def test_show_finds_an_output_named_outside_the_folder(solved, capsys):
    from bilevel_ray.records.manifest import write_manifest

    manifest = read_manifest(solved, "run")
    manifest["outputs"]["../other.pt"] = {"sha256": "0" * 64, "bytes": 1}
    write_manifest(solved, manifest)
    assert verify(solved, manifest) == ["output '../other.pt' is not a path inside the folder"]


def test_show_finds_a_changed_output(solved, capsys):
    torch.save({"x": {}, "y": {}}, solved / "result.pt")
    capsys.readouterr()
    assert main(["show", str(solved)]) == 1
    assert "output result.pt changed since it was written" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda p: p.mkdir(), r"the folder holds no manifest\.json; give the folder of a result"),
        (lambda p: None, r"not a folder; give the folder of a result"),
        (
            lambda p: (p.mkdir(), (p / MANIFEST).write_text("{")),
            r"manifest\.json is not valid JSON .*; restore the folder's manifest\.json from a "
            r"copy of the folder$",
        ),
        (
            lambda p: (p.mkdir(), (p / MANIFEST).write_text('{"schema": "other"}')),
            r"manifest\.json is not a bilevel_ray manifest",
        ),
        (
            lambda p: (
                p.mkdir(),
                (p / MANIFEST).write_text(json.dumps({"schema": SCHEMA, "schema_version": 99})),
            ),
            r"has schema_version 99; this bilevel_ray reads up to 1: upgrade bilevel_ray",
        ),
        (
            lambda p: (
                p.mkdir(),
                (p / MANIFEST).write_text(json.dumps({"schema": SCHEMA, "schema_version": 1})),
            ),
            r"manifest\.json lacks \['kind', .*'digest'\]; restore the folder's manifest",
        ),
        (
            lambda p: (p / MANIFEST).mkdir(parents=True),
            r"manifest\.json is not a file of a manifest's size; restore the folder's",
        ),
    ],
)
def test_show_refuses_what_is_not_a_manifest(tmp_path, capsys, setup, match):
    folder = tmp_path / "r"
    setup(folder)
    assert main(["show", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: show ") and len(err.splitlines()) == 1
    assert re.search(match, err), err


# --- the data's fingerprint and declare_inputs ---------------------------------------------------

FACTORY = """
import torch
import bilevel_ray as br

def make(config):
    path = config["csv"]
    br.declare_inputs(path)
    values = [float(v) for v in open(path).read().split()]
    data = torch.tensor(values, dtype=torch.float64)[:, None]
    problem = br.problems.QuadraticProblem(dim_x=1, dim_y=1, seed=0)
    x0 = {"x": torch.zeros(1, dtype=torch.float64)}
    y0 = {"y": torch.zeros(1, dtype=torch.float64)}
    return br.ProblemSpec(problem, x0, y0, br.full_batch(data, data), {"steps": 4})
"""


@pytest.fixture
def csv_factory(tmp_path):
    (tmp_path / "csv_problem.py").write_text(FACTORY)
    (tmp_path / "values.txt").write_text("1 2 3\n")
    return f"{tmp_path / 'csv_problem.py'}:make", tmp_path / "values.txt"


def test_a_fingerprint_is_the_same_for_the_same_data_and_names_declared_files(csv_factory):
    factory, csv = csv_factory
    _, first = fingerprinted_spec(factory, {"csv": str(csv)})
    _, again = fingerprinted_spec(factory, {"csv": str(csv)})
    assert first == again and first["files"][0]["by"] == "content"
    assert first["files"][0]["sha256"] != "missing" and first["files"][0]["bytes"] == 6
    csv.write_text("1 2 4\n")
    _, changed = fingerprinted_spec(factory, {"csv": str(csv)})
    assert changed["sha256"] != first["sha256"]
    assert changed["tensors"]["data"] != first["tensors"]["data"]
    assert changed["tensors"]["x0"] == first["tensors"]["x0"]


def test_a_large_file_is_described_by_name_size_and_time(csv_factory, monkeypatch):
    import bilevel_ray.records.files as files

    factory, csv = csv_factory
    monkeypatch.setattr(files, "LARGE_FILE_BYTES", 2)
    _, described = fingerprinted_spec(factory, {"csv": str(csv)})
    assert described["files"][0]["by"].startswith("name, size and modification time (a file over")


def test_declare_inputs_outside_a_run_only_returns_the_paths(tmp_path):
    assert br.declare_inputs(tmp_path / "a.csv", "b.csv") == (tmp_path / "a.csv", Path("b.csv"))
    with pytest.raises(br.ConfigError, match=r"^declare_inputs\(''\): give the path of a file"):
        br.declare_inputs("")


def test_a_folder_is_hashed_file_by_file_and_data_it_cannot_see_is_named(tmp_path):
    from bilevel_ray.inputs import DeclaredInput

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    spec = br.problems.BUILTIN_PROBLEMS["quadratic"]({})
    spec.data = ([{"u": 1}], [{"v": 2}])  # batch sources: not seen before the run draws them
    printed = fingerprint_spec(spec, [DeclaredInput(tmp_path / "d")])
    assert printed["files"][0]["bytes"] == 1
    assert printed["unhashed"] == []  # lists of dicts of numbers are hashed
    spec.data = (iter([]), iter([]))
    unhashed = fingerprint_spec(spec)["unhashed"]
    assert unhashed == ["data[0]: a list_iterator", "data[1]: a list_iterator"]


def test_the_git_commit_is_none_without_git(monkeypatch):
    monkeypatch.setattr(environment.shutil, "which", lambda name: None)
    assert environment.code_identity()["git"] is None


# --- tune and compare (Ray): their manifests and the parameters they keep -----------------------


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_keeps_its_best_trials_parameters_and_reruns_them(ray_2cpu, tmp_path, capsys):
    from ray import tune

    result = br.tune(
        "regression",
        problem_config={"n": 200},
        search_space={"lr_y": tune.grid_search([0.05, 0.1])},
        num_samples=1,
        steps=20,
        report_every=5,
        scheduler=None,
        storage_path=tmp_path,
        name="sw",
        progress=False,
    )
    folder = tmp_path / "sw"
    manifest = check_schema(folder, "sweep", "tune")
    assert manifest["invocation"]["api"] == "bilevel_ray.tune"
    best = result.best_metrics["trial_id"]
    assert manifest["outcome"]["best"]["trial_id"] == best
    assert manifest["outcome"]["best_parameters"] == "best_result.pt"
    assert manifest["outcome"]["trials"] == {"completed": 2}
    assert {"sweep.json", "trials.parquet", "best_schedule.json", "best_result.pt"} <= set(
        manifest["outputs"]
    )
    kept = torch.load(folder / "best_result.pt", weights_only=True)
    assert set(kept) == {"x", "y"} and set(kept["x"]) == {"W"}
    assert not (folder / "params").exists()  # the other trials' files are gone
    capsys.readouterr()
    assert main(["rerun", str(folder), "--quiet"]) == 0
    assert f"best trial {best}: reproduced" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.ray
def test_a_comparison_keeps_each_methods_best_run_and_reruns_them(ray_2cpu, tmp_path, capsys):
    result = br.compare(
        "quadratic",
        methods=["pbgd_free", "alt_pbgd"],
        budget_s=0.5,
        seeds=2,
        storage_path=str(tmp_path),
        name="c",
        progress=False,
    )
    folder = result.path
    manifest = check_schema(folder, "comparison", "compare")
    assert manifest["settings"]["methods"] == ["pbgd_free", "alt_pbgd"]
    assert manifest["settings"]["solver"]["alt_pbgd"]["inner_steps"] >= 1
    assert manifest["outcome"]["recommended"] == result.recommendation["method"]
    for method in ("pbgd_free", "alt_pbgd"):
        assert f"results/{method}.pt" in manifest["outputs"]
        kept = manifest["outcome"]["kept"][method]
        runs = [r for r in result.runs.to_pylist() if r["method"] == method]
        assert kept["phi_final"] == min(r["phi_final"] for r in runs)
    assert not (folder / "params").exists()
    capsys.readouterr()
    assert main(["rerun", str(folder), "--quiet"]) == 0
    assert capsys.readouterr().out.count("reproduced") == 2
