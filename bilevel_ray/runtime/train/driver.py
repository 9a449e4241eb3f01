"""``br.train``: a bilevel run as a Ray Train worker group (data-parallel, CPU or GPU).

The problem comes from a *factory*: a picklable callable, a ``"file.py:factory"`` /
``"package.module:factory"`` string or a built-in name, which every worker calls with the plain
``problem_config`` dict (plus ``"device"``) to build the problem, x0, y0 and the data, so nothing
large crosses the network. The solver keywords are those of ``br.solve``.

One worker with nothing that needs Ray (``max_failures=0``, no GPU requested, no fault hook) runs
in this process through the local runtime, with the same checkpoints, resume and result: a Train
worker group costs tens of seconds to start on a small machine and buys nothing for one CPU rank.
Ray is imported only when a worker group is started.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from bilevel_ray.config import SolverConfig
from bilevel_ray.data import as_batches
from bilevel_ray.errors import ConfigError, DivergenceError
from bilevel_ray.problem import ProblemSpec
from bilevel_ray.problems import build_spec
from bilevel_ray.records.fingerprint import fingerprinted_spec
from bilevel_ray.records.manifest import MANIFEST
from bilevel_ray.records.run_record import diverged_outcome
from bilevel_ray.runtime.cluster.shipping import portable_factory
from bilevel_ray.runtime.local.checkpoint import (
    LOCAL_CHECKPOINT,
    group_checkpoints,
    load_latest,
    same_settings,
    tensor_bytes,
)
from bilevel_ray.runtime.local.history import HISTORY_SCHEMA
from bilevel_ray.runtime.local.judge import FlatnessJudge
from bilevel_ray.runtime.local.output_files import (
    check_free_space,
    check_inside,
    check_output_path,
    check_writable,
)
from bilevel_ray.runtime.local.run_spec import (
    Placement,
    RunSpec,
    build_run,
    check_run_name,
    declare_run_options,
    take_run_options,
    verbose,
)
from bilevel_ray.runtime.local.solve import (
    SolveResult,
    run_params,
    run_spec_local,
    solver_config,
    tracked_at,
)
from bilevel_ray.runtime.local.spec_check import check_spec
from bilevel_ray.runtime.train.job import WorkerJob
from bilevel_ray.runtime.train.record import end_record, start_record
from bilevel_ray.solvers.base import state_from_dict
from bilevel_ray.tracking import (
    RowTracker,
    TrackerSink,
    check_runtime_env,
    check_train_callbacks,
    open_tracking,
    run_status,
)

__all__ = [
    "build_spec",
    "check_run_name",
    "default_run_name",
    "train",
]

Factory = Callable[[dict[str, Any]], ProblemSpec] | str


@declare_run_options()
def train(
    factory: Factory,
    *,
    problem_config: dict[str, Any] | None = None,
    method: str = "pbgd_free",
    steps: int | None = None,
    num_workers: int = 1,
    use_gpu: bool | str = "auto",
    resources_per_worker: dict[str, float] | None = None,
    storage_path: str | os.PathLike[str] | None = None,
    name: str | None = None,
    max_failures: int = 0,
    address: str | None = None,
    fault: dict[str, int] | None = None,
    datasets: dict[str, Any] | None = None,
    batch_size: int | tuple[int, int] | None = None,
    in_process: bool | str = "auto",
    mlflow: Any = None,
    tensorboard: str | os.PathLike[str] | None = None,
    experiment: str | None = None,
    tags: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    runtime_env: dict[str, Any] | None = None,
    **solver_options: Any,
) -> SolveResult:
    """Run ``method`` on the factory's problem with ``num_workers`` data-parallel workers.

    Args:
        factory: builds ``br.ProblemSpec(problem, x0, y0, data, defaults)`` from a config dict.
        problem_config: the factory's settings (plain, picklable values).
        method, steps, **solver_options: as in ``br.solve``; ``steps`` and the solver settings
            default to the problem's ``defaults``; the run settings (``seed``, ``report_every``,
            ``checkpoint_every``, the flatness watch's, ...) are listed below.
        num_workers: data-parallel ranks. With ``br.minibatches`` data each rank takes
            ``batch_size`` samples per step (global batch ``num_workers * batch_size``); full-batch
            data is split into equal slices. The averaged gradient equals the one-worker
            gradient when each loss is a *mean* over its batch (a ``.sum()`` loss would be
            scaled by 1 / num_workers).
        use_gpu: ``"auto"`` (GPUs whenever the cluster has them), True or False.
        resources_per_worker: e.g. ``{"CPU": 1}`` (Train's default) or ``{"CPU": 0.5}``.
        storage_path, name: the run lives in ``{storage_path}/{name}`` (default storage
            ``~/ray_results``); running again with the same pair resumes the run.
        max_failures: worker-group restarts allowed (Train's ``FailureConfig``).
        address: a Ray cluster to connect to; default: the running one, or a new local one.
        fault: test hook ``{"rank": r, "step": k}``: rank r exits at step k, once per run.
        datasets, batch_size: Ray Data instead of the factory's data:
            ``{"upper": ds, "lower": ds}`` (e.g. ``ray.data.read_parquet(...)``), split across
            the workers, ``batch_size`` rows per worker and step (one size or (upper, lower)),
            restarted each epoch; each level's loss receives ``{"column": Tensor}`` batches. A
            resumed run continues with fresh epochs (streams have no exact position to restore).
        in_process: ``"auto"`` runs one worker in this process when nothing needs Ray (no
            failures to survive, no GPU requested, no Ray Data, no fault hook); False always
            starts a worker group (to measure the group itself).
        mlflow, tensorboard, experiment, tags: as in ``br.solve``: one MLflow run named
            ``name`` (opened on a worker group's rank 0 by Ray's ``setup_mlflow``) with the
            settings as parameters, every logged history row as metrics and the manifest as
            an artifact; TensorBoard event files of every row.
        callbacks: ``ray.train.UserCallback`` objects for Train's ``RunConfig`` (e.g. one
            that sends each report elsewhere).
        runtime_env: the workers' Ray runtime environment (Train's ``worker_runtime_env``),
            e.g. ``{"env_vars": {"WANDB_API_KEY": "..."}, "pip": ["wandb"]}``. Callbacks and
            a runtime_env start a worker group (they are Ray's).

    With ``on_unsuitable`` on a worker group, rank 0's flatness estimates go to the run's named
    judge actor (``bilevel_ray.flatness.<name>``, ``num_cpus=0``).

    Returns:
        A :class:`~bilevel_ray.runtime.local.solve.SolveResult`, as ``br.solve`` returns.

    Raises:
        ConfigError: bad input, before any worker starts.
        DivergenceError: the run's losses became non-finite (all ranks stop together).
    """
    problem_config = dict(problem_config or {})
    # The factory as the workers will call it (with a device), so that a factory that fails
    # there fails here first.
    run_options = take_run_options(solver_options)
    spec, fingerprint = fingerprinted_spec(factory, {**problem_config, "device": "cpu"})
    if datasets is not None:
        fingerprint["unhashed"].append("datasets: Ray Data streams, read as the run goes")
    defaults = SolverConfig.applicable(method, spec.defaults)
    default_steps = defaults.pop("steps", 1000)
    settings = solver_config(method, {**defaults, **solver_options})
    settings.to_dict()  # workers rebuild the settings from a dict: refuse unserialisable ones now
    check_spec(spec, needs_eval=False)
    run = build_run(method, default_steps if steps is None else steps, run_options)
    placement = Placement(num_workers, use_gpu, resources_per_worker, max_failures)
    _check_hooks(fault, datasets, batch_size, in_process, spec, run, num_workers)
    # A fresh run gets a unique name; pass name= (the same one) to resume a run.
    name = default_run_name(method) if name is None else name
    check_output_path(name, "name", is_file=False)  # a NUL byte, a name too long: named so
    name = check_run_name(name)
    tracking = open_tracking(mlflow, tensorboard, experiment=experiment, tags=tags, run_name=name)
    callbacks = check_train_callbacks(callbacks) if callbacks is not None else []
    runtime_env = check_runtime_env(runtime_env)
    storage = _run_storage(storage_path, name, spec)
    gpu_here = use_gpu == "auto" and torch.cuda.is_available()
    uri = isinstance(storage, _UriPath)  # remote storage: Train writes it, not this process
    needs_ray = max_failures or use_gpu is True or gpu_here or fault or datasets is not None or uri
    needs_ray = needs_ray or callbacks or runtime_env is not None
    here = num_workers == 1 and not needs_ray and in_process == "auto"
    if not here:
        # Before the run folder is made: a refusal leaves nothing behind.
        check_fits_here(placement, datasets is not None, address)
    _check_run_folder(storage / name, here, settings, run.seed, placement.num_workers)
    recorder = start_record(
        storage / name,
        factory=factory,
        problem_config=problem_config,
        fingerprint=fingerprint,
        settings=settings,
        run=run,
        run_options=run_options,
        placement=placement,
        in_process=here,
        keywords=solver_options,
    )
    params = run_params(settings, run, num_workers=num_workers)
    tracker = None if tracking is None else RowTracker(tracking, name)
    with recorder.running(diverged_outcome) if recorder else contextlib.nullcontext():
        if here:
            result = run_spec_local(
                spec,
                settings,
                run,
                checkpoint_path=storage / name / LOCAL_CHECKPOINT,
                resume=True,
                judge=FlatnessJudge(),
                run_id=name,
                also=None if tracker is None else TrackerSink(tracker, params=params),
                tracker=tracker,
            )
        else:
            result = _tracked_group(
                tracker,
                params,
                factory,
                problem_config,
                settings,
                run,
                placement,
                storage,
                name,
                address=address,
                fault=fault,
                datasets=datasets,
                batch_size=batch_size,
                callbacks=callbacks,
                runtime_env=runtime_env,
            )
    result.fingerprint = fingerprint
    end_record(recorder, result)
    if tracker is not None:
        if result.held_out:
            tracker.log_row({"step": result.state.step, **result.held_out})
        if recorder is not None:
            tracker.log_artifact(recorder.folder / MANIFEST)
        tracker.end(result.status)
        result.tracking = tracked_at(tracker)
    return result


def _tracked_group(tracker: RowTracker | None, params: dict[str, Any], *args: Any, **kw: Any):
    """:func:`_train_on_group` with the run's MLflow run opened here first, so that this
    process can attach the manifest once the workers are done; rank 0 continues it and logs
    every row. A failed group ends it ``diverged`` or ``FAILED``."""
    if tracker is None:
        return _train_on_group(*args, **kw)
    tracker.start(params)
    try:
        run_id = tracker.run_id
        return _train_on_group(*args, tracking=tracker.settings, tracking_run_id=run_id, **kw)
    except BaseException as err:
        tracker.end(run_status(err))
        raise


def _check_hooks(
    fault: Any,
    datasets: Any,
    batch_size: Any,
    in_process: Any,
    spec: Any,
    run: RunSpec,
    num_workers: int,
) -> None:
    """The test hook, the Ray Data inputs and the in-process switch; the factory's data must
    shard over ``num_workers`` ranks (its last rank's first batch is drawn once)."""
    if fault is not None and (not isinstance(fault, dict) or set(fault) != {"rank", "step"}):
        raise ConfigError(f"fault={fault!r}: must be a dict {{'rank': r, 'step': k}}")
    if datasets is not None:
        _check_datasets(datasets, batch_size, spec.data)
    elif batch_size is not None:
        raise ConfigError("batch_size is for datasets=...; the factory's data sets its own size")
    else:
        next(as_batches(spec.data, run.seed, 0, num_workers - 1, num_workers))  # shardable?
    if in_process not in ("auto", False):
        raise ConfigError(f"in_process={in_process!r}: must be 'auto' or False")


def _run_storage(storage_path: Any, name: str, spec: Any) -> Any:
    """The storage the run's folder ``name`` lives in, checked where it is local."""
    storage = _storage(storage_path)
    if not isinstance(storage, _UriPath):
        # A planted link at {storage}/{name} must not carry the run's files elsewhere.
        check_inside(storage / name, storage, "name")
        # Train keeps two checkpoints and writes a third; a state is about x and y plus an
        # optimizer's two moments.
        check_free_space(storage, 9 * tensor_bytes((spec.x0, spec.y0)), "storage_path")
    return storage


def _train_on_group(
    factory: Factory,
    problem_config: dict[str, Any],
    settings: SolverConfig,
    run: RunSpec,
    placement: Placement,
    storage: Path | _UriPath,
    name: str,
    *,
    address: str | None,
    fault: dict[str, int] | None,
    datasets: dict[str, Any] | None,
    batch_size: int | tuple[int, int] | None,
    callbacks: list[Any] | None = None,
    runtime_env: Any = None,
    tracking: Any = None,
    tracking_run_id: str | None = None,
) -> SolveResult:
    """``train`` on a Ray Train worker group, its run in ``storage / name``, once ``train`` has
    checked everything (the run folder included); returns what the group's rank 0 saved
    last."""
    from bilevel_ray.runtime.cluster.session import connect, steady_working_dir
    from bilevel_ray.runtime.train.group import check_cluster_fits, fit_worker_group

    # Resolved before connecting: a job's driver may not stay in the folder the path is
    # relative to.
    shipped = portable_factory(factory)
    # A remote storage URI leaves the working directory as it is (nothing local to stand in).
    here = storage if isinstance(storage, Path) else Path.cwd()
    with steady_working_dir(here):
        gpus = connect(address)
        on_gpu = bool(gpus) if placement.use_gpu == "auto" else placement.use_gpu
        if address is None:
            check_cluster_fits(placement, on_gpu, datasets is not None)
        judge = None
        if run.watch is not None:
            from bilevel_ray.runtime.train.judge_actor import start_judge

            judge = start_judge(name)
        job = WorkerJob(
            shipped,
            problem_config,
            settings.to_dict(),
            run,
            placement.num_workers,
            on_gpu,
            batch_size=_pair(batch_size) if datasets is not None else None,
            fault=None if fault is None else {**fault, "marker_dir": str(storage / name)},
            judge=judge,
            run_id=name,
            verbose=verbose(),
            tracking=tracking,
            tracking_run_id=tracking_run_id,
        )
        metrics, payload = fit_worker_group(
            job, placement, storage, name, datasets, callbacks or None, runtime_env
        )
    if metrics.get("status") == "diverged":
        last = {k: v for k, v in metrics.items() if k == "step" or "/" in k}
        grew = (metrics.get("diverged_from", math.nan), metrics.get("diverged_to", math.nan))
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in grew)
        raise DivergenceError(
            metrics["diverged_at_step"], metrics["diverged_metric"], last, grew if finite else None
        )
    state = state_from_dict(payload["state"])
    history = pa.Table.from_pylist(payload["history"], schema=HISTORY_SCHEMA)
    flatness = payload.get("flatness") or {}
    return SolveResult(
        state.x,
        state.y,
        history,
        state,
        flatness.get("settings", payload["config"]),  # the settings in force at the end
        flatness.get("verdict"),
        flatness.get("status", "completed"),
        {k: float(v) for k, v in metrics.items() if k.startswith("eval/") and k not in _SCORES},
        start_config=payload["config"],
        steps=run.steps,
    )


# A sweep's scores (evaluation.evaluate's own two), not a problem's held-out numbers.
_SCORES = ("eval/upper_loss", "eval/lower_gap")


def check_fits_here(placement: Placement, with_data: bool, address: str | None) -> None:
    """Refuse, before Ray starts, a worker group that a local Ray (no ``address``, no
    ``RAY_ADDRESS``) could never hold: it gets this machine's CPUs, and Train would wait for
    the rest forever. A cluster's room is checked once connected (``check_cluster_fits``)."""
    if address is not None or os.environ.get("RAY_ADDRESS"):
        return
    import ray

    from bilevel_ray.runtime.cluster.session import _starts_local_ray

    if ray.is_initialized() or not _starts_local_ray():
        return  # a Ray already running: its own CPUs count, checked when connected
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers, each = placement.num_workers, placement.cpus_per_worker
    need = workers * each + (1.0 if with_data else 0.0)  # Ray Data needs a free CPU
    if cpus is not None and need > cpus:
        raise ConfigError(
            f"num_workers={workers} x {each:g} CPU per worker"
            + (" + 1 for Ray Data" if with_data else "")
            + f" = {need:g} CPUs, and this machine has {cpus} (a local Ray gets no more): lower "
            "num_workers (--workers) or resources_per_worker (--cpus-per-worker, e.g. 0.5), or "
            "give the address (--address) of a cluster with room"
        )


def default_run_name(method: str) -> str:
    return f"bilevel_ray-{method}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _storage(storage_path: Any) -> Any:
    """A local folder (created and proved writable now) or a URI such as ``s3://bucket/runs``,
    which Ray Train writes through pyarrow's file systems (needed across nodes)."""
    if isinstance(storage_path, str) and "://" in storage_path:
        return _UriPath(storage_path)
    return check_writable(storage_path or Path.home() / "ray_results", "storage_path")


class _UriPath(str):
    """A storage URI that joins like a Path (``uri / name``) but is never made local."""

    def __truediv__(self, other: str) -> _UriPath:
        return _UriPath(f"{self.rstrip('/')}/{other}")

    def exists(self) -> bool:  # nothing local to inspect: Train reads the URI itself
        return False


def _check_run_folder(
    folder: Any, in_process: bool, settings: Any = None, seed: int = 0, num_workers: int = 1
) -> None:
    """A run resumes only as it was started: same runtime, settings, seed and workers."""
    if not isinstance(folder, Path) or not folder.exists():
        return
    local = (folder / LOCAL_CHECKPOINT).exists()
    group = group_checkpoints(folder)
    if (in_process and group) or (not in_process and local):
        kind = "a worker group" if group else "one in-process worker"
        raise ConfigError(
            f"run {str(folder)!r} was started with {kind}; resume it the same way, or use a new "
            "name"
        )
    if in_process or not group:
        return
    saved = load_latest(group[-1], group[:-1])
    if saved.get("status") == "diverged":
        raise ConfigError(
            f"run {str(folder)!r} diverged; its last state is not finite: use a new name"
        )
    mismatched = [
        what
        for what, ok in (
            ("solver settings", same_settings(saved["config"], settings.to_dict())),
            ("seed", saved["seed"] == seed),
            ("num_workers", saved.get("num_workers", num_workers) == num_workers),
        )
        if not ok
    ]
    if mismatched:
        raise ConfigError(
            f"run {str(folder)!r} was started with other {', '.join(mismatched)}; resume it "
            "with the same ones, or use a new name"
        )


def _pair(batch_size: Any) -> tuple[int, int]:
    if isinstance(batch_size, (tuple, list)):
        return tuple(batch_size)
    return batch_size, batch_size


def _check_datasets(datasets: Any, batch_size: Any, factory_data: Any) -> None:
    if not isinstance(datasets, dict) or set(datasets) != {"upper", "lower"}:
        got = sorted(datasets) if isinstance(datasets, dict) else type(datasets).__name__
        raise ConfigError(
            f"datasets must be {{'upper': ray.data.Dataset, 'lower': ray.data.Dataset}}, got {got}"
        )
    sizes = _pair(batch_size) if isinstance(batch_size, (int, tuple, list)) else ()
    if len(sizes) != 2 or any(
        isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes
    ):
        raise ConfigError(
            f"batch_size={batch_size!r}: datasets need a per-worker batch size >= 1 (one integer "
            "or a pair (upper, lower))"
        )
    if factory_data is not None:
        raise ConfigError(
            "the factory returned data and datasets=... was given too: use one source of data "
            "(return data=None from the factory)"
        )
    from ray.data import Dataset

    wrong = {k: type(v).__name__ for k, v in datasets.items() if not isinstance(v, Dataset)}
    if wrong:
        raise ConfigError(
            f"datasets values must be ray.data.Dataset (e.g. ray.data.read_parquet(path)); got "
            f"{wrong}"
        )
