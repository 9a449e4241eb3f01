"""Every logged history row to MLflow and TensorBoard, from the process that runs the steps.

A :class:`RowTracker` lives where the rows are made (``br.solve``'s process, a Train worker, a
Tune trial), so a tracker draws the whole learning curve while Ray sees only the few reports
its schedulers need. Inside Ray work the MLflow run is opened by Ray's ``setup_mlflow``, rank 0
only in a worker group (:mod:`bilevel_ray.tracking.mlflow_runs`); the other ranks track
nothing, TensorBoard included, so N workers do not log N copies.

Rows are buffered and sent as one batch at most every ``flush_interval_s`` and at the end: a
request per row would cost a request's time (tens of ms on SQLite) at every logged row.
TensorBoard gets one scalar per numeric column per row (:mod:`bilevel_ray.tracking.event_files`).
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bilevel_ray.tracking.event_files import open_writer, run_folder
from bilevel_ray.tracking.mlflow_runs import (
    PARENT_TAG,
    STATUSES,
    OpenedRun,
    flat_params,
    metric_key,
    open_run_here,
    open_run_in_ray,
)
from bilevel_ray.tracking.settings import TrackingSettings

__all__ = ["FLUSH_INTERVAL_S", "STATUS_TAG", "RowTracker"]

FLUSH_INTERVAL_S = 2.0
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit on one log_batch request
STATUS_TAG = "bilevel_ray.status"  # a run's own status, where MLflow's says less


class RowTracker:
    """One tracked run: ``start(params)``, ``log_row(row)`` per history row,
    ``log_artifact(path)``, ``end(status)``; or ``with RowTracker(...).start(params) as t:``,
    which ends the run FAILED when the block raises.

    Args:
        settings: the checked :class:`~bilevel_ray.tracking.settings.TrackingSettings`
            (opened on the driver, so that the experiment's id is known).
        run_name: the run's name (default: ``settings.run_name``, else ``"run"``).
        inside_ray: True in a Train worker or a Tune trial: MLflow through Ray's
            ``setup_mlflow``, and only rank 0 of a worker group tracks.
        run_id: continue this MLflow run (a resumed run, or one the driver opened so that it
            can attach its files after the workers end) instead of creating one.
        parent_run_id: nest the new run under this one (a sweep's trials under the sweep).
        tags: more tags for this run, beside ``settings.tags``.
        first_step: the step the run starts from (a resumed run's): TensorBoard hides what an
            earlier run of the same name logged after it.
    """

    def __init__(
        self,
        settings: TrackingSettings,
        run_name: str | None = None,
        *,
        inside_ray: bool = False,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        first_step: int = 0,
        flush_interval_s: float = FLUSH_INTERVAL_S,
    ):
        self.settings, self.inside_ray = settings, inside_ray
        self.run_name = run_name or settings.run_name or "run"
        self.first_step, self.flush_interval_s = first_step, flush_interval_s
        self.tags = {**settings.tag_dict, **{k: str(v) for k, v in (tags or {}).items()}}
        if parent_run_id is not None:
            self.tags[PARENT_TAG] = parent_run_id
        self.active = False  # whether this process tracks (rank 0), once started
        self._run_id = run_id
        self._run: OpenedRun | None = None
        self._writer: Any = None  # TensorBoard's, opened at the first row
        self._params: dict[str, str] = {}
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()
        self._started = self._ended = False

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id (None without MLflow, or on a rank that does not track)."""
        return self._run.run_id if self._run is not None else None

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called."""
        return self._started

    @property
    def logdir(self) -> Path | None:
        """This run's TensorBoard folder (None without TensorBoard)."""
        if self.settings.tensorboard is None:
            return None
        return run_folder(self.settings.tensorboard, self.settings.experiment, self.run_name)

    def start(self, params: Mapping[str, Any] | None = None) -> RowTracker:
        """Open the run and log ``params`` (nested dicts flattened to ``a/b``); returns self."""
        if self._started:
            raise RuntimeError("RowTracker.start: this run was already started")
        self._started = True
        for key, value in self.settings.environment:
            os.environ.setdefault(key, value)  # e.g. the driver's file-store opt-in
        self._params = flat_params(params or {})
        rank = _rank() if self.inside_ray else 0
        self.active = rank == 0
        if self.settings.mlflow is not None:
            args = (self.settings, self.run_name, self._params, self.tags, self._run_id)
            if self.inside_ray:
                self._run = open_run_in_ray(*args, rank=rank)
                self.active = self._run is not None  # Ray's decision: rank 0 only
            else:
                self._run = open_run_here(*args)
        self._last_flush = time.monotonic()
        return self

    def log_row(self, row: Mapping[str, Any]) -> None:
        """Every finite numeric column of ``row`` as a metric at ``row["step"]`` (NaN is a
        quantity the method does not have; an infinity would flatten a plot's scale)."""
        if not self.active or self._ended:
            return
        if "step" not in row:
            raise ValueError(f"RowTracker.log_row: a history row has a 'step'; got {list(row)}")
        step = int(row["step"])
        values = {k: float(v) for k, v in row.items() if k != "step" and _finite(v)}
        if self.settings.tensorboard is not None:
            if self._writer is None:
                self._writer = open_writer(
                    self.logdir, self.first_step, self.flush_interval_s, self._params
                )
            for key, value in values.items():
                self._writer.add_scalar(key, value, global_step=step)
        if self._run is not None:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            self._pending.extend(Metric(metric_key(k), v, stamp, step) for k, v in values.items())
        if (
            len(self._pending) >= MAX_METRICS_PER_BATCH
            or time.monotonic() - self._last_flush >= self.flush_interval_s
        ):
            self.flush()

    def flush(self) -> None:
        """Send the buffered rows now."""
        self._last_flush = time.monotonic()
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
            batch = pending[i : i + MAX_METRICS_PER_BATCH]
            self._run.client.log_batch(self._run.run_id, metrics=batch)
        if self._writer is not None:
            self._writer.flush()

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """A file, or a folder's files, as the run's artifacts (MLflow only)."""
        if not self.active or self._run is None:
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"RowTracker.log_artifact: {path} does not exist")
        if path.is_dir():
            self._run.client.log_artifacts(self._run.run_id, str(path), artifact_path)
        else:
            self._run.client.log_artifact(self._run.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Send what is buffered and close the run with ``status``: MLflow's (``FINISHED``,
        ``FAILED``, ``KILLED``) or a run's own (``completed``, ``unsuitable``, ``diverged``,
        ``error``, ``stopped``; kept as the tag ``bilevel_ray.status``). Ending twice does
        nothing."""
        if status not in STATUSES:
            raise ValueError(f"RowTracker.end: status {status!r} is not one of {list(STATUSES)}")
        if self._ended or not self._started or not self.active:
            self._ended = True
            return
        self._ended = True
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.close()
            if self._run is not None:
                if status != STATUSES[status]:
                    self._run.client.set_tag(self._run.run_id, STATUS_TAG, status)
                self._run.end(STATUSES[status])

    def __enter__(self) -> RowTracker:
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self.end("FINISHED" if kind is None else "FAILED")


def _rank() -> int:
    """This process's rank in a Train worker group; 0 in a Tune trial or a plain Ray task."""
    import ray.train

    try:
        return ray.train.get_context().get_world_rank()
    except RuntimeError:  # not a Train worker
        return 0
    except DeprecationWarning:  # what Train V2 raises in a Tune trial: one process, rank 0
        return 0


def _finite(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )
