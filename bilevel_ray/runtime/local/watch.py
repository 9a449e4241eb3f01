"""Watching a PBGD-Free run for flatness, and acting on the verdict.

During a warm-up window of W steps the run estimates PBGD-Free's dropped term every ``every``
steps (:func:`bilevel_ray.diagnostics.flatness.estimate` at the current x, y and batch) and hands
the estimates to a *judge*; after step W the judge returns a verdict
(:func:`bilevel_ray.diagnostics.verdict.decide`) and the run does what the user chose with
``on_unsuitable``:

* ``"fallback"``: the same run continues from the current (x, y) with the verdict's fallback
  solver (``alt_pbgd``, which keeps the value-function term PBGD-Free drops); the history's
  ``method`` column shows from which row on;
* ``"stop"``: the run ends at step W with status ``unsuitable``;
* ``"warn"``: a warning, and the run goes on unchanged.

After the window the watch checks again every ``recheck_every`` steps (W by default: one estimate
per W steps, a quarter of the window's cost), so that a coupling that switches on only where the
window did not reach is still caught, and acts the same way the first time a later check finds
PBGD-Free unsuitable. Each estimate carries diagnose's settled flag (PBGD-Free's own direction
at most 10% of the dropped term) and, for plain SGD on x, its jitter floor lr_x ||kept||^2 / 4;
the tolerance is 5% of the achievable improvement from the run's start (f at its first
estimate, which every later check keeps) plus that floor. The judge is
a :class:`FlatnessJudge` in this process for ``br.solve``, and the same class inside a named Ray
actor for ``br.train`` and ``br.tune`` (:mod:`bilevel_ray.runtime.train.judge_actor`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bilevel_ray.config import METHOD_OPTIONS, SolverConfig
from bilevel_ray.diagnostics.end_check import EndCheck, end_check
from bilevel_ray.diagnostics.flatness import count_problem, estimate, estimate_problems
from bilevel_ray.diagnostics.responses import reference_upper
from bilevel_ray.diagnostics.verdict import Verdict, decide
from bilevel_ray.errors import ConfigError
from bilevel_ray.solvers.base import SolverState

__all__ = [
    "ON_UNSUITABLE",
    "ActiveSolver",
    "FlatnessJudge",
    "FlatnessWarning",
    "FlatnessWatch",
    "WatchSettings",
    "end_of_run_check",
    "fallback_config",
    "switch_solver",
    "verdict_columns",
    "watch_settings",
]

ON_UNSUITABLE = ("fallback", "stop", "warn")
# The watch runs inside a training run and must stay cheap: one random direction for the
# exponent fit; L-BFGS solves started at the run's y, to a relative gradient of 1e-2, and
# decide() accepting points solved that far (2e-2). Tighter tolerances sit at float32's rounding
# on a real model, where the solves then run to solve_steps: on the representation MLP an
# estimate costs about 0.3 s this way (about 100 PBGD-Free steps), against 1.6 s or more with
# br.diagnose's defaults. The verdict's thresholds (10% and 30% of the gradient) do not need
# more. A point whose solves did not converge is dropped, so a budget too small shows as
# "uncertain", not as a wrong verdict.
RUN_ESTIMATOR_OPTIONS: dict[str, Any] = {
    "directions": 1,
    "optimizer": "lbfgs",
    "solve_rtol": 1e-2,
}
RUN_DECIDE_OPTIONS: dict[str, Any] = {"max_residual": 2e-2}
SETTLE = 0.1  # diagnose's settle: kept <= SETTLE max(dropped, SETTLE peak kept)
# The keyword options of estimate() and their defaults ("responses" is the runtime's own).
ESTIMATOR_OPTIONS = {
    p.name: p.default
    for p in inspect.signature(estimate).parameters.values()
    if p.kind == p.KEYWORD_ONLY and p.name not in ("seed", "responses")
}


@dataclass(frozen=True)
class WatchSettings:
    """The warm-up window W, the estimate interval, the action, and estimator options."""

    on_unsuitable: str
    window: int = 200
    every: int = 50
    estimator: Mapping[str, Any] = field(default_factory=dict)
    recheck_every: int | None = None  # after the window; None: every W steps
    end_check: bool = True  # certify the end point of a run that stayed with PBGD-Free

    def estimate_steps(self) -> list[int]:
        """Steps completed at which an estimate is taken: every, 2 every, ..., and W."""
        return sorted({*range(self.every, self.window, self.every), self.window})

    def rechecks(self, step: int) -> bool:
        """Whether ``step`` (after the window) is one of the cheap later checks: every
        ``recheck_every`` (default W) steps past W."""
        period = self.recheck_every or self.window
        return step > self.window and (step - self.window) % period == 0


def watch_settings(
    on_unsuitable: str | None,
    method: str,
    window: Any = 200,
    every: Any = 50,
    estimator: Any = None,
) -> WatchSettings | None:
    """Validated settings, or None when no diagnostic was asked for (``on_unsuitable=None``);
    :class:`~bilevel_ray.runtime.local.run_spec.RunSpec` checks that the run reaches the window's
    end."""
    if on_unsuitable is None:
        return None
    problems = []
    if on_unsuitable not in ON_UNSUITABLE:
        problems.append(
            f"on_unsuitable={on_unsuitable!r}: choose one of {', '.join(ON_UNSUITABLE)}, or None "
            "for no flatness diagnostic"
        )
    if method != "pbgd_free":
        problems.append(
            f"on_unsuitable={on_unsuitable!r} with method={method!r}: the flatness diagnostic "
            "judges PBGD-Free's dropped term; use method='pbgd_free' or on_unsuitable=None"
        )
    count_problem(problems, "diagnose_window", window, 1)
    count_problem(problems, "diagnose_every", every, 1)
    if estimator is not None and not isinstance(estimator, Mapping):
        problems.append(f"diagnose_options={estimator!r}: must be a dict of estimator options")
        estimator = None
    options = {**ESTIMATOR_OPTIONS, **RUN_ESTIMATOR_OPTIONS, **(estimator or {})}
    if not problems:
        unknown = sorted(set(options) - set(ESTIMATOR_OPTIONS))
        if unknown:
            problems.append(
                f"diagnose_options has unknown key(s) {unknown}; see "
                "bilevel_ray.diagnostics.flatness.estimate for the options"
            )
        else:
            # gamma is the run's own, already checked with the solver settings.
            problems += estimate_problems(**{**options, "gamma": 1.0})
    if problems:
        raise ConfigError(problems)
    return WatchSettings(on_unsuitable, window, every, options)


class FlatnessWarning(UserWarning):
    """The diagnostic found PBGD-Free unsuitable and ``on_unsuitable="warn"`` keeps going."""


class FlatnessJudge:
    """Collects estimates per run id and, once asked, decides (the verdict is then fixed)."""

    def __init__(self, decide_options: Mapping[str, Any] | None = None):
        self._stats: dict[str, list[dict[str, float]]] = {}
        self._reference: dict[str, float] = {}  # f at each run's first estimate
        self._verdicts: dict[str, dict[str, Any]] = {}
        self._decide_options = {**RUN_DECIDE_OPTIONS, **(decide_options or {})}

    def add(self, run_id: str, step: int, stats: Mapping[str, float]) -> None:
        """Keep one estimate. Its ``start_upper`` (f at the run's start, which the watch
        measures) is the reference point the achievable improvement is measured from; an
        estimate without one gets the run's first estimate's f, so that a recheck on late
        estimates alone keeps the same tolerance."""
        points = self._stats.setdefault(run_id, [])
        upper = stats.get("flatness/upper", math.nan)
        if not points and isinstance(upper, (int, float)):
            self._reference[run_id] = float(upper)
        reference = {"flatness/start_upper": self._reference.get(run_id, math.nan)}
        points.append({**reference, **stats, "step": float(step)})

    def verdict(self, run_id: str) -> dict[str, Any]:
        """The run's verdict as plain values (``Verdict.to_dict()``), decided on first call."""
        if run_id not in self._verdicts:
            stats = self._stats.get(run_id)
            if stats:
                verdict = decide(stats, **self._decide_options)
            else:  # e.g. a judge actor restarted after its estimates were sent
                reason = f"no flatness estimate of run {run_id!r} reached the judge"
                verdict = Verdict(False, "uncertain", reason, {}, "compare with alt_pbgd")
            self._verdicts[run_id] = verdict.to_dict()
        return self._verdicts[run_id]

    def recheck(self, run_id: str, since: int) -> dict[str, Any]:
        """A later verdict on the estimates taken after step ``since`` (the window's end): it
        replaces the run's verdict only when it finds PBGD-Free unsuitable (a verdict acted on
        stays); returns the run's verdict either way."""
        current = self.verdict(run_id)
        later = [p for p in self._stats.get(run_id, []) if p["step"] > since]
        if current["verdict"] != "unsuitable" and later:
            # The latest two estimates: where the run is now, not where it was at W.
            fresh = decide(later[-2:], **self._decide_options).to_dict()
            if fresh["verdict"] == "unsuitable":
                fresh["stats"]["flatness/decided_at"] = later[-1]["step"]
                self._verdicts[run_id] = fresh
        return self._verdicts[run_id]

    def verdicts(self) -> dict[str, dict[str, Any]]:
        return dict(self._verdicts)


