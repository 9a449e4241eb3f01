"""Population-based training of the penalty schedule: Tune's PBT (or PB2) over a sweep.

The whole population runs at once (``num_samples`` trials sharing the cluster's CPUs; a smaller
``max_concurrent_trials`` is refused, and so, before Ray starts, is a population larger than its
machine's memory and CPUs hold: :mod:`bilevel_ray.runtime.tune.capacity`), each checkpointing
every ``interval`` steps. At every
interval a trial in the worst quarter of the population (by ``search/score``: the held-out upper
loss, any loss with a lower gap beyond ``gap_tol`` counting as worse) *exploits*: it continues
from the checkpoint of a trial in the best quarter (x, y, optimizer moments, RNG, step) with
that trial's settings, which it then *explores*: gamma, lr_y and lr_ratio (so lr_x)
are each multiplied by 0.8 or 1.2, or, with probability 1/4, drawn again from the search space.
The other settings (optimizer, inner_steps) are inherited, so the checkpoint's optimizer state
always fits. The best trial's lineage is the schedule it learned
(:mod:`bilevel_ray.runtime.tune.lineage`). PB2 (Parker-Holder et al. 2020) picks the new values with
a Gaussian-process bandit instead of random perturbations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from bilevel_ray.errors import ConfigError
from bilevel_ray.runtime.local.run_spec import RunSpec
from bilevel_ray.runtime.tune.space import RAMP_KEYS

__all__ = ["MUTABLE", "POPULATION_SCHEDULERS", "default_interval", "population_scheduler"]

POPULATION_SCHEDULERS = ("pbt", "pb2")
MUTABLE = ("gamma", "lr_y", "lr_ratio", "lr_x")  # what an exploit may change: numbers only


def default_interval(run: RunSpec) -> int:
    """About a tenth of the run, on a logged row (a checkpoint goes with a report)."""
    every = run.report_every
    return max(every, round(run.steps / 10 / every) * every)


def population_scheduler(
    kind: str, run: RunSpec, space: Mapping[str, Any], interval: int | None, num_workers: int
) -> tuple[Any, RunSpec]:
    """The Tune scheduler for ``kind`` ("pbt" or "pb2") and the trials' run, which now
    checkpoints every ``interval`` steps. Refuses what the population cannot do."""
    from ray.tune.search.sample import Domain

    if num_workers != 1:
        raise ConfigError(
            f"scheduler={kind!r} runs each trial in its own process (an exploit restarts it from "
            f"another trial's checkpoint); num_workers={num_workers}: use num_workers=1"
        )
    ramp = sorted(set(space) & set(RAMP_KEYS))
    if ramp:
        raise ConfigError(
            f"scheduler={kind!r} learns gamma's schedule itself; remove {ramp} from the search "
            "space and search a constant gamma (e.g. gamma: loguniform(1, 100))"
        )
    mutations = {k: v for k, v in space.items() if k in MUTABLE and isinstance(v, Domain)}
    if not mutations:
        raise ConfigError(
            f"scheduler={kind!r} perturbs {', '.join(MUTABLE)}, and the search space draws none "
            "of them from a distribution; add e.g. gamma=tune.loguniform(1, 100)"
        )
    interval = default_interval(run) if interval is None else interval
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ConfigError(f"pbt_interval={interval!r}: must be an integer >= 1 (steps)")
    if interval % run.report_every or interval >= run.steps:
        raise ConfigError(
            f"pbt_interval={interval}: must be a multiple of report_every={run.report_every} "
            f"(a checkpoint goes with a logged row) and below steps={run.steps}; e.g. "
            f"pbt_interval={default_interval(run)}"
        )
    run = dataclasses.replace(run, checkpoint_every=interval)
    common = dict(time_attr="step", perturbation_interval=interval, synch=False)
    if kind == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        pbt = _until_the_end(PopulationBasedTraining, run.steps)
        return pbt(**common, hyperparam_mutations=mutations, log_config=False), run
    try:
        import sklearn  # noqa: F401  (PB2's Gaussian process; Ray imports it lazily)
        from ray.tune.schedulers.pb2 import PB2
    except ImportError:
        raise ConfigError(
            "scheduler='pb2' needs the scikit-learn package: pip install 'bilevel_ray[pb2]' "
            "(or use scheduler='pbt', which needs nothing more)"
        ) from None
    bounds = {k: [_bound(k, d, "lower"), _bound(k, d, "upper")] for k, d in mutations.items()}
    return _until_the_end(PB2, run.steps)(**common, hyperparam_bounds=bounds, log_config=False), run


def _until_the_end(scheduler: type, steps: int) -> type:
    """``scheduler`` for a population that runs all at once.

    It leaves a trial's last report alone: an exploit there would restart the trial at its
    last step, to run nothing, and end it with its donor's result. And it never pauses a trial
    that is not exploited: Tune's PBT pauses a trial at its interval whenever another one waits
    (to share CPUs in turns), and with every trial running, the one waiting is an exploited
    trial restarting, so the pauses cascade: on ``representation`` with 36 trials every trial
    restarted at every interval, 10 process starts per trial instead of about 2."""
    from ray.tune.schedulers import TrialScheduler

    def on_trial_result(self: Any, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("step", 0) >= steps:
            return TrialScheduler.CONTINUE
        decision = scheduler.on_trial_result(self, tune_controller, trial, result)
        return TrialScheduler.CONTINUE if decision == TrialScheduler.PAUSE else decision

    return type(scheduler.__name__, (scheduler,), {"on_trial_result": on_trial_result})


def _bound(key: str, domain: Any, side: str) -> float:
    value = getattr(domain, side, None)
    if not isinstance(value, (int, float)):
        raise ConfigError(
            f"scheduler='pb2' needs a numeric range for {key} (e.g. tune.loguniform(1, 100)); "
            f"its search space entry is {domain!r}"
        )
    return float(value)
