"""One trial of a sweep (a Tune function trainable) and what it reports.

A single-worker trial runs the local runtime in the trial's own process; a multi-worker trial
launches a Train V2 ``TorchTrainer`` (run name from the trial id, the sweep's storage path) and
forwards its reports through ``TuneReportCallback``. Every logged row is scored on held-out data
(``eval/upper_loss``; every row that Tune sees adds ``eval/lower_gap``, which needs a lower
solve, and the searchers' ``search/score``, :mod:`bilevel_ray.runtime.local.ranking`) and kept
in the trial's history file, ``{sweep}/histories/<trial id>.parquet``; Tune sees a report at the
end, at the scheduler's milestones and checkpoints and otherwise at most every
``report_interval_s``. A trial whose loss goes non-finite ends with status ``diverged`` and its
last finite metrics; the sweep goes on.

With ``run.checkpoint_every`` (population-based training) a single-worker trial reports a Tune
checkpoint every that many steps and at its end: the local runtime's payload plus the trial's
lineage (:mod:`bilevel_ray.runtime.tune.lineage`). A trial started from a checkpoint (an exploit, or
a resumed sweep) continues from it with its own settings; its history file keeps every row it
computed, each with ``restart`` (which run of the trial it was) and ``from_step`` (the step that
run started from), so the sweep's compute (trial-steps) can be counted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import torch
from ray import tune as ray_tune

from bilevel_ray.errors import DivergenceError
from bilevel_ray.evaluation import evaluate
from bilevel_ray.problems import build_spec
from bilevel_ray.runtime.local import loop
from bilevel_ray.runtime.local.checkpoint import load_checkpoint, save_checkpoint
from bilevel_ray.runtime.local.history import read_rows, write_parquet
from bilevel_ray.runtime.local.judge import verdict_columns
from bilevel_ray.runtime.local.output_files import atomic_write
from bilevel_ray.runtime.local.ranking import FAILED, GAP, METRIC, SCORE, search_score
from bilevel_ray.runtime.local.run_spec import Placement, RunSpec, verbose
from bilevel_ray.runtime.local.solve import run_params, run_spec_local, solver_config
from bilevel_ray.runtime.local.threads import use_cpus
from bilevel_ray.runtime.train.job import WorkerJob
from bilevel_ray.runtime.tune.lineage import extend_lineage
from bilevel_ray.runtime.tune.outcome import HISTORIES, one_line
from bilevel_ray.runtime.tune.space import decode
from bilevel_ray.tracking import run_status

__all__ = ["PARAMS_FOLDER", "TRIAL_CHECKPOINT", "TrialPlan", "keep_params", "run_trial"]

TRIAL_CHECKPOINT = "trial.pt"  # inside each of a trial's Tune checkpoint folders
PARAMS_FOLDER = "params"  # each trial's parameters at its latest report, until the sweep ends


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a sweep shares: the problem, the method and its fixed settings, the
    run, the placement of its workers, the held-out scoring, and where its history goes."""

    factory: Any
    problem_config: Mapping[str, Any]
    method: str
    base: Mapping[str, Any]
    run: RunSpec
    placement: Placement
    use_gpu: bool
    gap_steps: int
    gap_tol: float
    sweep_folder: str
    milestones: frozenset[int] = frozenset()
    judge: Any = None
    # The sweep's checked TrackingSettings and its parent MLflow run's id: each trial logs
    # every row to a run of its own, nested under it (None: not tracked).
    tracking: Any = None
    tracking_parent: str | None = None


def run_trial(point: dict[str, Any], plan: TrialPlan) -> None:
    """A Tune function trainable: the trial at ``point`` of the search space.

    An exception of the trial's own code (bad settings, the user's loss) is a result, not a
    crash: the trial reports status ``error`` with a one-line reason and ends, so that Tune
    does not retry it (it would fail again); only a trial whose process dies is retried.
    """
    trial_id = ray_tune.get_context().get_trial_id()
    history = Path(plan.sweep_folder) / HISTORIES / f"{trial_id}.parquet"
    try:
        settings = solver_config(plan.method, {**plan.base, **decode(point)})
        if plan.placement.num_workers > 1:
            _trial_on_worker_group(settings, plan, trial_id, history, point)
        else:
            _trial_in_process(settings, plan, trial_id, history, point)
    except Exception as err:
        ray_tune.report(
            {
                # Every result carries the schedulers' time attribute: PBT and PB2 stop the
                # whole sweep on a result without one ("Cannot find time_attr step").
                "step": 0,
                "status": "error",
                "error": one_line(err),
                METRIC: math.inf,
                GAP: math.inf,
                SCORE: FAILED,
            }
        )


