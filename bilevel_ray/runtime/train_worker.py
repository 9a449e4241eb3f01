"""The Ray Train worker loop: one data-parallel rank of a bilevel run.

Every rank builds the problem from the plain config dict (the problem factory runs on the worker),
draws its share of each step's data, and runs the same solver with an all-reduce mean as the
gradient reduction (one coalesced collective per level per gradient evaluation). Every
``report_every`` steps the window's metrics are averaged over ranks and passed to
``ray.train.report`` (a barrier: every rank reports at the same steps). Every
``checkpoint_every`` steps, and at the end, rank 0 attaches a checkpoint: the solver state
(x, y, optimizer states, value-function copies, multipliers, step), the RNG state, the history
so far and the settings, in the format of the local runtime. A restarted worker group resumes
from ``ray.train.get_checkpoint()`` and draws exactly the batches it had not yet used.

With a flatness diagnostic (``cfg["flatness"]``) rank 0 sends its estimates during the warm-up
window to the run's judge actor and broadcasts the verdict, so that every rank switches to the
fallback solver, or stops, at the same step (:class:`~bilevel_ray.runtime.flatness_watch.
ActiveSolver`).

A diverged run is a result, not a crash: it reports ``status="diverged"`` with its last finite
metrics and ends (a raised error would make Train restart a run bound to diverge again).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from bilevel_ray.config import SolverConfig
from bilevel_ray.data import BilevelBatch, FullBatch, as_batches
from bilevel_ray.errors import ConfigError, DivergenceError
from bilevel_ray.problem import check_losses
from bilevel_ray.runtime.checkpoint import checkpoint_payload, load_latest, save_checkpoint
from bilevel_ray.runtime.collectives import (
    allreduce_mean,
    allreduce_mean_tensor,
    broadcast_from_rank0,
)
from bilevel_ray.runtime.flatness_actor import ActorJudge
from bilevel_ray.runtime.flatness_watch import (
    ActiveSolver,
    FlatnessWatch,
    WatchSettings,
    verdict_columns,
)
from bilevel_ray.runtime.history import HistoryRecorder
from bilevel_ray.runtime.local import progress_line
from bilevel_ray.runtime.train import CHECKPOINT_FILE, build_spec
from bilevel_ray.solvers.base import SolverState, state_from_dict
from bilevel_ray.tree import to_device

__all__ = ["FAULT_MARKER", "train_loop_per_worker"]

FAULT_MARKER = ".bilevel_ray_fault_injected"


def _inject_fault(cfg: dict[str, Any], rank: int, step: int) -> None:
    """Test hook: rank ``fail_rank`` dies at step ``fail_step``, once per run (a marker file in
    the run folder remembers that it happened, so the restarted group goes on)."""
    fault = cfg.get("fault")
    if not fault or rank != fault["rank"] or step != fault["step"]:
        return
    marker = Path(fault["marker_dir"]) / FAULT_MARKER
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} killed at step {step}\n")
    os._exit(1)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Train's per-worker function; ``cfg`` is built by :func:`bilevel_ray.runtime.train.train`."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if cfg["use_gpu"] else torch.device("cpu")

    torch.manual_seed(cfg["seed"])  # before the factory: a random initialisation is the same
    spec = build_spec(cfg["factory"], {**cfg["problem_config"], "device": str(device)})
    settings = SolverConfig.from_dict(cfg["solver"])
    solver = settings.build(spec.problem, grad_reduce=allreduce_mean if world > 1 else None)

    def reduce_values(values: torch.Tensor) -> torch.Tensor:
        return allreduce_mean_tensor(values.to(device)).cpu() if world > 1 else values

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = load_latest(Path(folder) / CHECKPOINT_FILE, _older(checkpoint.path))
        state = state_from_dict(to_device(saved["state"], device))
        recorder = HistoryRecorder(
            settings.method,
            cfg["report_every"],
            saved["history"],
            saved["elapsed_s"],
            reduce_values,
        )
    else:
        state = solver.init(to_device(spec.x0, device), to_device(spec.y0, device))
        if world > 1:
            # Every rank must start from rank 0's point, as DDP does: a factory that initialises
            # without a fixed seed would otherwise give each rank its own model.
            broadcast_from_rank0(state.x)
            broadcast_from_rank0(state.y)
        torch.manual_seed(cfg["seed"])
        recorder = HistoryRecorder(
            settings.method, cfg["report_every"], reduce_values=reduce_values
        )

    data = spec.data
    if isinstance(data, FullBatch):  # moved to the device once, not at every step
        data = FullBatch(to_device(data.upper, device), to_device(data.lower, device))
    if cfg["batch_size"] is not None:
        source = _ray_data_batches(*cfg["batch_size"])
    else:
        source = as_batches(data, cfg["seed"], state.step, rank, world)
    if checkpoint is not None:
        torch.set_rng_state(saved["rng"])  # after skipping the used batches (see local.py)
    batches = (to_device(b, device) for b in source)
    if state.step == 0:
        first = next(batches)
        check_losses(
            spec.problem, state.x, state.y, first, upper_needs_x=settings.method == "pbgd_free"
        )
        batches = itertools.chain([first], batches)
    scorer = None
    if cfg.get("evaluate") is not None:
        scorer = _scorer(spec, cfg["evaluate"], device)
    active = _active_solver(cfg, rank, world, settings, solver, spec.problem)
    if checkpoint is not None:
        active.restore(saved.get("flatness"))
        recorder.method = active.settings.method
    _Run(cfg, rank, settings, recorder, scorer).loop(state, active, batches)


def _active_solver(cfg, rank, world, settings, solver, problem) -> ActiveSolver:
    """The solver in force, with the run's flatness watch when one was asked for."""
    grad_reduce = allreduce_mean if world > 1 else None
    flatness = cfg.get("flatness")
    if flatness is None:
        return ActiveSolver(settings, solver, problem, grad_reduce, None)
    watch = FlatnessWatch(
        WatchSettings(**flatness["settings"]),
        ActorJudge(flatness["judge"]),
        flatness["run_id"],
        settings.option("gamma"),
    )

    def share(verdict: Any) -> Any:
        box = [verdict]
        if world > 1:
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    return ActiveSolver(settings, solver, problem, grad_reduce, watch, rank == 0, share)


