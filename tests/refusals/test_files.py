"""Refusals of what is read back from files: checkpoints, weights files, settings and schedules
serialised as dicts (JSON), solver states, and the result files ``report`` reads.

A checkpoint that cannot be read, is not ours, was written with other settings or another seed,
or belongs to another run (other names, shapes, dtypes, fewer steps), is refused before the
first step with a message that says what to do; so is a solver-state dict that is not one. A
weights file that is not only tensors is not unpickled. Settings and schedules round-trip
through ``to_dict`` / ``from_dict``; a user-written schedule, which cannot be saved, is refused
where the settings are saved. ``report`` refuses history and trial files it cannot use, and
shows no control characters from them.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from llama_files import save_code_weights, save_truncated_weights

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.problems.toys import NegativeToy
from bilevel_ray.runtime.local.checkpoint import CHECKPOINT_KEYS
from bilevel_ray.runtime.local.output_files import previous_path

from .catalogue import (
    CKPT,
    GOOD_HISTORY,
    GOOD_TRIALS,
    NOT_REGULAR,
    api,
    cli,
    factory,
    fifo_at,
    needs_peft,
    params,
    report_folder,
    run_case,
    trained,
)
from .support import (
    Quad,
    assert_refused_before_start,
    assert_train_refused,
    negative_toy,
    solve,
    solve_args,
    t64,
)

S = br.schedules


# --- settings and schedules read back (to_dict / from_dict) -------------------------------------


@pytest.mark.parametrize(
    ("d", "match"),
    [
        (
            {"lr": 0.1, "gama": 1.0},
            r"^unknown solver setting\(s\) \['gama', 'lr'\]; the allowed ones are: method, lr_x",
        ),
        (
            {"lr_x": {"kind": "cosine"}},
            r"^lr_x=\{'kind': 'cosine'\}: 'kind' must be one of \['constant', 'inverse_power', "
            r"'linear', 'piecewise_constant'\]",
        ),
        (
            {"gamma": {"kind": "linear", "init_value": 1.0}},
            r"^gamma=\{'kind': 'linear', 'init_value': 1\.0\}: wrong fields for a linear "
            r"schedule \(.*end_value",
        ),
        ([("lr_x", 0.1)], r"^solver settings must be a dict, got list$"),
        ("lr_x=0.1", r"^solver settings must be a dict, got str$"),
    ],
)
def test_solver_config_from_dict_refuses(d, match):
    with pytest.raises(br.ConfigError, match=match):
        br.SolverConfig.from_dict(d)


def test_solver_config_from_dict_round_trips():
    """The counterpart of the refusals above: to_dict's output (dict schedules, lists for
    tuples) is accepted and rebuilt into the same settings."""
    config = br.SolverConfig(
        method="pbgd",
        gamma=br.schedules.pbgd_ramp(1.0, 10.0, 5),
        optimizer=("adam", "sgd"),
        betas=(0.8, 0.9),
        momentum=0.5,
    )
    d = config.to_dict()
    assert d["gamma"]["kind"] == "linear" and d["optimizer"] == ["adam", "sgd"]
    assert br.SolverConfig.from_dict(d) == config


def test_solver_config_to_dict_refuses_user_schedule():
    config = br.SolverConfig(lr_x=lambda t: 0.1)
    with pytest.raises(
        br.ConfigError, match=r"^lr_x=<function .*>: a user-written schedule cannot"
    ):
        config.to_dict()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: S.to_dict(lambda t: 1.0),
            r"^schedule <function .*>: only built-in schedules \(constant, linear, "
            r"inverse_power, piecewise_constant\) and numbers can be serialised",
        ),
        (
            lambda: S.from_dict({"kind": "cosine"}),
            r"^schedule=\{'kind': 'cosine'\}: 'kind' must be one of \['constant', "
            r"'inverse_power', 'linear', 'piecewise_constant'\]",
        ),
        (
            lambda: S.from_dict({"value": 1.0}),
            r"^schedule=\{'value': 1\.0\}: 'kind' must be one of",
        ),
        (
            lambda: S.from_dict({"kind": "constant", "value": 1.0, "scale": 2.0}, name="gamma"),
            r"^gamma=\{'kind': 'constant', 'value': 1\.0, 'scale': 2\.0\}: wrong fields for a "
            r"constant schedule \(.*'scale'",
        ),
        (
            lambda: S.from_dict([("kind", "constant"), ("value", 1.0)], name="lr_x"),
            r"^lr_x=\[\('kind', 'constant'\), \('value', 1\.0\)\]: 'kind' must be one of",
        ),
    ],
)
def test_schedules_refuse_what_they_cannot_serialise_or_read_back(build, match):
    with pytest.raises(br.ConfigError, match=match):
        build()


def test_an_unhashable_schedule_kind_is_a_config_error():
    with pytest.raises(br.ConfigError):
        br.SolverConfig.from_dict({"lr_x": {"kind": ["linear"]}})


def test_solve_accepts_dict_schedule():
    """A dict schedule (to_dict's form) is rebuilt into the schedule it describes."""
    config = br.SolverConfig(lr_x={"kind": "constant", "value": 0.05})
    assert config.lr_x == br.schedules.constant(0.05)
    result = br.solve(**solve_args(lr_x={"kind": "constant", "value": 0.05}))
    assert result.config["lr_x"] == {"kind": "constant", "value": 0.05}


# --- settings that must be saved: a user-written schedule cannot be -----------------------------


def test_solve_refuses_user_callable_lr_with_a_checkpoint(tmp_path):
    """A checkpoint stores the settings, so an unserialisable one is refused before step 0 (it
    used to fail at the first save)."""
    path = tmp_path / "ckpt.pt"
    assert_refused_before_start(
        r"^lr_x=<function .*>: a user-written schedule cannot be saved with the settings "
        r"\(checkpoints, Tune\); use a br\.schedules one$",
        lr_x=lambda t: 0.05,
        checkpoint_path=path,
        checkpoint_every=1,
    )
    assert not path.exists()


def test_unserialisable_setting_refusal_names_the_setting(tmp_path):
    with pytest.raises(br.ConfigError) as info:
        br.solve(
            **solve_args(lr_x=lambda t: 0.05, checkpoint_path=tmp_path / "c.pt", checkpoint_every=1)
        )
    assert str(info.value).startswith("lr_x=") and "checkpoint" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        # the solver settings must be serialisable (workers rebuild them)
        (
            {"lr_x": lambda t: 0.1},
            r"^lr_x=<function .*>: a user-written schedule cannot be saved with the settings",
        ),
    ],
)
def test_train_refuses_unserialisable_settings_before_any_worker_starts(
    tmp_path, no_ray, overrides, match
):
    assert_train_refused(tmp_path, overrides, match)


