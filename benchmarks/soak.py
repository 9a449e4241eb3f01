"""Soak: a long br.tune sweep of a tiny problem leaves no actors or placement groups behind and
keeps the driver's memory steady.

A ``--trials`` sweep (default 100) of ``toy-negative`` with ``--steps`` PBGD-Free steps per trial
(random search, no early stopping, so every trial runs to its end) on a local Ray of ``--cpus``
CPUs (default 2, no dashboard), two trials at a time. Measured:

- the driver's resident memory (RSS) before the sweep, after every ``--every`` ended trials
  (sampled from Tune's trial-complete callback, in the driver, after a ``gc.collect()``) and
  after the sweep; the growth from the first sample to the last is the leak figure (the first
  ``--every`` trials warm Tune's and torch's caches);
- the actors alive and the placement groups not ``REMOVED`` after the sweep that were not there
  before it: read from Ray's state API (``ray.util.state``) where it answers; that API is served
  by the dashboard, which this local Ray does not start, so otherwise from the GCS tables the
  driver reads directly (``ray._private.state.actors()`` and
  ``ray.util.placement_group_table()``). Tune removes a trial's placement group asynchronously,
  so the count is taken when ``br.tune`` returns and again after a grace of ``--grace`` s.

Exit code 0 when every trial ended and nothing leaked, else 1.

    .venv/bin/python benchmarks/soak.py [--trials 100] [--steps 20] [--every 10] [--cpus 2]
    .venv/bin/python benchmarks/soak.py --plain     # the same sweep of a plain Tune trainable
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from typing import Any

import psutil
import ray
from ray import tune

import bilevel_ray as br

MIB = 2**20


def rss_mib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / MIB


class MemoryLog:
    """RSS after every ``every`` ended trials, recorded from Tune's callback in the driver."""

    def __init__(self, every: int):
        self.every = every
        self.ended = 0
        self.samples: list[tuple[int, float, float]] = []  # (trials ended, RSS MiB, seconds)
        self.started = time.perf_counter()

    def trial_ended(self) -> None:
        self.ended += 1
        if self.ended % self.every == 0:
            self.samples.append((self.ended, rss_mib(), time.perf_counter() - self.started))


def hook_trial_events(log: MemoryLog, quiet: bool) -> None:
    """Record each ended trial through br.tune's progress callback (the one Tune callback a
    sweep has); with ``quiet`` its per-trial lines are not printed."""
    from bilevel_ray.runtime.tune.progress import SweepProgress as progress

    complete, error = progress.on_trial_complete, progress.on_trial_error

    def on_complete(self: Any, *args: Any, **kwargs: Any) -> None:
        if not quiet:
            complete(self, *args, **kwargs)
        log.trial_ended()

    def on_error(self: Any, *args: Any, **kwargs: Any) -> None:
        if not quiet:
            error(self, *args, **kwargs)
        log.trial_ended()

    progress.on_trial_complete = on_complete
    progress.on_trial_error = on_error
    if quiet:
        progress.on_trial_start = lambda self, *args, **kwargs: None


def cluster_state() -> tuple[dict[str, str], dict[str, str], str]:
    """(alive actors: id -> class, placement groups not removed: id -> state, the source)."""
    try:
        from ray.util.state import list_actors, list_placement_groups

        address = ray.get_runtime_context().gcs_address
        actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], timeout=10)
        groups = list_placement_groups(address=address, timeout=10)
        return (
            {a.actor_id: a.class_name for a in actors},
            {g.placement_group_id: g.state for g in groups if g.state != "REMOVED"},
            "ray.util.state",
        )
    except Exception as err:  # the state API is served by the dashboard: read the GCS tables
        why = type(err).__name__
    actors = {
        actor_id: str(info.get("ActorClassName") or info.get("Name") or "?")
        for actor_id, info in ray._private.state.actors().items()
        if info.get("State") == "ALIVE"
    }
    groups = {
        group_id: info["state"]
        for group_id, info in ray.util.placement_group_table().items()
        if info["state"] != "REMOVED"
    }
    return actors, groups, f"GCS tables (ray.util.state unavailable: {why}, no dashboard)"


