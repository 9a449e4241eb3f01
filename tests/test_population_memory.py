"""A population sized to its machine before it starts, and a sweep whose trials die (killed by
an out-of-memory killer, or crashed) that records them and goes on."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from ray import exceptions as rex

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.runtime.local.run_spec import take_run_options
from bilevel_ray.runtime.tune import deaths, plan
from bilevel_ray.runtime.tune import outcome as outcome_module
from bilevel_ray.runtime.tune.capacity import (
    DEFAULT_POPULATION,
    RAY_PROCESSES,
    STATE_COPIES,
    TRIALS_PER_CPU,
    WORKER_MEMORY,
    Capacity,
    PeakMemory,
    cluster_capacity,
    largest_population,
    machine_capacity,
    population_size,
    trial_memory,
)
from bilevel_ray.runtime.tune.deaths import KilledForMemory, death_reason, handle_trial_deaths
from bilevel_ray.runtime.tune.driver import TUNE_RUN_DEFAULTS, TUNE_RUN_EXCLUDED
from bilevel_ray.runtime.tune.outcome import outcome, trials_table

MiB, GiB = 2**20, 2**30
ROOMY = 10**6  # CPUs enough that memory alone bounds a population


def machine(memory: float | None, cpus: float = ROOMY) -> Capacity:
    return Capacity(memory, "MemAvailable", cpus, "this machine")


# --- the sizing rule --------------------------------------------------------------------------


def test_48_trials_of_400_mib_do_not_fit_in_5_gib_and_12_do():
    assert largest_population(400 * MiB, machine(5 * GiB)) == 12
    with pytest.raises(br.ConfigError) as err:
        population_size("pbt", 48, 400 * MiB, machine(5 * GiB))
    assert str(err.value) == (
        "scheduler='pbt' runs its whole population at once, and num_samples=48 does not fit: "
        "48 trials x 400 MiB each is 18.8 GiB, and this machine has 5.0 GiB of memory for the "
        f"trials (MemAvailable) and {ROOMY:g} CPUs (at most {TRIALS_PER_CPU} trials per CPU); "
        "the largest population that fits is 12: use num_samples=12, or more memory or CPUs "
        "(a Ray cluster: address=...)"
    )
    assert population_size("pbt", 12, 400 * MiB, machine(5 * GiB)) == (12, None)


def test_cpus_bound_a_population_too():
    two = machine(64 * GiB, cpus=2)
    assert largest_population(400 * MiB, two) == 2 * TRIALS_PER_CPU
    with pytest.raises(br.ConfigError, match=r"and 2 CPUs \(at most \d+ trials per CPU\)"):
        population_size("pb2", 2 * TRIALS_PER_CPU + 1, 400 * MiB, two)
    # Memory not known (another system): the CPUs alone.
    assert largest_population(400 * MiB, machine(None, cpus=1.5)) == int(1.5 * TRIALS_PER_CPU)


def test_a_default_population_is_sized_to_what_fits_and_says_so():
    size, note = population_size("pbt", None, 400 * MiB, machine(5 * GiB))
    assert size == 12
    assert note == (
        "scheduler='pbt': a population of 12 trials, as many as this machine holds (5.0 GiB of "
        f"memory for the trials (MemAvailable) and {ROOMY:g} CPUs (at most {TRIALS_PER_CPU} "
        f"trials per CPU)); the default is {DEFAULT_POPULATION}"
    )
    assert population_size("pbt", None, 400 * MiB, machine(64 * GiB)) == (DEFAULT_POPULATION, None)


def test_a_machine_that_holds_not_one_trial_refuses_even_the_default():
    with pytest.raises(br.ConfigError, match=r"the largest population that fits is 0: use more"):
        population_size("pbt", None, 400 * MiB, machine(300 * MiB))


def test_a_trial_is_a_worker_its_problem_and_copies_of_its_state():
    assert trial_memory(80 * MiB, 10 * MiB) == WORKER_MEMORY + 80 * MiB + STATE_COPIES * 10 * MiB
    # A state larger than what the step measured (the allocator had the memory already).
    assert trial_memory(0, 10 * MiB) == WORKER_MEMORY + (1 + STATE_COPIES) * 10 * MiB


def test_a_refused_cluster_population_names_the_cluster():
    cluster = cluster_capacity({"CPU": 4.0, "memory": 8 * GiB})
    with pytest.raises(br.ConfigError, match=r"the Ray cluster has 8\.0 GiB of memory .*Ray's"):
        population_size("pbt", 97, 100 * MiB, cluster)


# --- what the machine has ------------------------------------------------------------------------


def _fake_root(tmp_path: Path, cgroup: str, files: dict[str, str]) -> Path:
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "meminfo").write_text(
        "MemTotal:       25165824 kB\nMemAvailable:   20971520 kB\n"  # 24 GiB, 20 GiB
    )
    (tmp_path / "proc" / "self" / "cgroup").write_text(cgroup)
    for name, text in files.items():
        path = tmp_path / "sys" / "fs" / "cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_cgroup_limit_bounds_the_memory_less_its_working_set(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_memory_usage_threshold", "0.95")
    root = _fake_root(
        tmp_path,
        "0::/job\n",
        {
            "job/memory.max": f"{5 * GiB}\n",
            "job/memory.current": f"{2 * GiB}\n",
            "job/memory.stat": f"anon 1\ninactive_file {GiB}\n",  # reclaimable page cache
            "memory.max": "max\n",
        },
    )
    found = machine_capacity(ray_started=False, root=str(root))
    # 5 GiB less 1 GiB in use, less Ray's kill margin (5% of 5 GiB) and Ray's own processes.
    assert found.memory == pytest.approx(4 * GiB - 0.05 * 5 * GiB - RAY_PROCESSES)
    assert found.memory_source == "the cgroup's memory limit, 5.0 GiB"


def test_v1_and_no_limit_leave_memavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_memory_usage_threshold", "1.0")
    unlimited = str(2**63 - 4096)
    root = _fake_root(
        tmp_path, "4:memory:/a\n0::/\n", {"memory/a/memory.limit_in_bytes": unlimited}
    )
    found = machine_capacity(ray_started=True, root=str(root))
    assert (found.memory, found.memory_source) == (20 * GiB, "MemAvailable")
    # A running Ray's memory resource, when smaller, and its CPUs.
    found = machine_capacity(True, {"CPU": 2.0, "memory": 3 * GiB}, root=str(root))
    assert (found.memory, found.memory_source, found.cpus) == (
        3 * GiB,
        "Ray's memory resource",
        2.0,
    )


@pytest.mark.parametrize(
    "files",
    [
        {"cpu.max": "150000 100000\n"},
        {"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"},
    ],
)
def test_the_cgroups_cpu_quota_bounds_the_cpus(tmp_path, files):
    root = _fake_root(tmp_path, "0::/\n", files)
    assert machine_capacity(ray_started=False, root=str(root)).cpus == min(
        len(os.sched_getaffinity(0)), 1.5
    )


def test_peak_memory_sees_an_allocation_freed_before_the_block_ends():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the kernel's peak resident size is Linux's")
    measured = PeakMemory()
    with measured.measure():
        block = torch.ones(50_000_000, dtype=torch.float32)  # 191 MiB, touched
        del block
    assert measured.bytes >= 150 * MiB


def test_the_pre_flight_refuses_a_population_larger_than_the_machine(no_ray, tmp_path, monkeypatch):
    """br.tune, before Ray starts: 48 trials against 5 GiB, each estimated at 400 MiB."""
    monkeypatch.setattr(plan, "sweep_capacity", lambda address: machine(5 * GiB))
    monkeypatch.setattr(plan, "trial_memory", lambda problem, state: 400 * MiB)
    with pytest.raises(br.ConfigError, match=r"num_samples=48 does not fit.* is 12: use num_s"):
        br.tune("quadratic", scheduler="pbt", num_samples=48, steps=40, storage_path=tmp_path)
    assert not (tmp_path / "sweep").exists()


def test_the_default_population_is_sized_on_a_line(no_ray, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plan, "sweep_capacity", lambda address: machine(64 * GiB, cpus=1))
    found = plan.plan_sweep(
        "quadratic",
        **{
            **PLAN_ARGS,
            "num_samples": None,
            "scheduler": "pbt",
            "storage_path": tmp_path,
        },
    )
    assert found.num_samples == TRIALS_PER_CPU and found.record["num_samples"] == TRIALS_PER_CPU
    assert found.trial_memory > WORKER_MEMORY
    assert f"[tune] scheduler='pbt': a population of {TRIALS_PER_CPU} trials" in (
        capsys.readouterr().err
    )


def test_a_cluster_not_yet_connected_is_checked_once_connected(monkeypatch, tmp_path):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # this session may run one
    found = plan.plan_sweep(
        "quadratic",
        **{**PLAN_ARGS, "num_samples": 100, "scheduler": "pbt", "storage_path": tmp_path},
        address="ray://head:10001",
    )
    assert (found.num_samples, found.population_checked) == (100, False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "memory": 64 * GiB})
    with pytest.raises(br.ConfigError, match=r"num_samples=100 does not fit.*the Ray cluster"):
        plan.check_population_fits(found)


PLAN_ARGS = {
    "problem_config": None,
    "method": "pbgd_free",
    "search_space": None,
    "steps": 40,
    "run_options": take_run_options({}, TUNE_RUN_DEFAULTS, TUNE_RUN_EXCLUDED),
    "search_alg": "auto",
    "max_concurrent_trials": None,
    "placement": (1, False, None, 1),
    "gap": (0.1, 5),
    "name": "sweep",
    "search_seed": None,
    "pbt_interval": None,
    "base_options": {},
}


# --- a trial whose process died -------------------------------------------------------------------


def test_a_dead_process_is_killed_and_an_error_of_the_code_is_not():
    assert death_reason(rex.OutOfMemoryError("Task was killed due to the node running low on"))
    assert death_reason(rex.OutOfMemoryError("x")).startswith("killed: out of memory")
    assert death_reason(rex.ActorDiedError()).startswith("killed: its process died")
    assert death_reason(rex.WorkerCrashedError()).startswith("killed: its process died")
    wrapped = rex.RayTaskError("run_trial", "traceback", rex.WorkerCrashedError())
    assert death_reason(wrapped).startswith("killed: its process died")
    assert death_reason(rex.NodeDiedError("gone")) == "killed: its node died or became unreachable"
    assert death_reason(ValueError("the user's loss broke")) is None
    assert death_reason(None) is None


class _Result(SimpleNamespace):
    pass


@pytest.mark.parametrize(
    "folder, trial_id",
    [
        ("run_trial_ab12c_00003_3_gamma=2.0,lr_y=0.1_2026-01-01_10-00-00", "ab12c_00003"),
        ("run_trial_0c652abc_1_gamma=84.59_2026-01-01_10-00-00", "0c652abc"),
        ("elsewhere", "elsewhere"),
    ],
)
def test_a_trial_without_a_report_is_named_by_its_folder(folder, trial_id):
    assert outcome_module._trial_id(folder) == trial_id


def test_rays_memory_monitor_ends_a_trial_not_the_sweep():
    """Ray's OutOfMemoryError reaches Tune's actor manager, which raised on it (the whole
    sweep ended); it now goes the way of an actor's death: the trial's error handlers."""
    from ray.air.execution._internal.actor_manager import RayActorManager

    handle_trial_deaths()
    seen = []
    actor = SimpleNamespace(actor_id="a", _on_error=lambda actor, err: seen.append(err))
    task = SimpleNamespace(_tracked_actor=actor, _on_error=None)
    manager = SimpleNamespace(_failed_actor_ids=set(), _cleanup_actor=lambda tracked_actor: None)
    oom = rex.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory.")
    RayActorManager._actor_task_failed(manager, tracked_actor_task=task, exception=oom)
    assert isinstance(seen[0], rex.ActorDiedError) and isinstance(seen[0], KilledForMemory)
    assert death_reason(seen[0]).startswith("killed: out of memory (Ray's memory monitor")
    assert pickle.loads(pickle.dumps(seen[0])).args == seen[0].args  # Tune pickles it


def test_a_trial_killed_before_its_first_report_keeps_the_other_trials_columns(tmp_path):
    """Arrow takes a table's columns from its first row: a killed trial there (no metrics, no
    config) dropped every other trial's config and lineage ("best config: {}")."""
    killed = tmp_path / "run_trial_ab12c_00000_0_gamma=2.0_2026-01-01"
    killed.mkdir()
    (killed / "params.json").write_text(json.dumps({"gamma": 2.0}))
    done = {
        "trial_id": "ab12c_00001",
        "status": "completed",
        "step": 40,
        "eval/upper_loss": 1.5,
        "eval/lower_gap": 0.01,
        "search/score": 1.5,
        "lineage": "[]",
        "config": {"gamma": 3.0},
    }
    grid = [
        _Result(metrics={}, config=None, error=rex.ActorDiedError(), path=str(killed)),
        _Result(metrics=done, config={"gamma": 3.0}, error=None, path=str(tmp_path / "b")),
    ]
    table = trials_table(grid)
    rows = table.to_pylist()
    assert [r["trial_id"] for r in rows] == ["ab12c_00000", "ab12c_00001"]
    assert [r["config/gamma"] for r in rows] == [2.0, 3.0]
    assert rows[0]["status"] == "error" and rows[0]["error"].startswith("killed: its process")
    assert rows[1]["lineage"] == "[]" and rows[0]["lineage"] is None
    result = outcome(table, table.slice(0, 0), tmp_path, {}, 0.1)
    assert result.best_config == {"gamma": 3.0} and result.status == "completed"
    assert result.failure_summary().startswith("1 of 2 trials failed: killed: its process died")