def verdict_columns(verdict: Mapping[str, Any] | None) -> dict[str, Any]:
    """A verdict, once given, as report columns (a sweep's trials.parquet keeps them)."""
    if verdict is None:
        return {}
    return {"flatness/verdict": verdict["verdict"], "flatness/reason": verdict["reason"]}


def fallback_config(settings: SolverConfig, method: str) -> SolverConfig:
    """``settings`` for ``method``: step sizes, optimizer and gamma kept; the knobs of the old
    method that the new one lacks dropped; the new method's own knobs at their defaults."""
    knobs = {name: None for knobs in METHOD_OPTIONS.values() for name in knobs}
    if "gamma" in METHOD_OPTIONS[method]:
        knobs["gamma"] = settings.gamma
    return dataclasses.replace(settings, method=method, **knobs)


class FlatnessWatch:
    """The run's side of the diagnostic: estimate, hand over, at step W say what to do, and
    then check again every ``recheck_every`` steps (one estimate each) until PBGD-Free is found
    unsuitable or the run switched away from it."""

    def __init__(self, settings: WatchSettings, judge: Any, run_id: str, gamma: Any):
        """``judge`` has ``add(run_id, step, stats)``, ``verdict(run_id)`` and
        ``recheck(run_id, since)`` (a FlatnessJudge or an actor proxy); ``gamma`` is the run's
        penalty, a number or a schedule of the step."""
        self.settings, self.judge, self.run_id, self.gamma = settings, judge, run_id, gamma
        self._due = set(settings.estimate_steps())
        self._peak = 0.0  # the largest kept term seen: the settled flag's reference
        self.sgd_lr_x: Any = None  # lr_x (a number or a schedule) for plain SGD on x (bind)
        self.start_upper: float | None = None  # f at the run's first step (start)

    def bind(self, solver_settings: Any) -> None:
        """The run's step rule: plain SGD on x jitters lr_x tr(Var kept) / 4 above its end
        point, a floor under any visible gap (as diagnose's)."""
        rule = solver_settings.optimizer
        rule = rule if isinstance(rule, str) else rule[0]
        self.sgd_lr_x = solver_settings.lr_x if rule == "sgd" else None

    def start(self, problem: Any, state: SolverState, batch: Any) -> None:
        """f(x, y_gamma(x)) at the run's first watched step: the reference every estimate
        carries, so the tolerance is 5% of the improvement from the run's start, whichever
        estimate the judge decides on (a later estimate's own f would collapse it)."""
        gamma = float(self.gamma(state.step) if callable(self.gamma) else self.gamma)
        solve = {"solve_steps": 50, "solve_lr": 0.05, "solve_rtol": 1e-2, "optimizer": "lbfgs"}
        self.start_upper, _ = reference_upper(problem, state.x, state.y, batch, gamma, solve)

    def observe(self, problem: Any, state: SolverState, batch: Any) -> None:
        """Estimate at (x, y) if this step is one of the window's estimate steps or a later
        check; the estimate carries the settled flag and the jitter floor diagnose uses."""
        if not self.due(state.step):
            return
        gamma = float(self.gamma(state.step) if callable(self.gamma) else self.gamma)
        # The solves start at the run's y: PBGD-Free's y tracks y_gamma, O(1/gamma) from y_g,
        # a closer start than the previous point's y_g once x has moved for every steps.
        stats = estimate(problem, state.x, state.y, batch, gamma, **self.settings.estimator)
        kept, dropped = stats["flatness/kept"], stats["flatness/dropped"]
        if kept == kept:
            self._peak = max(self._peak, kept)
        # Settled as in diagnose: PBGD-Free's own step has died out against the dropped term
        # (or against its own largest value); at a settled point E ||kept_b||^2 ~ tr Var kept.
        settled = kept <= SETTLE * max(dropped, SETTLE * self._peak)
        stats["flatness/settled"], stats["flatness/settle"] = float(settled), SETTLE
        stats["flatness/settle_ratio"] = kept / max(dropped, SETTLE * self._peak, 1e-300)
        lr_x = self.sgd_lr_x
        jitter = 0.0 if lr_x is None else float(lr_x(state.step) if callable(lr_x) else lr_x) / 4
        stats["flatness/noise_floor"] = jitter * kept**2 if settled else 0.0
        if self.start_upper is not None:
            stats["flatness/start_upper"] = self.start_upper
        self.judge.add(self.run_id, state.step, stats)

    def due(self, step: int) -> bool:
        return step in self._due or self.settings.rechecks(step)

    def decides_at(self, step: int) -> bool:
        return step == self.settings.window

    def verdict(self) -> dict[str, Any]:
        return self.judge.verdict(self.run_id)

    def recheck(self) -> dict[str, Any]:
        return self.judge.recheck(self.run_id, self.settings.window)

    def action(
        self, verdict: Mapping[str, Any], warn: bool = True, step: int | None = None
    ) -> str | None:
        """None (keep going), "fallback" or "stop"; "warn" warns here (if ``warn``) and keeps
        going."""
        if verdict["verdict"] != "unsuitable":
            return None
        if self.settings.on_unsuitable == "warn":
            if not warn:
                return None
            # Attributed to no source file: Python would print the line of this library that
            # warned under the message, which tells a user nothing.
            warnings.warn_explicit(
                f"flatness diagnostic at step {step or self.settings.window}: "
                f"{verdict['reason']} (recommendation: {verdict['recommendation']})",
                FlatnessWarning,
                filename="bilevel_ray",
                lineno=0,
            )
            return None
        return self.settings.on_unsuitable


