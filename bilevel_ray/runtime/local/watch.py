"""Watching a PBGD-Free run for flatness: the early price during a warm-up window.

During a warm-up window of W steps the run estimates PBGD-Free's dropped term every ``every``
steps (:func:`bilevel_ray.diagnostics.flatness.estimate` at the current x, y and batch) and hands
every estimate to a *judge* (:mod:`bilevel_ray.runtime.local.judge`), which decides at step W
on all of them (:func:`bilevel_ray.diagnostics.price_rule.decide`). The run then does what the
user chose with ``on_unsuitable`` (:mod:`bilevel_ray.runtime.local.active_solver`):

* ``"fallback"``: the same run continues from the current (x, y) with the verdict's fallback
  solver (``alt_pbgd``); the history's ``method`` column shows from which row on;
* ``"stop"``: the run ends at step W with status ``unsuitable``;
* ``"warn"``: a warning, and the run goes on unchanged.

After the window the watch checks again every ``recheck_every`` steps (W by default), so that a
coupling that switches on only where the window did not reach is still caught. Each estimate
carries diagnose's settled flag (PBGD-Free's own direction at most 10% of the dropped term), for
plain SGD on x its jitter floor lr_x ||kept||^2 / 4, and f at the run's first step (measured
once by the watch): the tolerance is 5% of the achievable improvement from the run's start,
whichever estimates the judge decides on. This early verdict is a prediction; a run that stays
with PBGD-Free is certified at its end (:func:`~bilevel_ray.runtime.local.active_solver.
end_of_run_check`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

from bilevel_ray.diagnostics.flatness import count_problem, estimate, estimate_problems
from bilevel_ray.diagnostics.responses import reference_upper
from bilevel_ray.errors import ConfigError
from bilevel_ray.runtime.local.run_spec import ON_UNSUITABLE, WatchSettings
from bilevel_ray.solvers.base import SolverState

__all__ = [
    "ON_UNSUITABLE",
    "FlatnessWarning",
    "FlatnessWatch",
    "WatchSettings",
    "watch_settings",
]

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
SETTLE = 0.1  # diagnose's settle: kept <= SETTLE max(dropped, SETTLE peak kept)
# The keyword options of estimate() and their defaults ("responses" is the runtime's own).
ESTIMATOR_OPTIONS = {
    p.name: p.default
    for p in inspect.signature(estimate).parameters.values()
    if p.kind == p.KEYWORD_ONLY and p.name not in ("seed", "responses")
}


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
