"""Faults a long run meets: a damaged checkpoint (the previous one is used), and a resumed run
that still gives the uninterrupted result."""

from __future__ import annotations

import pytest
import torch

import bilevel_ray as br
from bilevel_ray.runtime.local.checkpoint import CHECKPOINT_FILE
from bilevel_ray.runtime.local.output_files import previous_path


def _run(quadratic, origin, steps, **extra):
    x0, y0 = origin
    options = {"steps": steps, "lr_x": 0.05, "lr_y": 0.2, "gamma": 10.0, "report_every": 10}
    return br.solve(quadratic, x0, y0, **{**options, **extra})


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),  # a copy cut short
        lambda p: p.write_bytes(b"\x00" * 64),  # a bad disk block
        lambda p: p.unlink(),  # a crash between moving it to .prev and renaming the new one
    ],
)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(
    quadratic, origin, tmp_path, damage, capsys
):
    ckpt = tmp_path / "ckpt.pt"
    whole = _run(quadratic, origin, 60)
    _run(quadratic, origin, 40, checkpoint_path=ckpt, checkpoint_every=10)
    assert previous_path(ckpt).exists()  # the step-30 checkpoint, kept when step 40 was saved
    damage(ckpt)
    resumed = _run(quadratic, origin, 60, checkpoint_path=ckpt, checkpoint_every=10, resume=True)
    err = capsys.readouterr().err
    assert "cannot be read" in err and "Resuming from the previous checkpoint" in err
    assert "(step 30)" in err
    # Ten steps are redone from step 30; the result is the uninterrupted run's.
    assert torch.equal(resumed.x["x"], whole.x["x"]) and torch.equal(resumed.y["y"], whole.y["y"])
    assert resumed.history["step"].to_pylist() == whole.history["step"].to_pylist()


def test_a_crash_while_writing_a_checkpoint_leaves_the_last_one_in_place(tmp_path, monkeypatch):
    from bilevel_ray.runtime.local import checkpoint

    ckpt = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint({"step": 1}, ckpt, keep_previous=True)

    def crash(payload, tmp):
        tmp.write_bytes(b"half a file")
        raise OSError("killed mid-write")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="killed mid-write"):
        checkpoint.save_checkpoint({"step": 2}, ckpt, keep_previous=True)
    monkeypatch.undo()
    assert torch.load(ckpt) == {"step": 1}
    assert not previous_path(ckpt).exists()


def test_both_checkpoints_damaged_is_a_clear_error(quadratic, origin, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    _run(quadratic, origin, 20, checkpoint_path=ckpt, checkpoint_every=10)
    for path in (ckpt, previous_path(ckpt)):
        path.write_bytes(b"junk")
    with pytest.raises(
        br.ConfigError,
        match=r"^checkpoint '.*ckpt\.pt' cannot be read \(\w+\): it is truncated, corrupted or "
        r"not a bilevel_ray checkpoint\. Delete it to start afresh\. The previous checkpoint "
        r"'.*ckpt\.pt\.prev' cannot be read either: delete both to start afresh\.$",
    ):
        _run(quadratic, origin, 40, checkpoint_path=ckpt, checkpoint_every=10, resume=True)


CRASHING_FACTORY = '''
import os
from pathlib import Path

import ray

from bilevel_ray.problems import BUILTIN_PROBLEMS


def factory(config):
    """toy-negative, whose first build inside a trial kills the trial's process."""
    config = dict(config)
    marker = Path(config.pop("marker"))
    in_trial = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    if in_trial and not marker.exists():
        marker.write_text("crashed once")
        os._exit(1)
    return BUILTIN_PROBLEMS["toy-negative"](config)
'''


@pytest.mark.ray
@pytest.mark.slow
def test_a_crashed_trial_process_is_retried_and_the_sweep_completes(ray_2cpu, tmp_path):
    from ray import tune

    (tmp_path / "crashing.py").write_text(CRASHING_FACTORY)
    marker = tmp_path / "crashed"
    result = br.tune(
        f"{tmp_path / 'crashing.py'}:factory",
        problem_config={"marker": str(marker)},
        search_space={"lr_y": tune.choice([0.1])},
        num_samples=1,
        steps=50,
        report_every=10,
        scheduler=None,
        search_alg=None,
        storage_path=tmp_path / "runs",
        name="crashing",
    )
    assert marker.read_text() == "crashed once"  # the trial did die once
    trials = result.trials.to_pylist()
    assert [t["status"] for t in trials] == ["completed"] and trials[0]["step"] == 50


@pytest.mark.ray
@pytest.mark.slow
def test_a_damaged_train_checkpoint_falls_back_to_the_one_before(ray_2cpu, tmp_path, capfd):
    common = {
        "num_workers": 2,
        "resources_per_worker": {"CPU": 0.5},
        "report_every": 10,
        "checkpoint_every": 10,
        "storage_path": tmp_path,
        "in_process": False,
    }
    whole = br.train("quadratic", steps=60, name="whole", **common)
    br.train("quadratic", steps=40, name="cut", **common)
    newest = sorted((tmp_path / "cut").glob("checkpoint_step_*"))[-1] / CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:100])  # a copy cut short
    resumed = br.train("quadratic", steps=60, name="cut", **common)
    assert "Resuming from the previous checkpoint" in capfd.readouterr().err
    assert torch.allclose(resumed.x["x"], whole.x["x"], atol=1e-12)
    assert resumed.history["step"].to_pylist()[-1] == 60


