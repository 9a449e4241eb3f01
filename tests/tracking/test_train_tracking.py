"""A real 2-worker Ray Train group (Train V2's TorchTrainer) with tracking: Ray's setup_mlflow
opens the run on rank 0 only, so the store holds exactly one run with every row, rank 0's, and
TensorBoard one file; the driver opened the run first, and attaches its files after the fit."""

from __future__ import annotations

import pytest

from bilevel_ray.tracking import RowTracker, TrackingSettings, open_experiment
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
pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROWS = 8


@pytest.fixture(autouse=True)
def _worker_fn_by_value():
    """Train workers cannot import this test module: its function travels by value."""
    import sys

    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


def _worker(config):
    """Every rank logs every row (each its own numbers); only rank 0's may reach a tracker."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    tracker = RowTracker(config["settings"], "train", inside_ray=True, run_id=config["run_id"])
    with tracker.start({"lr": config["lr"], "num_workers": 2}):
        for step in range(1, ROWS + 1):
            tracker.log_row({"step": step, "method": "toy", "upper/loss": 100.0 * rank + step})
        assert tracker.active == (rank == 0) and (tracker.run_id is None) == (rank != 0)
        ray.train.report({"step": ROWS})
        tracker.end("completed")


def test_a_worker_group_logs_one_run_from_rank_zero(ray_2cpu, sqlite_uri, tmp_path):
    import ray.train
    from mlflow.tracking import MlflowClient
    from ray.train.torch import TorchTrainer

    settings = open_experiment(
        TrackingSettings(mlflow=sqlite_uri, tensorboard=tmp_path / "tb", experiment="train")
    )
    # The driver opens the run, so that it can attach the run's files once the group is done.
    driver = RowTracker(settings, "train").start({"num_workers": 2})
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"settings": settings, "run_id": driver.run_id, "lr": 0.1},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="train", storage_path=str(tmp_path / "storage")),
    )
    result = trainer.fit()
    assert result.error is None
    (tmp_path / "manifest.json").write_text("{}")
    driver.log_artifact(tmp_path / "manifest.json")
    driver.end("completed")

    client = MlflowClient(settings.mlflow)
    (run,) = client.search_runs([settings.experiment_id])  # exactly one, not one per worker
    assert run.info.run_id == driver.run_id and run.info.run_name == "train"
    assert run.data.params == {"num_workers": "2", "lr": "0.1"}
    expected = [(s, float(s)) for s in range(1, ROWS + 1)]  # rank 0's rows, every one
    assert metric_points(client, run.info.run_id, "upper/loss") == expected
    assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == "completed"
    assert artifact_paths(client, run.info.run_id) == {"manifest.json"}
    logdir = tmp_path / "tb" / "train" / "train"
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1  # rank 0's file only
    assert same_points(scalars(logdir)["upper/loss"], expected)