def _tracker(plan: TrialPlan, settings: Any, point: dict[str, Any], start: int = 0) -> Any:
    """This trial's tracked run (Ray's ``setup_mlflow``, nested under the sweep's), with the
    trial's settings and the point Tune sampled as parameters; None when untracked."""
    if plan.tracking is None:
        return None
    from bilevel_ray.tracking import trial_tracker

    params = run_params(settings, plan.run, searched=decode(point))
    return trial_tracker(plan.tracking, plan.tracking_parent, params, first_step=start)


def _trial_in_process(
    settings: Any, plan: TrialPlan, trial_id: str, history: Path, point: dict[str, Any]
) -> None:
    use_cpus(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    spec = build_spec(plan.factory, {**plan.problem_config, "device": "cpu"})
    restored = _restored_payload()
    start = int(restored["state"]["step"]) if restored is not None else 0
    lineage = restored.get("lineage", []) if restored is not None else []
    lineage = extend_lineage(lineage, start, trial_id, settings.to_dict(strict=False))
    sink = _TuneSink(spec, plan, trial_id, history, start, lineage)
    sink.tracker = _tracker(plan, settings, point, start)
    try:
        result = run_spec_local(
            spec,
            settings,
            plan.run,
            judge=_judge(plan),
            run_id=trial_id,
            also=sink,
            restore=restored,
            on_checkpoint=sink.hold if plan.run.checkpoint_every else None,
            tracker=sink.tracker,
        )
    except DivergenceError as err:
        sink.diverged(err)
        return
    if sink.tracker is not None:
        sink.tracker.end(result.status)
    certified = verdict_columns(result.verdict)
    if certified and any(sink.last.get(k) != v for k, v in certified.items()):
        # The run's end was certified after its last report: the trial's row says so.
        ray_tune.report({**sink.last, **certified, "status": result.status})


def _restored_payload() -> dict[str, Any] | None:
    """The checkpoint Tune starts this trial from (an exploit's donor, or its own after a
    resume), or None."""
    checkpoint = ray_tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / TRIAL_CHECKPOINT)


def _judge(plan: TrialPlan) -> Any:
    if plan.judge is None:
        return None
    from bilevel_ray.runtime.train.judge_actor import ActorJudge

    return ActorJudge(plan.judge)


