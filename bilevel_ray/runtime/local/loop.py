"""The step loop every runtime runs, and where its outputs go.

    for t in range(state.step, steps):
        state, metrics = solver.step(state, next(batches))
        state, action  = watch.after_step(state, batch)     # continue, "fallback" or "stop"
        row            = history.record(t + 1, metrics)     # every report_every steps
        sink.after_step(...)                               # files, ray.train / tune.report

The loop owns the order of these calls; a *sink* decides what leaves the process: the local
sink writes checkpoint files, the Train sink calls ``ray.train.report``, the Tune trial's sink
``tune.report``; a sink may also end the run (``br.compare``'s budget). A report to Ray is a
barrier that costs seconds, so a sink reports at a checkpoint, at the end and otherwise at most
every ``report_interval_s`` (:class:`ReportClock`); the history keeps every logged row in any
case. A :class:`DivergenceError` from the history
propagates to the caller, which decides whether it is an error (``br.solve``) or a result
(a Train worker, a Tune trial).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from bilevel_ray.runtime.local.active_solver import ActiveSolver
from bilevel_ray.runtime.local.history import HistoryRecorder
from bilevel_ray.runtime.local.run_spec import RunSpec
from bilevel_ray.solvers.base import SolverState

__all__ = [
    "PROGRESS_INTERVAL_S",
    "ReportClock",
    "Sink",
    "StepOutcome",
    "progress_line",
    "run",
    "switch_line",
]

PROGRESS_INTERVAL_S = 2.0


class StepOutcome:
    """What a sink learns after a step: the logged row (or None), whether the run ends here,
    whether a checkpoint is due, and the watch's action (None, "fallback" or "stop")."""

    __slots__ = ("action", "checkpoint", "done", "row")

    def __init__(self, row: dict[str, Any] | None, done: bool, checkpoint: bool, action: Any):
        self.row, self.done, self.checkpoint, self.action = row, done, checkpoint, action


class Sink(Protocol):
    def before_step(self, step: int) -> None: ...

    def after_step(
        self, outcome: StepOutcome, state: SolverState, active: ActiveSolver
    ) -> bool | None:
        """Handle the step's outcome; a true return ends the run here (a spent budget)."""
        ...


class ReportClock:
    """When a report to Ray is due: at a checkpoint, at the end, at one of ``milestones`` (a
    scheduler's rungs), or once ``interval_s`` has passed since the last report.

    ``agree(due)`` makes the decision the same on every data-parallel rank (every rank must call
    ``ray.train.report`` at the same steps): by default the local clock decides alone.
    """

    def __init__(
        self,
        interval_s: float,
        milestones: frozenset[int] = frozenset(),
        agree: Callable[[bool], bool] | None = None,
    ):
        self.interval_s, self.milestones = interval_s, milestones
        self.agree = agree or (lambda due: due)
        self._last = time.perf_counter()

    def due(self, outcome: StepOutcome) -> bool:
        if outcome.row is None:
            return False
        forced = outcome.done or outcome.checkpoint or outcome.row["step"] in self.milestones
        if forced:
            return True
        return self.agree(time.perf_counter() - self._last >= self.interval_s)

    def reported(self) -> None:
        self._last = time.perf_counter()


def run(
    active: ActiveSolver,
    state: SolverState,
    batches: Iterator[Any],
    spec: RunSpec,
    recorder: HistoryRecorder,
    sink: Sink,
    progress: bool = False,
) -> SolverState:
    """Run from ``state.step`` to ``spec.steps`` (or until the watch stops the run); returns the
    last state. ``progress``: print a progress line to stderr at most every 2 s (one process of
    a worker group prints)."""
    last_print = -float("inf")
    # A problem that counts its tokens (a language model's) gets tokens per second in its rows.
    count_tokens = getattr(active.problem, "batch_tokens", None)
    for t in range(state.step, spec.steps):
        if active.status != "completed":
            break  # e.g. a resumed run that the diagnostic had stopped
        sink.before_step(t)
        batch = next(batches)
        state, metrics = active.solver.step(state, batch)
        # The watch's estimate of step t + 1 belongs to that step's time (and its row).
        state, action = active.after_step(state, batch)
        row = recorder.record(t + 1, metrics, count_tokens(batch) if count_tokens else 0)
        done = t + 1 == spec.steps or action == "stop"
        if (done or action is not None) and row is None:
            row = recorder.flush()  # the final step, and the step of a switch, are logged
        if action == "fallback":
            if progress:
                print(switch_line(t + 1, recorder.method, active), file=sys.stderr, flush=True)
            recorder.method = active.settings.method  # rows after a switch name the fallback
        every = spec.checkpoint_every
        checkpoint = done or bool(every and (t + 1) % every == 0)
        if (
            progress
            and row is not None
            and (recorder.elapsed - last_print >= PROGRESS_INTERVAL_S or done)
        ):
            last_print = recorder.elapsed
            print(progress_line(row, spec.steps), file=sys.stderr, flush=True)
        ended = sink.after_step(StepOutcome(row, done, checkpoint, action), state, active)
        if action == "stop" or ended:
            break
    return state


def switch_line(step: int, before: str, active: ActiveSolver) -> str:
    verdict = active.verdict or {}
    return (
        f"[{before}] step {step}: the flatness diagnostic found it unsuitable; switching to "
        f"{active.settings.method} ({verdict.get('reason', 'no reason given')})"
    )


def progress_line(row: dict[str, Any], steps: int) -> str:
    shown = " ".join(
        f"{k}={row[k]:.5g}"
        for k in ("upper/loss", "lower/loss", "penalty/gamma")
        if row[k] == row[k]  # skip NaN: the method has no such quantity
    )
    threads = torch.get_num_threads()  # the count behind the step time, shown beside it
    tokens = row.get("time/tokens_per_s", math.nan)
    rate = f"{tokens:,.0f} tokens/s, " if tokens == tokens else ""
    return (
        f"[{row['method']}] step {row['step']}/{steps} {shown} "
        f"({1e3 * row['time/step_s']:.2f} ms/step, {rate}{threads} thread"
        f"{'s' if threads > 1 else ''}, {row['time/elapsed_s']:.1f} s)"
    )
