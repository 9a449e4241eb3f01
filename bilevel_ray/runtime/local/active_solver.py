"""The solver in force during a run, and acting on the flatness watch's verdicts: switching to the
fallback (``alt_pbgd``) from the current (x, y), stopping, warning, and certifying the end
point of a run that stayed with PBGD-Free (:mod:`bilevel_ray.diagnostics.end_check`)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

from bilevel_ray.config import METHOD_OPTIONS, SolverConfig
from bilevel_ray.diagnostics.end_check import EndCheck, end_check
from bilevel_ray.diagnostics.verdict import Verdict
from bilevel_ray.runtime.local.watch import FlatnessWarning, FlatnessWatch
from bilevel_ray.solvers.base import SolverState

__all__ = ["ActiveSolver", "end_of_run_check", "fallback_config", "switch_solver"]


def fallback_config(settings: SolverConfig, method: str) -> SolverConfig:
    """``settings`` for ``method``: step sizes, optimizer and gamma kept; the knobs of the old
    method that the new one lacks dropped; the new method's own knobs at their defaults."""
    knobs = {name: None for knobs in METHOD_OPTIONS.values() for name in knobs}
    if "gamma" in METHOD_OPTIONS[method]:
        knobs["gamma"] = settings.gamma
    return dataclasses.replace(settings, method=method, **knobs)


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
