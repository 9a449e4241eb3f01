"""Tracking: a run's rows in MLflow and TensorBoard, through Ray's own integrations.

A room of its own beside the runtimes: ``br.solve``, ``br.train``, ``br.tune`` and
``br.compare`` all use it, and it imports none of them. Importing it loads neither Ray, MLflow
nor tensorboardX: each is imported where it is used.

* :mod:`.settings`: :class:`TrackingSettings`, checked on the driver before Ray starts;
  :mod:`.uris`, the MLflow tracking URIs it takes; :mod:`.store`, opening the store and the
  experiment (:func:`open_experiment`); :mod:`.entry`, what every entry point does with its
  tracking keywords (:func:`open_tracking`, :func:`attach_files`).
* :mod:`.rows`: :class:`RowTracker`, every logged history row from the process that runs the
  steps (rank 0 of a worker group); :mod:`.mlflow_runs` opens its MLflow run (Ray's
  ``setup_mlflow`` inside Ray work), :mod:`.event_files` its TensorBoard files;
  :mod:`.sink`, :class:`TrackerSink`, the step loop's sink that feeds it.
* :mod:`.sweep`: a sweep's parent run and its trials' runs; :mod:`.tune_callbacks`, the
  Tune callbacks of a sweep; :mod:`.ray_objects`, checks of what a Ray user passes through
  (``callbacks=``, ``stop=``, ``runtime_env=``).
"""

from __future__ import annotations

from bilevel_ray.tracking.entry import attach_files, open_tracking, run_status
from bilevel_ray.tracking.ray_objects import (
    check_runtime_env,
    check_stop,
    check_train_callbacks,
    check_tune_callbacks,
)
from bilevel_ray.tracking.rows import RowTracker
from bilevel_ray.tracking.settings import TrackingSettings, tracking_settings
from bilevel_ray.tracking.sink import TrackerSink
from bilevel_ray.tracking.store import open_experiment
from bilevel_ray.tracking.sweep import end_sweep_run, open_sweep_run, trial_tracker
from bilevel_ray.tracking.tune_callbacks import sweep_callbacks

__all__ = [
    "RowTracker",
    "TrackerSink",
    "TrackingSettings",
    "attach_files",
    "check_runtime_env",
    "check_stop",
    "check_train_callbacks",
    "check_tune_callbacks",
    "end_sweep_run",
    "open_experiment",
    "open_sweep_run",
    "open_tracking",
    "run_status",
    "sweep_callbacks",
    "tracking_settings",
    "trial_tracker",
]
