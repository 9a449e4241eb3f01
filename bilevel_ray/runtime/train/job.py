"""What every rank of a worker group runs: :class:`WorkerJob`, built on the driver by
``br.train`` or a Tune trial, sent as ``to_dict()`` (Train's ``train_loop_config``) and rebuilt
on each worker with ``from_dict``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bilevel_ray.runtime.local.run_spec import RunSpec

__all__ = ["WorkerJob"]


@dataclass(frozen=True)
class WorkerJob:
    """One worker group's run.

    Attributes:
        factory: the problem factory (a callable shipped by value, or a name).
        problem_config: the factory's settings (plain values; ``"device"`` is added per rank).
        solver: ``SolverConfig.to_dict()``.
        run: the loop's settings.
        num_workers, use_gpu: the group's size and whether its ranks hold a GPU.
        batch_size: per-rank (upper, lower) rows per step when reading Ray Data, else None.
        fault: test hook ``{"rank", "step", "marker_dir"}``: that rank exits at that step, once.
        gap_steps: a Tune trial's held-out scoring (the lower gap's solve steps), else None.
        gap_tol: a Tune trial's gap tolerance (its ``search/score``).
        judge, run_id: the flatness judge actor and this run's id in it (with ``run.watch``).
        verbose: show Ray Train's own log lines.
        tracking, tracking_run_id: the run's checked ``TrackingSettings`` and the MLflow run
            the driver opened, which rank 0 continues (None: not tracked).
    """

    factory: Any
    problem_config: Mapping[str, Any]
    solver: Mapping[str, Any]
    run: RunSpec
    num_workers: int = 1
    use_gpu: bool = False
    batch_size: tuple[int, int] | None = None
    fault: Mapping[str, Any] | None = None
    gap_steps: int | None = None
    gap_tol: float | None = None
    judge: Any = None
    run_id: str = "run"
    verbose: bool = False
    tracking: Any = None
    tracking_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["run"] = self.run.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WorkerJob:
        return cls(**{**d, "run": RunSpec.from_dict(d["run"])})
