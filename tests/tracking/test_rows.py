"""RowTracker in a process without Ray: every history row reaches MLflow (SQLite and file
stores) and TensorBoard, read back with their own readers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from bilevel_ray.tracking import (
    RowTracker,
    TrackerSink,
    TrackingSettings,
    end_sweep_run,
    open_experiment,
    open_sweep_run,
)
from bilevel_ray.tracking.rows import STATUS_TAG

from .readers import (
    MLFLOW_EXTRA,
    TENSORBOARD_EXTRA,
    artifact_paths,
    metric_points,
    same_points,
    scalars,
)

mlflow = pytest.importorskip("mlflow", reason=MLFLOW_EXTRA)
pytest.importorskip("tensorboard", reason=TENSORBOARD_EXTRA)
from mlflow.tracking import MlflowClient  # noqa: E402


def _row(step: int, **extra) -> dict:
    """A row of the history's fixed schema (NaN where a method has no such quantity)."""
    return {
        "step": step,
        "method": "pbgd_free",
        "upper/loss": 1.0 / step,
        "lower/loss": 2.0 / step,
        "value/loss": math.nan,
        "penalty/gamma": 0.5 * step,
        "penalty/multiplier": math.nan,
        "time/step_s": 0.001,
        "time/elapsed_s": 0.01 * step,
        "time/tokens_per_s": math.nan,
        **extra,
    }


@pytest.fixture
def settings(sqlite_uri, tmp_path):
    return open_experiment(
        TrackingSettings(
            mlflow=sqlite_uri, tensorboard=tmp_path / "tb", experiment="exp", tags={"team": "t"}
        )
    )


@pytest.mark.parametrize("flush_interval_s", [0.0, 3600.0])  # every row sent; all at the end
def test_every_row_reaches_mlflow_and_tensorboard(settings, tmp_path, flush_interval_s):
    steps = [10, 20, 30, 40, 50, 60, 70]
    params = {"lr_x": 0.01, "method": "pbgd_free", "schedule": {"kind": "ramp", "to": 5.0}}
    with RowTracker(settings, "run-1", flush_interval_s=flush_interval_s).start(params) as tracker:
        for step in steps:
            row = _row(step, **{"eval/upper_loss": 3.0 * step, "status": "running"})
            row["diverged"] = True  # not a number to plot
            row["bad"] = math.inf  # would flatten the plot: left out
            tracker.log_row(row)
        (tmp_path / "manifest.json").write_text("{}")
        tracker.log_artifact(tmp_path / "manifest.json")
        pictures = tmp_path / "pictures"
        pictures.mkdir()
        (pictures / "report.png").write_bytes(b"\x89PNG")
        tracker.log_artifact(pictures, "pictures")
    client = MlflowClient(settings.mlflow)
    (run,) = client.search_runs([settings.experiment_id])
    assert run.info.run_id == tracker.run_id and run.info.run_name == "run-1"
    assert run.info.status == "FINISHED"
    assert run.data.params == {
        "lr_x": "0.01",
        "method": "pbgd_free",
        "schedule/kind": "ramp",
        "schedule/to": "5.0",
    }
    assert run.data.tags["team"] == "t"
    expected = {"upper/loss", "lower/loss", "penalty/gamma", "time/step_s", "time/elapsed_s"}
    assert set(run.data.metrics) == expected | {"eval/upper_loss"}  # NaN, inf, text left out
    assert metric_points(client, run.info.run_id, "upper/loss") == [(s, 1.0 / s) for s in steps]
    assert metric_points(client, run.info.run_id, "eval/upper_loss") == [
        (s, 3.0 * s) for s in steps
    ]
    assert artifact_paths(client, run.info.run_id) == {"manifest.json", "pictures/report.png"}
    board = scalars(tracker.logdir)
    assert tracker.logdir == tmp_path / "tb" / "exp" / "run-1"
    assert set(board) == expected | {"eval/upper_loss"}
    assert same_points(board["upper/loss"], [(s, 1.0 / s) for s in steps])


