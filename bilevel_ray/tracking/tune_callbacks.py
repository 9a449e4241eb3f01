"""The Tune callbacks of a sweep: the user's own, then those the tracking settings add.

A sweep's trials track their rows themselves (a :class:`~bilevel_ray.tracking.rows.RowTracker`
in each trial, :mod:`bilevel_ray.tracking.sweep`), so Ray's ``MLflowLoggerCallback`` is added
only for trials that do not (``trials_track_rows=False``): beside a trial's own run it would
log each trial again, as a second MLflow run holding only what the trial reported to Tune.
Tune's TensorBoard logger (``TBXLoggerCallback``) writes one point per report into each trial's
folder; Tune adds it by itself unless ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`` is set, so with
``tensorboard=`` it is added here too, whatever that variable says.
"""

from __future__ import annotations

from typing import Any

from bilevel_ray.tracking.ray_objects import check_tune_callbacks
from bilevel_ray.tracking.settings import TrackingSettings

__all__ = ["sweep_callbacks"]


def sweep_callbacks(
    settings: TrackingSettings | None, callbacks: Any = None, *, trials_track_rows: bool = True
) -> list[Any]:
    """The ``callbacks`` of a sweep's ``ray.tune.RunConfig``: the user's ``callbacks``
    (checked: :func:`~bilevel_ray.tracking.ray_objects.check_tune_callbacks`), then Tune's
    TensorBoard logger (with ``settings.tensorboard``) and Ray's ``MLflowLoggerCallback``
    (with ``settings.mlflow``, for trials that do not track their own rows: every trial's
    settings as parameters, every report as metrics, its folder as artifacts)."""
    items = check_tune_callbacks(callbacks, settings.mlflow if settings is not None else None)
    if settings is None:
        return items
    if settings.tensorboard is not None:
        from ray.tune.logger import TBXLoggerCallback

        if not any(isinstance(c, TBXLoggerCallback) for c in items):
            items.append(TBXLoggerCallback())
    if settings.mlflow is not None and not trials_track_rows:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        items.append(
            MLflowLoggerCallback(
                tracking_uri=settings.mlflow,
                experiment_name=settings.experiment,
                tags=settings.tag_dict or None,
                save_artifact=True,
            )
        )
    return items
