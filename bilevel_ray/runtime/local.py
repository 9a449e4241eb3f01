"""The local runtime: ``br.solve`` runs a solver in this process, with no Ray.

    for t in range(steps): state, metrics = solver.step(state, next(batches))

Everything is validated before step 0 (settings, x0 / y0, data, one evaluation of each loss).
Metrics become floats only every ``report_every`` steps; a non-finite loss stops the run with
:class:`~bilevel_ray.errors.DivergenceError`. With ``checkpoint_path`` the state, the RNG, the
history so far and the settings are saved every ``checkpoint_every`` steps, and ``resume=True``
continues from there with the same batches and the same result as an uninterrupted run.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from bilevel_ray.config import SolverConfig
from bilevel_ray.data import as_batches
from bilevel_ray.errors import ConfigError
from bilevel_ray.problem import BilevelProblem, check_losses, check_params, check_problem
from bilevel_ray.runtime.checkpoint import (
    check_free_space,
    check_writable,
    checkpoint_payload,
    load_latest,
    previous_path,
    save_checkpoint,
    tensor_bytes,
)
from bilevel_ray.runtime.flatness_watch import (
    ActiveSolver,
    FlatnessJudge,
    FlatnessWatch,
    watch_settings,
)
from bilevel_ray.runtime.history import HistoryRecorder, write_parquet
from bilevel_ray.solvers.base import GradReduce, SolverState, state_from_dict
from bilevel_ray.tree import Params, cuda_devices, to_device

__all__ = [
    "SolveResult",
    "count",
    "progress_line",
    "run_local",
    "solve",
    "solver_config",
]


@dataclass
class SolveResult:
    """Final iterates, the logged history (``HISTORY_SCHEMA``), the solver state and settings;
    with a flatness diagnostic, its verdict and the run's status (``"completed"``, or
    ``"unsuitable"`` when ``on_unsuitable="stop"`` ended it)."""

    x: Params
    y: Params
    history: pa.Table
    state: SolverState
    config: dict[str, Any]
    verdict: dict[str, Any] | None = None
    status: str = "completed"


def count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r}: must be an integer >= {minimum}")
    return value


def solver_config(method: str, options: dict[str, Any]) -> SolverConfig:
    """A SolverConfig from keywords, refusing unknown ones by name."""
    allowed = {f.name for f in fields(SolverConfig)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown keyword(s) {unknown}; solver settings are: {', '.join(sorted(allowed))}; "
            "run settings are: steps, data, seed, report_every, history_path, checkpoint_path, "
            "checkpoint_every, resume, progress, grad_reduce"
        )
    return SolverConfig(method=method, **options)


def solve(
    problem: BilevelProblem,
    x0: Params,
    y0: Params,
    *,
    method: str = "pbgd_free",
    steps: int = 1000,
    data: Any = None,
    seed: int = 0,
    report_every: int = 10,
    history_path: str | os.PathLike[str] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    progress: bool = False,
    grad_reduce: GradReduce | None = None,
    on_unsuitable: str | None = None,
    diagnose_window: int = 200,
    diagnose_every: int = 50,
    diagnose_options: dict[str, Any] | None = None,
    **solver_options: Any,
) -> SolveResult:
    """Solve ``min_x f(x, y*(x))`` from ``(x0, y0)`` with ``method``, in this process.

    Args:
        problem: an object with ``upper_loss(x, y, batch)`` and ``lower_loss(x, y, batch)``.
        x0, y0: initial upper / lower variables (dicts of floating tensors; copied, not modified).
        method: ``pbgd_free`` (default), ``pbgd``, ``alt_pbgd``, ``f2sa``, ``bome``,
            ``implicit_cg``.
        steps: total iterations (a resumed run continues up to this count).
        data: ``None``, ``br.full_batch(...)``, ``br.minibatches(...)`` or a pair of batch
            sources; see :mod:`bilevel_ray.data`.
        seed: seeds torch's RNG for the run (restored afterwards) and the minibatch sampler.
        report_every: log a history row (and check for divergence) every this many steps.
        history_path: also write the history to this Parquet file.
        checkpoint_path, checkpoint_every, resume: save every K steps; continue a saved run.
        progress: print one line per logged row (at most every 2 s) to stderr.
        grad_reduce: the gradient reduction (identity here; the Ray runtime injects its own).
        on_unsuitable: ``None`` (no flatness diagnostic), or what to do when the diagnostic
            finds PBGD-Free unsuitable after ``diagnose_window`` steps: ``"fallback"`` (continue
            with ``alt_pbgd`` from the current x, y), ``"stop"`` or ``"warn"``; see
            :mod:`bilevel_ray.runtime.flatness_watch`.
        diagnose_window, diagnose_every, diagnose_options: the warm-up window W, the interval
            of its estimates, and options of :func:`bilevel_ray.diagnostics.flatness.estimate`.
        **solver_options: the :class:`~bilevel_ray.config.SolverConfig` fields (``lr_x``,
            ``lr_y``, ``gamma``, ``inner_steps``, ``optimizer``, ...).

    Raises:
        ConfigError: bad input, before any step runs.
        DivergenceError: a loss became NaN or infinite (names the step).
    """
    config = solver_config(method, solver_options)
    settings = watch_settings(
        on_unsuitable, method, diagnose_window, diagnose_every, diagnose_options, steps
    )
    watch = None
    if settings is not None:
        watch = FlatnessWatch(settings, FlatnessJudge(), "run", config.option("gamma"))
    return run_local(
        problem,
        x0,
        y0,
        config,
        steps=steps,
        data=data,
        seed=seed,
        report_every=report_every,
        history_path=history_path,
        checkpoint_path=checkpoint_path,
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=progress,
        grad_reduce=grad_reduce,
        watch=watch,
    )


def run_local(
    problem: BilevelProblem,
    x0: Params,
    y0: Params,
    config: SolverConfig,
    *,
    steps: int,
    data: Any,
    seed: int,
    report_every: int,
    history_path: str | os.PathLike[str] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    progress: bool = False,
    grad_reduce: GradReduce | None = None,
    on_row: Callable[[dict[str, Any], SolverState, ActiveSolver], None] | None = None,
    watch: FlatnessWatch | None = None,
) -> SolveResult:
    """:func:`solve` with its settings already built (also the one-worker path of ``train`` and
    a sweep's trials). ``on_row(row, state, active)`` is called after each logged row (``active``:
    the ActiveSolver, with the verdict and status); ``watch`` runs the flatness diagnostic."""
    steps = count("steps", steps, 1)
    report_every = count("report_every", report_every, 1)
    seed = count("seed", seed, 0)
    checkpoint_every = count("checkpoint_every", checkpoint_every, 0)
    if resume and checkpoint_path is None:
        raise ConfigError("resume=True needs checkpoint_path: pass checkpoint_path='run/ckpt.pt'")
    if checkpoint_every and checkpoint_path is None:
        raise ConfigError(
            f"checkpoint_every={checkpoint_every} needs checkpoint_path: pass "
            "checkpoint_path='run/ckpt.pt'"
        )
    if checkpoint_every % report_every:
        raise ConfigError(
            f"checkpoint_every={checkpoint_every} must be a multiple of report_every="
            f"{report_every}: a checkpoint carries the history up to a logged row"
        )
    for what, path in (("history_path", history_path), ("checkpoint_path", checkpoint_path)):
        if path is not None:  # a bad path fails now, not after the run (or at its first save)
            if Path(path).is_dir():
                raise ConfigError(f"{what} {str(path)!r} is a folder; give a file path in it")
            check_writable(Path(path).parent, what)
    if checkpoint_path is not None:
        config.to_dict()  # a checkpoint stores the settings: refuse unserialisable ones now
    check_problem(problem)
    check_params(x0, y0)
    solver = config.build(problem, grad_reduce)

    saved = _load_resume(checkpoint_path, config, seed) if resume else None
    run = ActiveSolver(config, solver, problem, grad_reduce, watch)
    if saved is not None:
        # Checkpoints are read onto the CPU; the run continues where x0 lives.
        state = to_device(state_from_dict(saved["state"]), next(iter(x0.values())).device)
        run.restore(saved.get("flatness"))
        recorder = HistoryRecorder(
            run.settings.method, report_every, saved["history"], saved["elapsed_s"]
        )
    else:
        state = solver.init(x0, y0)
        recorder = HistoryRecorder(config.method, report_every)
    if checkpoint_path is not None:
        # The new file, its .tmp while written, and the previous one; the history is small.
        check_free_space(Path(checkpoint_path).parent, 3 * tensor_bytes(state), "checkpoint_path")

    # The seeded RNG covers the data stream too (a shuffled DataLoader draws when iterated).
    with torch.random.fork_rng(devices=cuda_devices(x0, y0)):
        # A resumed stream first skips the batches it used, drawing from the seeded RNG as the
        # first run did (a shuffled DataLoader draws when it starts an epoch); then the RNG
        # continues from the checkpoint.
        torch.manual_seed(seed)
        batches = as_batches(data, seed, start_step=state.step)
        if saved is not None:
            torch.set_rng_state(saved["rng"])
        else:
            first = next(batches)
            check_losses(
                problem, state.x, state.y, first, upper_needs_x=config.method == "pbgd_free"
            )
            batches = itertools.chain([first], batches)
        try:
            state = _run(
                run,
                state,
                batches,
                steps,
                recorder,
                progress,
                (checkpoint_path, checkpoint_every, config, seed),
                on_row,
            )
        finally:
            if history_path is not None:
                write_parquet(recorder.table(), history_path)
    return SolveResult(
        state.x,
        state.y,
        recorder.table(),
        state,
        run.settings.to_dict(strict=False),
        run.verdict,
        run.status,
    )


def _run(run, state, batches, steps, recorder, progress, checkpointing, on_row) -> SolverState:
    checkpoint_path, checkpoint_every, config, seed = checkpointing
    last_print = -float("inf")
    for t in range(state.step, steps):
        if run.status != "completed":
            break
        batch = next(batches)
        state, metrics = run.solver.step(state, batch)
        # The watch's estimate of step t + 1 belongs to that step's time (and its row).
        state, action = run.after_step(state, batch)
        row = recorder.record(t + 1, metrics)
        done = t + 1 == steps or action == "stop"
        if (done or action is not None) and row is None:
            row = recorder.flush()  # the final step, and the step of a switch, are logged
        recorder.method = run.settings.method  # rows after a switch name the fallback
        if progress and row is not None and (recorder.elapsed - last_print >= 2.0 or done):
            last_print = recorder.elapsed
            print(progress_line(row, steps), file=sys.stderr, flush=True)
        if on_row is not None and row is not None:
            on_row(row, state, run)
            recorder.restart_window()
        # Every K steps (multiples of report_every: the rows are flushed) and at the end.
        if checkpoint_path is not None and (
            done or (checkpoint_every and (t + 1) % checkpoint_every == 0)
        ):
            payload = checkpoint_payload(state, recorder, config, seed)
            payload["flatness"] = run.saved()
            save_checkpoint(payload, checkpoint_path, keep_previous=True)
            recorder.restart_window()
    return state


def _load_resume(path: Any, config: SolverConfig, seed: int) -> dict[str, Any] | None:
    if not Path(path).exists() and not previous_path(path).exists():
        return None
    saved = load_latest(path)  # falls back to <path>.prev (a crash between its two renames)
    if saved["seed"] != seed:
        raise ConfigError(
            f"checkpoint {str(path)!r} was written with seed={saved['seed']}, not seed={seed}: "
            "the data stream would differ; resume with the same seed, or start a new run"
        )
    if saved["config"] != config.to_dict():
        raise ConfigError(
            f"checkpoint {str(path)!r} was written with other solver settings "
            f"({saved.get('config')}); resume with the same settings, or start a new run (another "
            "checkpoint_path, or another name with br.train)"
        )
    return saved


def progress_line(row: dict[str, Any], steps: int) -> str:
    shown = " ".join(
        f"{k}={row[k]:.5g}"
        for k in ("upper/loss", "lower/loss", "penalty/gamma")
        if row[k] == row[k]  # skip NaN: the method has no such quantity
    )
    return (
        f"[{row['method']}] step {row['step']}/{steps} {shown} "
        f"({1e3 * row['time/step_s']:.2f} ms/step, {row['time/elapsed_s']:.1f} s)"
    )