def test_a_run_is_continued_and_nested(settings):
    client = MlflowClient(settings.mlflow)
    parent = RowTracker(settings, "sweep").start({"num_samples": 3})
    child = RowTracker(settings, "trial", parent_run_id=parent.run_id).start({"lr": 0.1})
    child.log_row(_row(1))
    child.end("diverged")
    parent.end("completed")
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.info.status == "FAILED" and run.data.tags[STATUS_TAG] == "diverged"
    assert client.get_run(parent.run_id).info.status == "FINISHED"

    # Resumed from step 1: the same run goes on; a setting it holds is not logged again.
    resumed = RowTracker(settings, "trial", run_id=child.run_id, first_step=1)
    resumed.start({"lr": 0.1, "steps": 4})
    for step in (2, 3):
        resumed.log_row(_row(step))
    resumed.end()
    run = client.get_run(child.run_id)
    assert run.data.params == {"lr": "0.1", "steps": "4"} and run.info.status == "FINISHED"
    assert [s for s, _ in metric_points(client, child.run_id, "upper/loss")] == [1, 2, 3]
    assert len(client.search_runs([settings.experiment_id])) == 2


def test_ending_a_sweep_ends_the_runs_its_dead_trials_left_running(settings):
    sweep = open_sweep_run(settings, "sweep", {"num_samples": 2})
    finished = RowTracker(settings, "t0", parent_run_id=sweep.run_id).start()
    finished.end("completed")
    dead = RowTracker(settings, "t1", parent_run_id=sweep.run_id).start()  # its process died
    other = RowTracker(settings, "elsewhere").start()  # not the sweep's: left alone
    assert end_sweep_run(sweep, "completed") == [dead.run_id]
    client = MlflowClient(settings.mlflow)
    status = {t.run_name: client.get_run(t.run_id).info.status for t in (sweep, finished, dead)}
    assert status == {"sweep": "FINISHED", "t0": "FINISHED", "t1": "KILLED"}
    assert client.get_run(other.run_id).info.status == "RUNNING"


