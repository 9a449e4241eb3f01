"""Tuning a problem of one's own (issue 14): a user's factory file run from its own folder,
refused before Ray starts when a trial could only fail, trial errors recorded as results, an
honest outcome, and one sweep per folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.runtime.tune.folder import SWEEP_FILE, claim_sweep_folder
from bilevel_ray.runtime.tune.preflight import check_space_values, describe_space, space_values

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_problem.py"


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A user's folder holding their problem file, as the working directory."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "my_problem.py")
    monkeypatch.chdir(folder)
    return folder


TUPLE_EVAL = """
import torch
import bilevel_ray as br
from bilevel_ray.problems import toys


def factory(config):
    spec = toys.negative_toy({})
    return br.ProblemSpec(spec.problem, spec.x0, spec.y0, spec.data, eval_data=(1.0, 2.0))
"""

RAISES_LATER = '''
import torch
import bilevel_ray as br


class Flaky:
    """Its upper loss raises from its 30th call on: after the driver's pre-flight (a handful of
    calls), inside every trial."""

    calls = 0

    def upper_loss(self, x, y, batch):
        Flaky.calls += 1
        if Flaky.calls > 30:
            raise RuntimeError("the user's loss broke")
        return ((x["x"] - 1) ** 2).sum() + (y["y"] ** 2).sum()

    def lower_loss(self, x, y, batch):
        return ((y["y"] - x["x"]) ** 2).sum()


def factory(config):
    with open(config["log"], "a") as log:  # one line per build: a retried trial builds twice
        log.write("built\\n")
    x0 = {"x": torch.zeros(1, dtype=torch.float64)}
    y0 = {"y": torch.zeros(1, dtype=torch.float64)}
    held = br.BilevelBatch(None, None)
    return br.ProblemSpec(Flaky(), x0, y0, eval_data=held, defaults={"steps": 50})
'''


# --- refused before Ray starts --------------------------------------------------------------


def test_hyperclean_is_refused_before_ray_starts(no_ray, tmp_path, capsys):
    code = main(["tune", "hyperclean", "--samples", "2", "--out", str(tmp_path), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "PBGD-Free" in err and "x" in err


def test_a_tuple_eval_data_is_refused_naming_the_field(no_ray, tmp_path, monkeypatch, capsys):
    (tmp_path / "tuple_eval.py").write_text(TUPLE_EVAL)
    monkeypatch.chdir(tmp_path)
    code = main(["tune", "tuple_eval.py:factory", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "ProblemSpec.eval_data is a tuple: it must be br.BilevelBatch(" in err


def test_a_space_that_can_draw_an_invalid_value_is_refused_every_time(no_ray, tmp_path, capsys):
    for _ in range(3):  # not one random sample: the range itself is checked
        code = main(
            [
                "tune",
                "toy-negative",
                "--space",
                'lr_y={"uniform": [-1, 1]}',
                "--out",
                str(tmp_path),
                "--quiet",
            ]
        )
        assert code == 2
        err = capsys.readouterr().err
        assert "search_space lr_y: it can draw -1" in err and "narrow its range" in err


def test_space_values_are_the_bounds_categories_and_grid_values():
    from ray import tune

    assert space_values(tune.loguniform(1e-3, 1.0)) == [1e-3, 1.0]
    assert space_values(tune.randint(1, 4)) == [1, 3]  # randint excludes its upper bound
    assert space_values(tune.choice(["sgd", "adam"])) == ["sgd", "adam"]
    assert space_values(tune.grid_search([1, 2])) == [1, 2]
    assert space_values(0.5) == [0.5]
    check_space_values({"lr_y": tune.loguniform(1e-4, 1e-1)}, "pbgd_free", {})
    with pytest.raises(br.ConfigError, match=r"inner_steps: it can draw 0"):
        check_space_values({"inner_steps": tune.randint(0, 3)}, "pbgd_free", {})
    assert describe_space({"lr_y": tune.loguniform(1e-4, 1e-1), "k": tune.choice([1, 2])}) == {
        "k": {"choice": [1, 2]},
        "lr_y": {"loguniform": [1e-4, 1e-1]},
    }


# --- one folder, one sweep -------------------------------------------------------------------


def test_a_sweep_folder_refuses_another_sweep_and_a_changed_resume(tmp_path):
    settings = {"problem": "quadratic", "num_samples": 8, "steps": 100}
    claim_sweep_folder(tmp_path / "s", settings, resume=False).release()
    assert (tmp_path / "s" / SWEEP_FILE).is_file()
    claim_sweep_folder(tmp_path / "s", settings, resume=True).release()  # the same sweep, resumed
    with pytest.raises(br.ConfigError, match=r"already holds this sweep: pass --resume"):
        claim_sweep_folder(tmp_path / "s", settings, resume=False)
    other = {**settings, "num_samples": 4}
    with pytest.raises(
        br.ConfigError,
        match=r"holds a sweep with other settings \(num_samples: 8 then, 4 now\): cannot "
        r"resume this sweep there; use a new --name",
    ):
        claim_sweep_folder(tmp_path / "s", other, resume=True)
    with pytest.raises(br.ConfigError, match=r"cannot run this sweep there"):
        claim_sweep_folder(tmp_path / "s", other, resume=False)


def test_a_folder_with_an_older_sweeps_results_is_refused(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "trials.parquet").write_bytes(b"")
    with pytest.raises(br.ConfigError, match=r"holds an earlier sweep's results: pass --resume"):
        claim_sweep_folder(tmp_path / "s", {"steps": 1}, resume=False)


def test_the_cli_refuses_a_second_different_sweep_into_one_folder(no_ray, tmp_path, capsys):
    first = ["tune", "toy-negative", "--samples", "4", "--out", str(tmp_path), "--quiet"]
    with pytest.raises(no_ray):  # the first sweep claims its folder, then reaches Ray
        main(first)
    assert main([*first[:3], "8", *first[4:], "--resume"]) == 2
    err = capsys.readouterr().err
    assert "num_samples: 4 then, 8 now" in err


# --- the whole path, on Ray -------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_a_users_file_tunes_from_its_own_folder(ray_2cpu, user_folder, capsys):
    code = main(
        ["tune", "my_problem.py:factory", "--samples", "4", "--max-steps", "50", "--out", "out"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    trials = pq.read_table(user_folder / "out" / "sweep" / "trials.parquet").to_pylist()
    assert len(trials) == 4 and {t["status"] for t in trials} == {"completed"}
    assert "best config:" in out
    history = pq.read_table(user_folder / "out" / "sweep" / "history.parquet")
    assert history.num_rows >= 4 and set(history.column("trial_id").to_pylist()) == {
        t["trial_id"] for t in trials
    }


@pytest.mark.ray
@pytest.mark.slow
def test_trial_errors_are_results_not_retries_and_no_best_config(ray_2cpu, tmp_path, capsys):
    (tmp_path / "flaky.py").write_text(RAISES_LATER)
    log = tmp_path / "built.log"
    code = main(
        [
            "tune",
            str(tmp_path / "flaky.py") + ":factory",
            "--samples",
            "2",
            "--config",
            f"log={log}",
            "--space",
            'lr_y={"choice": [0.1]}',
            "--out",
            str(tmp_path / "out"),
            "--max-failures",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "best config" not in captured.out
    assert "no trial of the sweep completed; 2 of 2 trials failed: RuntimeError: the user's " in (
        captured.err
    )
    trials = pq.read_table(tmp_path / "out" / "sweep" / "trials.parquet").to_pylist()
    assert [t["status"] for t in trials] == ["error", "error"]
    assert {t["error"] for t in trials} == {"RuntimeError: the user's loss broke"}
    # The driver's pre-flight built the problem once, each trial once: no retry.
    assert log.read_text().count("built") == 3