@pytest.mark.parametrize("runner", ["solve", "train"])
def test_a_full_disk_is_refused_before_the_run_starts(
    quadratic, origin, tmp_path, monkeypatch, runner
):
    import shutil

    from bilevel_ray.runtime.local import checkpoint

    full = shutil._ntuple_diskusage(total=10**9, used=10**9 - 100, free=100)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: full)
    match = r"has 0\.0 MiB free and the run's checkpoints need about .* MiB: free some space"
    what = "checkpoint_path" if runner == "solve" else "storage_path"
    with pytest.raises(br.ConfigError, match=rf"^{what} '.*' " + match):
        if runner == "solve":
            _run(quadratic, origin, 20, checkpoint_path=tmp_path / "ckpt.pt", checkpoint_every=10)
        else:
            br.train("quadratic", steps=20, storage_path=tmp_path, name="r")
    assert not list(tmp_path.rglob("*.pt"))  # nothing written


def _altered(path, change):
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p["flatness"].update(method="alt_pbgd"),  # was KeyError 'y_g' mid-run
        lambda p: p["state"].update(opt="garbage"),  # was TypeError mid-run
        lambda p: p["state"]["extra"].update(multiplier=1.0),
    ],
)
def test_an_altered_solver_state_falls_back_to_the_previous_one(
    quadratic, origin, tmp_path, change, capsys
):
    """A checkpoint whose solver state is not what its method keeps counts as damaged."""
    ckpt = tmp_path / "ckpt.pt"
    whole = _run(quadratic, origin, 60)
    _run(quadratic, origin, 40, checkpoint_path=ckpt, checkpoint_every=10)
    _altered(ckpt, change)
    resumed = _run(quadratic, origin, 60, checkpoint_path=ckpt, checkpoint_every=10, resume=True)
    err = capsys.readouterr().err
    assert "its solver state is not what" in err or "flatness" in err
    assert "Resuming from the previous checkpoint" in err
    assert torch.allclose(resumed.x["x"], whole.x["x"], atol=1e-12)


@pytest.mark.parametrize("method", ["pbgd_free", "f2sa", "alt_pbgd"])
@pytest.mark.parametrize("optimizer", [{"optimizer": "adam"}, {"momentum": 0.9}])
def test_every_methods_own_checkpoint_passes_the_state_check(
    quadratic, origin, tmp_path, method, optimizer
):
    """The check compares with what the method keeps: a real checkpoint always fits it."""
    from bilevel_ray.runtime.local.checkpoint import load_checkpoint

    ckpt = tmp_path / "ckpt.pt"
    _run(quadratic, origin, 20, checkpoint_path=ckpt, checkpoint_every=10, method=method,
         **optimizer)  # fmt: skip
    load_checkpoint(ckpt)
    _altered(ckpt, lambda p: p["state"]["opt"]["x"].update(count=1.5))
    with pytest.raises(br.ConfigError, match=r"state\.opt\['x'\]\['count'\]=1\.5 is not a"):
        load_checkpoint(ckpt)


def test_an_exploding_loss_stops_the_run_as_diverged(quadratic, origin):
    """A loss that grows by 1e12 times its start diverged, though still finite."""
    with pytest.raises(br.DivergenceError) as caught:
        _run(quadratic, origin, 40, lr_x=5.0)
    err = caught.value
    assert err.grew is not None and abs(err.grew[1]) > 1e12 * max(1.0, abs(err.grew[0]))
    assert str(err).startswith(f"diverged at step {err.step}: {err.metric} grew from ")
    assert "Lower the step sizes lr_x / lr_y" in str(err)


def test_divergence_error_crosses_processes_with_its_fields():
    import pickle

    err = br.DivergenceError(7, "upper/loss", {"step": 6}, grew=(1.0, 1e20))
    back = pickle.loads(pickle.dumps(err))
    assert (back.step, back.metric, back.last_finite, back.grew, str(back)) == (
        7, "upper/loss", {"step": 6}, (1.0, 1e20), str(err)
    )  # fmt: skip


def test_the_explosion_rule_leaves_large_but_bounded_losses_alone():
    from bilevel_ray.runtime.local.history import HistoryRecorder, exploded

    assert not exploded(-0.8, 9e11) and exploded(-0.8, 2e12) and exploded(1e3, -2e15)
    recorder = HistoryRecorder("pbgd_free", 1)
    recorder.record(1, {"upper/loss": 1e3, "lower/loss": 0.0})
    recorder.record(2, {"upper/loss": 1e14, "lower/loss": 5e11})  # 1e11 times, not 1e12
    with pytest.raises(br.DivergenceError, match=r"step 3: lower/loss grew from 0 to 2e\+12"):
        recorder.record(3, {"upper/loss": 1.0, "lower/loss": 2e12})