def test_tensorboard_hides_what_a_restarted_run_had_logged_past_its_start(tmp_path):
    settings = TrackingSettings(tensorboard=tmp_path / "tb")
    with RowTracker(settings, "trial").start() as first:
        for step in range(1, 6):
            first.log_row({"step": step, "upper/loss": float(step)})
    # Restored from a checkpoint at step 2: steps 3-5 are computed again.
    with RowTracker(settings, "trial", first_step=2).start() as again:
        for step in (3, 4):
            again.log_row({"step": step, "upper/loss": 10.0 * step})
    assert len(list(first.logdir.glob("events.out.tfevents.*"))) == 2
    assert scalars(first.logdir)["upper/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_a_failed_block_ends_the_run_failed_and_leaves_mlflow_global_state_alone(settings):
    before = mlflow.get_tracking_uri()
    tracker = RowTracker(settings, "broken")
    with pytest.raises(ZeroDivisionError), tracker.start():
        tracker.log_row(_row(1))
        1 / 0  # noqa: B018
    client = MlflowClient(settings.mlflow)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert metric_points(client, tracker.run_id, "upper/loss") == [(1, 1.0)]
    assert mlflow.get_tracking_uri() == before and mlflow.active_run() is None


def test_each_tracker_alone(sqlite_uri, tmp_path):
    only_mlflow = RowTracker(TrackingSettings(mlflow=sqlite_uri), "m").start({"a": 1})
    only_mlflow.log_row(_row(1))
    only_mlflow.end()
    assert only_mlflow.logdir is None
    # Without the driver's open_experiment, the tracker finds (or makes) the experiment itself.
    client = MlflowClient(sqlite_uri)
    assert client.get_experiment_by_name("bilevel_ray") is not None
    assert metric_points(client, only_mlflow.run_id, "lower/loss") == [(1, 2.0)]

    only_board = RowTracker(TrackingSettings(tensorboard=tmp_path / "tb")).start({"a": 1})
    only_board.log_row(_row(1))
    only_board.log_artifact(tmp_path / "not-there")  # no MLflow: nothing to attach it to
    only_board.end()
    assert only_board.run_id is None
    assert scalars(tmp_path / "tb" / "bilevel_ray" / "run")["lower/loss"] == [(1, 2.0)]


def test_the_file_store_works_too(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    settings = open_experiment(TrackingSettings(mlflow=str(tmp_path / "mlruns")))
    with RowTracker(settings, "f").start({"lr": 1}) as tracker:
        for step in (1, 2):
            tracker.log_row(_row(step))
    client = MlflowClient(settings.mlflow)
    assert metric_points(client, tracker.run_id, "penalty/gamma") == [(1, 0.5), (2, 1.0)]


def test_misuse_is_an_error(settings):
    tracker = RowTracker(settings, "misuse").start()
    with pytest.raises(RuntimeError, match="already started"):
        tracker.start()
    with pytest.raises(ValueError, match="a history row has a 'step'"):
        tracker.log_row({"upper/loss": 1.0})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tracker.log_artifact("no/such/file")
    with pytest.raises(ValueError, match="status 'done' is not one of"):
        tracker.end("done")
    tracker.end("stopped")
    tracker.end("completed")  # a second end does nothing
    run = MlflowClient(settings.mlflow).get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.data.tags[STATUS_TAG] == "stopped"


def test_the_loop_sink_logs_every_row_of_a_real_run(settings, quadratic, origin):
    from bilevel_ray.runtime.local.run_spec import build_run
    from bilevel_ray.runtime.local.solve import run_local, solver_config

    x0, y0 = origin
    calls = []
    downstream = SimpleNamespace(
        before_step=lambda step: calls.append(step), after_step=lambda *a: None
    )
    with RowTracker(settings, "solve", flush_interval_s=0.5).start() as tracker:
        result = run_local(
            quadratic,
            x0,
            y0,
            solver_config("pbgd_free", {"lr_x": 0.05, "lr_y": 0.1, "gamma": 2.0}),
            build_run("pbgd_free", 40, {"report_every": 5}),
            also=TrackerSink(tracker, also=downstream),
        )
    history = result.history.to_pylist()
    assert [r["step"] for r in history] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert calls == list(range(40))  # the sink passed every step on
    client = MlflowClient(settings.mlflow)
    for key in ("upper/loss", "lower/loss", "penalty/gamma"):
        expected = [(r["step"], r[key]) for r in history]
        assert metric_points(client, tracker.run_id, key) == expected
        assert same_points(scalars(tracker.logdir)[key], expected)


def test_a_resumed_run_hides_the_rows_its_crashed_first_run_logged_past_the_checkpoint(
    settings, quadratic, origin, tmp_path
):
    from bilevel_ray.runtime.local.run_spec import build_run
    from bilevel_ray.runtime.local.solve import run_local, solver_config

    x0, y0 = origin
    checkpoint = tmp_path / "ckpt.pt"

    def run(steps, **kwargs):
        with RowTracker(settings, "resumed").start() as tracker:
            run_local(
                quadratic,
                x0,
                y0,
                solver_config("pbgd_free", {"lr_x": 0.05, "lr_y": 0.1, "gamma": 2.0}),
                build_run("pbgd_free", steps, {"report_every": 5, "checkpoint_every": 10}),
                checkpoint_path=checkpoint,
                also=TrackerSink(tracker),
                **kwargs,
            )
        return tracker

    first = run(20)  # checkpoint at step 20
    # A first run that got further before it died: TensorBoard has rows 25 and 30 from it.
    with RowTracker(settings, "resumed", first_step=20).start() as crashed:
        for step in (25, 30):
            crashed.log_row({"step": step, "upper/loss": 99.0})
    resumed = run(30, resume=True)
    assert resumed.first_step == 20  # heard from the loop: where the checkpoint was
    points = scalars(first.logdir)["upper/loss"]
    assert [s for s, _ in points] == [5, 10, 15, 20, 25, 30]
    assert all(v != 99.0 for _, v in points)  # the crashed run's rows are hidden
