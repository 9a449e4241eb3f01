"""A sweep's runs: one parent run on the driver, one run per trial nested under it.

The driver opens the sweep's run before Tune starts (:func:`open_sweep_run`: the sweep's fixed
settings as parameters; later its files, the manifest, the tables and the pictures, as
artifacts, and the best trial's numbers). Each trial opens its own run from inside the trial
with Ray's ``setup_mlflow`` (:func:`trial_tracker`: named by the trial, its sampled settings
as parameters) and logs every row of its history there. MLflow's UI shows the trials under the
sweep, and TensorBoard the trials' curves side by side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bilevel_ray.tracking.mlflow_runs import PARENT_TAG
from bilevel_ray.tracking.rows import RowTracker
from bilevel_ray.tracking.settings import TrackingSettings

__all__ = ["TRIAL_TAG", "end_sweep_run", "open_sweep_run", "trial_tracker"]

TRIAL_TAG = "ray.trial_id"


def open_sweep_run(
    settings: TrackingSettings, name: str, params: Mapping[str, Any] | None = None
) -> RowTracker:
    """The sweep's parent run, started in the driver's process (no Ray needed); its
    ``run_id`` goes to every trial."""
    return RowTracker(settings, settings.run_name or name).start(params)


def trial_tracker(
    settings: TrackingSettings,
    parent_run_id: str | None,
    params: Mapping[str, Any] | None = None,
    first_step: int = 0,
) -> RowTracker:
    """This trial's run, started from inside the trial (a Tune function trainable), named by
    Tune's trial name and tagged with its id; ``first_step``: the step a trial restored from a
    checkpoint starts from."""
    from ray import tune

    context = tune.get_context()
    return RowTracker(
        settings,
        context.get_trial_name(),
        inside_ray=True,
        parent_run_id=parent_run_id,
        tags={TRIAL_TAG: context.get_trial_id()},
        first_step=first_step,
    ).start(params)


def end_sweep_run(sweep: RowTracker, status: str = "completed") -> list[str]:
    """End the sweep's run with ``status``, after ending as KILLED every trial run still
    RUNNING under it: a trial whose process died (a lost node, a killed worker) never ended
    its own, and Tune ran it again as a new run. Returns the ids of the runs it ended so."""
    stale: list[str] = []
    if sweep.run_id is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=sweep.settings.mlflow)
        parent = client.get_run(sweep.run_id)
        for run in client.search_runs(
            [parent.info.experiment_id],
            filter_string=(
                f"tags.`{PARENT_TAG}` = '{sweep.run_id}' and attributes.status = 'RUNNING'"
            ),
        ):
            client.set_terminated(run.info.run_id, "KILLED")
            stale.append(run.info.run_id)
    sweep.end(status)
    return stale
