"""The runtime's typed settings (RunSpec, Placement), the shared step loop and its report clock,
and torch's thread count: no Ray started."""

from __future__ import annotations

import pytest
import torch

import bilevel_ray as br
from bilevel_ray.runtime.local import loop
from bilevel_ray.runtime.local.run_spec import Placement, RunSpec
from bilevel_ray.runtime.local.solve import run_local, solver_config
from bilevel_ray.runtime.local.threads import threads_for_cpus, use_cpus
from bilevel_ray.runtime.local.watch import watch_settings
from bilevel_ray.runtime.train.job import WorkerJob


def test_run_spec_round_trips_through_a_dict_with_its_watch():
    watch = watch_settings("fallback", "pbgd_free", 20, 5, None)
    spec = RunSpec(100, seed=3, report_every=5, checkpoint_every=10, watch=watch)
    again = RunSpec.from_dict(spec.to_dict())
    assert again == spec and again.watch.estimate_steps() == [5, 10, 15, 20]
    job = WorkerJob("quadratic", {}, solver_config("pbgd_free", {}).to_dict(), spec)
    assert WorkerJob.from_dict(job.to_dict()) == job


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"steps": 0}, r"^steps=0: must be an integer >= 1$"),
        ({"steps": 2**63}, r"^steps=9223372036854775808: must be below 2\*\*63"),
        ({"seed": 2**64}, r"^seed=18446744073709551616: must be below 2\*\*63"),
        ({"report_interval_s": -1.0}, r"^report_interval_s=-1.0: must be a finite number"),
        ({"report_interval_s": float("nan")}, r"^report_interval_s=nan: must be a finite"),
        ({"checkpoint_every": 15}, r"checkpoint_every=15 must be a multiple of report_every=10"),
    ],
)
def test_run_spec_refuses_bad_settings(changes, match):
    with pytest.raises(br.ConfigError, match=match):
        RunSpec(**{"steps": 100, "report_every": 10, **changes})


def test_run_spec_lists_every_problem_at_once():
    with pytest.raises(br.ConfigError, match=r"^2 problems:\n  - steps=0.*\n  - seed=-1"):
        RunSpec(0, seed=-1)


def test_a_watch_window_past_the_run_is_refused():
    watch = watch_settings("stop", "pbgd_free", 500, 50, None)
    with pytest.raises(br.ConfigError, match=r"diagnose_window=500 is longer than the run"):
        RunSpec(100, watch=watch)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_workers": 0}, r"^num_workers=0: must be an integer >= 1$"),
        ({"use_gpu": 1}, r"^use_gpu=1: must be 'auto', True or False$"),
        ({"resources_per_worker": {"CPU": 0}}, r"resources_per_worker=\{'CPU': 0\}: must map"),
        ({"max_failures": -1}, r"^max_failures=-1: must be an integer >= 0$"),
    ],
)
def test_placement_refuses_bad_settings(changes, match):
    with pytest.raises(br.ConfigError, match=match):
        Placement(**changes)


def test_placement_round_trips_and_counts_cpus():
    placement = Placement(2, False, {"CPU": 0.5}, 1)
    assert Placement.from_dict(placement.to_dict()) == placement
    assert placement.cpus_per_worker == 0.5 and Placement().cpus_per_worker == 1.0


def _row(step: int) -> dict:
    return {"step": step}


def test_report_clock_reports_at_the_end_checkpoints_and_milestones_only_within_its_interval():
    clock = loop.ReportClock(interval_s=3600.0, milestones=frozenset({20}))
    outcome = loop.StepOutcome
    assert not clock.due(outcome(None, False, False, None))  # no row: nothing to report
    assert not clock.due(outcome(_row(10), False, False, None))  # within the interval
    assert clock.due(outcome(_row(20), False, False, None))  # a milestone
    assert clock.due(outcome(_row(30), False, True, None))  # a checkpoint
    assert clock.due(outcome(_row(40), True, False, None))  # the end
    every_row = loop.ReportClock(interval_s=0.0)
    assert every_row.due(outcome(_row(10), False, False, None))


def test_report_clock_asks_the_ranks_to_agree():
    asked = []

    def agree(due: bool) -> bool:
        asked.append(due)
        return True  # another rank's clock said so

    clock = loop.ReportClock(interval_s=3600.0, agree=agree)
    assert clock.due(loop.StepOutcome(_row(10), False, False, None)) and asked == [False]


class _Recording:
    """A sink that remembers what the loop handed it."""

    def __init__(self):
        self.before, self.after = [], []

    def before_step(self, step):
        self.before.append(step)

    def after_step(self, outcome, state, active):
        self.after.append((state.step, outcome.row and outcome.row["step"], outcome.checkpoint))


def test_the_loop_hands_every_step_to_the_sink_with_rows_and_checkpoints(
    quadratic, origin, tmp_path
):
    x0, y0 = origin
    sink = _Recording()
    spec = RunSpec(30, report_every=10, checkpoint_every=20)
    settings = solver_config("pbgd_free", {})
    result = run_local(
        quadratic, x0, y0, settings, spec, checkpoint_path=tmp_path / "c.pt", also=sink
    )
    assert sink.before == list(range(30))
    logged = [(s, r, c) for s, r, c in sink.after if r is not None or c]
    assert logged == [(10, 10, False), (20, 20, True), (30, 30, True)]
    assert result.history.column("step").to_pylist() == [10, 20, 30]


def test_threads_follow_the_cpus_given():
    assert threads_for_cpus(0.5) == 1 and threads_for_cpus(2.0) == 2 and threads_for_cpus(3.7) == 3
    before = torch.get_num_threads()
    try:
        assert use_cpus(1.0) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_failed_attempts_checkpoint_folders_are_pruned_to_the_newest_two(tmp_path):
    from bilevel_ray.runtime.local.checkpoint import (
        CHECKPOINT_FILE,
        group_checkpoint_name,
        group_checkpoints,
        prune_group_checkpoints,
    )

    # Two attempts of a worker group: the first wrote steps 10-30, the restarted one 30-40.
    for step, attempt in (
        (10, "aaaaaa"),
        (20, "aaaaaa"),
        (30, "aaaaaa"),
        (30, "bbbbbb"),
        (40, "bbbbbb"),
    ):
        folder = tmp_path / group_checkpoint_name(step, attempt)
        folder.mkdir()
        (folder / CHECKPOINT_FILE).write_bytes(b"")
    prune_group_checkpoints(tmp_path)
    kept = [p.parent.name for p in group_checkpoints(tmp_path)]
    assert kept == [group_checkpoint_name(30, "bbbbbb"), group_checkpoint_name(40, "bbbbbb")]
