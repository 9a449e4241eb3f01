"""Starting a Ray Train worker group for a :class:`~bilevel_ray.runtime.train.job.WorkerJob`
and reading its result (``br.train`` with more than one worker, a multi-worker Tune trial)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bilevel_ray.errors import ConfigError
from bilevel_ray.runtime.local.checkpoint import (
    CHECKPOINT_FILE,
    KEEP_GROUP_CHECKPOINTS,
    load_checkpoint,
    prune_group_checkpoints,
)
from bilevel_ray.runtime.local.run_spec import Placement
from bilevel_ray.runtime.train.job import WorkerJob

__all__ = ["check_cluster_fits", "fit_worker_group"]


def check_cluster_fits(placement: Placement, on_gpu: bool, with_data: bool) -> None:
    """Refuse a worker group the local cluster can never hold (Train would wait forever)."""
    import ray

    have = ray.cluster_resources()
    workers, cpu_each = placement.num_workers, placement.cpus_per_worker
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


def _serves_state_api() -> bool:
    """Whether the cluster runs the dashboard's HTTP server, where Ray's state API answers (a
    local Ray started here runs none: ``include_dashboard=False``)."""
    try:
        from ray._private.services import get_webui_url_from_internal_kv

        return bool(get_webui_url_from_internal_kv())
    except Exception:  # another Ray version: leave Train as it is
        return True


def _trainer_class() -> Any:
    """``TorchTrainer``, less Train's placement-group cleaner on a cluster without the state API.

    The cleaner is a detached actor that asks the state API every second whether the Train
    controller still lives, to remove the group's placement group if it died. Without the
    dashboard's HTTP server it can never know: with one Ray on the machine it warns every few
    seconds; with several, its first question ends its thread with a 43-line "Found multiple
    active Ray instances" traceback on the terminal (it finds the cluster as ``ray status``
    does, not from its own connection); and where another Ray's dashboard holds the port this
    one's records name (127.0.0.1:8265), that one could answer "no such actor" and the cleaner
    would remove the running group's placement group. Dropping it there loses nothing it could
    do (and a local Ray ends with its driver: ``bilevel_ray.runtime.cluster.guardian``). Where
    a Ray version names the method otherwise, the cleaner stays, and ``ray_logs`` keeps its
    traceback off the terminal.

    And Ctrl-C ends the run as an interrupt: Train's own handler aborts the group, then exits
    the process with status 1 and no word (the run's record left "running"); this one aborts
    the group, then raises ``KeyboardInterrupt`` where the driver waits, so the run ends as
    SIGTERM ends it (one line, exit 130, the record "interrupted", resumable from its last
    checkpoint).
    """
    import contextlib
    import signal

    import ray
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if _serves_state_api():
                return callbacks
            return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]

        def _register_sigint_handler(self, controller: Any) -> None:
            def interrupt(signum: int, frame: Any) -> None:
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second: at once
                # The controller may be gone already: nothing left to abort then.
                with contextlib.suppress(Exception):
                    ray.get(controller.abort.remote(), timeout=30)
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, interrupt)

    return Trainer


def fit_worker_group(
    job: WorkerJob,
    placement: Placement,
    storage: Any,
    name: str,
    datasets: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    runtime_env: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start the worker group, wait for it, and read the final checkpoint (``callbacks``: Train
    callbacks such as Tune's ``TuneReportCallback`` for a multi-worker trial, or a user's;
    ``runtime_env``: the workers' Ray runtime environment). Returns the last
    reported metrics and the final checkpoint's payload (empty for a diverged run)."""
    import ray
    import ray.train

    from bilevel_ray.runtime.train.worker import train_loop_per_worker

    trainer = _trainer_class()(
        train_loop_per_worker,
        train_loop_config=job.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=placement.num_workers,
            use_gpu=job.use_gpu,
            resources_per_worker=placement.resources_per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=placement.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_GROUP_CHECKPOINTS),
            callbacks=callbacks,
            worker_runtime_env=runtime_env,
            logging_config=None if job.verbose else ray.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if isinstance(storage, Path):
        prune_group_checkpoints(storage / name)
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
