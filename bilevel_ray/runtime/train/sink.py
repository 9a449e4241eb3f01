"""A Ray Train rank's reports (:class:`TrainSink`, the step loop's sink): held-out scores on
every logged row of a sweep's trial, ``ray.train.report`` when the report clock says so, and
rank 0's checkpoint with it; a test hook that kills a rank once."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import ray.train

from bilevel_ray.runtime.local import loop
from bilevel_ray.runtime.local.checkpoint import (
    CHECKPOINT_FILE,
    checkpoint_payload,
    group_checkpoint_name,
    save_checkpoint,
)
from bilevel_ray.runtime.local.history import HistoryRecorder
from bilevel_ray.runtime.local.judge import verdict_columns
from bilevel_ray.runtime.local.output_files import atomic_write
from bilevel_ray.runtime.train.job import WorkerJob
from bilevel_ray.solvers.base import SolverState

__all__ = ["FAULT_MARKER", "TrainSink"]

FAULT_MARKER = ".bilevel_ray_fault_injected"


class TrainSink:
    """A rank's reports: held-out scores on every logged row (a sweep's trial), and
    ``ray.train.report`` when the :class:`~bilevel_ray.runtime.local.loop.ReportClock` says so."""

    def __init__(
        self,
        job: WorkerJob,
        rank: int,
        recorder: HistoryRecorder,
        scorer,
        agree,
        held_out=None,
        tracker=None,
    ):
        """``held_out(state)``: the problem's own held-out numbers, added to the last row;
        ``tracker``: the run's :class:`~bilevel_ray.tracking.RowTracker` (it logs on rank 0
        only), which receives every row as the history keeps it, scores included."""
        self.job, self.rank, self.recorder, self.scorer = job, rank, recorder, scorer
        self.held_out, self.tracker = held_out, tracker
        self.clock = loop.ReportClock(job.run.report_interval_s, agree=agree)
        self.attempt = uuid.uuid4().hex[:6]
        self.state: SolverState | None = None  # the last state a row was logged at

    def before_step(self, step: int) -> None:
        """Test hook: rank ``fault["rank"]`` dies at step ``fault["step"]``, once per run (a
        marker file in the run folder remembers that it happened, so the restarted group goes
        on)."""
        fault = self.job.fault
        if not fault or self.rank != fault["rank"] or step != fault["step"]:
            return
        marker = Path(fault["marker_dir"]) / FAULT_MARKER
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        text = f"rank {self.rank} killed at step {step}\n"
        atomic_write(marker, lambda tmp: tmp.write_text(text))
        os._exit(1)

    def after_step(self, outcome: loop.StepOutcome, state: SolverState, active: Any) -> None:
        row = outcome.row
        if row is None:
            return
        self.state = state
        due = self.clock.due(outcome)  # a collective: every rank asks at every logged row
        if self.scorer is not None:
            # In the row itself, so that the history (in the checkpoint) keeps the scores; the
            # gap (a lower solve) on the rows Tune sees, where its scheduler reads search/score.
            row.update(self.scorer(state, due))
        elif outcome.done and self.held_out is not None:
            row.update(self.held_out(state))  # a sweep's scorer already holds them
        if self.tracker is not None:
            self.tracker.log_row(row)
        if not due:
            return
        status = active.status if outcome.done else "running"
        columns = {**row, **verdict_columns(active.verdict), "status": status}
        self.report(columns, state, outcome.checkpoint, active, status)

    def end_tracking(self, status: str) -> None:
        """End the tracked run with the run's ``status`` (nothing when untracked)."""
        if self.tracker is not None:
            self.tracker.end(status)

    def report(
        self,
        row: dict[str, Any],
        state: SolverState,
        save: bool,
        active: Any,
        status: str = "running",
    ) -> None:
        """``ray.train.report`` on every rank (a barrier); rank 0 attaches the checkpoint. A
        diverged run's checkpoint says so: resuming it is refused (its state is not finite)."""
        self.clock.reported()
        if not save or self.rank != 0:
            ray.train.report(row)
        else:
            payload = checkpoint_payload(
                state,
                self.recorder,
                active.initial_settings,
                self.job.run.seed,
                active.saved(),
                status=status,
                num_workers=self.job.num_workers,
            )
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(payload, Path(folder) / CHECKPOINT_FILE)
                ray.train.report(
                    row,
                    checkpoint=ray.train.Checkpoint.from_directory(folder),
                    checkpoint_dir_name=group_checkpoint_name(state.step, self.attempt),
                )
        self.recorder.restart_window()  # a report is a barrier: not a step's cost