# --- br.state_from_dict (solvers/base.py) ------------------------------------------------------

_STATE = {"step": 0, "x": {}, "y": {}, "opt": {}, "extra": {}}


@pytest.mark.parametrize(
    ("d", "match"),
    [
        (
            [1, 2],
            r"^not a solver state: expected the keys \['extra', 'opt', 'step', 'x', 'y'\], got "
            r"list; load a file written by state_to_dict",
        ),
        ({"step": 0, "x": {}}, r"""^not a solver state: .*, got \["'step'", "'x'"\];"""),
        (
            {**_STATE, "rng": None},
            r"""got \["'extra'", "'opt'", "'rng'", "'step'", "'x'", "'y'"\]""",
        ),
        # keys of mixed types are listed too (by repr), not a TypeError from sorting them
        ({1: 0, "step": 0}, r"""got \["'step'", '1'\]; load a file written by state_to_dict"""),
        ({**_STATE, "step": -1}, r"^solver state step=-1: must be an integer >= 0$"),
        ({**_STATE, "step": 1.0}, r"^solver state step=1\.0: must be an integer >= 0$"),
        ({**_STATE, "step": True}, r"^solver state step=True: must be an integer >= 0$"),
    ],
)
def test_state_from_dict_refuses(d, match):
    with pytest.raises(br.ConfigError, match=match):
        br.state_from_dict(d)