def run_br(args: argparse.Namespace, storage: str, log: MemoryLog, name: str) -> list[str]:
    """The sweep through br.tune; the trials' statuses."""
    result = br.tune(
        "toy-negative",
        num_samples=args.trials,
        steps=args.steps,
        report_every=max(args.steps // 2, 1),
        search_alg=None,  # random search: no searcher state grows with the trials
        scheduler=None,  # no early stopping: every trial runs its steps
        max_concurrent_trials=args.concurrent,
        storage_path=storage,
        name=name,
    )
    return result.trials["status"].to_pylist()


def plain_trainable(config: dict[str, Any]) -> None:
    for step in (1, 2):
        tune.report({"eval/upper_loss": config["x"], "step": step})


def run_plain(args: argparse.Namespace, storage: str, log: MemoryLog, name: str) -> list[str]:
    """The same sweep as a plain Tune function trainable (two reports, no torch): what Tune
    itself costs the driver per trial, for comparison."""

    class Ended(tune.Callback):
        def on_trial_complete(self, *args: Any, **kwargs: Any) -> None:
            log.trial_ended()

        def on_trial_error(self, *args: Any, **kwargs: Any) -> None:
            log.trial_ended()

    grid = tune.Tuner(
        tune.with_resources(plain_trainable, {"cpu": 1}),
        param_space={"x": tune.uniform(0.0, 1.0)},
        tune_config=tune.TuneConfig(num_samples=args.trials, max_concurrent_trials=args.concurrent),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0, callbacks=[Ended()]),
    ).fit()
    return ["completed" if r.error is None else "error" for r in grid]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20, help="PBGD-Free steps per trial")
    parser.add_argument("--every", type=int, default=10, help="sample RSS every N ended trials")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--concurrent", type=int, default=2, help="trials at a time")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds before the recount")
    parser.add_argument("--verbose", action="store_true", help="print br.tune's trial lines")
    parser.add_argument(
        "--plain", action="store_true", help="a plain Tune trainable instead of br.tune"
    )
    parser.add_argument(
        "--sweeps", type=int, default=1, help="sweeps of --trials each, one after the other"
    )
    args = parser.parse_args()

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    log = MemoryLog(args.every)
    if not args.plain:
        hook_trial_events(log, quiet=not args.verbose)
    before_actors, before_groups, _ = cluster_state()
    rss_start = rss_mib()
    with tempfile.TemporaryDirectory() as storage:
        started = time.perf_counter()
        log.started = started
        statuses, sweep_ends = [], []
        for sweep in range(1, args.sweeps + 1):
            run = run_plain if args.plain else run_br
            statuses += run(args, storage, log, f"soak-{sweep}")
            sweep_ends.append((sweep, len(statuses), rss_mib()))
        wall = time.perf_counter() - started
        actors, groups, source = cluster_state()
        new_actors = {k: v for k, v in actors.items() if k not in before_actors}
        new_groups = {k: v for k, v in groups.items() if k not in before_groups}
        if new_actors or new_groups:  # removal is asynchronous: count again after a grace
            time.sleep(args.grace)
            actors, groups, source = cluster_state()
        late_actors = {k: v for k, v in actors.items() if k not in before_actors}
        late_groups = {k: v for k, v in groups.items() if k not in before_groups}
        rss_end = rss_mib()

    done = {s: statuses.count(s) for s in sorted(set(statuses))}
    what = (
        "a plain Tune trainable (2 reports, no torch)"
        if args.plain
        else f"br.tune on toy-negative ({args.steps} steps each)"
    )
    print(
        f"soak: {args.sweeps} x {args.trials} trials of {what} on {args.cpus} CPUs, "
        f"{args.concurrent} at a "
        f"time, random search, no early stopping; Ray {ray.__version__}"
    )
    print(f"trials ended: {len(statuses)} / {args.sweeps * args.trials} (statuses: {done})")
    print(f"wall time: {wall:.1f} s ({wall / max(len(statuses), 1):.2f} s per trial)")
    print(f"driver RSS (MiB): start {rss_start:.1f}")
    for ended, rss, seconds in log.samples:
        print(f"  after {ended:4d} trials ({seconds:6.1f} s): {rss:.1f}")
    if args.sweeps > 1:
        for sweep, ended, rss in sweep_ends:
            print(f"  when sweep {sweep} returned ({ended} trials): {rss:.1f}")
    print(f"  end (after the sweep): {rss_end:.1f}")
    if log.samples:
        first, last = log.samples[0], log.samples[-1]
        span = max(last[0] - first[0], 1)
        print(
            f"  growth from the first sample ({first[0]} trials) to the last ({last[0]}): "
            f"{last[1] - first[1]:+.1f} MiB ({(last[1] - first[1]) / span * 100:+.2f} MiB per "
            f"100 trials); start to end: {rss_end - rss_start:+.1f} MiB"
        )
    print(f"cluster state read from: {source}")
    print(
        f"leaked actors when br.tune returned: {len(new_actors)} {sorted(new_actors.values())}; "
        f"after {args.grace:g} s: {len(late_actors)} {sorted(late_actors.values())}"
        if new_actors
        else "leaked actors: 0"
    )
    print(
        f"placement groups not removed when br.tune returned: {len(new_groups)}; after "
        f"{args.grace:g} s: {len(late_groups)} {sorted(late_groups.values())}"
        if new_groups
        else "placement groups not removed: 0"
    )
    print(f"alive actors before the sweep (not counted): {len(before_actors)}")
    ray.shutdown()
    ok = len(statuses) == args.sweeps * args.trials and not late_actors and not late_groups
    print("PASS" if ok else "FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
