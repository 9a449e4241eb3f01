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

import dataclasses
import os
import sys
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
from bilevel_ray.problem import ProblemSpec, check_params, check_problem
from bilevel_ray.problems import load_factory
from bilevel_ray.runtime.checkpoint import (
    check_free_space,
    check_writable,
    load_checkpoint,
    load_latest,
    tensor_bytes,
)
from bilevel_ray.runtime.flatness_watch import (
    FlatnessJudge,
    FlatnessWatch,
    fallback_config,
    watch_settings,
)
from bilevel_ray.runtime.history import HISTORY_SCHEMA
from bilevel_ray.runtime.local import SolveResult, count, run_local, solver_config
from bilevel_ray.solvers.base import state_from_dict

__all__ = ["CHECKPOINT_FILE", "build_spec", "train"]

CHECKPOINT_FILE = "state.pt"  # inside each Train checkpoint folder

Factory = Callable[[dict[str, Any]], ProblemSpec] | str


def build_spec(factory: Factory, problem_config: dict[str, Any]) -> ProblemSpec:
    """Resolve ``factory`` and call it, checking that it returns a ProblemSpec."""
    resolved = load_factory(factory) if isinstance(factory, str) else factory
    if not callable(resolved):
        raise ConfigError(f"factory={factory!r}: must be callable or a 'file.py:factory' string")
    spec = resolved(dict(problem_config))
    if not isinstance(spec, ProblemSpec):
        raise ConfigError(
            f"the factory returned a {type(spec).__name__}: it must return "
            "br.ProblemSpec(problem, x0, y0, data, defaults)"
        )
    return spec


