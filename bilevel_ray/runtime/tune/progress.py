"""A sweep's progress on stderr: one line per trial event (Tune's own tables are off)."""

from __future__ import annotations

import sys
from typing import Any

from ray import tune as ray_tune

from bilevel_ray.runtime.local.ranking import GAP, METRIC
from bilevel_ray.runtime.tune.deaths import death_reason

__all__ = ["SweepProgress", "short"]


class SweepProgress(ray_tune.Callback):
    """One line per trial event on stderr (Tune's own tables are off)."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        shown = ", ".join(f"{k}={short(v)}" for k, v in trial.config.items())
        print(f"[tune] {trial.trial_id} started: {shown}", file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        m = trial.last_result or {}
        ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials) + 1
        status = m.get("status", "done")
        status = "stopped early" if status == "running" else status
        if status == "error":
            shown = f"error: {m.get('error')}"
        else:
            shown = f"{METRIC}={short(m.get(METRIC))} {GAP}={short(m.get(GAP))}"
        print(
            f"[tune] {trial.trial_id} {status} at step {m.get('step')}: {shown} "
            f"({ended}/{len(trials)} ended)",
            file=sys.stderr,
            flush=True,
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = death_reason(_trial_error(trial))
        step = (trial.last_result or {}).get("step")
        at = "before its first report" if step is None else f"at step {step}"
        print(
            f"[tune] {trial.trial_id} failed {at}: {reason or 'see ' + trial.local_path}",
            file=sys.stderr,
            flush=True,
        )


def _trial_error(trial: Any) -> BaseException | None:
    """The error Tune ended ``trial`` with, from the file it has just written on this machine
    (its copy in the sweep's storage comes later); None if unreadable."""
    from ray import cloudpickle

    try:
        with open(trial.pickled_error_file, "rb") as f:
            return cloudpickle.load(f)
    except Exception:  # no error file (another Ray), or one that does not load here
        return None


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