def test_state_round_trips_through_state_from_dict():
    """The counterpart of test_state_from_dict_refuses: state_to_dict's output is accepted."""
    problem, x0, y0 = negative_toy()
    solver = br.SolverConfig(method="f2sa").build(problem)
    state = solver.init(x0, y0)
    assert br.state_from_dict(br.state_to_dict(state)) == state


# --- resuming from a checkpoint (runtime/local/checkpoint.py, runtime/local/solve.py) -----------


def _checkpointed_run(path: Path, **overrides):
    """A run's checkpoint at ``path``, alone: without the previous one a bad file has no
    fallback (tests/test_reliability.py covers the fallback)."""
    result = br.solve(**solve_args(checkpoint_path=path, checkpoint_every=1, **overrides))
    previous_path(path).unlink(missing_ok=True)
    return result


def _truncated(path: Path) -> None:
    _checkpointed_run(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edited(edit):
    """A writer: a genuine checkpoint (written with lr_x=0.02), then ``edit(payload)``."""

    def write(path: Path) -> None:
        _checkpointed_run(path, lr_x=0.02)
        payload = torch.load(path, weights_only=True)
        edit(payload)
        torch.save(payload, path)

    return write


_NOT_OURS = r"^checkpoint '.*ckpt\.pt' is not a bilevel_ray checkpoint \(missing "


@pytest.mark.parametrize(
    ("write", "match"),
    [
        (
            lambda p: p.write_bytes(b"not a checkpoint"),
            # torch's own text is left out: it may advise weights_only=False (running code).
            r"^checkpoint '.*ckpt\.pt' cannot be read \(\w+\): it is truncated, corrupted or not "
            r"a bilevel_ray checkpoint\. Delete it to start afresh\.$",
        ),
        (_truncated, r"^checkpoint '.*ckpt\.pt' cannot be read \(\w+\): it is truncated"),
        (
            lambda p: torch.save({"weights": torch.zeros(1)}, p),
            _NOT_OURS + r"\['config', 'elapsed_s', 'history', 'rng', 'seed', 'state'\]\); delete "
            r"it to start afresh$",
        ),
        (
            lambda p: torch.save({"state": {}}, p),
            _NOT_OURS + r"\['config', 'elapsed_s', 'history', 'rng', 'seed'\]\)",
        ),
        (lambda p: torch.save([1, 2], p), _NOT_OURS + r"everything: not a dict\); delete it"),
        *[
            (_edited(lambda d, k=key: d.pop(k)), _NOT_OURS + rf"\['{key}'\]\)")
            for key in CHECKPOINT_KEYS
        ],
        (
            lambda p: _checkpointed_run(p, lr_x=0.01),
            r"^checkpoint '.*ckpt\.pt' was written with other solver settings \(\{.*'lr_x': "
            r"0\.01.*\}\); resume with the same settings, or start a new run \(another "
            r"checkpoint_path, or another name with br\.train\)$",
        ),
        # the seed of the data stream is checked too (and first)
        (
            lambda p: _checkpointed_run(p, lr_x=0.02, seed=1),
            r"^checkpoint '.*ckpt\.pt' was written with seed=1, not seed=0: the data stream would "
            r"differ; resume with the same seed, or start a new run$",
        ),
        (
            lambda p: _checkpointed_run(p, lr_x=0.01, seed=3),
            r"^checkpoint '.*ckpt\.pt' was written with seed=3, not seed=0",
        ),
        (
            _edited(lambda d: d["state"].pop("opt")),
            r"""^not a solver state: expected the keys \[.*\], got \["'extra'", "'step'", """,
        ),
    ],
)
def test_resume_refuses_bad_checkpoint(tmp_path, write, match):
    path = tmp_path / "ckpt.pt"
    write(path)
    assert_refused_before_start(
        match, checkpoint_path=path, checkpoint_every=1, resume=True, lr_x=0.02
    )


def test_resume_with_same_settings_works(tmp_path):
    """The counterpart of the settings mismatch above: the same settings resume."""
    path = tmp_path / "ckpt.pt"
    _checkpointed_run(path, lr_x=0.02, steps=2)
    result = _checkpointed_run(path, lr_x=0.02, steps=4, resume=True)
    assert result.state.step == 4


def test_resume_with_same_seed_works(tmp_path):
    """The counterpart of the seed mismatch above: the same (non-default) seed resumes."""
    path = tmp_path / "ckpt.pt"
    _checkpointed_run(path, seed=7, steps=2)
    result = _checkpointed_run(path, seed=7, steps=4, resume=True)
    assert result.state.step == 4 and result.history["step"].to_pylist() == [1, 2, 3, 4]


def test_incomplete_checkpoint_is_reported_as_such(tmp_path):
    """A dict with a 'state' entry but not the other keys is not taken for a checkpoint written
    with other settings; the missing keys are named."""
    path = tmp_path / "ckpt.pt"
    torch.save({"state": {}}, path)
    with pytest.raises(
        br.ConfigError,
        match=r"^checkpoint '.*ckpt\.pt' is not a bilevel_ray checkpoint \(missing \['config', "
        r"'elapsed_s', 'history', 'rng', 'seed'\]\); delete it to start afresh$",
    ):
        br.solve(**solve_args(checkpoint_path=path, checkpoint_every=1, resume=True))


# --- reading results: report -------------------------------------------------------------------


def test_report_shows_no_control_characters(tmp_path):
    folder = tmp_path / "rep"
    folder.mkdir()
    trials = {**GOOD_TRIALS, "trial_id": ["\x1b[2J\x1b]0;owned\x07a", "b"]}
    history = {**GOOD_HISTORY, "trial_id": trials["trial_id"]}
    pq.write_table(pa.table(trials), folder / "trials.parquet")
    pq.write_table(pa.table(history), folder / "history.parquet")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", str(folder)]) == 0
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue()
    assert "?[2J" in out.getvalue()


# --- the catalogue's cases ---------------------------------------------------------------------

RESUME_R = "train regression --workers 1 --steps 4 --report-every 1 --checkpoint-every 1 "
RESUME_R += "--out {tmp}/runs --name r"
TINY_PEFT = {"vocab": 16, "n_pref": 8, "n_sft": 8, "n_eval": 4, "batch": 4}


def trained_run(tmp: Path) -> None:
    """A one-worker run (in this process) with a checkpoint in tmp/runs/r."""
    argv = ["train", "regression", "--workers", "1", "--steps", "2", "--report-every", "1"]
    argv += ["--checkpoint-every", "1", "--out", str(tmp / "runs"), "--name", "r", "--quiet"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0


def trained_quadratic(tmp: Path) -> None:
    argv = ["train", "quadratic", "--config", "dim_x=2", "--config", "dim_y=2", "--workers", "1"]
    argv += [
        "--steps",
        "2",
        "--report-every",
        "1",
        "--checkpoint-every",
        "1",
        "--out",
        str(tmp / "runs"),
        "--name",
        "r",
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*argv, "--quiet"]) == 0


def crafted(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """A loadable checkpoint (a real one, then ``change``d)."""

    def setup(tmp: Path) -> None:
        trained(tmp)
        payload = torch.load(tmp / CKPT, weights_only=True)
        change(payload)
        torch.save(payload, tmp / CKPT)
        (tmp / (CKPT + ".prev")).unlink(missing_ok=True)

    return setup


def resume(**overrides: Any) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        args = {"checkpoint_path": tmp / CKPT, "checkpoint_every": 1, "resume": True, "steps": 4}
        return solve(**{**args, **overrides})

    return run


def malicious_model(tmp: Path) -> str | None:
    """tmp/model: a saved tiny Llama whose pytorch_model.bin is a pickle that names a function
    (``print``): torch.load(weights_only=True) refuses it, and it must stay refused."""
    if needs_peft():
        return needs_peft()
    save_code_weights(tmp / "model", "this ran code from the file")
    return None


def truncated_model(tmp: Path) -> str | None:
    """tmp/model: a saved config and a pytorch_model.bin cut in half (a copy cut short)."""
    if needs_peft():
        return needs_peft()
    save_truncated_weights(tmp / "model")
    return None


def sweep_folder(trials: dict[str, list], history: dict[str, list]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        folder = tmp / "rep"
        folder.mkdir()
        pq.write_table(pa.table(trials), folder / "trials.parquet")
        pq.write_table(pa.table(history), folder / "history.parquet")

    return setup


def _no_columns(tmp: Path) -> None:
    (tmp / "rep").mkdir()
    pq.write_table(pa.table({}), tmp / "rep" / "history.parquet")


def _foreign(tmp: Path) -> None:
    (tmp / "rep").mkdir()
    pq.write_table(pa.table({"a": [1, 2], "b": ["u", "v"]}), tmp / "rep" / "history.parquet")


TUNE_S = "tune quadratic --samples 2 --steps 20 --scheduler fifo --out {tmp}/runs --name s --quiet"


def _planted_tune_state(tmp: Path) -> None:
    """A sweep folder as an interrupted sweep leaves it, whose ``tuner.pkl`` someone else
    wrote: a pickle that runs a command when Tune loads it."""
    import pickle

    with contextlib.suppress(AssertionError):  # the first call stops where it reaches Ray
        main(TUNE_S.format(tmp=tmp).split())
    sweep = tmp / "runs" / "s"
    assert (sweep / "sweep.json").is_file()
    (sweep / "tuner.pkl").write_bytes(pickle.dumps(print))  # any callable: code to run
    (sweep / "experiment_state-2026-12-06.json").write_text('{"trial_data": []}')


CASES = [
    # --- checkpoints ------------------------------------------------------------------------
    api(
        "file-corrupt-checkpoint",
        "config file",
        "resume from a checkpoint of 256 random bytes",
        lambda tmp: solve(checkpoint_path=tmp / "run" / "ckpt.pt", checkpoint_every=1, resume=True),
        r"^checkpoint '.*ckpt\.pt' cannot be read \(\w+\): it is truncated, corrupted or not a "
        r"bilevel_ray checkpoint\. Delete it to start afresh\.$",
        writes=("run",),
    ),
    cli(
        "file-checkpoint-other-settings",
        "config file",
        "train resumes a run with another --set lr_x",
        RESUME_R + " --set lr_x=0.5",
        match=r"^error: run '.*r' was started with other settings or data, and continuing it "
        r"would change its trajectory: solver\.lr_x: 0\.02 -> 0\.5\. Use a new --name",
        writes=("runs",),
        setup=trained_run,
    ),
    cli(
        "file-checkpoint-other-seed",
        "config file",
        "train resumes a run with another --seed",
        RESUME_R + " --seed 3",
        match=r"^error: run '.*r' was started with other settings or data, and continuing it "
        r"would change its trajectory: run\.seed: 0 -> 3\. Use a new --name \(name=\.\.\.\) "
        r"for a run with these settings, or rerun the run's own command with only --steps",
        writes=("runs",),
        setup=trained_run,
    ),
    # a checkpoint of another run: names, shapes, dtypes, steps
    api(
        "resume-other-names",
        "config file",
        "resume with x0 named 'z' where the checkpoint's is 'x'",
        resume(
            problem=Quad(
                upper=lambda x, y: ((x["z"] - 1) ** 2).sum() + ((y["y"] - x["z"]) ** 2).sum(),
                lower=lambda x, y: ((y["y"] - x["z"]) ** 2).sum(),
            ),
            x0={"z": t64(2.0)},
        ),
        r"^checkpoint '.*c\.pt' belongs to another run: x names \['x'\] in the checkpoint, "
        r"\['z'\] now\. Resume with the same problem",
        writes=("ck",),
        setup=trained,
    ),
    api(
        "resume-other-shape",
        "config file",
        "resume with x0['x'] of shape (2,) where the checkpoint's is (1,)",
        resume(x0={"x": t64(2.0, 1.0)}, y0={"y": t64(0.0, 0.0)}),
        r"^checkpoint '.*' belongs to another run: x\['x'\] is \(1,\) torch\.float64 in the "
        r"checkpoint, \(2,\) torch\.float64 now; y\['y'\] is \(1,\) .*\. Resume with the same "
        r"problem",
        writes=("ck",),
        setup=trained,
    ),
    api(
        "resume-other-dtype",
        "config file",
        "resume with float32 x0 / y0 where the checkpoint's are float64",
        resume(x0={"x": torch.tensor([2.0])}, y0={"y": torch.tensor([0.0])}),
        r"^checkpoint '.*' belongs to another run: x\['x'\] is \(1,\) torch\.float64 in the "
        r"checkpoint, \(1,\) torch\.float32 now",
        writes=("ck",),
        setup=trained,
    ),
    api(
        "resume-fewer-steps",
        "config file",
        "resume with steps=1 from a checkpoint at step 2",
        resume(steps=1),
        r"^checkpoint '.*' belongs to another run: it is at step 2, past steps=1\. Resume with "
        r"the same problem and steps >= the checkpoint's step",
        writes=("ck",),
        setup=trained,
    ),
    api(
        "resume-fifo",
        "config file",
        "resume from a checkpoint that is a FIFO (hung forever)",
        resume(),
        r"^checkpoint_path '.*c\.pt' " + NOT_REGULAR,
        writes=("ck",),
        setup=fifo_at(CKPT),
    ),
    api(
        "resume-history-not-rows",
        "config file",
        "resume from a loadable checkpoint whose history is [1, 2]",
        resume(),
        r"^checkpoint '.*' belongs to another run: its history is not a list of rows\. Resume "
        r"with the same problem",
        writes=("ck",),
        setup=crafted(lambda p: p.update(history=[1, 2])),
    ),
    api(
        "resume-history-a-string",
        "config file",
        "resume from a loadable checkpoint whose history is a string",
        resume(),
        r"^checkpoint '.*' belongs to another run: its history is not a list of rows\.",
        writes=("ck",),
        setup=crafted(lambda p: p.update(history="rows")),
    ),
    api(
        "resume-x-not-dict",
        "config file",
        "resume from a loadable checkpoint whose state x is a bare tensor",
        resume(),
        r"^checkpoint '.*' belongs to another run: its x is not a dict of tensors\.",
        writes=("ck",),
        setup=crafted(lambda p: p["state"].update(x=t64(1.0))),
    ),
    api(
        "resume-extra-name",
        "config file",
        "resume with an extra tensor in y0",
        resume(y0={"y": t64(0.0), "y2": t64(0.0)}),
        r"^checkpoint '.*' belongs to another run: y names \['y'\] in the checkpoint, "
        r"\['y', 'y2'\] now",
        writes=("ck",),
        setup=trained,
    ),
    cli(
        "train-resume-other-config",
        "CLI",
        "train resumes runs/r with another --config dim_x",
        "train quadratic --config dim_x=3 --config dim_y=2 --workers 1 --steps 4 --report-every 1 "
        "--checkpoint-every 1 --out {tmp}/runs --name r --quiet",
        r"^error: run '.*r' was started with other settings or data, .*: problem config "
        r"dim_x: 2 -> 3; data \(x0 differ: sha256 .*\)\. Use a new --name",
        writes=("runs",),
        setup=trained_quadratic,
    ),
    # --- a weights file that is not only tensors, or is cut short ----------------------------
    api(
        "peft-malicious-pytorch-model-bin",
        "data",
        "peft-dpo-sft model=DIR whose pytorch_model.bin pickles a function (print)",
        lambda tmp: factory("peft-dpo-sft", model=str(tmp / "model"), **TINY_PEFT)(tmp),
        r"^problem 'peft-dpo-sft': model='.*model': pytorch_model\.bin holds objects other than "
        r"tensors \(it names [\w.]*print\), so it was not loaded: unpickling it could run "
        r"code\. Give "
        r"a model saved as safetensors \(model\.save_pretrained\(dir\) writes "
        r"model\.safetensors\), or re-save the weights as a plain state dict: "
        r"torch\.save\(model\.state_dict\(\), 'pytorch_model\.bin'\)$",
        writes=("model",),
        setup=malicious_model,
    ),
    api(
        "peft-truncated-pytorch-model-bin",
        "data",
        "peft-dpo-sft model=DIR whose pytorch_model.bin is cut short",
        lambda tmp: factory("peft-dpo-sft", model=str(tmp / "model"), **TINY_PEFT)(tmp),
        r"^problem 'peft-dpo-sft': cannot load model='.*model': pytorch_model\.bin cannot be "
        r"read \(.*\); it is truncated or corrupted: save the model again with "
        r"model\.save_pretrained\(dir\)$",
        writes=("model",),
        setup=truncated_model,
    ),
    # --- result files report reads ----------------------------------------------------------
    cli(
        "file-report-no-runs",
        "config file",
        "report on a folder without runs",
        "report {tmp}/empty_dir",
        match=r"^error: '.*empty_dir' holds no history\.parquet: give a folder written by "
        r"'bilevel-ray tune --out', 'solve --out' or 'train --out'$",
        writes=("empty_dir",),
    ),
    cli(
        "file-report-corrupt-history",
        "config file",
        "report on a folder whose history.parquet is random bytes",
        "report {tmp}/bad_report",
        match=r"^error: .*history\.parquet.*(cannot be read|cannot read|corrupted|not a Parquet)",
        writes=("bad_report",),
    ),
    cli(
        "report-zero-rows",
        "config file",
        "report on a history.parquet with zero rows",
        "report {tmp}/rep",
        r"^error: '.*history\.parquet' holds no rows: the run logged nothing; rerun it with a "
        r"smaller --report-every$",
        writes=("rep",),
        setup=report_folder(rows=0),
    ),
    cli(
        "report-no-columns",
        "config file",
        "report on a history.parquet with no columns",
        "report {tmp}/rep",
        r"^error: '.*history\.parquet' lacks the column\(s\) \['step', 'upper/loss', "
        r"'time/elapsed_s'\]: it was not written by bilevel-ray",
        writes=("rep",),
        setup=_no_columns,
    ),
    cli(
        "report-foreign-parquet",
        "config file",
        "report on a foreign history.parquet (columns a, b)",
        "report {tmp}/rep",
        r"^error: '.*history\.parquet' lacks the column\(s\) \['step', 'upper/loss', "
        r"'time/elapsed_s'\]: .*give a folder written by 'bilevel-ray tune/solve/train --out'$",
        writes=("rep",),
        setup=_foreign,
    ),
    cli(
        "report-no-elapsed",
        "config file",
        "report on a run's history without time/elapsed_s",
        "report {tmp}/rep",
        r"^error: '.*history\.parquet' lacks the column\(s\) \['time/elapsed_s'\]",
        writes=("rep",),
        setup=report_folder(drop=("time/elapsed_s",)),
    ),
    cli(
        "report-trials-no-trial-id",
        "config file",
        "report on a sweep whose trials.parquet has no trial_id",
        "report {tmp}/rep",
        r"^error: '.*trials\.parquet' lacks the column\(s\) \['trial_id'\]",
        writes=("rep",),
        setup=sweep_folder({"status": ["completed"]}, GOOD_HISTORY),
    ),
    cli(
        "report-history-no-trial-id",
        "config file",
        "report on a sweep whose history.parquet has no trial_id",
        "report {tmp}/rep",
        r"^error: '.*history\.parquet' lacks the column\(s\) \['trial_id'\]",
        writes=("rep",),
        setup=sweep_folder(GOOD_TRIALS, {"step": [1], "eval/upper_loss": [1.0]}),
    ),
    cli(
        "report-trials-zero-rows",
        "config file",
        "report on a sweep whose trials.parquet has zero rows",
        "report {tmp}/rep",
        r"^error: '.*trials\.parquet' holds no rows",
        writes=("rep",),
        setup=sweep_folder({"trial_id": pa.array([], pa.string())}, GOOD_HISTORY),
    ),
    cli(
        "report-other-sweeps",
        "config file",
        "report on trials.parquet and history.parquet of different sweeps",
        "report {tmp}/rep",
        r"^error: '.*trials\.parquet' names no trial of history\.parquet: the two files come "
        r"from different sweeps",
        writes=("rep",),
        setup=sweep_folder({**GOOD_TRIALS, "trial_id": ["c", "d"]}, GOOD_HISTORY),
    ),
    # --- Tune's pickled state --------------------------------------------------------------
    cli(
        "tune-resume-planted-state",
        "config file",
        "tune --resume on a sweep whose tuner.pkl someone else wrote",
        TUNE_S + " --resume",
        r"^error: sweep folder '.*s': Tune's saved state \(experiment_state-2026-12-06\.json, "
        r"tuner\.pkl\) was not sealed by a sweep of this account \(it has no state_seal\.json\); "
        r"resuming unpickles it, which runs any code it holds\. .*--trust-state",
        writes=("runs",),
        setup=_planted_tune_state,
    ),
    api(
        "resume-flatness-method-altered",
        "config file",
        "resume from a checkpoint whose flatness.method says alt_pbgd, its state pbgd_free's "
        "(was KeyError 'y_g' at the first step)",
        resume(),
        r"^checkpoint '.*c\.pt' is not a bilevel_ray checkpoint \(its solver state is not what "
        r"alt_pbgd keeps: state\.opt holds \['x', 'y'\], not \['x', 'y', 'y_g'\]; "
        r"state\.extra holds \[\], not \['y_g'\]\): it was written by something else or "
        r"altered; delete it",
        writes=("ck",),
        setup=crafted(lambda p: p["flatness"].update(method="alt_pbgd")),
    ),
    api(
        "resume-opt-a-string",
        "config file",
        "resume from a checkpoint whose state.opt is 'garbage' (was TypeError mid-run)",
        resume(),
        r"^checkpoint '.*c\.pt' is not a bilevel_ray checkpoint \(its solver state is not what "
        r"pbgd_free keeps: state\.opt is a str, not a dict\)",
        writes=("ck",),
        setup=crafted(lambda p: p["state"].update(opt="garbage")),
    ),
    api(
        "resume-opt-stray-buffer",
        "config file",
        "resume a plain-sgd run whose state.opt.x holds a momentum buffer",
        resume(),
        r"^checkpoint '.*c\.pt' is not a bilevel_ray checkpoint \(its solver state is not what "
        r"pbgd_free keeps: state\.opt\['x'\] holds \['count', 'momentum'\], not \[\]\)",
        writes=("ck",),
        setup=crafted(
            lambda p: p["state"]["opt"].update(x={"count": 1, "momentum": {"x": torch.zeros(5)}})
        ),
    ),
    api(
        "resume-flatness-not-a-method",
        "config file",
        "resume from a checkpoint whose flatness.method is 'nope'",
        resume(),
        r"^checkpoint '.*c\.pt' is not a bilevel_ray checkpoint \(flatness\.method='nope' is no "
        r"method\)",
        writes=("ck",),
        setup=crafted(lambda p: p["flatness"].update(method="nope")),
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case, tmp_path, request, no_compare_ray):
    run_case(case, tmp_path, request, CASES)


# --- round three (a hidden catalogue's classes, closed) -------------------------------


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