def train(
    factory: Factory,
    *,
    problem_config: dict[str, Any] | None = None,
    method: str = "pbgd_free",
    steps: int | None = None,
    num_workers: int = 1,
    use_gpu: bool | str = "auto",
    resources_per_worker: dict[str, float] | None = None,
    checkpoint_every: int = 0,
    storage_path: str | os.PathLike[str] | None = None,
    name: str | None = None,
    max_failures: int = 0,
    seed: int = 0,
    report_every: int = 10,
    address: str | None = None,
    fault: dict[str, int] | None = None,
    progress: bool = False,
    datasets: dict[str, Any] | None = None,
    batch_size: int | tuple[int, int] | None = None,
    in_process: bool | str = "auto",
    on_unsuitable: str | None = None,
    diagnose_window: int = 200,
    diagnose_every: int = 50,
    diagnose_options: dict[str, Any] | None = None,
    **solver_options: Any,
) -> SolveResult:
    """Run ``method`` on the factory's problem with ``num_workers`` data-parallel workers.

    Args:
        factory: builds ``br.ProblemSpec(problem, x0, y0, data, defaults)`` from a config dict.
        problem_config: the factory's settings (plain, picklable values).
        method, steps, seed, report_every, **solver_options: as in ``br.solve``; ``steps`` and
            the solver settings default to the problem's ``defaults``.
        num_workers: data-parallel ranks. With ``br.minibatches`` data each rank takes
            ``batch_size`` samples per step (global batch ``num_workers * batch_size``); full-batch
            data is split into equal slices. The averaged gradient equals the one-worker
            gradient when each loss is a *mean* over its batch (a ``.sum()`` loss would be
            scaled by 1 / num_workers).
        use_gpu: ``"auto"`` (GPUs whenever the cluster has them), True or False.
        resources_per_worker: e.g. ``{"CPU": 1}`` (Train's default) or ``{"CPU": 0.5}``.
        checkpoint_every: checkpoint every K steps (the final step always is).
        storage_path, name: the run lives in ``{storage_path}/{name}`` (default storage
            ``~/ray_results``); running again with the same pair resumes the run.
        max_failures: worker-group restarts allowed (Train's ``FailureConfig``).
        address: a Ray cluster to connect to; default: the running one, or a new local one.
        fault: test hook ``{"rank": r, "step": k}``: rank r exits at step k, once per run.
        progress: one line per logged row, at most every 2 s (rank 0's, on a worker group).
        datasets, batch_size: Ray Data instead of the factory's data:
            ``{"upper": ds, "lower": ds}`` (e.g. ``ray.data.read_parquet(...)``), split across
            the workers, ``batch_size`` rows per worker and step (one size or (upper, lower)),
            restarted each epoch; each level's loss receives ``{"column": Tensor}`` batches. A
            resumed run continues with fresh epochs (streams have no exact position to restore).
        in_process: ``"auto"`` runs one worker in this process when nothing needs Ray (no
            failures to survive, no GPU requested, no Ray Data, no fault hook); False always
            starts a worker group (to measure the group itself).
        on_unsuitable, diagnose_window, diagnose_every, diagnose_options: the flatness
            diagnostic, as in ``br.solve``; on a worker group rank 0's estimates go to the run's
            named judge actor (``bilevel_ray.flatness.<name>``, ``num_cpus=0``).

    Returns:
        A :class:`~bilevel_ray.runtime.local.SolveResult`, as ``br.solve`` returns.

    Raises:
        ConfigError: bad input, before any worker starts.
        DivergenceError: the run's losses became non-finite (all ranks stop together).
    """
    problem_config = dict(problem_config or {})
    # The factory as the workers will call it (with a device), so that a factory that fails
    # there fails here first.
    spec = build_spec(factory, {**problem_config, "device": "cpu"})
    defaults = SolverConfig.applicable(method, spec.defaults)
    default_steps = defaults.pop("steps", 1000)
    steps = count("steps", default_steps if steps is None else steps, 1)
    settings = solver_config(method, {**defaults, **solver_options})
    settings.to_dict()  # workers rebuild the settings from a dict: refuse unserialisable ones now
    check_problem(spec.problem)
    check_params(spec.x0, spec.y0)
    num_workers = count("num_workers", num_workers, 1)
    max_failures = count("max_failures", max_failures, 0)
    checkpoint_every = count("checkpoint_every", checkpoint_every, 0)
    report_every = count("report_every", report_every, 1)
    seed = count("seed", seed, 0)
    if checkpoint_every % report_every:
        raise ConfigError(
            f"checkpoint_every={checkpoint_every} must be a multiple of report_every="
            f"{report_every}: a checkpoint carries the history up to a logged row"
        )
    if use_gpu not in ("auto", True, False):
        raise ConfigError(f"use_gpu={use_gpu!r}: must be 'auto', True or False")
    if fault is not None and (not isinstance(fault, dict) or set(fault) != {"rank", "step"}):
        raise ConfigError(f"fault={fault!r}: must be a dict {{'rank': r, 'step': k}}")
    if datasets is not None:
        _check_datasets(datasets, batch_size, spec.data)
    elif batch_size is not None:
        raise ConfigError("batch_size is for datasets=...; the factory's data sets its own size")
    else:
        next(as_batches(spec.data, seed, 0, num_workers - 1, num_workers))  # shardable?
    if in_process not in ("auto", False):
        raise ConfigError(f"in_process={in_process!r}: must be 'auto' or False")
    watch = watch_settings(
        on_unsuitable, method, diagnose_window, diagnose_every, diagnose_options, steps
    )
    check_resources_spec(resources_per_worker)
    # A fresh run gets a unique name; pass name= (the same one) to resume a run.
    name = check_run_name(name or default_run_name(method))
    storage = _storage(storage_path)

    if not isinstance(storage, _UriPath):
        # Train keeps two checkpoints and writes a third; a state is about x and y plus an
        # optimizer's two moments.
        check_free_space(storage, 9 * tensor_bytes((spec.x0, spec.y0)), "storage_path")
    gpu_here = use_gpu == "auto" and torch.cuda.is_available()
    uri = isinstance(storage, _UriPath)  # remote storage: Train writes it, not this process
    needs_ray = max_failures or use_gpu is True or gpu_here or fault or datasets is not None or uri
    if num_workers == 1 and not needs_ray and in_process == "auto":
        _check_run_folder(storage / name, in_process=True)
        return run_local(
            spec.problem,
            spec.x0,
            spec.y0,
            settings,
            steps=steps,
            data=spec.data,
            seed=seed,
            report_every=report_every,
            checkpoint_path=storage / name / "checkpoint.pt",
            checkpoint_every=checkpoint_every,
            resume=True,
            progress=progress,
            watch=None
            if watch is None
            else FlatnessWatch(watch, FlatnessJudge(), name, settings.option("gamma")),
        )

    from bilevel_ray.runtime.ray_session import connect

    _check_run_folder(
        storage / name, in_process=False, settings=settings, seed=seed, num_workers=num_workers
    )
    gpus = connect(address)
    on_gpu = bool(gpus) if use_gpu == "auto" else use_gpu
    if address is None:
        _check_resources(num_workers, resources_per_worker, on_gpu, datasets is not None)
    config = worker_config(
        factory,
        problem_config,
        settings,
        steps=steps,
        seed=seed,
        report_every=report_every,
        checkpoint_every=checkpoint_every,
        use_gpu=on_gpu,
        num_workers=num_workers,
        progress=progress,
        fault=None if fault is None else {**fault, "marker_dir": str(storage / name)},
        batch_size=_pair(batch_size) if datasets is not None else None,
    )
    if watch is not None:
        from bilevel_ray.runtime.flatness_actor import start_judge

        config["flatness"] = {
            "settings": dataclasses.asdict(watch),
            "judge": start_judge(name),
            "run_id": name,
        }
    metrics, payload = fit_worker_group(
        config, num_workers, resources_per_worker, storage, name, max_failures, datasets
    )
    if metrics.get("status") == "diverged":
        last = {k: v for k, v in metrics.items() if k == "step" or "/" in k}
        raise DivergenceError(metrics["diverged_at_step"], metrics["diverged_metric"], last)
    state = state_from_dict(payload["state"])
    history = pa.Table.from_pylist(payload["history"], schema=HISTORY_SCHEMA)
    flatness = payload.get("flatness") or {}
    config = payload["config"]
    if flatness.get("method", config["method"]) != config["method"]:
        config = fallback_config(SolverConfig.from_dict(config), flatness["method"]).to_dict()
    return SolveResult(
        state.x,
        state.y,
        history,
        state,
        config,
        flatness.get("verdict"),
        flatness.get("status", "completed"),
    )


