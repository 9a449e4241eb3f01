"""Opening an MLflow run: here with MLflow's client, or in Ray work with Ray's ``setup_mlflow``.

In a Train worker or a Tune trial the run is opened by
:func:`ray.air.integrations.mlflow.setup_mlflow`, Ray's integration: it logs the settings as
parameters, and in a worker group it opens the run on rank 0 only and hands the other ranks a
module that does nothing. In a process without Ray (``br.solve``, a driver) MLflow's client is
used directly, so that the caller's own global MLflow state (its tracking URI, an active run) is
left as it was. Either way the rows are then sent through a client on the run's id.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from bilevel_ray.tracking.settings import TrackingSettings

__all__ = [
    "PARENT_TAG",
    "STATUSES",
    "OpenedRun",
    "flat_params",
    "metric_key",
    "open_run_here",
    "open_run_in_ray",
]

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit on one log_batch request
MAX_PARAM_LENGTH = 6000  # and on a parameter's value
PARENT_TAG = "mlflow.parentRunId"  # MLflow's nesting tag (a sweep's trials under the sweep)
# A run's own statuses (and MLflow's) -> MLflow's RunStatus.
STATUSES = {
    "completed": "FINISHED",
    "unsuitable": "FINISHED",  # stopped by the flatness verdict: a result, not a failure
    "diverged": "FAILED",
    "error": "FAILED",
    "stopped": "KILLED",
    "FINISHED": "FINISHED",
    "FAILED": "FAILED",
    "KILLED": "KILLED",
}


class OpenedRun:
    """A run this process tracks: its id, a client on its store, and the module Ray's
    ``setup_mlflow`` returned (None outside Ray), whose ``end_run`` closes Ray's active run."""

    __slots__ = ("client", "module", "run_id")

    def __init__(self, client: Any, run_id: str, module: ModuleType | None = None):
        self.client, self.run_id, self.module = client, run_id, module

    def end(self, status: str) -> None:
        if self.module is not None:
            self.module.end_run(status=status)  # a reused trial process starts clean
        else:
            self.client.set_terminated(self.run_id, status)


def open_run_here(
    settings: TrackingSettings,
    run_name: str,
    params: Mapping[str, str],
    tags: Mapping[str, str],
    run_id: str | None = None,
) -> OpenedRun:
    """A new run (or ``run_id`` continued) opened with MLflow's client."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=settings.mlflow)
    if run_id is None:
        experiment_id = settings.experiment_id or experiment_id_of(client, settings)
        run_id = client.create_run(experiment_id, tags=dict(tags), run_name=run_name).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        params = _new_params(client, run_id, params)
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
    return OpenedRun(client, run_id)


def open_run_in_ray(
    settings: TrackingSettings,
    run_name: str,
    params: Mapping[str, str],
    tags: Mapping[str, str],
    run_id: str | None = None,
    rank: int = 0,
) -> OpenedRun | None:
    """The run opened by Ray's ``setup_mlflow`` (``run_id``: continued); None on a rank that
    does not track (Ray's no-op module)."""
    from mlflow.tracking import MlflowClient

    # ray.air.integrations is where Ray 2.60 keeps its MLflow integration (not the deprecated
    # ray.air session API): there is no ray.train or ray.tune home for it.
    from ray.air.integrations.mlflow import setup_mlflow

    experiment_id = settings.experiment_id
    if rank == 0:
        client = MlflowClient(tracking_uri=settings.mlflow)
        if experiment_id is None:
            # Without it Ray would look for an experiment named by the trial's id.
            experiment_id = experiment_id_of(client, settings)
        if run_id is not None:
            params = _new_params(client, run_id, params)
            # MLflow's start_run continues the run this variable names (and removes it).
            os.environ["MLFLOW_RUN_ID"] = run_id
    try:
        module = setup_mlflow(
            dict(params),
            tracking_uri=settings.mlflow,
            experiment_id=experiment_id,
            experiment_name=settings.experiment,
            run_name=run_name,
            create_experiment_if_not_exists=True,
            tags=dict(tags),
            rank_zero_only=True,
        )
    finally:
        os.environ.pop("MLFLOW_RUN_ID", None)
    if not isinstance(module, ModuleType):
        return None
    return OpenedRun(module.MlflowClient(), module.active_run().info.run_id, module)


def experiment_id_of(client: Any, settings: TrackingSettings) -> str:
    """The experiment's id where the driver did not open it (a tracker used on its own)."""
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(settings.experiment)


def flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``params`` as MLflow parameters: nested mappings flattened to ``a/b``, names cleaned of
    characters MLflow refuses, values as text cut to MLflow's 6000 characters."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_params(value, f"{name}/"))
            continue
        text = str(value)
        if len(text) > MAX_PARAM_LENGTH:
            text = text[: MAX_PARAM_LENGTH - 3] + "..."
        flat[metric_key(name)] = text
    return flat


def metric_key(name: str) -> str:
    """A name MLflow takes (for a metric or a parameter): its characters, at most 250 of
    them, and no empty, ``.`` or ``..`` path parts."""
    name = re.sub(r"[^/\w.\- :]", "_", str(name))[:250]
    return "/".join(p for p in name.split("/") if p not in ("", ".", "..")) or "_"


def _new_params(client: Any, run_id: str, params: Mapping[str, str]) -> dict[str, str]:
    """The parameters a continued run does not hold yet (MLflow refuses to change one)."""
    held = client.get_run(run_id).data.params
    return {k: v for k, v in params.items() if k not in held}