def test_a_sweep_whose_trials_all_died_has_no_best_and_says_why(tmp_path):
    grid = [
        _Result(metrics={}, config=None, error=rex.OutOfMemoryError("x"), path=str(tmp_path))
        for _ in range(3)
    ]
    table = trials_table(grid)
    result = outcome(table, table.slice(0, 0), tmp_path, {}, 0.1)
    assert result.best_config is None
    assert result.status.startswith("no trial finished: 3 of 3 failed, first reason: killed: out")


def test_rays_notices_of_a_dead_worker_are_dropped_and_other_lines_pass(monkeypatch):
    from ray._private import worker

    shown = []
    monkeypatch.setattr(worker, "print_to_stdstream", lambda data, *a, **k: shown.append(data))
    monkeypatch.delenv("BILEVEL_RAY_VERBOSE", raising=False)
    handle_trial_deaths()
    notice = "A worker died or was killed while executing a task by an unexpected system error."
    worker.print_to_stdstream({"pid": "raylet", "lines": [notice]}, ignore_prefix=False)
    worker.print_to_stdstream({"pid": "raylet", "lines": [notice, "other"]}, ignore_prefix=False)
    worker.print_to_stdstream({"pid": 12, "lines": [notice]}, ignore_prefix=False)
    assert [d["lines"] for d in shown] == [["other"], [notice]]
    failed = "Trial task failed for trial run_trial_1"
    record = logging.LogRecord("ray.tune", logging.ERROR, "", 0, failed, (), None)
    assert not deaths._FILTER.filter(record)
    monkeypatch.setenv("BILEVEL_RAY_VERBOSE", "1")
    assert deaths._FILTER.filter(record)


