"""``br.compare``'s progress while its runs go: a line as each run ends (its final held-out
phi, or why it did not complete, with the divergence rule applied at once) and, between them,
a line every few seconds with the runs ended and running and the time left (the plan's
per-run estimate, replaced by the mean of the runs ended once there are some)."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from ray import tune as ray_tune

from bilevel_ray.runtime.compare.plan import Estimate, Heartbeat, say
from bilevel_ray.runtime.compare.rank import divergence

__all__ = ["RunProgress"]


class RunProgress(ray_tune.Callback):
    """Tune's callback for the run-end lines, and the heartbeat's message (module docstring).
    ``start`` is phi(x0), for the divergence rule."""

    def __init__(self, estimate: Estimate, start: float, quiet: bool = False):
        self.estimate, self.start, self.quiet = estimate, start, quiet
        self.began = time.monotonic()
        self.running: dict[str, tuple[str, float]] = {}
        self.took: list[float] = []
        self.lock = threading.Lock()
        self.heartbeat = Heartbeat(self.message, quiet)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment's state: not the lock and the thread.
        state = dict(self.__dict__)
        state.pop("lock", None)
        state.pop("heartbeat", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()
        self.heartbeat = Heartbeat(self.message, quiet=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        c = trial.config
        with self.lock:
            self.running[trial.trial_id] = (
                f"{c.get('method')} seed {c.get('seed')}",
                time.monotonic(),
            )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self.lock:
            _, began = self.running.pop(trial.trial_id, ("", time.monotonic()))
            self.took.append(time.monotonic() - began)
            ended = len(self.took)
        m, c = trial.last_result or {}, trial.config
        status = m.get("status")
        exploded = (
            divergence(
                {k: m.get(k, math.nan) for k in ("final_phi", "final_upper_loss")}, (), self.start
            )
            if status == "completed"
            else None
        )
        if exploded:
            shown = f"diverged: {exploded}"
        elif status == "completed" and m.get("final_solved", True) is False:
            shown = (
                f"final held-out phi unscored (the lower solve did not settle) after "
                f"{m.get('steps')} steps"
            )
        elif status == "completed":
            phi = m.get("final_phi", math.nan)
            shown = f"final held-out phi {phi:.5g} after {m.get('steps')} steps"
        else:
            shown = f"{status}: {m.get('reason')}"
        wall = m.get("run_wall_s")
        took = f", {wall:.0f} s of wall time" if isinstance(wall, (int, float)) else ""
        if not self.quiet:
            say(
                f"{c.get('method')} seed {c.get('seed')}: {shown}{took} "
                f"({ended}/{self.estimate.runs})"
            )
            self.heartbeat.nudge()

    on_trial_error = on_trial_complete

    def message(self) -> str:
        """The heartbeat line."""
        now = time.monotonic()
        with self.lock:
            running = list(self.running.values())
            took = list(self.took)
        per_run = sum(took) / len(took) if took else self.estimate.per_run_s
        waiting = self.estimate.runs - len(took) - len(running)
        left_now = max((per_run - (now - began) for _, began in running), default=0.0)
        waves = math.ceil(max(waiting, 0) / self.estimate.concurrent)
        left = max(left_now, 0.0) + waves * per_run
        doing = ", ".join(f"{name} for {now - began:.0f} s" for name, began in running)
        return (
            f"runs: {len(took)} of {self.estimate.runs} ended"
            + (f", running {doing}" if doing else "")
            + f"; {now - self.began:.0f} s so far, about {left:.0f} s left (an estimate)"
        )
