"""The step loop's sink that hands every logged row to a :class:`RowTracker`.

``br.solve`` passes it as the loop's further sink (``also=``); a runtime whose own sink adds
columns to a row (a trial's held-out scores) calls ``tracker.log_row`` itself instead, so that
the tracker sees the row as the history keeps it. It matches
:class:`bilevel_ray.runtime.local.loop.Sink` by its shape, so that this room imports no
runtime.
"""

from __future__ import annotations

from typing import Any

from bilevel_ray.tracking.rows import RowTracker

__all__ = ["TrackerSink"]


class TrackerSink:
    """Logs each step's row (when one was logged), after ``also`` (a further sink, which may
    add to the row or end the run) has had the step."""

    def __init__(self, tracker: RowTracker, also: Any = None, params: Any = None):
        """``params``: with a tracker not started yet, it starts at the loop's first step
        with these (so that input the run refuses before its first step leaves no run)."""
        self.tracker, self.also, self.params = tracker, also, params
        self._first = True

    def before_step(self, step: int) -> None:
        """The loop's first step is where a resumed run starts: the tracker hears it before
        its first row (TensorBoard then hides what an earlier run logged past it)."""
        if self._first:
            self._first = False
            self.tracker.first_step = step
            if not self.tracker.started:
                self.tracker.start(self.params)
        if self.also is not None:
            self.also.before_step(step)

    def after_step(self, outcome: Any, state: Any, active: Any) -> bool | None:
        """Log the row; returns what ``also`` returns (True ends the run)."""
        ended = self.also.after_step(outcome, state, active) if self.also is not None else None
        if outcome.row is not None:
            self.tracker.log_row(outcome.row)
        return ended