class _TuneSink:
    """Scores every logged row, keeps the trial's history file, and reports to Tune when the
    :class:`~bilevel_ray.runtime.local.loop.ReportClock` says so (with the checkpoint, when one is
    held)."""

    def __init__(
        self,
        spec: Any,
        plan: TrialPlan,
        trial_id: str,
        history: Path,
        start: int = 0,
        lineage: list[dict[str, Any]] | None = None,
    ):
        self.spec, self.plan, self.trial_id, self.history = spec, plan, trial_id, history
        self.start, self.lineage = start, lineage or []
        self.lineage_json = json.dumps(self.lineage)  # fixed for this run of the trial
        self.clock = loop.ReportClock(plan.run.report_interval_s, plan.milestones)
        # A trial started again keeps what it computed before (its compute is spent); each of
        # its runs is numbered (``restart``), so that a plot draws them apart.
        self.rows: list[dict[str, Any]] = read_rows(history) if start else []
        self.restart = 1 + max((r.get("restart", 0) for r in self.rows), default=-1)
        self.last: dict[str, Any] = {}
        self.held: dict[str, Any] | None = None
        self.tracker: Any = None  # the trial's RowTracker: every row, scores included

    def hold(self, payload: dict[str, Any]) -> None:
        """Keep a checkpoint payload for this step's report (the lineage goes with it)."""
        self.held = {**payload, "lineage": self.lineage}

    def before_step(self, step: int) -> None:
        """Nothing to do before a step."""

    def after_step(self, outcome: loop.StepOutcome, state: Any, active: Any) -> None:
        row = outcome.row
        if row is None:
            return
        # The gap (a lower solve) only on the rows that Tune sees: the searchers and
        # schedulers read search/score there, and the ranking reads the final one.
        due = self.clock.due(outcome) or self.held is not None
        scores = evaluate(
            self.spec.problem,
            state.x,
            state.y,
            self.spec.eval_data,
            gap_steps=self.plan.gap_steps,
            with_gap=due,
        )
        scores[SCORE] = search_score(scores[METRIC], scores[GAP], self.plan.gap_tol)
        if self.tracker is not None:
            self.tracker.log_row({**row, **scores})
        # A run stopped by the flatness verdict ends on this row, with its status.
        status = active.status if outcome.done else "running"
        self.last = {**_numbers(row), **scores, **verdict_columns(active.verdict)}
        self.last["lineage"] = self.lineage_json  # the best one becomes a schedule
        self.rows.append(
            {
                "trial_id": self.trial_id,
                **row,
                **scores,
                "status": status,
                "from_step": self.start,
                "restart": self.restart,
            }
        )
        if due:
            keep_params(self.plan.sweep_folder, self.trial_id, state.x, state.y)
            self.report({**self.last, "status": status})

    def report(self, metrics: dict[str, Any]) -> None:
        write_parquet(pa.Table.from_pylist(self.rows), self.history)
        if self.held is None:
            ray_tune.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(self.held, Path(folder) / TRIAL_CHECKPOINT)
                ray_tune.report(metrics, checkpoint=ray_tune.Checkpoint.from_directory(folder))
            self.held = None
        self.clock.reported()

    def diverged(self, err: DivergenceError) -> None:
        ended = {
            METRIC: math.inf,
            GAP: math.inf,
            SCORE: FAILED,
            "status": "diverged",
            "diverged_at_step": err.step,
        }
        self.rows.append({"trial_id": self.trial_id, **_numbers(err.last_finite), **ended})
        self.report({**self.last, **_numbers(err.last_finite), **ended, "diverged_how": err.what})


def _trial_on_worker_group(
    settings: Any, plan: TrialPlan, trial_id: str, history: Path, point: dict[str, Any]
) -> None:
    """A multi-worker trial: a Train worker group started from the trial, whose rows the
    trial's tracker logs once the group is done (the group's history comes back whole)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from bilevel_ray.runtime.cluster.shipping import portable_factory
    from bilevel_ray.runtime.train.group import fit_worker_group

    job = WorkerJob(
        portable_factory(plan.factory),
        plan.problem_config,
        settings.to_dict(),
        dataclasses.replace(plan.run, checkpoint_every=0),
        plan.placement.num_workers,
        plan.use_gpu,
        gap_steps=plan.gap_steps,
        gap_tol=plan.gap_tol,
        judge=plan.judge,
        run_id=trial_id,
        verbose=verbose(),
    )
    tracker = _tracker(plan, settings, point)
    try:
        metrics, payload = fit_worker_group(
            job,
            dataclasses.replace(plan.placement, max_failures=0),
            Path(plan.sweep_folder).parent,
            f"train-{trial_id}",
            callbacks=[TuneReportCallback()],
        )
    except BaseException as err:
        if tracker is not None:
            tracker.end(run_status(err))
        raise
    if tracker is not None:
        for row in payload.get("history", []):
            tracker.log_row(row)
        status = metrics.get("status")
        tracker.end(status if status in ("diverged", "unsuitable") else "completed")
    rows = [{"trial_id": trial_id, **row} for row in payload.get("history", [])]
    write_parquet(pa.Table.from_pylist(rows), history)
    if "state" in payload:
        state = payload["state"]
        keep_params(plan.sweep_folder, trial_id, state["x"], state["y"])


def keep_params(sweep_folder: str, trial_id: str, x: Any, y: Any) -> None:
    """The trial's parameters as of the report it makes now (its last one is its final), in
    ``{sweep}/params/<trial id>.pt``: the sweep keeps its best trial's as ``best_result.pt``."""
    params = {"x": {k: v.detach().cpu() for k, v in x.items()}}
    params["y"] = {k: v.detach().cpu() for k, v in y.items()}
    path = Path(sweep_folder) / PARAMS_FOLDER / f"{trial_id}.pt"
    atomic_write(path, lambda tmp: torch.save(params, tmp))


def _numbers(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k == "step" or "/" in k}
