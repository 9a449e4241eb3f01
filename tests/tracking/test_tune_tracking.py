"""A real Ray Tune sweep of 3 trials with tracking, read back from a real MLflow store and
TensorBoard's reader: one run per trial, nested under the sweep's, holding every row although
each trial reports to Tune once; and Ray's MLflowLoggerCallback for trials that track nothing."""

from __future__ import annotations

import math

import pytest

from bilevel_ray.tracking import (
    TrackingSettings,
    end_sweep_run,
    open_experiment,
    open_sweep_run,
    sweep_callbacks,
    trial_tracker,
)
from bilevel_ray.tracking.sweep import TRIAL_TAG

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
pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROWS = 6  # rows a trial logs; it reports to Tune once, at its end


@pytest.fixture(autouse=True)
def _trainables_by_value():
    """Trial processes cannot import this test module: its trainables travel by value, as a
    user's script's do."""
    import sys

    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


def _loss(lr: float, step: int) -> float:
    return lr / step


def _tracked_trial(config, settings, parent_run_id):
    """A function trainable that logs every row to its own run and reports once."""
    from ray import tune

    with trial_tracker(settings, parent_run_id, config) as tracker:
        for step in range(1, ROWS + 1):
            tracker.log_row(
                {
                    "step": step,
                    "method": "toy",
                    "upper/loss": _loss(config["lr"], step),
                    "value/loss": math.nan,
                }
            )
        tune.report({"step": ROWS, "upper/loss": _loss(config["lr"], ROWS), "status": "completed"})
        tracker.end("completed")


def _fit(trainable, settings, tmp_path, name, lrs, callbacks):
    from ray import tune

    tuner = tune.Tuner(
        trainable,
        param_space={"lr": tune.grid_search(lrs)},
        # A reused trial process must start each trial's run afresh (Ray's active run ended).
        tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=str(tmp_path / "sweeps"), verbose=0, callbacks=callbacks
        ),
    )
    grid = tuner.fit()
    assert not grid.errors, grid.errors
    return grid


def test_a_sweep_logs_every_row_of_every_trial(ray_2cpu, sqlite_uri, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray import tune

    settings = open_experiment(
        TrackingSettings(mlflow=sqlite_uri, tensorboard=tmp_path / "tb", experiment="sweep")
    )
    parent = open_sweep_run(settings, "sweep", {"num_samples": 3, "method": "toy"})
    trainable = tune.with_parameters(_tracked_trial, settings=settings, parent_run_id=parent.run_id)
    lrs = [0.1, 0.2, 0.3]
    grid = _fit(trainable, settings, tmp_path, "sweep", lrs, sweep_callbacks(settings))
    (tmp_path / "manifest.json").write_text('{"sweep": "sweep"}')
    parent.log_artifact(tmp_path / "manifest.json")
    parent.log_row({"step": ROWS, "best/upper_loss": min(_loss(lr, ROWS) for lr in lrs)})
    assert end_sweep_run(parent, "completed") == []  # every trial ended its own run

    client = MlflowClient(settings.mlflow)
    runs = client.search_runs([settings.experiment_id])
    trials = [r for r in runs if r.info.run_id != parent.run_id]
    assert len(runs) == 4 and len(trials) == 3  # the sweep's run and one per trial, no more
    assert len({r.metrics["pid"] for r in grid}) < 3  # a trial ran in a reused process
    by_lr = {float(r.data.params["lr"]): r for r in trials}
    assert sorted(by_lr) == lrs
    results = {r.config["lr"]: r for r in grid}
    for lr, run in by_lr.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.run_id
        assert run.data.tags[TRIAL_TAG] in {r.metrics["trial_id"] for r in grid}
        assert run.info.status == "FINISHED" and run.data.params == {"lr": str(lr)}
        expected = [(s, _loss(lr, s)) for s in range(1, ROWS + 1)]
        assert metric_points(client, run.info.run_id, "upper/loss") == expected
        assert "value/loss" not in run.data.metrics  # NaN: nothing to draw
        # TensorBoard: every row a point, in {tensorboard}/{experiment}/{trial name}.
        logdir = tmp_path / "tb" / "sweep" / run.info.run_name
        assert same_points(scalars(logdir)["upper/loss"], expected)
        # Tune's own TensorBoard logger, in the trial's folder, has the one report.
        tune_points = scalars(results[lr].path)["ray/tune/upper/loss"]
        assert [s for s, _ in tune_points] == [1]
    assert artifact_paths(client, parent.run_id) == {"manifest.json"}
    assert metric_points(client, parent.run_id, "best/upper_loss") == [(ROWS, _loss(0.1, ROWS))]


def _untracked_trial(config):
    from ray import tune

    for step in (1, 2):
        tune.report({"step": step, "upper/loss": _loss(config["lr"], step)})


def test_trials_that_track_nothing_get_rays_mlflow_logger(ray_2cpu, sqlite_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    settings = open_experiment(TrackingSettings(mlflow=sqlite_uri, experiment="logged"))
    callbacks = sweep_callbacks(settings, trials_track_rows=False)
    _fit(_untracked_trial, settings, tmp_path, "logged", [0.1, 0.2], callbacks)
    client = MlflowClient(settings.mlflow)
    runs = client.search_runs([settings.experiment_id])
    assert sorted(float(r.data.params["lr"]) for r in runs) == [0.1, 0.2]
    for run in runs:
        lr = float(run.data.params["lr"])
        # Every report, at Tune's training iteration; the trial's folder as artifacts.
        points = metric_points(client, run.info.run_id, "upper/loss")
        assert points == [(1, _loss(lr, 1)), (2, _loss(lr, 2))]
        assert "result.json" in artifact_paths(client, run.info.run_id)