def worker_config(
    factory: Any,
    problem_config: dict[str, Any],
    settings: SolverConfig,
    *,
    steps: int,
    seed: int,
    report_every: int,
    checkpoint_every: int,
    use_gpu: bool,
    num_workers: int,
    progress: bool = False,
    fault: dict[str, Any] | None = None,
    batch_size: tuple[int, int] | None = None,
    evaluate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The plain dict every worker rebuilds its run from (``train_loop_per_worker``'s config)."""
    return {
        "factory": portable_factory(factory),
        "problem_config": problem_config,
        "solver": settings.to_dict(),
        "steps": steps,
        "seed": seed,
        "report_every": report_every,
        "checkpoint_every": checkpoint_every,
        "use_gpu": use_gpu,
        "num_workers": num_workers,
        "progress": progress,
        "fault": fault,
        "batch_size": batch_size,
        "evaluate": evaluate,
    }


def check_run_name(name: Any) -> str:
    """A run or sweep name is one folder inside the storage path: no separators, no '..'
    (a name like '../x' or '/x' would put the run, and its files, outside it)."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise ConfigError(
            f"name={name!r}: must be a plain folder name (no '/' or '..'), e.g. name='run1'"
        )
    return name


def check_resources_spec(resources: Any) -> None:
    """``resources_per_worker``: None, or resource names to finite numbers > 0."""
    if resources is None:
        return
    if not isinstance(resources, dict) or not all(
        isinstance(k, str)
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and 0 < v < float("inf")
        for k, v in resources.items()
    ):
        raise ConfigError(
            f"resources_per_worker={resources!r}: must map resource names to numbers > 0, "
            "e.g. {'CPU': 1} or {'CPU': 0.5}"
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


def portable_factory(factory: Any) -> Any:
    """What the workers receive: a ``file.py:factory`` string becomes the callable itself,
    shipped by value (workers run elsewhere and cannot find the file); other strings (built-in
    names, ``package.module:factory``) and callables go as they are."""
    if not isinstance(factory, str) or ".py:" not in factory:
        return factory
    from ray import cloudpickle

    resolved = load_factory(factory)
    cloudpickle.register_pickle_by_value(sys.modules[resolved.__module__])
    return resolved


def _check_resources(workers: int, resources: Any, on_gpu: bool, with_data: bool) -> None:
    """Refuse a worker group the local cluster can never hold (Train would wait forever)."""
    import ray

    have = ray.cluster_resources()
    cpu_each = float((resources or {}).get("CPU", 1.0))
    need_cpu = workers * cpu_each + (1.0 if with_data else 0.0)  # Ray Data needs a free CPU
    problems = []
    if need_cpu > have.get("CPU", 0.0):
        problems.append(
            f"{workers} workers x {cpu_each:g} CPU{' + 1 for Ray Data' if with_data else ''} = "
            f"{need_cpu:g} CPUs, the cluster has {have.get('CPU', 0.0):g}: lower "
            "resources_per_worker (e.g. {'CPU': 0.5}) or num_workers"
        )
    if on_gpu and have.get("GPU", 0.0) < workers:
        problems.append(
            f"{workers} GPU workers, the cluster has {have.get('GPU', 0.0):g} GPUs: use "
            "use_gpu=False or fewer workers"
        )
    if problems:
        raise ConfigError(problems)


def _check_run_folder(
    folder: Any, in_process: bool, settings: Any = None, seed: int = 0, num_workers: int = 1
) -> None:
    """A run resumes only as it was started: same runtime, settings, seed and workers."""
    if not isinstance(folder, Path) or not folder.exists():
        return
    local = (folder / "checkpoint.pt").exists()
    group = sorted(folder.glob("checkpoint_step_*"))
    if (in_process and group) or (not in_process and local):
        kind = "a worker group" if group else "one in-process worker"
        raise ConfigError(
            f"run {str(folder)!r} was started with {kind}; resume it the same way, or use a new "
            "name"
        )
    if in_process or not group:
        return
    saved = load_latest(group[-1] / CHECKPOINT_FILE, [d / CHECKPOINT_FILE for d in group[:-1]])
    if saved.get("status") == "diverged":
        raise ConfigError(
            f"run {str(folder)!r} diverged; its last state is not finite: use a new name"
        )
    mismatched = [
        what
        for what, ok in (
            ("solver settings", saved["config"] == settings.to_dict()),
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


def fit_worker_group(
    config: dict[str, Any],
    num_workers: int,
    resources: dict[str, float] | None,
    storage: Path,
    name: str,
    max_failures: int,
    datasets: dict[str, Any] | None,
    callbacks: list[Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start the worker group, wait for it, and read the final checkpoint (``callbacks``: Train
    callbacks such as Tune's ``TuneReportCallback`` for a multi-worker trial)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from bilevel_ray.runtime.train_worker import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=config["use_gpu"],
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.error is not None:
        # Bad input a worker found (e.g. data too small for its shard) reaches the user as the
        # ConfigError it is, not as Train's wrapper.
        failures = getattr(result.error, "worker_failures", {}) or {}
        for failure in failures.values():
            if isinstance(failure, ConfigError):
                raise failure from None
        raise result.error
    payload: dict[str, Any] = {}
    if result.metrics.get("status") != "diverged":
        with result.checkpoint.as_directory() as folder:
            payload = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
    return dict(result.metrics), payload
