"""Bad input, round three: numbers that size work are bounded where they enter, an empty tensor
is no start point, and an address that is not one is a clear error."""

from __future__ import annotations

import pytest
import torch

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.problems.toys import NegativeToy


def test_an_empty_start_tensor_is_refused_before_any_step():
    with pytest.raises(br.ConfigError, match=r"x0\['x'\] is empty \(shape \(0,\)\)"):
        br.solve(NegativeToy(), {"x": torch.zeros(0)}, {"y": torch.zeros(1)}, steps=1)


@pytest.mark.parametrize("value", [100_001, 10**12])
def test_an_inner_loop_of_hours_is_refused_with_the_bound(value):
    with pytest.raises(br.ConfigError, match=r"inner_steps=.*must be at most 100,000") as err:
        br.solve(NegativeToy(), {"x": torch.ones(1)}, {"y": torch.zeros(1)}, inner_steps=value)
    assert "e.g. inner_steps=10" in str(err.value)


def test_thousands_of_threads_are_refused(monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "100000")
    assert main(["solve", "toy-negative", "--steps", "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "OMP_NUM_THREADS='100000': at most 1024" in err and "OMP_NUM_THREADS=2" in err


def test_an_address_that_is_not_one_is_a_clear_error(monkeypatch):
    # Ray's own ValueError ("... is not a valid address") becomes the usual connect message.
    import bilevel_ray.runtime.cluster.session as session

    def init(*args, **kwargs):
        raise ValueError("'garbage' is not a valid address")

    monkeypatch.setattr(session.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(session.ray, "init", init)
    with pytest.raises(br.ConfigError, match=r"address='garbage': cannot connect .* not a valid"):
        session.connect("garbage")


def test_a_trial_whose_code_raises_reports_a_step_so_a_population_goes_on(monkeypatch):
    # PBT and PB2 read every result's "step": an error report without one ended the sweep.
    from bilevel_ray.runtime.local.run_spec import Placement, RunSpec
    from bilevel_ray.runtime.tune import trial

    reported = []

    class Context:
        def get_trial_id(self):
            return "t0"

    monkeypatch.setattr(trial.ray_tune, "get_context", lambda: Context())
    monkeypatch.setattr(trial.ray_tune, "report", reported.append)
    plan = trial.TrialPlan(
        "toy-negative", {}, "pbgd_free", {}, RunSpec(10), Placement(), False, 5, 0.1, "/tmp"
    )
    trial.run_trial({"lr_x": -1.0}, plan)  # a setting the trial's own code refuses
    assert reported[0]["status"] == "error" and reported[0]["step"] == 0
    assert "lr_x=-1.0" in reported[0]["error"]


def test_resuming_a_finished_sweep_whose_tune_state_is_gone_is_refused(tmp_path):
    # Tune cannot restore it and would start over, rewriting the finished sweep's tables.
    from bilevel_ray.runtime.tune.folder import claim_sweep_folder

    folder = tmp_path / "sweep"
    claim_sweep_folder(folder, {"method": "pbgd_free"}, resume=False)
    (folder / "trials.parquet").write_bytes(b"the finished sweep's table")
    with pytest.raises(br.ConfigError, match=r"whose Tune state .* is gone: there is nothing"):
        claim_sweep_folder(folder, {"method": "pbgd_free"}, resume=True)
    assert (folder / "trials.parquet").read_bytes() == b"the finished sweep's table"
    (folder / "tuner.pkl").write_bytes(b"")
    (folder / "experiment_state-2026.json").write_text("{}")
    claim_sweep_folder(folder, {"method": "pbgd_free"}, resume=True)  # resumable: accepted


def _schedule(tmp_path, **changes):
    import json

    from bilevel_ray.runtime.tune.lineage import FORMAT

    document = {
        "format": FORMAT,
        "problem": "toy-negative",
        "problem_config": {},
        "method": "pbgd_free",
        "steps": 20,
        "seed": 0,
        "settings": {"lr_x": 0.01, "lr_y": 0.1, "gamma": 10.0},
        **changes,
    }
    path = tmp_path / "best_schedule.json"
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"problem_config": [1, 2]}, "its problem_config is a list"),
        ({"settings": {"gamma": 10.0, "seed": 3}}, "its settings name ['seed']"),
        ({"settings": {"gamma": 10.0, "report_every": 1}}, "its settings name ['report_every']"),
        ({"problem": "/elsewhere/other.py:factory"}, "was learned on '/elsewhere/other.py:"),
        ({"problem_config": {"data": "/their/file.csv"}}, "data='/their/file.csv'"),
    ],
)
def test_a_handed_over_schedule_may_change_only_the_solver_settings(
    tmp_path, capsys, changes, message
):
    path = _schedule(tmp_path, **changes)
    assert main(["solve", "toy-negative", "--schedule", str(path), "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_a_schedules_problem_config_is_taken_with_the_flag_only(tmp_path, capsys):
    path = _schedule(tmp_path, problem_config={"x0": 3.0})
    argv = ["solve", "toy-negative", "--schedule", str(path), "--quiet"]
    assert main(argv) == 2
    assert "problem config {x0=3.0}" in capsys.readouterr().err
    assert main([*argv, "--config", "x0=3.0"]) == 0  # the same config, given
    assert main([*argv, "--schedule-config"]) == 0  # taken from the file, asked for


@pytest.mark.parametrize("kind", ["fifo", "device", "nested"])
def test_a_schedule_that_is_no_regular_file_or_nests_too_deep_is_refused(tmp_path, kind):
    import os

    from bilevel_ray.runtime.tune.lineage import read_schedule_file

    path = tmp_path / "best_schedule.json"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    elif kind == "device":
        path.symlink_to("/dev/zero")  # reading it would never end
    else:
        path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(br.ConfigError, match=r"not a regular file|nests deeper"):
        read_schedule_file(path)


def test_a_model_folder_is_sized_and_its_safetensors_header_checked_before_loading(tmp_path):
    pytest.importorskip("transformers")
    from llama_files import tiny_llama_config

    from bilevel_ray.problems import build_spec

    huge = tmp_path / "huge"
    tiny_llama_config(num_hidden_layers=1_000_000, hidden_size=4096).save_pretrained(huge)
    with pytest.raises(br.ConfigError, match=r"1,000,000|parameters"):
        build_spec("peft-dpo-sft", {"model": str(huge)})  # refused as the same dict would be
    planted = tmp_path / "planted"
    tiny_llama_config().save_pretrained(planted)
    (planted / "model.safetensors").write_bytes((2**56).to_bytes(8, "little") + b"{}")
    with pytest.raises(br.ConfigError, match=r"is not a safetensors file \(its header says"):
        build_spec("peft-dpo-sft", {"model": str(planted)})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rng", [1, 2, 3], "rng is a list, not torch's RNG state"),
        ("elapsed_s", "soon", "elapsed_s='soon' is not a number"),
        ("history", [{"step": "many"}], "history does not fit the metric history's schema"),
        ("history", [{"step": 1, "upper/loss": "low"}], "history does not fit"),
        ("seed", 1.5, "seed=1.5 is not an integer"),
    ],
)
def test_a_checkpoint_with_a_field_of_the_wrong_type_is_refused_before_resuming(
    tmp_path, field, value, message
):
    problem, x0, y0 = NegativeToy(), {"x": torch.ones(1)}, {"y": torch.zeros(1)}
    ckpt = tmp_path / "ckpt.pt"
    br.solve(problem, x0, y0, steps=10, checkpoint_path=ckpt, checkpoint_every=10)
    payload = torch.load(ckpt, weights_only=True)
    payload[field] = value
    torch.save(payload, ckpt)
    with pytest.raises(br.ConfigError, match=message):
        br.solve(problem, x0, y0, steps=20, checkpoint_path=ckpt, checkpoint_every=10, resume=True)
