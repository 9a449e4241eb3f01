"""The flatness judge as a named Ray actor, shared by a run's workers or a sweep's trials.

One actor per run (``br.train``) or per sweep (``br.tune``), named
``bilevel_ray.flatness.<run or sweep name>`` so that a user can look it up
(``ray.get_actor(name)``) and read every verdict while the run goes on. It holds no tensors:
workers send the float estimates of :func:`bilevel_ray.diagnostics.flatness.estimate` and get
back plain verdicts. ``num_cpus=0``: it never takes a CPU from the workers it serves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ray

from bilevel_ray.runtime.local.judge import FlatnessJudge

__all__ = ["ActorJudge", "actor_name", "start_judge"]

NAME_PREFIX = "bilevel_ray.flatness."


def actor_name(run_name: str) -> str:
    return NAME_PREFIX + run_name


def start_judge(run_name: str) -> Any:
    """The run's judge actor (created, or the running one of that name: a restarted worker
    group or a resumed sweep keeps the verdicts already given)."""
    remote = ray.remote(num_cpus=0, max_restarts=-1)(FlatnessJudge)
    return remote.options(name=actor_name(run_name), get_if_exists=True).remote()


class ActorJudge:
    """The judge interface of :class:`FlatnessJudge` over an actor handle (blocking calls)."""

    def __init__(self, handle: Any):
        self.handle = handle

    def add(self, run_id: str, step: int, stats: Mapping[str, float]) -> None:
        ray.get(self.handle.add.remote(run_id, step, dict(stats)))

    def verdict(self, run_id: str) -> dict[str, Any]:
        return ray.get(self.handle.verdict.remote(run_id))

    def recheck(self, run_id: str, since: int) -> dict[str, Any]:
        return ray.get(self.handle.recheck.remote(run_id, since))
