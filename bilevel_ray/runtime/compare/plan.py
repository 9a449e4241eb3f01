"""What ``br.compare`` will run and how long it should take, said before it starts; progress
lines while it works.

The estimate, in seconds (printed as one; every part is measured on this machine or a stated
constant):

* runs: waves * per_run, waves = ceil(methods * seeds / C) with C the runs at a time (the
  cluster's CPUs: one CPU per run), and
  per_run = budget + CONTENTION * (SCORED_POINTS + 2 + gap_steps / TRACK_STEPS) * t_score
  + TRIAL_START_S: the budget of the method's own steps, the scoring of at most
  SCORED_POINTS + 1 points and the final lower-gap solve (t_score: one scored point, timed here
  on phi(x0); CONTENTION for runs side by side, where it measured 3-4x the lone timing), and a
  trial's start (Tune's process, its imports, the problem's build); plus RAY_START_S when a new
  local Ray starts. The constants were fitted on a 2-CPU machine running 2 at a time (the
  estimate came within 30% on the negative toy and on hyperclean); once runs end, the progress
  lines use their measured time instead;
* the diagnostic (PBGD-Free's flatness verdict on the same start):
  DIAGNOSTIC_OVERHEAD_S + 1.5 * t_free * (steps + max(steps / 4, 100) * replicas * 4): its run
  to the horizon ``steps`` (the problem's suggested steps, else br.diagnose's default) and the
  end check's steps of PBGD-Free and alt_pbgd on its replicas (one on deterministic data; an
  alt_pbgd step taken as 3 PBGD-Free steps), the 1.5 and the overhead for its checks and priced
  solves (fitted on the built-in problems: 2-5 s where it takes 2-5 s, 38 s where it takes
  37 s), capped by its max_seconds when it has one (t_free: PBGD-Free's step, timed here). It
  is timed when it ends, and the runs' estimate is said again.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bilevel_ray.data import as_batches
from bilevel_ray.runtime.compare.trial import SCORED_POINTS, TRACK_STEPS
from bilevel_ray.runtime.local.solve import solver_config

__all__ = [
    "Estimate",
    "Heartbeat",
    "diagnostic_horizon",
    "diagnostic_seconds",
    "estimate_for",
    "plan_line",
    "say",
    "step_seconds",
]

TRIAL_START_S = 6.0  # a Tune trial's process, imports and the problem's build
CONTENTION = 3.0  # the scoring of runs side by side, against its lone timing
RAY_START_S = 10.0  # a new local Ray
DIAGNOSTIC_OVERHEAD_S = 2.5  # the diagnostic's checks and priced solves, beyond its steps
PROGRESS_EVERY_S = 5.0  # at most one heartbeat line this often, at least one this often
STEP_TIMING_S = 0.5  # PBGD-Free's step is timed over this long (at most 50 steps)
MIN_DIAGNOSTIC_STEPS = 200  # a horizon shorter than this settles too little to judge


def say(line: str) -> None:
    """A progress line on stderr."""
    print(f"[compare] {line}", file=sys.stderr, flush=True)


def step_seconds(spec: Any, method: str, options: Mapping[str, Any]) -> float:
    """Seconds per step of ``method`` from the problem's start (the median of up to 50 steps
    or STEP_TIMING_S; the caller's RNG is left as it was)."""
    solver = solver_config(method, dict(options)).build(spec.problem)
    times: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = solver.init(spec.x0, spec.y0)
        for batch in itertools.islice(as_batches(spec.data, 0), 51):
            began = time.perf_counter()
            state, _ = solver.step(state, batch)
            times.append(time.perf_counter() - began)
            if sum(times) > STEP_TIMING_S:
                break
    times = times[1:] or times  # the first step builds what the others reuse
    return sorted(times)[len(times) // 2]


def diagnostic_horizon(budget_s: float, step_s: float, suggested: Any) -> int:
    """The steps PBGD-Free takes within ``budget_s`` at ``step_s`` a step, at most the
    problem's ``suggested`` steps and at least :data:`MIN_DIAGNOSTIC_STEPS`."""
    reached = int(budget_s / max(step_s, 1e-9))
    if isinstance(suggested, int) and not isinstance(suggested, bool) and suggested > 0:
        reached = min(reached, suggested)
    return max(reached, MIN_DIAGNOSTIC_STEPS)


def diagnostic_seconds(step_s: float, deterministic: bool, horizon: Any = None) -> float:
    """The diagnostic's estimate (module docstring), from br.diagnose's own defaults and the
    horizon it judges (the problem's suggested steps, which bilevel-ray diagnose passes)."""
    from bilevel_ray.diagnostics import diagnose

    defaults = {
        p.name: p.default
        for p in inspect.signature(diagnose).parameters.values()
        if p.default is not p.empty
    }
    steps = defaults.get("steps") or defaults.get("max_steps") or 20 * defaults["warmup_steps"]
    if isinstance(horizon, int) and not isinstance(horizon, bool) and horizon > 0:
        steps = horizon
    replicas = 1 if deterministic else int(defaults.get("replicas", 1))
    check = max(steps // 4, 100) * replicas * 4 if "replicas" in defaults else 0
    seconds = DIAGNOSTIC_OVERHEAD_S + 1.5 * (steps + check) * step_s
    cap = defaults.get("max_seconds")
    return min(seconds, float(cap)) if isinstance(cap, (int, float)) else seconds


@dataclass
class Estimate:
    """The plan's numbers (seconds), kept in compare.json beside what the comparison took."""

    runs: int
    concurrent: int
    budget_s: float
    score_s: float
    per_run_s: float
    ray_start_s: float
    diagnostic_s: float | None
    # The horizon the diagnostic judges: the steps a PBGD-Free run reaches within the budget
    # (at most the problem's suggested steps), so that it costs about one run, not a whole
    # suggested run of a slow problem.
    diagnostic_steps: int | None = None

    @classmethod
    def of(
        cls,
        runs,
        concurrent,
        budget_s,
        score_s,
        gap_steps,
        ray_starts,
        diagnostic_s,
        diagnostic_steps=None,
    ):
        scoring = CONTENTION * (SCORED_POINTS + 2 + gap_steps / TRACK_STEPS) * score_s
        return cls(
            runs,
            max(1, concurrent),
            budget_s,
            score_s,
            budget_s + scoring + TRIAL_START_S,
            RAY_START_S if ray_starts else 0.0,
            diagnostic_s,
            diagnostic_steps,
        )

    @property
    def runs_s(self) -> float:
        return self.ray_start_s + math.ceil(self.runs / self.concurrent) * self.per_run_s

    @property
    def total_s(self) -> float:
        return self.runs_s + (self.diagnostic_s or 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "runs_s": self.runs_s, "total_s": self.total_s}


def concurrency(address: str | None) -> int:
    """Runs at a time, as far as known before Ray starts: the running Ray's CPUs, this
    machine's for a new local Ray, else one (a cluster not yet reached: revised on connect)."""
    import ray

    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    if address is None and not os.environ.get("RAY_ADDRESS"):
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        return max(1, len(cpus) if cpus else os.cpu_count() or 1)
    return 1


def estimate_for(spec, settings, seeds, budget_s, gap_steps, score_s, address) -> Estimate:
    """The plan's estimate (module docstring) for ``settings`` (method -> keywords) x
    ``seeds`` runs; ``score_s``: one scored point's seconds, measured."""
    import ray

    diagnostic = horizon = None
    if "pbgd_free" in settings:
        step_s = step_seconds(spec, "pbgd_free", settings["pbgd_free"])
        horizon = diagnostic_horizon(budget_s, step_s, spec.defaults.get("steps"))
        diagnostic = diagnostic_seconds(step_s, spec.data is None, horizon)
    new_ray = not ray.is_initialized() and address is None
    return Estimate.of(
        len(settings) * seeds,
        concurrency(address),
        budget_s,
        score_s,
        gap_steps,
        new_ray,
        diagnostic,
        horizon,
    )


def plan_line(methods, seeds, estimate: Estimate, rank_by: str, read: int = 0) -> str:
    """The plan, one paragraph: what runs, for how long, how it is judged, and the estimate;
    ``read``: the runs a resume read from the folder (``estimate.runs`` are those left)."""
    diagnostic = (
        f"first the flatness diagnostic on the same start (about {estimate.diagnostic_s:.0f} s); "
        if estimate.diagnostic_s is not None
        else "no flatness diagnostic (PBGD-Free does not run); "
    )
    point = (
        "each run's best held-out point (early stopping on the validation half of the "
        "held-out rows, reported on the other half)"
        if rank_by == "best"
        else "each run's final point"
    )
    return (
        f"plan: {len(methods)} method(s) ({', '.join(methods)}) x {seeds} seed(s) (0-"
        f"{seeds - 1}) = {estimate.runs + read} runs"
        + (f" ({read} read from the folder, {estimate.runs} to run)" if read else "")
        + f" of {estimate.budget_s:g} s of the method's own "
        f"steps each (their settings go to compare.json), {estimate.concurrent} at a time; "
        f"{diagnostic}scoring and a run's start add about "
        f"{estimate.per_run_s - estimate.budget_s:.0f} s per run (up to {SCORED_POINTS + 1} "
        "held-out points, not charged to the budget: the table shows each run's wall time "
        f"beside it); ranked at {point}. Estimated wall time: about {estimate.total_s:.0f} s "
        f"(an estimate; the runs {estimate.runs_s:.0f} s)."
    )


class Heartbeat:
    """A line from ``message()`` every PROGRESS_EVERY_S seconds while the block runs (a
    daemon thread; ``quiet`` makes it a no-op). ``nudge()`` restarts the wait after another
    line was printed, so that lines come at most one per few seconds."""

    def __init__(self, message: Callable[[], str], quiet: bool = False):
        self.message, self.quiet = message, quiet
        self.stop = threading.Event()
        self.last = time.monotonic()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="compare-progress")

    def __enter__(self) -> Heartbeat:
        if not self.quiet:
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=1.0)

    def nudge(self) -> None:
        self.last = time.monotonic()

    def _beat(self) -> None:
        while not self.stop.wait(0.25):
            if time.monotonic() - self.last >= PROGRESS_EVERY_S:
                self.last = time.monotonic()
                try:
                    say(self.message())
                except Exception as err:  # a progress line never ends a comparison
                    say(f"(progress line failed: {err})")