def _older(path: str) -> list[Path]:
    """The run's checkpoint files before ``path`` (oldest first), the fallbacks should the
    latest be damaged; Train keeps two (``num_to_keep``). Only on a local or mounted storage
    path: an object store is not listed."""
    here = Path(path)
    if not here.parent.is_dir():
        return []
    return [
        d / CHECKPOINT_FILE
        for d in sorted(here.parent.glob("checkpoint_step_*"))
        if d.name < here.name
    ]


def _scorer(spec: Any, options: dict[str, Any], device: torch.device) -> Any:
    """Held-out scores for a sweep (every rank computes the same numbers on the same data)."""
    from bilevel_ray.evaluation import evaluate

    if spec.eval_data is None:
        raise ConfigError(
            "a sweep scores trials on held-out data: the factory must return eval_data="
            "br.BilevelBatch(upper_heldout, lower_sample)"
        )
    batch = to_device(spec.eval_data, device)
    return lambda state, final: evaluate(
        spec.problem, state.x, state.y, batch, gap_steps=options["gap_steps"], with_gap=final
    )


def _ray_data_batches(upper_size: int, lower_size: int) -> Any:
    """This rank's shards of the "upper" and "lower" Ray datasets, batch after batch, each shard
    restarted when it runs out, so that every rank takes the same number of steps."""

    def cycle(name: str, size: int) -> Any:
        shard = ray.train.get_dataset_shard(name)
        while True:
            empty = True
            for batch in shard.iter_torch_batches(batch_size=size, drop_last=True):
                empty = False
                yield batch
            if empty:
                raise ConfigError(
                    f"the {name!r} dataset's shard holds fewer than {size} rows: use a smaller "
                    "batch_size or fewer workers"
                )

    pairs = zip(cycle("upper", upper_size), cycle("lower", lower_size))
    return (BilevelBatch(u, v) for u, v in pairs)


