"""The local runtime: ``br.solve`` runs a solver in this process, with no Ray.

Everything is validated before step 0 (settings, x0 / y0, data, one evaluation of each loss).
The steps are :func:`bilevel_ray.runtime.local.loop.run`'s; this module's sink writes the files.
With ``checkpoint_path`` the state, the RNG, the history so far and the settings are saved every
``checkpoint_every`` steps, and ``resume=True`` continues from there with the same batches and
the same result as an uninterrupted run. A non-finite loss stops the run with
:class:`~bilevel_ray.errors.DivergenceError`.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from bilevel_ray.config import SolverConfig
from bilevel_ray.data import as_batches
from bilevel_ray.errors import ConfigError
from bilevel_ray.evaluation import held_out_metrics
from bilevel_ray.problem import (
    BilevelProblem,
    ProblemSpec,
    check_losses,
    check_params,
    check_problem,
)
from bilevel_ray.runtime.local import loop
from bilevel_ray.runtime.local.active_solver import ActiveSolver, end_of_run_check
from bilevel_ray.runtime.local.checkpoint import (
    check_resume_shapes,
    checkpoint_payload,
    history_bytes,
    load_resume,
    save_checkpoint,
    tensor_bytes,
)
from bilevel_ray.runtime.local.history import HistoryRecorder, write_parquet
from bilevel_ray.runtime.local.judge import FlatnessJudge
from bilevel_ray.runtime.local.output_files import (
    check_distinct,
    check_free_space,
    check_output_path,
    check_writable,
)
from bilevel_ray.runtime.local.run_spec import (
    RUN_OPTIONS,
    RunSpec,
    build_run,
    declare_run_options,
    take_run_options,
)
from bilevel_ray.runtime.local.watch import FlatnessWatch
from bilevel_ray.solvers.base import GradReduce, SolverState, state_from_dict
from bilevel_ray.solvers.compute import LossReturnError
from bilevel_ray.tracking import RowTracker, TrackerSink, open_tracking, run_status
from bilevel_ray.tree import Params, cuda_devices, to_device

__all__ = [
    "SolveResult",
    "run_local",
    "run_params",
    "run_spec_local",
    "solve",
    "solver_config",
    "with_held_out",
]

RUN_SETTINGS = ", ".join(
    ["steps", "data", "history_path", "checkpoint_path", "resume", "grad_reduce", *RUN_OPTIONS]
)


@dataclass
class SolveResult:
    """Final iterates, the logged history (``HISTORY_SCHEMA``), the solver state and settings;
    with a flatness diagnostic, its verdict and the run's status (``"completed"``, or
    ``"unsuitable"`` when ``on_unsuitable="stop"`` ended it). ``config["method"]`` is the
    method in force at the end (the fallback's, after a switch)."""

    x: Params
    y: Params
    history: pa.Table
    state: SolverState
    config: dict[str, Any]
    verdict: dict[str, Any] | None = None
    status: str = "completed"
    # The problem's own held-out numbers at the end (``eval/<name>``,
    # :func:`~bilevel_ray.evaluation.held_out_metrics`); empty when it has none.
    held_out: dict[str, float] = field(default_factory=dict)
    # The settings the run started with (``config`` is the one in force at its end: a
    # fallback's after a switch), the steps it was asked for, and the fingerprint of the data
    # it was built from where the entry point took one (a manifest's ``data``).
    start_config: dict[str, Any] | None = None
    steps: int | None = None
    fingerprint: dict[str, Any] | None = None
    # Where the run was tracked: ``{"mlflow_run_id": ..., "tensorboard": folder}`` (the keys
    # of the trackers asked for), or None when it was not.
    tracking: dict[str, str] | None = None


def solver_config(method: str, options: dict[str, Any]) -> SolverConfig:
    """A SolverConfig from keywords, refusing unknown ones by name."""
    allowed = {f.name for f in fields(SolverConfig)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown keyword(s) {unknown}; solver settings are: {', '.join(sorted(allowed))}; "
            f"run settings are: {RUN_SETTINGS}"
        )
    for key, value in options.items():
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            # Python holds it; float() and torch do not (an OverflowError deep in the setup).
            digits = len(str(abs(value)))
            shown = repr(value) if digits <= 30 else f"<an integer of {digits} digits>"
            raise ConfigError(
                f"{key}={shown}: too large; must be below 2**63 (for a rate or a penalty, give a "
                "float such as 1e3)"
            )
    return SolverConfig(method=method, **options)


@declare_run_options()
def solve(
    problem: BilevelProblem | ProblemSpec,
    x0: Params | None = None,
    y0: Params | None = None,
    *,
    method: str = "pbgd_free",
    steps: int | None = None,
    data: Any = None,
    history_path: str | os.PathLike[str] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    grad_reduce: GradReduce | None = None,
    mlflow: Any = None,
    tensorboard: str | os.PathLike[str] | None = None,
    experiment: str | None = None,
    tags: dict[str, Any] | None = None,
    **options: Any,
) -> SolveResult:
    """Solve ``min_x f(x, y*(x))`` from ``(x0, y0)`` with ``method``, in this process.

    Args:
        problem: an object with ``upper_loss(x, y, batch)`` and ``lower_loss(x, y, batch)``;
            or a whole ``br.ProblemSpec`` (what a factory returns): its problem, start point and
            data, and its suggested settings (``defaults``, ``steps`` included) under the
            keywords given here.
        x0, y0: initial upper / lower variables (dicts of floating tensors; copied, not
            modified); taken from the spec when ``problem`` is one.
        method: ``pbgd_free`` (default), ``pbgd``, ``alt_pbgd``, ``f2sa``, ``bome``,
            ``implicit_cg``.
        steps: total iterations (a resumed run continues up to this count); default 1000, or
            the spec's suggested steps.
        data: ``None``, ``br.full_batch(...)``, ``br.minibatches(...)`` or a pair of batch
            sources; see :mod:`bilevel_ray.data`.
        history_path: also write the history to this Parquet file.
        checkpoint_path, resume: save to this file every ``checkpoint_every`` steps and at the
            end; continue a saved run.
        grad_reduce: the gradient reduction (identity here; the Ray runtime injects its own).
        mlflow: an MLflow tracking URI (``sqlite:///mlflow.db``, a folder, ``http://host:5000``;
            needs ``pip install 'bilevel_ray[mlflow]'``): the run's settings as parameters,
            every logged history row as metrics, ``history_path`` as an artifact.
        tensorboard: a folder for TensorBoard event files (needs
            ``pip install 'bilevel_ray[tensorboard]'``): every logged row, in
            ``{tensorboard}/{experiment}/{run name}``.
        experiment, tags: the MLflow experiment (default ``bilevel_ray``) and tags of the run.
        on_unsuitable and the other run settings below: :data:`~bilevel_ray.runtime.local.
            run_spec.RUN_OPTIONS` (with ``on_unsuitable``, the flatness diagnostic runs during
            a warm-up window and acts; see :mod:`bilevel_ray.runtime.local.watch`).
        **options: the run settings below, and the :class:`~bilevel_ray.config.SolverConfig`
            fields (``lr_x``, ``lr_y``, ``gamma``, ``inner_steps``, ``optimizer``, ...).

    Raises:
        ConfigError: bad input, before any step runs.
        DivergenceError: a loss became NaN or infinite (names the step).
    """
    run_options = take_run_options(options)
    tracking = open_tracking(mlflow, tensorboard, experiment=experiment, tags=tags)
    eval_data = problem.eval_data if isinstance(problem, ProblemSpec) else None
    if isinstance(problem, ProblemSpec):
        problem, x0, y0, data, options, steps = _from_spec(
            problem, x0, y0, data, method, options, steps
        )
    if x0 is None or y0 is None:
        raise ConfigError(
            "solve needs x0 and y0 (dicts of tensors), or a br.ProblemSpec as its first argument "
            "(what a factory returns): br.solve(spec) or br.solve(problem, x0, y0)"
        )
    config = solver_config(method, options)
    spec = build_run(method, 1000 if steps is None else steps, run_options)
    tracker = None
    if tracking is not None:
        # Started at the first step: input refused before it leaves no run behind.
        tracker = RowTracker(tracking, tracking.run_name or _run_name(method))
    result = run_local(
        problem,
        x0,
        y0,
        config,
        spec,
        data=data,
        history_path=history_path,
        checkpoint_path=checkpoint_path,
        resume=resume,
        grad_reduce=grad_reduce,
        judge=FlatnessJudge(),
        run_id="run",
        also=None if tracker is None else TrackerSink(tracker, params=run_params(config, spec)),
        tracker=tracker,
    )
    result = with_held_out(result, problem, eval_data)
    if tracker is not None:
        _end_tracked(tracker, result, history_path)
    return result


def run_params(config: SolverConfig, spec: RunSpec, **more: Any) -> dict[str, Any]:
    """A run's parameters as a tracker keeps them: the method, the steps, the seed, the
    logging interval, ``more`` and the solver settings (``solver/lr_x``, ...)."""
    return {
        "method": config.method,
        "steps": spec.steps,
        "seed": spec.seed,
        "report_every": spec.report_every,
        **more,
        "solver": {k: v for k, v in config.to_dict(strict=False).items() if k != "method"},
    }


def _run_name(method: str) -> str:
    """A new run's name: MLflow tells runs apart by id, TensorBoard by folder name."""
    return f"solve-{method}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _end_tracked(tracker: RowTracker, result: SolveResult, history_path: Any) -> None:
    """The run's held-out numbers and its history file, then its end with the run's status;
    where it was tracked goes on the result (the command line attaches its files later)."""
    if result.held_out:
        tracker.log_row({"step": result.state.step, **result.held_out})
    if history_path is not None:
        tracker.log_artifact(history_path)
    tracker.end(result.status)
    result.tracking = tracked_at(tracker)


def tracked_at(tracker: RowTracker) -> dict[str, str]:
    """Where a run was tracked (a :class:`SolveResult`'s ``tracking``)."""
    where = {"mlflow_run_id": tracker.run_id, "tensorboard": tracker.logdir}
    return {k: str(v) for k, v in where.items() if v is not None}


def with_held_out(result: SolveResult, problem: Any, eval_data: Any) -> SolveResult:
    """``result`` with the problem's held-out numbers at its end point (none when the problem
    has no ``eval_metrics`` or no held-out data)."""
    if eval_data is not None:
        device = next(iter(result.x.values())).device
        batch = to_device(eval_data, device)
        result.held_out = held_out_metrics(problem, result.x, result.y, batch)
    return result


def _from_spec(
    spec: ProblemSpec,
    x0: Params | None,
    y0: Params | None,
    data: Any,
    method: str,
    options: dict[str, Any],
    steps: int | None,
) -> tuple[BilevelProblem, Params, Params, Any, dict[str, Any], int | None]:
    """A spec taken whole: its parts where the call gives none, its suggested settings that
    apply to ``method`` under the call's own."""
    if x0 is not None or y0 is not None:
        raise ConfigError(
            "br.solve(spec, ...) takes x0 and y0 from the ProblemSpec: pass neither, or pass "
            "spec.problem with your own x0 and y0"
        )
    suggested = dict(SolverConfig.applicable(method, spec.defaults))
    suggested_steps = suggested.pop("steps", None)
    return (
        spec.problem,
        spec.x0,
        spec.y0,
        spec.data if data is None else data,
        {**suggested, **options},
        steps if steps is not None else suggested_steps,
    )


def run_local(
    problem: BilevelProblem,
    x0: Params,
    y0: Params,
    config: SolverConfig,
    spec: RunSpec,
    *,
    data: Any = None,
    history_path: str | os.PathLike[str] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    grad_reduce: GradReduce | None = None,
    judge: Any = None,
    run_id: str = "run",
    also: loop.Sink | None = None,
    restore: dict[str, Any] | None = None,
    on_checkpoint: Any = None,
    tracker: RowTracker | None = None,
) -> SolveResult:
    """:func:`solve` with its settings already built (also the one-worker path of ``train`` and
    a sweep's trials). ``judge`` receives the flatness watch's estimates (when ``spec.watch``);
    ``also`` is a further sink that sees every step after this one's files (a Tune trial's
    reports).

    A sweep's trial keeps its checkpoints itself: ``on_checkpoint(payload)`` receives each one
    (every ``spec.checkpoint_every`` steps and at the end), and ``restore`` is a payload to
    continue from. Unlike ``resume``, ``restore`` may come with other solver settings: a
    population-based exploit continues another trial's state with perturbed settings.

    ``tracker``: the run's :class:`~bilevel_ray.tracking.RowTracker` (fed by a sink in
    ``also``), ended ``diverged`` or ``FAILED`` when the run raises."""
    if resume and checkpoint_path is None:
        raise ConfigError("resume=True needs checkpoint_path: pass checkpoint_path='run/ckpt.pt'")
    if spec.checkpoint_every and checkpoint_path is None and on_checkpoint is None:
        raise ConfigError(
            f"checkpoint_every={spec.checkpoint_every} needs checkpoint_path: pass "
            "checkpoint_path='run/ckpt.pt'"
        )
    for what, path in (("history_path", history_path), ("checkpoint_path", checkpoint_path)):
        if path is not None:  # a bad path fails now, not after the run (or at its first save)
            path = check_output_path(path, what)
            check_writable(path.parent, what)
    check_distinct({"history_path": history_path, "checkpoint_path": checkpoint_path})
    if checkpoint_path is not None:
        config.to_dict()  # a checkpoint stores the settings: refuse unserialisable ones now
    check_problem(problem)
    check_params(x0, y0)
    solver = config.build(problem, grad_reduce)

    saved = load_resume(checkpoint_path, config.to_dict(), spec.seed) if resume else restore
    if saved is not None:
        check_resume_shapes(checkpoint_path, saved, x0, y0, spec.steps)
    watch = None
    if spec.watch is not None:
        watch = FlatnessWatch(spec.watch, judge or FlatnessJudge(), run_id, config.option("gamma"))
    active = ActiveSolver(config, solver, problem, grad_reduce, watch)
    if saved is not None:
        # Checkpoints are read onto the CPU; the run continues where x0 lives.
        state = to_device(state_from_dict(saved["state"]), next(iter(x0.values())).device)
        active.restore(saved.get("flatness"))
        recorder = HistoryRecorder(
            active.settings.method, spec.report_every, saved["history"], saved["elapsed_s"]
        )
    else:
        state = solver.init(x0, y0)
        recorder = HistoryRecorder(config.method, spec.report_every)
    rows = history_bytes(spec.steps, spec.report_every)
    if checkpoint_path is not None:
        # The new file, its temporary copy while written, and the previous one, each with the
        # history so far; and the history file when it shares the disk.
        check_free_space(
            Path(checkpoint_path).parent, 3 * (tensor_bytes(state) + rows), "checkpoint_path"
        )
    if history_path is not None:
        check_free_space(Path(history_path).parent, 2 * rows, "history_path")

    # The seeded RNG covers the data stream too (a shuffled DataLoader draws when iterated).
    with torch.random.fork_rng(devices=cuda_devices(x0, y0)):
        # A resumed stream first skips the batches it used, drawing from the seeded RNG as the
        # first run did (a shuffled DataLoader draws when it starts an epoch); then the RNG
        # continues from the checkpoint.
        torch.manual_seed(spec.seed)
        device = next(iter(x0.values())).device
        batches = (to_device(b, device) for b in as_batches(data, spec.seed, state.step))
        if saved is not None:
            torch.set_rng_state(saved["rng"])
        else:
            first = next(batches)
            check_losses(
                problem, state.x, state.y, first, upper_needs_x=config.method == "pbgd_free"
            )
            batches = itertools.chain([first], batches)
        sink = _FileSink(checkpoint_path, config, spec.seed, recorder, also, on_checkpoint)
        try:
            state = loop.run(active, state, batches, spec, recorder, sink, spec.progress)
            # The watch's early verdict was a prediction: the run's end point is certified.
            end_of_run_check(active, state, data, spec.steps, spec.seed, (x0, y0))
        except LossReturnError as err:
            if tracker is not None:
                tracker.end("FAILED")
            raise err.at_step(sink.step) from None
        except BaseException as err:
            if tracker is not None:
                tracker.end(run_status(err))
            raise
        finally:
            if history_path is not None:
                write_parquet(recorder.table(), history_path)
    return SolveResult(
        state.x,
        state.y,
        recorder.table(),
        state,
        active.settings.to_dict(strict=False),
        active.verdict,
        active.status,
        start_config=config.to_dict(strict=False),
        steps=spec.steps,
    )


def run_spec_local(spec: Any, config: SolverConfig, run: RunSpec, **options: Any) -> SolveResult:
    """:func:`run_local` on a factory's ``ProblemSpec`` (its problem, start point and data)."""
    result = run_local(spec.problem, spec.x0, spec.y0, config, run, data=spec.data, **options)
    return with_held_out(result, spec.problem, spec.eval_data)


class _FileSink:
    """The local run's outputs: a checkpoint file every K steps and at the end (the history is
    the recorder's), then whatever the caller's own sink does."""

    def __init__(
        self,
        path: Any,
        config: SolverConfig,
        seed: int,
        recorder: Any,
        also: Any,
        on_checkpoint: Any = None,
    ):
        self.path, self.config, self.seed = path, config, seed
        self.recorder, self.also, self.on_checkpoint = recorder, also, on_checkpoint
        self.step = 0  # the step running now (0-based), named by a loss's wrong return

    def before_step(self, step: int) -> None:
        self.step = step
        if self.also is not None:
            self.also.before_step(step)

    def after_step(self, outcome: loop.StepOutcome, state: SolverState, active: Any) -> bool | None:
        if outcome.checkpoint and (self.path is not None or self.on_checkpoint is not None):
            payload = checkpoint_payload(
                state, self.recorder, self.config, self.seed, active.saved()
            )
            if self.path is not None:
                save_checkpoint(payload, self.path, keep_previous=True)
            if self.on_checkpoint is not None:
                self.on_checkpoint(payload)
            self.recorder.restart_window()  # a save is not a step's cost
        return self.also.after_step(outcome, state, active) if self.also is not None else None
