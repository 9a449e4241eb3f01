"""The entry points with their trackers, read back from a real MLflow store (SQLite) with
MLflow's client and from TensorBoard's own reader: ``solve`` on the command line (in this
process), ``br.solve``'s ends (a refusal leaves no run, a divergence a failed one), a 3-trial
``br.tune`` sweep with a user's Tune callback, a 2-worker ``br.train`` and a ``br.compare``."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.tracking.mlflow_runs import PARENT_TAG
from bilevel_ray.tracking.rows import STATUS_TAG

from .readers import (
    MLFLOW_EXTRA,
    TENSORBOARD_EXTRA,
    artifact_paths,
    metric_points,
    same_points,
    scalars,
)

pytest.importorskip("mlflow", reason=MLFLOW_EXTRA)
pytest.importorskip("tensorboard", reason=TENSORBOARD_EXTRA)

SOLVE_STEPS, SOLVE_EVERY = 40, 5


def _runs(uri: str, experiment: str = "bilevel_ray") -> tuple[object, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client, ([] if found is None else client.search_runs([found.experiment_id]))


def _history_points(history: list[dict], key: str = "upper/loss") -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in history]


def test_cli_solve_logs_every_row_its_settings_and_its_files(sqlite_uri, tmp_path, capsys):
    out, tb = tmp_path / "out", tmp_path / "tb"
    code = main(
        [
            "solve", "quadratic", "--steps", str(SOLVE_STEPS), "--report-every", str(SOLVE_EVERY),
            "--set", "gamma=20", "--out", str(out), "--quiet",
            "--mlflow", sqlite_uri, "--tensorboard", str(tb), "--experiment", "cli",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr()
    history = pq.read_table(out / "history.parquet").to_pylist()
    assert len(history) == SOLVE_STEPS // SOLVE_EVERY
    client, runs = _runs(sqlite_uri, "cli")
    (run,) = runs
    params = run.data.params
    assert params["method"] == "pbgd_free" and params["steps"] == str(SOLVE_STEPS)
    assert params["seed"] == "0" and params["solver/gamma"] == "20.0"
    assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "completed"
    expected = _history_points(history)
    # Every history row, no more: the count of points is the count of rows.
    assert metric_points(client, run.info.run_id, "upper/loss") == expected
    assert len(metric_points(client, run.info.run_id, "lower/loss")) == len(history)
    assert {"manifest.json", "history.parquet", "run.json"} <= artifact_paths(
        client, run.info.run_id
    )
    # TensorBoard: one point per row, in {tb}/{experiment}/{run name}.
    (logdir,) = (tb / "cli").iterdir()
    assert logdir.name == run.info.run_name
    assert same_points(scalars(logdir)["upper/loss"], expected)


def test_a_refused_solve_leaves_no_run_and_a_diverged_one_a_failed_run(sqlite_uri, tmp_path):
    spec = br.problems.build_spec("quadratic", {})
    with pytest.raises(br.ConfigError, match="lr_x"):
        br.solve(spec, steps=5, lr_x=-1.0, mlflow=sqlite_uri)
    assert _runs(sqlite_uri)[1] == []  # refused before its first step: nothing to track

    class Exploding:
        def upper_loss(self, x, y, batch):
            return (x["x"] ** 2).sum() + (y["y"] ** 2).sum()

        def lower_loss(self, x, y, batch):
            return -((y["y"] - x["x"]) ** 2).sum() * 1e3  # unbounded below: y runs off

    x0, y0 = {"x": torch.ones(1, dtype=torch.float64)}, {"y": torch.zeros(1, dtype=torch.float64)}
    with pytest.raises(br.DivergenceError):
        br.solve(Exploding(), x0, y0, steps=400, report_every=1, lr_y=1.0, mlflow=sqlite_uri)
    client, runs = _runs(sqlite_uri)
    (run,) = runs
    assert run.info.status == "FAILED" and run.data.tags[STATUS_TAG] == "diverged"
    assert metric_points(client, run.info.run_id, "upper/loss")  # the rows before it


# --- Ray: a sweep, a worker group, a comparison ---------------------------------------------------


class _CountResults:
    """A user's Tune callback: counts the results each trial reports."""

    def __new__(cls):
        from ray import tune

        class Counter(tune.Callback):
            def __init__(self):
                self.results: dict[str, int] = {}

            def on_trial_result(self, iteration, trials, trial, result, **info):
                self.results[trial.trial_id] = self.results.get(trial.trial_id, 0) + 1

        return Counter()


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_logs_a_parent_run_and_every_row_of_three_trials(ray_2cpu, sqlite_uri, tmp_path):
    from ray import tune

    counter = _CountResults()
    result = br.tune(
        "toy-negative",
        search_space={"lr_y": tune.grid_search([0.05, 0.1, 0.2])},
        num_samples=1,
        steps=30,
        report_every=5,
        scheduler=None,
        max_concurrent_trials=2,
        storage_path=tmp_path / "sweeps",
        name="swept",
        progress=False,
        mlflow=sqlite_uri,
        tensorboard=tmp_path / "tb",
        experiment="sweep",
        tags={"team": "bilevel"},
        callbacks=[counter],
    )
    assert result.num_trials == 3 and result.best_config is not None
    history = pq.read_table(result.path / "history.parquet").to_pylist()
    client, runs = _runs(sqlite_uri, "sweep")
    (parent,) = [r for r in runs if PARENT_TAG not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert len(runs) == 4 and len(trials) == 3  # the sweep's run and one per trial
    assert parent.info.run_name == "swept" and parent.data.params["num_samples"] == "1"
    assert parent.data.tags["team"] == "bilevel" and parent.info.status == "FINISHED"
    assert {"manifest.json", "trials.parquet", "history.parquet"} <= artifact_paths(
        client, parent.info.run_id
    )
    assert "best/eval/upper_loss" in parent.data.metrics
    by_lr = {float(r.data.params["searched/lr_y"]): r for r in trials}
    assert sorted(by_lr) == [0.05, 0.1, 0.2]
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.tags["team"] == "bilevel"
        assert run.data.params["solver/lr_y"] == run.data.params["searched/lr_y"]
        trial_id = run.data.tags["ray.trial_id"]
        rows = [r for r in history if r["trial_id"] == trial_id]
        assert len(rows) == 30 // 5
        # Every logged row, with the held-out score each row of the history has.
        assert metric_points(client, run.info.run_id, "upper/loss") == _history_points(rows)
        scores = metric_points(client, run.info.run_id, "eval/upper_loss")
        assert scores == _history_points(rows, "eval/upper_loss")
        logdir = tmp_path / "tb" / "sweep" / run.info.run_name
        assert same_points(scalars(logdir)["upper/loss"], _history_points(rows))
    # The user's callback reached Tune: every trial's reports.
    assert len(counter.results) == 3 and all(n >= 1 for n in counter.results.values())


@pytest.mark.slow
@pytest.mark.ray
def test_a_worker_group_logs_one_run_with_every_row(ray_2cpu, sqlite_uri, tmp_path):
    result = br.train(
        "regression",
        problem_config={"n": 200, "batch_size": 25},
        num_workers=2,
        resources_per_worker={"CPU": 0.5},
        steps=20,
        report_every=5,
        storage_path=tmp_path / "runs",
        name="grouped",
        mlflow=sqlite_uri,
        tensorboard=tmp_path / "tb",
    )
    client, runs = _runs(sqlite_uri)
    (run,) = runs  # one run, not one per worker
    assert run.info.run_name == "grouped" and run.info.run_id == result.tracking["mlflow_run_id"]
    assert run.data.params["num_workers"] == "2" and run.data.params["steps"] == "20"
    assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "completed"
    rows = result.history.to_pylist()
    assert len(rows) == 4
    assert metric_points(client, run.info.run_id, "upper/loss") == _history_points(rows)
    assert "manifest.json" in artifact_paths(client, run.info.run_id)
    logdir = tmp_path / "tb" / "bilevel_ray" / "grouped"
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1  # rank 0's only
    assert same_points(scalars(logdir)["upper/loss"], _history_points(rows))


@pytest.mark.slow
@pytest.mark.ray
def test_a_comparison_logs_a_run_per_method_and_seed(ray_2cpu, sqlite_uri, tmp_path):
    result = br.compare(
        "toy-negative",
        methods=["alt_pbgd"],
        budget_s=0.5,
        seeds=2,
        storage_path=str(tmp_path / "out"),
        name="compared",
        progress=False,
        mlflow=sqlite_uri,
    )
    client, runs = _runs(sqlite_uri)
    (parent,) = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert len(children) == 2 and parent.info.run_name == "compared"
    assert {"compare.json", "compare.png", "manifest.json"} <= artifact_paths(
        client, parent.info.run_id
    )
    curves = pq.read_table(result.path / "curves.parquet").to_pylist()
    for run in children:
        seed = int(run.data.params["seed"])
        points = metric_points(client, run.info.run_id, "upper/loss")
        scored = metric_points(client, run.info.run_id, "eval/phi")
        assert len(points) >= len(scored) >= 1  # every row; the scored ones with their phi
        assert scored == [
            (int(c["step"]), float(c["eval/phi"])) for c in curves if c["seed"] == seed
        ]


@pytest.mark.slow
@pytest.mark.ray
def test_runtime_env_is_refused_where_ray_already_runs(ray_2cpu, tmp_path):
    with pytest.raises(br.ConfigError, match=r"^runtime_env: Ray is already initialised in this"):
        br.tune(
            "toy-negative",
            search_space={"gamma": 5.0},
            storage_path=tmp_path / "sweeps",
            steps=5,
            runtime_env={"env_vars": {"A": "1"}},
        )
    assert not (tmp_path / "sweeps").exists()  # refused before the sweep's folder