class _Run:
    """The step loop of one rank, with its reporting and checkpointing."""

    _last_print = -float("inf")

    def progress(self, row: dict[str, Any]) -> None:
        """Rank 0's progress line, at most every 2 s (and at the end)."""
        if self.recorder.elapsed - self._last_print >= 2.0 or row["step"] == self.cfg["steps"]:
            self._last_print = self.recorder.elapsed
            print(progress_line(row, self.cfg["steps"]), flush=True)

    def __init__(
        self,
        cfg: dict[str, Any],
        rank: int,
        settings: SolverConfig,
        recorder: HistoryRecorder,
        scorer: Any = None,
    ):
        self.cfg, self.rank, self.settings, self.recorder = cfg, rank, settings, recorder
        self.scorer = scorer  # a sweep's trial: held-out scores added to every report
        self.active: ActiveSolver | None = None
        self.attempt = uuid.uuid4().hex[:6]

    def loop(self, state: SolverState, active: ActiveSolver, batches: Any) -> None:
        steps, every = self.cfg["steps"], self.cfg["checkpoint_every"]
        self.active = active
        for t in range(state.step, steps):
            if active.status != "completed":
                return  # a resumed run that the diagnostic had stopped
            _inject_fault(self.cfg, self.rank, t)
            batch = next(batches)
            state, metrics = active.solver.step(state, batch)
            state, action = active.after_step(state, batch)
            done = t + 1 == steps or action == "stop"
            save = done or bool(every and (t + 1) % every == 0)
            try:
                # A row every report_every steps (checkpoint steps are multiples), at the end
                # and at a switch of solver.
                row = self.recorder.record(t + 1, metrics)
                if row is None and (done or action is not None):
                    row = self.recorder.flush()
                self.recorder.method = active.settings.method
            except DivergenceError as err:
                # Train V2 keeps only metrics reported with a checkpoint, so the verdict carries
                # one; the run's last good state is the checkpoint before it.
                verdict = {
                    **err.last_finite,
                    "status": "diverged",
                    "diverged_at_step": err.step,
                    "diverged_metric": err.metric,
                }
                self.report(verdict, state, save=True, status="diverged")
                return
            if row is not None:
                scores = self.scorer(state, done) if self.scorer is not None else {}
                status = active.status if done else "running"
                self.report(
                    {**row, **scores, **verdict_columns(self.active.verdict), "status": status},
                    state,
                    save,
                    status,
                )
                self.recorder.restart_window()  # a report is a barrier: not a step's cost
                if action == "stop":
                    return

    def report(
        self, row: dict[str, Any], state: SolverState, save: bool, status: str = "running"
    ) -> None:
        """``ray.train.report`` on every rank (a barrier); rank 0 attaches the checkpoint. A
        diverged run's checkpoint says so: resuming it is refused (its state is not finite)."""
        if self.rank == 0 and self.cfg.get("progress") and row.get("step") is not None:
            self.progress(row)
        if not save or self.rank != 0:
            ray.train.report(row)
            return
        payload = checkpoint_payload(state, self.recorder, self.settings, self.cfg["seed"])
        payload.update(status=status, num_workers=self.cfg["num_workers"])
        if self.active is not None:
            payload["flatness"] = self.active.saved()
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(payload, Path(folder) / CHECKPOINT_FILE)
            ray.train.report(
                row,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                # Unique per group start: a group that resumed from an older checkpoint (the
                # newest was damaged) must not write into a folder Train already tracks.
                checkpoint_dir_name=f"checkpoint_step_{state.step:09d}_{self.attempt}",
            )
