"""What every entry point (``br.solve``, ``br.train``, ``br.tune``, ``br.compare``) does with
its tracking keywords: check them and open the experiment on the driver, before any work
(:func:`open_tracking`); attach a run's files once they are written (:func:`attach_files`),
which may be after the run ended (the command line writes ``solve``'s files after the call).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bilevel_ray.errors import ConfigError
from bilevel_ray.tracking.settings import TrackingSettings, tracking_settings
from bilevel_ray.tracking.store import open_experiment

__all__ = ["attach_files", "open_tracking", "run_status"]


def open_tracking(
    mlflow: Any = None,
    tensorboard: Any = None,
    *,
    experiment: str | None = None,
    tags: Any = None,
    run_name: str | None = None,
) -> TrackingSettings | None:
    """The checked settings with the experiment opened, or None when no tracker is asked for.

    ``mlflow`` may also be :class:`TrackingSettings` already checked (what the command line
    passes to a task on a cluster: the store is checked on the driver's disk, not the
    node's); then the other keywords must be None. Raises :class:`ConfigError` for
    ``experiment=`` or ``tags=`` without a tracker (they would be ignored silently)."""
    if isinstance(mlflow, TrackingSettings):
        if tensorboard is not None or experiment is not None or tags is not None:
            raise ConfigError(
                "mlflow= is a TrackingSettings object: give tensorboard, experiment and tags "
                "in it, not as keywords"
            )
        return mlflow if mlflow.experiment_id is not None else open_experiment(mlflow)
    names = {"experiment": experiment, "tags": tags, "run_name": run_name}
    settings = tracking_settings(mlflow, tensorboard, **names)
    if settings is None:
        given = [k for k in ("experiment", "tags") if names[k] is not None]
        if given:
            raise ConfigError(
                f"{given[0]}={names[given[0]]!r} names where a tracker logs, and no tracker is "
                "asked for: pass mlflow='sqlite:///mlflow.db' (or tensorboard='runs/tb') too, "
                f"or leave {given[0]} out"
            )
        return None
    return open_experiment(settings)


def attach_files(
    settings: TrackingSettings | None,
    run_id: str | None,
    paths: Iterable[str | os.PathLike[str]],
) -> list[str]:
    """Log the files of ``paths`` that exist as artifacts of the MLflow run ``run_id`` (ended
    or not: MLflow takes artifacts after a run's end). Returns the names logged."""
    if settings is None or settings.mlflow is None or run_id is None:
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=settings.mlflow)
    logged = []
    for path in map(Path, paths):
        if path.is_file():
            client.log_artifact(run_id, str(path))
            logged.append(path.name)
    return logged


def run_status(error: BaseException | None) -> str:
    """A run's status for an error that ended it: ``diverged`` for a loss gone non-finite,
    ``stopped`` (MLflow's KILLED) for an interrupt, else ``FAILED``."""
    from bilevel_ray.errors import DivergenceError

    if isinstance(error, DivergenceError):
        return "diverged"
    return "stopped" if isinstance(error, KeyboardInterrupt) else "FAILED"
