"""``br.compare``'s folder claim and ``resume=True`` (``--resume``).

Two calls into one folder: the first claims it (``claim.json``) before any work and the second
is refused, before Ray starts; a claim left by a killed call is stale and a resume takes it
over. Each finished run leaves ``runs/<method>-seed<k>.json`` as it ends; a comparison stopped
after some runs resumes with only the others, and a resume is refused where it cannot be honest
(other arguments, a finished comparison, no comparison). Most tests stand in for Ray with runs
that leave the files a trial leaves (``_fake_runs``); one resumes a real comparison on Ray.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import bilevel_ray as br
import bilevel_ray.runtime.compare.driver as compare_module
from bilevel_ray.cli import main
from bilevel_ray.records.manifest import finish as end_manifest
from bilevel_ray.records.manifest import new_manifest
from bilevel_ray.runtime.compare.claim import CLAIM, claim_record, is_alive
from bilevel_ray.runtime.compare.finished import RUNS, run_row, write_finished
from bilevel_ray.runtime.compare.trial import CURVES, PARAMS_FOLDER
from bilevel_ray.runtime.local.history import write_parquet

METHODS = ["alt_pbgd", "pbgd"]  # no PBGD-Free: no flatness diagnostic to wait for
ARGS = {"methods": METHODS, "budget_s": 1, "seeds": 1, "name": "c", "progress": False}


class RayStarted(AssertionError):
    """The call reached Ray."""


def _finish_run(folder: Path, key: str, method: str, seed: int) -> dict:
    """What a trial leaves as it ends: its curve, its parameters, its checkpoint."""
    phi = (0.1 if method == "alt_pbgd" else 0.2) + 0.001 * seed
    curve = [
        {"method": method, "seed": seed, "step": step, "wall_s": wall, "eval/phi": p,
         "eval/phi_val": p, "eval/upper_loss": p}
        for step, wall, p in ((10, 0.5, phi + 1.0), (20, 1.0, phi))
    ]  # fmt: skip
    name = f"{method}-seed{seed}"
    write_parquet(pa.Table.from_pylist(curve), folder / CURVES / f"{name}.parquet")
    (folder / PARAMS_FOLDER).mkdir(parents=True, exist_ok=True)
    params = {"x": {"x": torch.zeros(1)}, "y": {"y": torch.zeros(1)}}
    torch.save(params, folder / PARAMS_FOLDER / f"{name}.pt")
    report = {
        "status": "completed", "reason": None, "steps": 20, "wall_s": 1.0, "final_phi": phi,
        "final_upper_loss": phi, "lower_gap": 0.0, "state_bytes": 16, "peak_rss_mb": 100.0,
        "rss_growth_mb": 1.0, "scoring_s": 0.1, "run_wall_s": 1.2,
    }  # fmt: skip
    write_finished(folder, key, method, seed, report, curve, f"{PARAMS_FOLDER}/{name}.pt")
    return run_row(method, seed, report)


def _fake_runs(calls: list, stop_after: int | None = None, during=None):
    """compare's ``_run_all`` without Ray: each run it is given leaves a trial's files;
    ``stop_after`` runs, a KeyboardInterrupt (a comparison stopped mid-way); ``during()`` is
    called while the runs go."""

    def run_all(plan, methods, seeds, storage, name, where, watch, extra):
        todo = (
            plan.todo if plan.todo is not None else [(m, s) for m in methods for s in range(seeds)]
        )
        calls.append(list(todo))
        if during is not None:
            during()
        rows = []
        for i, (method, seed) in enumerate(todo):
            if i == stop_after:
                raise KeyboardInterrupt
            rows.append(_finish_run(Path(plan.folder), plan.key, method, seed))
        return rows

    return run_all


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise RayStarted("the call reached Ray")

    monkeypatch.setattr(compare_module, "connect", refuse)
    monkeypatch.setattr(compare_module, "_run_all", refuse)


def _stopped(tmp_path: Path, monkeypatch, after: int | None = 1) -> Path:
    """A comparison of METHODS stopped after ``after`` of its runs (None: after all of them,
    before its table); its folder."""
    monkeypatch.setattr(compare_module, "_run_all", _fake_runs([], stop_after=after))
    finish = compare_module.finish
    if after is None:
        monkeypatch.setattr(compare_module, "finish", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        br.compare("toy-negative", storage_path=str(tmp_path), **ARGS)
    monkeypatch.setattr(compare_module, "finish", finish)
    return tmp_path / "c"


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return int(child.stdout)


def _plant_claim(folder: Path, pid: int, host: str | None = None, start=None) -> dict:
    claim = {**claim_record(), "pid": pid, "process_start": start}
    if host is not None:
        claim["host"] = host
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CLAIM).write_text(json.dumps(claim))
    return claim


def _files(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


# --- two writers -----------------------------------------------------------------------------


def test_a_second_call_is_refused_while_the_first_writes(tmp_path, monkeypatch):
    """The second call meets the first's claim (the folder still empty of results) and is
    refused; the folder ends with the first comparison only."""
    second: list[str] = []

    def during():
        for resume in (False, True):
            with pytest.raises(br.ConfigError) as info:
                br.compare("toy-negative", storage_path=str(tmp_path), resume=resume, **ARGS)
            second.append(str(info.value))

    monkeypatch.setattr(compare_module, "_run_all", _fake_runs([], during=during))
    result = br.compare("toy-negative", storage_path=str(tmp_path), **ARGS)
    folder = tmp_path / "c"
    shown = re.escape(f"pid {os.getpid()} on {socket.gethostname()!r} since ")
    for message in second:  # even --resume: the first is alive
        assert re.match(
            rf"comparison folder '{re.escape(str(folder))}' is being written by {shown}.*: use a "
            r"new --name \(name=\.\.\.\), or wait until it ends and pass --resume \(resume=True\) "
            r"if it did not finish$",
            message,
        ), message
    assert not (folder / CLAIM).exists()  # released at the end
    runs = pq.read_table(folder / "compare.parquet").to_pylist()
    assert sorted(r["method"] for r in runs) == METHODS
    assert result.recommendation["method"] == "alt_pbgd"


@pytest.mark.parametrize("owner", ["this process", "a live child"])
def test_a_live_claim_refuses_before_ray_starts(tmp_path, no_ray, owner):
    child = None
    if owner == "a live child":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid = os.getpid() if child is None else child.pid
        claim = _plant_claim(tmp_path / "c", pid)
        before = _files(tmp_path)
        for resume in (False, True):
            with pytest.raises(br.ConfigError, match=rf"is being written by pid {pid} on "):
                br.compare("toy-negative", storage_path=str(tmp_path), resume=resume, **ARGS)
        assert _files(tmp_path) == before
        assert json.loads((tmp_path / "c" / CLAIM).read_text()) == claim
    finally:
        if child is not None:
            child.kill()
            child.wait()


def test_a_claim_from_another_host_or_unreadable_is_refused(tmp_path, no_ray):
    folder = tmp_path / "c"
    _plant_claim(folder, 1, host="elsewhere.example")
    with pytest.raises(
        br.ConfigError,
        match=r"is claimed by pid 1 on 'elsewhere\.example' since .*, and this host cannot tell "
        r"whether that process still runs: use a new --name \(name=\.\.\.\), or once it has "
        r"ended remove claim\.json and pass --resume \(resume=True\)$",
    ):
        br.compare("toy-negative", storage_path=str(tmp_path), resume=True, **ARGS)
    (folder / CLAIM).write_text('{"pid": ')
    with pytest.raises(
        br.ConfigError,
        match=r"its claim\.json cannot be read as a claim \(pid, host, time\): if no comparison "
        r"is writing the folder, remove claim\.json and pass --resume",
    ):
        br.compare("toy-negative", storage_path=str(tmp_path), **ARGS)


def test_a_reused_pid_or_a_dead_one_is_not_alive():
    assert is_alive(os.getpid(), claim_record()["process_start"])
    assert not is_alive(os.getpid(), -1)  # another process now holds the pid
    assert not is_alive(_dead_pid())


def test_a_stale_claim_is_taken_over_by_resume_only(tmp_path, monkeypatch, capsys):
    """A comparison killed after one run: its claim names a dead pid. Without --resume the
    call is told to resume; with it, the claim is taken over and the comparison finished."""
    folder = _stopped(tmp_path, monkeypatch)
    dead = _dead_pid()
    _plant_claim(folder, dead)
    with pytest.raises(
        br.ConfigError,
        match=rf"holds an unfinished comparison \(its writer, pid {dead} on .*, ended without "
        r"finishing it\): pass --resume \(resume=True\) to continue it, or use a new --name",
    ):
        br.compare("toy-negative", storage_path=str(tmp_path), **ARGS)
    calls: list = []
    monkeypatch.setattr(compare_module, "_run_all", _fake_runs(calls))
    capsys.readouterr()
    br.compare(
        "toy-negative", storage_path=str(tmp_path), resume=True, **{**ARGS, "progress": True}
    )
    err = capsys.readouterr().err
    assert f"[compare] took over the claim of pid {dead} (since " in err
    assert calls == [[("pbgd", 0)]] and not (folder / CLAIM).exists()


def test_a_claim_left_before_anything_was_written_lets_a_new_start_take_it(tmp_path, monkeypatch):
    """A comparison killed before it wrote anything but its claim: there is nothing to resume,
    and a new start takes the stale claim over (the two messages no longer point at each
    other)."""
    folder = tmp_path / "c"
    folder.mkdir()
    _plant_claim(folder, _dead_pid())
    with pytest.raises(br.ConfigError, match=r"holds no comparison to resume: run it without"):
        br.compare("toy-negative", storage_path=str(tmp_path), resume=True, **ARGS)
    calls: list = []
    monkeypatch.setattr(compare_module, "_run_all", _fake_runs(calls))
    br.compare("toy-negative", storage_path=str(tmp_path), **ARGS)
    assert len(calls) == 1 and not (folder / CLAIM).exists()
    assert (folder / "compare.parquet").is_file()


# --- stopped and resumed ------------------------------------------------------------------------


def test_a_stopped_comparison_resumes_with_only_the_runs_it_lacks(tmp_path, monkeypatch, capsys):
    folder = _stopped(tmp_path, monkeypatch)
    kept = folder / RUNS / "alt_pbgd-seed0.json"
    stamp = kept.stat().st_mtime_ns
    assert json.loads((folder / "manifest.json").read_text())["outcome"]["status"] == "interrupted"
    with pytest.raises(br.ConfigError, match=r"holds an unfinished comparison: pass --resume"):
        br.compare("toy-negative", storage_path=str(tmp_path), **ARGS)
    calls: list = []
    monkeypatch.setattr(compare_module, "_run_all", _fake_runs(calls))
    capsys.readouterr()
    result = br.compare(
        "toy-negative", storage_path=str(tmp_path), resume=True, **{**ARGS, "progress": True}
    )
    err = capsys.readouterr().err
    assert calls == [[("pbgd", 0)]]  # only the run it lacked
    assert "= 2 runs (1 read from the folder, 1 to run) of 1 s" in err
    assert "[compare] resuming: 1 of 2 runs read from the folder (runs/); running the other 1: " \
        "pbgd seed 0" in err  # fmt: skip
    assert kept.stat().st_mtime_ns == stamp
    assert result.resumed == {
        "runs_read": ["alt_pbgd-seed0"], "runs_run": ["pbgd-seed0"], "untrusted": {}
    }  # fmt: skip
    saved = json.loads((folder / "compare.json").read_text())
    assert saved["resumed"] == result.resumed
    assert sorted(r["method"] for r in saved["runs"]) == METHODS
    assert {r["method"] for r in pq.read_table(folder / "curves.parquet").to_pylist()} == set(
        METHODS
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["outcome"]["status"] == "completed"
    assert [c["previous_outcome"]["status"] for c in manifest["continuations"]] == ["interrupted"]
    assert {"results/alt_pbgd.pt", "results/pbgd.pt", "compare.json"} <= set(manifest["outputs"])
    # Finished: a resume says so and leaves it as it is.
    before = _files(folder)
    with pytest.raises(
        br.ConfigError,
        match=rf"^comparison folder '{re.escape(str(folder))}' holds a finished comparison "
        r"\(recommended: alt_pbgd\): there is nothing to resume, and its files stay as they are "
        r"\(bilevel-ray show shows it\); use a new --name \(name=\.\.\.\) to run it again$",
    ):
        br.compare("toy-negative", storage_path=str(tmp_path), resume=True, **ARGS)
    assert _files(folder) == before


@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        (
            lambda f: f.write_text(f.read_text()[:100]),
            r"not readable JSON \(JSONDecodeError: it "
            r"may be cut short\)",
        ),
        (
            lambda f: f.write_text(f.read_text().replace('"comparison": "', '"comparison": "0')),
            r"written by another comparison \(its problem, data or settings differ\)",
        ),
        (
            lambda f: (f.parent.parent / PARAMS_FOLDER / "alt_pbgd-seed0.pt").write_bytes(b"x"),
            r"its parameters file params/alt_pbgd-seed0\.pt changed since the run wrote it",
        ),
    ],
    ids=["truncated", "foreign", "params-changed"],
)
def test_a_checkpoint_not_trusted_is_run_again_and_said(tmp_path, monkeypatch, capsys, spoil, why):
    folder = _stopped(tmp_path, monkeypatch, after=None)  # both runs ended, then stopped
    spoil(folder / RUNS / "alt_pbgd-seed0.json")
    calls: list = []
    monkeypatch.setattr(compare_module, "_run_all", _fake_runs(calls))
    capsys.readouterr()
    result = br.compare("toy-negative", storage_path=str(tmp_path), resume=True, **ARGS)
    assert re.search(
        rf"^warning: runs/alt_pbgd-seed0\.json is not trusted \({why}\): removed; alt_pbgd seed "
        r"0 runs again$",
        capsys.readouterr().err,
        re.MULTILINE,
    )
    assert calls == [[("alt_pbgd", 0)]]
    assert result.resumed["runs_read"] == ["pbgd-seed0"]
    assert set(result.resumed["untrusted"]) == {"alt_pbgd-seed0"}
    assert json.loads((folder / RUNS / "alt_pbgd-seed0.json").read_text())["report"]["steps"] == 20


def test_every_run_finished_resumes_without_ray(tmp_path, monkeypatch):
    """Stopped after its last run, before its table: the resume only writes the outcome."""
    _stopped(tmp_path, monkeypatch, after=None)
    monkeypatch.undo()  # compare's own _run_all, which must not reach Ray: nothing to run
    monkeypatch.setattr(compare_module, "connect", _interrupt)
    result = br.compare("toy-negative", storage_path=str(tmp_path), resume=True, **ARGS)
    assert result.resumed["runs_run"] == [] and len(result.resumed["runs_read"]) == 2
    assert (tmp_path / "c" / "compare.png").is_file()


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


# --- resume refusals ---------------------------------------------------------------------------


def test_a_resume_with_other_arguments_names_each_difference(tmp_path, monkeypatch, no_ray):
    folder = _stopped(tmp_path, monkeypatch)
    monkeypatch.setattr(compare_module, "_run_all", _interrupt)
    before = _files(folder)
    with pytest.raises(br.ConfigError) as info:
        br.compare("toy-negative", storage_path=str(tmp_path), resume=True,
                   **{**ARGS, "budget_s": 2, "methods": ["pbgd", "alt_pbgd"]})  # fmt: skip
    assert str(info.value) == (
        f"comparison '{folder}' was started with other settings or data, and continuing it "
        "would change its trajectory: budget_s: 1.0 -> 2.0; methods: ['alt_pbgd', 'pbgd'] -> "
        "['pbgd', 'alt_pbgd']. Use a new --name (name=...) for a comparison with these "
        "settings, or resume it with the arguments it was started with (bilevel-ray show lists "
        "them)"
    )
    assert _files(folder) == before


def test_a_resume_where_there_is_no_comparison_is_refused(tmp_path, no_ray):
    nothing = r"holds no comparison to resume: run it without --resume \(resume=False\) to start"
    with pytest.raises(br.ConfigError, match=rf"folder '.*c' {nothing}"):
        br.compare("toy-negative", storage_path=str(tmp_path), resume=True, **ARGS)
    assert not (tmp_path / "c").exists()  # not left behind
    (tmp_path / "c").mkdir()
    with pytest.raises(br.ConfigError, match=nothing):
        br.compare("toy-negative", storage_path=str(tmp_path), resume=True, **ARGS)
    assert list((tmp_path / "c").iterdir()) == []
    (tmp_path / "c" / "notes.txt").write_text("mine\n")
    with pytest.raises(
        br.ConfigError,
        match=r"holds files but no comparison's record \(manifest\.json\): there is nothing to "
        r"check a resume against; use a new --name",
    ):
        br.compare("toy-negative", storage_path=str(tmp_path), resume=True, **ARGS)


def test_a_resume_of_another_kind_of_result_is_refused(tmp_path, no_ray):
    folder = tmp_path / "c"
    folder.mkdir()
    manifest = new_manifest("tune", problem="toy-negative", problem_config={}, data=None,
                            settings={}, seeds={})  # fmt: skip
    end_manifest(manifest, folder, {"status": "completed"}, [])
    with pytest.raises(br.ConfigError, match=r"holds a sweep, not a comparison: use a new --name"):
        br.compare("toy-negative", storage_path=str(tmp_path), resume=True, **ARGS)


def test_the_cli_resumes_and_says_how_many_runs_it_read(tmp_path, monkeypatch, capsys):
    _stopped(tmp_path, monkeypatch)
    monkeypatch.setattr(compare_module, "_run_all", _fake_runs([]))
    argv = ["compare", "toy-negative", "--methods", "alt_pbgd,pbgd", "--budget", "1", "--seeds",
            "1", "--out", str(tmp_path), "--name", "c", "--quiet", "--resume"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"  resumed: 1 of 2 runs read from {tmp_path / 'c'}/runs, 1 run now" in out


# --- on Ray: a real comparison stopped after its runs, one run's checkpoint lost ---------------


@pytest.mark.ray
@pytest.mark.slow
def test_a_comparison_on_ray_resumes_the_run_it_lost(ray_2cpu, tmp_path, monkeypatch, capsys):
    args = {**ARGS, "budget_s": 0.5}
    monkeypatch.setattr(compare_module, "finish", _interrupt)  # stopped before its table
    with pytest.raises(KeyboardInterrupt):
        br.compare("quadratic", storage_path=str(tmp_path), **args)
    monkeypatch.undo()
    folder = tmp_path / "c"
    kept, lost = folder / RUNS / "alt_pbgd-seed0.json", folder / RUNS / "pbgd-seed0.json"
    record = json.loads(kept.read_text())
    assert record["report"]["status"] == "completed" and record["curve"]
    assert record["params"]["path"] == "params/alt_pbgd-seed0.pt"
    lost.unlink()  # as if killed before its run ended: its curve and parameters are left over
    _plant_claim(folder, _dead_pid())  # and its claim
    stamp = kept.stat().st_mtime_ns
    capsys.readouterr()
    result = br.compare("quadratic", storage_path=str(tmp_path), resume=True,
                        **{**args, "progress": True})  # fmt: skip
    err = capsys.readouterr().err
    assert "resuming: 1 of 2 runs read from the folder (runs/); running the other 1: pbgd" in err
    assert "pbgd seed 0: final held-out phi" in err and "(1/1)" in err
    assert kept.stat().st_mtime_ns == stamp and lost.is_file()
    runs = result.runs.to_pylist()
    assert sorted((r["method"], r["status"]) for r in runs) == [
        ("alt_pbgd", "completed"),
        ("pbgd", "completed"),
    ]
    assert {r["method"] for r in result.curves.to_pylist()} == set(METHODS)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["outcome"]["status"] == "completed" and len(manifest["continuations"]) == 1
    assert (folder / "results" / "pbgd.pt").is_file() and not (folder / CLAIM).exists()


# --- a real kill: the CLI's driver and its Ray killed after its first run ---------------------


@pytest.mark.slow
def test_a_killed_comparison_resumes_with_only_the_runs_it_lacks(tmp_path):
    import signal
    import time

    argv = [sys.executable, "-m", "bilevel_ray", "compare", "toy-negative", "--methods",
            "alt_pbgd,pbgd", "--budget", "2", "--seeds", "3", "--out", str(tmp_path), "--name",
            "c", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen(argv, env=env, cwd=root, start_new_session=True)
    runs = tmp_path / "c" / RUNS
    deadline = time.monotonic() + 300
    try:
        while not (runs.is_dir() and any(runs.glob("*.json"))):
            assert child.poll() is None, "the comparison ended before its first run did"
            assert time.monotonic() < deadline, "no run finished"
            time.sleep(0.2)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the driver and the Ray it started
        child.wait()
    time.sleep(10)  # a trial that was ending may still save its run before the guardian ends it
    kept = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    assert 1 <= len(kept) < 6, "the kill came after the comparison had finished"

    done = subprocess.run([*argv, "--resume"], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(rf"resumed: {len(kept)} of 6 runs read from .*, {6 - len(kept)} runs? now",
                     done.stdout), done.stdout  # fmt: skip
    assert {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json") if p.name in kept} == kept
    table = pq.read_table(tmp_path / "c" / "compare.parquet").to_pylist()
    assert sorted((row["method"], row["seed"]) for row in table) == [
        (m, k) for m in METHODS for k in range(3)
    ]
    assert not (tmp_path / "c" / CLAIM).exists()


def test_a_run_whose_numbers_were_edited_is_not_trusted(tmp_path, monkeypatch):
    from bilevel_ray.runtime.compare.finished import read_finished

    _finish_run(tmp_path, "k", "pbgd", 0)
    path = tmp_path / RUNS / "pbgd-seed0.json"
    assert read_finished(tmp_path, "k", "pbgd", 0)[0] is not None
    record = json.loads(path.read_text())
    record["report"]["final_phi"] = -1000.0  # every plain hash still holds
    for row in record["curve"]:
        row["eval/phi"] = -1000.0
    path.write_text(json.dumps(record))
    assert read_finished(tmp_path, "k", "pbgd", 0) == (
        None,
        "not sealed by this account: written elsewhere, or its numbers edited",
    )
    # Another account's key (another machine's run): the same.
    monkeypatch.setenv("BILEVEL_RAY_STATE_KEY", str(tmp_path / "other.key"))
    _finish_run(tmp_path, "k", "alt_pbgd", 0)
    monkeypatch.setenv("BILEVEL_RAY_STATE_KEY", str(tmp_path / "mine.key"))
    assert read_finished(tmp_path, "k", "alt_pbgd", 0)[1].startswith("not sealed by this account")