def end_of_run_check(
    active: ActiveSolver,
    state: SolverState,
    data: Any,
    steps: int,
    seed: int,
    start: tuple[Any, Any],
) -> Verdict | None:
    """The end-of-run certificate (:mod:`~bilevel_ray.diagnostics.end_check`) of a run that
    stayed with PBGD-Free to its last step, at a cost kept small against the run: one batch
    order and M = max(20, steps / 40) continuation steps of each method (about a sixth of the
    run's time with alt_pbgd's K = 5). None where it does not apply."""
    watch = active.watch
    if (
        watch is None
        or not watch.settings.end_check
        or active.settings.method != "pbgd_free"
        or active.status != "completed"
        or state.step != steps
    ):
        return None
    check = EndCheck(active.settings, check_steps=max(20, steps // 40), replicas=1, seed=seed)
    verdict = end_check(
        active.problem, state.x, state.y, data, check, reference=start, end_step=steps
    )
    active.certify(verdict, steps)
    return verdict


def switch_solver(
    settings: SolverConfig, method: str, problem: Any, state: SolverState, grad_reduce: Any
) -> tuple[SolverConfig, Any, SolverState]:
    """The fallback's settings, solver and state, continuing from ``state``'s (x, y) and step
    (the fallback's optimizer states start afresh)."""
    new_settings = fallback_config(settings, method)
    solver = new_settings.build(problem, grad_reduce)
    return new_settings, solver, solver.init(state.x, state.y)._replace(step=state.step)


class ActiveSolver:
    """The solver in force (PBGD-Free, or its fallback after a flatness verdict), its settings,
    and the diagnostic's outcome, for one rank of a run.

    With several data-parallel ranks only the leader (rank 0) estimates and asks the judge;
    ``share(verdict)`` hands the leader's verdict to every rank (a broadcast), so that all of
    them switch or stop at the same step.
    """

    def __init__(
        self,
        settings: SolverConfig,
        solver: Any,
        problem: Any,
        grad_reduce: Any,
        watch: FlatnessWatch | None,
        leader: bool = True,
        share: Any = None,
    ):
        self.settings, self.solver, self.problem = settings, solver, problem
        self.initial_settings = settings  # what the run was started with (its checkpoints')
        self.grad_reduce, self.watch, self.leader = grad_reduce, watch, leader
        self.share = share or (lambda verdict: verdict)
        self.verdict: dict[str, Any] | None = None
        self.status = "completed"
        if watch is not None:
            watch.bind(settings)

    def after_step(self, state: SolverState, batch: Any) -> tuple[SolverState, str | None]:
        """Feed the watch; at the end of its window, act on the verdict. Returns the state and
        the action taken (None, "fallback" or "stop")."""
        if self.watch is None:
            return state, None
        if self.leader and self.watch.start_upper is None and self.settings.method == "pbgd_free":
            self.watch.start(self.problem, state, batch)
        if not self.watch.due(state.step):
            return state, None
        window = self.watch.decides_at(state.step)
        in_window = state.step < self.watch.settings.window
        if state.step > self.watch.settings.window and (
            self.settings.method != "pbgd_free"
            or self.verdict is None
            or self.verdict["verdict"] == "unsuitable"
        ):
            return state, None  # later checks only while PBGD-Free runs and was not yet acted on
        if self.leader:
            self.watch.observe(self.problem, state, batch)
        if in_window:
            return state, None  # an in-window estimate: the judge decides on all of them at W
        if window:
            self.verdict = self.share(self.watch.verdict() if self.leader else None)
        else:
            later = self.share(self.watch.recheck() if self.leader else None)
            if later["verdict"] != "unsuitable":
                return state, None
            self.verdict = later
        action = self.watch.action(self.verdict, warn=self.leader, step=state.step)
        if action == "stop":
            self.status = "unsuitable"
        elif action == "fallback":
            self.settings, self.solver, state = switch_solver(
                self.settings, self.verdict["fallback"], self.problem, state, self.grad_reduce
            )
        return state, action

    def certify(self, verdict: Verdict, step: int) -> None:
        """The end-of-run certificate replaces the early verdict (it measures the outcome the
        early one predicted) and is acted on as the user chose: "warn" warns, "stop" marks the
        run ``unsuitable``; "fallback" cannot switch a run that has ended, so it warns too and
        the recommendation names the method to rerun with."""
        self.verdict = verdict.to_dict()
        self.verdict["stats"]["flatness/decided_at"] = float(step)
        if verdict.verdict != "unsuitable" or self.watch is None:
            return
        if self.watch.settings.on_unsuitable == "stop":
            self.status = "unsuitable"
        elif self.leader:
            warnings.warn_explicit(
                f"flatness certificate at the run's end (step {step}): {verdict.reason}",
                FlatnessWarning,
                filename="bilevel_ray",
                lineno=0,
            )

    def saved(self) -> dict[str, Any]:
        """What a checkpoint keeps of the diagnostic (plain values)."""
        return {
            "method": self.settings.method,
            "settings": self.settings.to_dict(strict=False),  # in force: the fallback's
            "verdict": self.verdict,
            "status": self.status,
        }

    def restore(self, saved: Mapping[str, Any] | None) -> None:
        """Continue a resumed run with the solver it had switched to."""
        if not saved:
            return
        self.verdict, self.status = saved["verdict"], saved["status"]
        if saved["method"] != self.settings.method:
            self.settings = fallback_config(self.settings, saved["method"])
            self.solver = self.settings.build(self.problem, self.grad_reduce)