# --- sweeps (Ray) --------------------------------------------------------------------------------

KILLS_ITSELF = """
import os, signal
from bilevel_ray.problems import build_spec


class Killing:
    def __init__(self, inner, marker, every):
        self.inner, self.marker, self.calls, self.every = inner, marker, 0, every

    def upper_loss(self, x, y, batch):
        self.calls += 1
        # In a trial (not the driver's pre-flight), past its first reports: the first trial
        # there (all of them with every=True) kills its own process, as an OOM killer would.
        if self.calls == 60 and os.environ.get("BR_TEST_DRIVER") != str(os.getpid()):
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                if not self.every:
                    return self.inner.upper_loss(x, y, batch)
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.upper_loss(x, y, batch)

    def lower_loss(self, x, y, batch):
        return self.inner.lower_loss(x, y, batch)


def factory(config):
    import dataclasses
    spec = build_spec("quadratic", {"device": config.get("device", "cpu")})
    killing = Killing(spec.problem, config["marker"], config.get("every", False))
    return dataclasses.replace(spec, problem=killing)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_trial_killed_mid_run_is_recorded_and_the_sweep_goes_on(
    ray_2cpu, tmp_path, monkeypatch, capfd
):
    (tmp_path / "killing.py").write_text(KILLS_ITSELF)
    monkeypatch.setenv("BR_TEST_DRIVER", str(os.getpid()))
    monkeypatch.delenv("BILEVEL_RAY_VERBOSE", raising=False)
    result = br.tune(
        f"{tmp_path / 'killing.py'}:factory",
        problem_config={"marker": str(tmp_path / "killed")},
        num_samples=2,
        steps=200,
        report_every=20,
        scheduler=None,
        search_alg=None,
        max_failures=0,
        storage_path=tmp_path,
        name="fifo",
    )
    trials = sorted(result.trials.to_pylist(), key=lambda t: t["status"])
    assert [t["status"] for t in trials] == ["completed", "error"]
    assert trials[1]["error"].startswith("killed: its process died")
    assert result.best_config is not None and "lr_y" in result.best_config
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "A worker died" not in out + err
    failed = [line for line in err.splitlines() if re.match(r"\[tune\] \w+ failed ", line)]
    assert len(failed) == 1 and "killed: its process died" in failed[0], err


@pytest.mark.ray
@pytest.mark.slow
def test_a_population_whose_trials_all_died_exits_1_quietly(ray_2cpu, tmp_path, monkeypatch, capfd):
    (tmp_path / "killing.py").write_text(KILLS_ITSELF)
    monkeypatch.setenv("BR_TEST_DRIVER", str(os.getpid()))
    monkeypatch.delenv("BILEVEL_RAY_VERBOSE", raising=False)
    argv = ["tune", f"{tmp_path / 'killing.py'}:factory", "--config", "every=true"]
    argv += ["--config", f"marker={tmp_path / 'killed'}", "--samples", "2", "--max-steps", "200"]
    argv += ["--report-every", "20", "--scheduler", "pbt", "--max-failures", "0"]
    argv += ["--out", str(tmp_path), "--quiet"]
    assert main(argv) == 1
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "A worker died" not in out + err, out + err
    assert "best config" not in out
    said = "error: no trial of the sweep completed; 2 of 2 trials failed: killed: its process"
    assert said in err
    folder = tmp_path / "sweep"
    assert not (folder / "best_schedule.json").exists()
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    assert {t["status"] for t in trials} == {"error"}
    assert all(t["error"].startswith("killed: its process died") for t in trials)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["outcome"]["status"] == "failed"
