"""A trial whose process died (Ray's memory monitor or the kernel's OOM killer killed it, it
crashed, its node went away): a failed trial, not a failed sweep; its one-line reason; and
Ray's own notices of the death kept off the terminal.

Ray's memory monitor ends the task of the worker it kills with ``OutOfMemoryError``, which
Tune's actor manager (Ray 2.60) does not expect of a trial: it raises, and the whole sweep ends
with a traceback. :func:`handle_trial_deaths` has it take the error as the actor's death it
is (:class:`KilledForMemory`), so the trial fails (and is retried up to ``max_failures``) and the
sweep goes on.

Ray tells of such a death three times: Tune logs the error with its traceback, the tune
call logs the trials that did not complete, and the raylet's notice ("A worker died or was
killed ...", a paragraph) is printed on the driver's stdout. A sweep says it once, in its own
line per failed trial and in ``trials.parquet``'s ``error`` column, so unless verbose
(``BILEVEL_RAY_VERBOSE=1``) those three are left out (and the raylet's warning that a
population started many worker processes, which it does by design).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import exceptions as rex

from bilevel_ray.runtime.local.run_spec import verbose

__all__ = ["KILLED", "KilledForMemory", "death_reason", "handle_trial_deaths"]

KILLED = "killed: "  # how a dead trial's reason starts
OUT_OF_MEMORY = f"{KILLED}out of memory"
# What Ray's memory monitor says in the errors of the workers it kills.
_MONITOR_WORDS = ("memory pressure", "running low on memory")
_NOTICES = (
    "A worker died or was killed while executing a task",
    "were killed due to the node running low on memory",
    # A population's trials share CPUs on purpose (capacity.TRIALS_PER_CPU bounds them), and
    # the raylet warns of the many processes, with workarounds that do not apply.
    "PYTHON worker processes have been started on node",
)


def death_reason(error: BaseException | None) -> str | None:
    """ "killed: ..." for an error that says the trial's process died (Ray's wrappers looked
    through); None for any other error (the trial's code raised)."""
    seen = 0
    while error is not None and seen < 8:
        seen += 1
        text = str(error)
        if isinstance(error, rex.OutOfMemoryError) or any(w in text for w in _MONITOR_WORDS):
            return (
                f"{OUT_OF_MEMORY} (Ray's memory monitor killed its process: the node's memory "
                "was nearly full; run fewer trials at once or give them more memory)"
            )
        if isinstance(error, (rex.NodeDiedError, rex.LocalRayletDiedError)):
            return f"{KILLED}its node died or became unreachable"
        if isinstance(error, rex.RayActorError) and not error.actor_init_failed:
            return _process_died()
        if isinstance(error, rex.WorkerCrashedError):
            return _process_died()
        error = getattr(error, "cause", None) or error.__cause__
    return None


def _process_died() -> str:
    return (
        f"{KILLED}its process died (the kernel's out-of-memory killer, a signal or a crash; "
        "the kernel log of its node, dmesg, says which)"
    )


class _TrialDeathNotices(logging.Filter):
    """Drops Tune's records of trials that failed (a sweep names each in its own line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose():
            return True
        message = record.getMessage()
        return not message.startswith(("Trial task failed for trial", "Trials did not complete"))


_FILTER = _TrialDeathNotices()


def handle_trial_deaths() -> None:
    """A trial killed by Ray's memory monitor fails alone, and Ray's notices of a dead trial
    stay off the terminal (unless verbose). Idempotent."""
    _oom_ends_the_trial()
    if verbose():
        return
    # Tune's controller logs every trial error with its traceback (a documented switch).
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    _filter_raylet_notices()


class KilledForMemory(rex.ActorDiedError):
    """Ray's ``OutOfMemoryError`` of a trial's actor, as the actor's death that Tune handles."""

    def __init__(self, message: str = "killed by Ray's memory monitor") -> None:
        rex.RayActorError.__init__(self, None, message)
        self.args = (message,)  # a pickled copy (Tune's error.pkl) is built from its message


def _oom_ends_the_trial() -> None:
    """Wrap Tune's handler of a failed actor task so that Ray's ``OutOfMemoryError`` is taken
    as the actor's death (Tune raises on any error but an actor's or a task's)."""
    try:
        from ray.air.execution._internal.actor_manager import RayActorManager
    except ImportError:  # another Ray: its own handling
        return
    failed = getattr(RayActorManager, "_actor_task_failed", None)
    if failed is None or getattr(failed, "_bilevel_ray", False):
        return

    def _actor_task_failed(self: Any, tracked_actor_task: Any, exception: Exception) -> Any:
        if isinstance(exception, rex.OutOfMemoryError):
            exception = KilledForMemory(str(exception))
        return failed(self, tracked_actor_task=tracked_actor_task, exception=exception)

    _actor_task_failed._bilevel_ray = True  # type: ignore[attr-defined]
    RayActorManager._actor_task_failed = _actor_task_failed


def _filter_raylet_notices() -> None:
    """The driver's listener prints each error the raylet publishes for this job through
    ``ray._private.worker.print_to_stdstream`` (stdout, a paragraph per dead worker, arriving
    after the trial's error, even after the sweep's end); there is no switch, so the notices
    of dead workers are dropped there, and every other line passes."""
    try:
        from ray._private import worker
    except ImportError:  # another Ray: its notices show
        return
    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "_bilevel_ray", False):
        return

    def print_to_stdstream(data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        if not verbose() and data.get("pid") == "raylet":
            lines = [line for line in data.get("lines", []) if not any(n in line for n in _NOTICES)]
            if not lines:
                return
            data = {**data, "lines": lines}
        printer(data, *args, **kwargs)

    print_to_stdstream._bilevel_ray = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = print_to_stdstream
