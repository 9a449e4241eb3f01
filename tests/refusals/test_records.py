"""Refusals of the records: a continuation that would change a run's trajectory (other data, an
edited or outdated record), a result's manifest that is missing or does not verify (``show``,
``rerun``, ``solve --schedule``), ``declare_inputs`` given no path, and a comparison's folder
that is not this call's (claimed by a running compare, unfinished without --resume, resumed
with other arguments, finished, or holding nothing to resume); a manifest this account did
not seal (``rerun``), a replay a command line would refuse, a manifest nested past any
record, and a run folder edited after its run (``diagnose --at-end``). Each names what
differs and the way out, before any work; nothing in the folder changes."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

import bilevel_ray as br
from bilevel_ray.cli import main

from .catalogue import api, cli, params, run_case

RUN = "train regression --workers 1 --steps 2 --report-every 1 --out {tmp}/runs --name r --quiet"

FACTORY = """
import torch
import bilevel_ray as br

def make(config):
    br.declare_inputs(config["csv"])
    values = [float(v) for v in open(config["csv"]).read().split()]
    data = torch.tensor(values, dtype=torch.float64)[:, None]
    problem = br.problems.QuadraticProblem(dim_x=1, dim_y=1, seed=0)
    x0 = {"x": torch.zeros(1, dtype=torch.float64)}
    y0 = {"y": torch.zeros(1, dtype=torch.float64)}
    return br.ProblemSpec(problem, x0, y0, br.full_batch(data, data), {"steps": 2})
"""


def _quiet(argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) in (0, 3)


def run_r(tmp: Path) -> None:
    """A two-step run in tmp/runs/r, with its manifest."""
    _quiet(RUN.replace("{tmp}", str(tmp)).split())


def edited(tmp: Path) -> None:
    run_r(tmp)
    path = tmp / "runs" / "r" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["settings"]["solver"]["lr_x"] = 0.5
    path.write_text(json.dumps(manifest))


def output_changed(tmp: Path) -> None:
    run_r(tmp)
    (tmp / "runs" / "r" / "run.json").write_text("{}\n")


def csv_run(tmp: Path) -> None:
    """A run of a factory that declares its CSV, whose bytes then change."""
    (tmp / "csv_problem.py").write_text(FACTORY)
    (tmp / "values.txt").write_text("1 2 3\n")
    br.train(f"{tmp / 'csv_problem.py'}:make", problem_config={"csv": str(tmp / "values.txt")},
             storage_path=tmp / "runs", name="c")  # fmt: skip
    (tmp / "values.txt").write_text("1 2 4\n")


def _resume_csv(tmp: Path) -> None:
    br.train(f"{tmp / 'csv_problem.py'}:make", problem_config={"csv": str(tmp / "values.txt")},
             storage_path=tmp / "runs", name="c")  # fmt: skip


def no_manifest(tmp: Path) -> None:
    run_r(tmp)
    (tmp / "runs" / "r" / "manifest.json").unlink()


def sweep_edited(tmp: Path) -> None:
    """A sweep's folder (its schedule and manifest), whose schedule was then edited."""
    from bilevel_ray.records.fingerprint import fingerprinted_spec
    from bilevel_ray.records.manifest import finish, new_manifest

    folder = tmp / "sweep"
    folder.mkdir()
    schedule = {"format": "bilevel_ray.best_schedule/1", "problem": "quadratic", "method":
                "pbgd_free", "steps": 2, "seed": 0, "settings": {"lr_x": 0.01}}  # fmt: skip
    (folder / "best_schedule.json").write_text(json.dumps(schedule))
    _, data = fingerprinted_spec("quadratic", {})
    manifest = new_manifest("tune", problem="quadratic", problem_config={}, data=data,
                            settings={}, seeds={})  # fmt: skip
    finish(manifest, folder, {"status": "completed"}, ["best_schedule.json"])
    schedule["settings"]["lr_x"] = 0.05
    (folder / "best_schedule.json").write_text(json.dumps(schedule))


def _forged(tmp: Path, edit) -> None:
    """runs/r's manifest edited as one without this account's key can: its plain digest
    recomputed, no seal."""
    import hashlib

    from bilevel_ray.records.manifest import canonical

    run_r(tmp)
    path = tmp / "runs" / "r" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest.pop("seal")
    manifest["digest"] = hashlib.sha256(canonical(manifest)).hexdigest()
    path.write_text(json.dumps(manifest))


def forged_problem(tmp: Path) -> None:
    (tmp / "evil.py").write_text("raise SystemExit('imported')\n")
    _forged(tmp, lambda m: m["problem"].update(name=f"{tmp / 'evil.py'}:factory"))


def forged_steps(tmp: Path) -> None:
    _forged(tmp, lambda m: m["replay"]["runs"][0].update(steps=10**12))


def nested_manifest(tmp: Path) -> None:
    run_r(tmp)
    (tmp / "runs" / "r" / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)


def run_json_steps(tmp: Path) -> None:
    run_r(tmp)
    path = tmp / "runs" / "r" / "run.json"
    path.write_text(path.read_text().replace('"steps": 2', '"steps": 1000000000000'))


def rerun_target_used(tmp: Path) -> None:
    run_r(tmp)
    (tmp / "used").mkdir()
    (tmp / "used" / "mine.txt").write_text("mine\n")


# --- compare's folder: claimed by one call at a time, resumed only where that is honest ----------

COMPARE_C = (
    "compare toy-negative --methods alt_pbgd --budget 1 --seeds 1 --quiet --out {tmp}/out --name c"
)


def _stop(*args, **kwargs):
    raise KeyboardInterrupt


def compare_stopped(tmp: Path) -> None:
    """A comparison in tmp/out/c stopped before its first run ended (its manifest, no runs)."""
    import bilevel_ray.runtime.compare.driver as driver

    with pytest.MonkeyPatch.context() as patch, contextlib.suppress(KeyboardInterrupt):
        patch.setattr(driver, "_run_all", _stop)
        br.compare("toy-negative", methods=["alt_pbgd"], budget_s=1, seeds=1,
                   storage_path=tmp / "out", name="c", progress=False)  # fmt: skip


def compare_finished(tmp: Path) -> None:
    """tmp/out/c holds a finished comparison's record."""
    from bilevel_ray.records.manifest import finish, new_manifest

    folder = tmp / "out" / "c"
    folder.mkdir(parents=True)
    manifest = new_manifest("compare", problem="toy-negative", problem_config={}, data=None,
                            settings={}, seeds={})  # fmt: skip
    finish(manifest, folder, {"status": "completed", "recommended": "alt_pbgd"}, [])


def compare_claimed(tmp: Path) -> None:
    """tmp/out/c claimed by this (live) process, as a comparison that is running."""
    from bilevel_ray.runtime.compare.claim import CLAIM, claim_record

    (tmp / "out" / "c").mkdir(parents=True)
    (tmp / "out" / "c" / CLAIM).write_text(json.dumps(claim_record()))


CASES = [
    cli(
        "record-compare-claimed",
        "CLI",
        "compare into a folder another compare (a live process) is writing",
        COMPARE_C,
        r"^error: comparison folder '.*c' is being written by pid \d+ on '.*' since .*: use a "
        r"new --name \(name=\.\.\.\), or wait until it ends and pass --resume \(resume=True\) if"
        r" it did not finish$",
        writes=("out",),
        setup=compare_claimed,
    ),
    cli(
        "record-compare-unfinished-no-resume",
        "CLI",
        "compare into a folder holding an unfinished comparison, without --resume",
        COMPARE_C,
        r"^error: comparison folder '.*c' holds an unfinished comparison: pass --resume "
        r"\(resume=True\) to continue it, or use a new --name \(name=\.\.\.\)$",
        writes=("out",),
        setup=compare_stopped,
    ),
    cli(
        "record-compare-resume-other-budget",
        "CLI",
        "compare --resume of a comparison started with another --budget",
        COMPARE_C.replace("--budget 1", "--budget 2") + " --resume",
        r"^error: comparison '.*c' was started with other settings or data, and continuing it "
        r"would change its trajectory: budget_s: 1\.0 -> 2\.0\. Use a new --name \(name=\.\.\.\) "
        r"for a comparison with these settings, or resume it with the arguments it was started "
        r"with \(bilevel-ray show lists them\)$",
        writes=("out",),
        setup=compare_stopped,
    ),
    cli(
        "record-compare-resume-finished",
        "CLI",
        "compare --resume of a finished comparison",
        COMPARE_C + " --resume",
        r"^error: comparison folder '.*c' holds a finished comparison \(recommended: alt_pbgd\): "
        r"there is nothing to resume, and its files stay as they are \(bilevel-ray show shows "
        r"it\); use a new --name \(name=\.\.\.\) to run it again$",
        writes=("out",),
        setup=compare_finished,
    ),
    cli(
        "record-compare-resume-nothing",
        "CLI",
        "compare --resume where no comparison was started",
        COMPARE_C + " --resume",
        r"^error: comparison folder '.*c' holds no comparison to resume: run it without "
        r"--resume \(resume=False\) to start it there$",
        writes=("out",),
    ),
    cli(
        "record-resume-other-data-config",
        "CLI",
        "train resumes runs/r with another --config n (other data)",
        RUN + " --config n=300",
        r"^error: run '.*r' was started with other settings or data, and continuing it would "
        r"change its trajectory: problem config n: \(not given\) -> 300; data \(data, eval_data "
        r"differ: sha256 .*\)\. Use a new --name \(name=\.\.\.\) for a run with these "
        r"settings, or rerun the run's own command with only --steps changed to extend it$",
        writes=("runs",),
        setup=run_r,
    ),
    api(
        "record-resume-changed-file",
        "data",
        "br.train resumes a run whose declared CSV changed since",
        _resume_csv,
        r"^run '.*c' was started with other settings or data, .*: data \(data, file .*values\.txt"
        r" differ: sha256 .*\)\. Use a new --name",
        writes=("runs",),
        setup=csv_run,
    ),
    cli(
        "record-resume-edited-manifest",
        "config file",
        "train resumes runs/r whose manifest.json had a setting edited",
        RUN + " --set lr_x=0.5",
        r"^error: run '.*r' does not match its manifest \(manifest\.json was edited after it was "
        r"written \(its content does not match its digest\)\): its record cannot vouch for it, so"
        r" it is not continued; start a new result under a new --name",
        writes=("runs",),
        setup=edited,
    ),
    cli(
        "record-resume-changed-output",
        "config file",
        "train resumes runs/r whose run.json changed after the run",
        RUN + " --steps 4",
        r"^error: run '.*r' does not match its manifest \(output run\.json changed since it was "
        r"written \(sha256 .*\)\): its record cannot vouch for it",
        writes=("runs",),
        setup=output_changed,
    ),
    cli(
        "record-show-no-manifest",
        "CLI",
        "show a run folder that holds no manifest.json",
        "show {tmp}/runs/r",
        r"^error: show '.*r': the folder holds no manifest\.json; give the folder of a result "
        r"\(results written before manifests have none\)$",
        writes=("runs",),
        setup=no_manifest,
    ),
    cli(
        "record-rerun-edited",
        "config file",
        "rerun a run whose manifest.json had a setting edited",
        "rerun {tmp}/runs/r --out {tmp}/again",
        r"^error: rerun '.*r': the folder does not match its manifest \(manifest\.json was edited"
        r".*\): there is no trustworthy record to reproduce; bilevel-ray show says more$",
        writes=("runs",),
        setup=edited,
    ),
    cli(
        "record-rerun-not-sealed",
        "config file",
        "rerun a folder whose manifest names a problem file, digest recomputed, not sealed",
        "rerun {tmp}/runs/r --out {tmp}/again",
        r"^error: rerun '.*r': its manifest is not sealed by this account \(written elsewhere, "
        r"or edited and its digest recomputed\), and a rerun runs what it names: the problem "
        r"'.*evil\.py:factory', as 'bilevel-ray train regression .*'; nothing was imported or "
        r"run\. If you trust who wrote the folder, pass --trust-record$",
        writes=("runs",),
        setup=forged_problem,
    ),
    cli(
        "record-rerun-trusted-steps",
        "config file",
        "rerun --trust-record of a manifest whose replay runs 10**12 steps",
        "rerun {tmp}/runs/r --out {tmp}/again --trust-record",
        r"^error: rerun '.*r': its recorded run 'run' would be refused from a command line: "
        r"steps=1000000000000: too large; must be an integer in \[1, .*\); the record was "
        r"edited or written by another bilevel_ray$",
        writes=("runs",),
        setup=forged_steps,
    ),
    cli(
        "record-show-nested",
        "config file",
        "show a manifest.json of 100000 nested brackets",
        "show {tmp}/runs/r",
        r"^error: show '.*r': manifest\.json is nested too deeply to be a manifest; restore the "
        r"folder's manifest\.json from a copy of the folder$",
        writes=("runs",),
        setup=nested_manifest,
    ),
    cli(
        "record-at-end-edited-run",
        "config file",
        "diagnose --at-end of a run whose run.json steps were edited to 10**12",
        "diagnose --at-end {tmp}/runs/r",
        r"^error: --at-end '.*r' does not match its manifest \(output run\.json changed since it "
        r"was written \(sha256 .*\)\): its files are not the ones its run wrote; restore the "
        r"folder from the run's own copy, or rerun the run \(bilevel-ray show says more\)$",
        writes=("runs",),
        setup=run_json_steps,
    ),
    cli(
        "record-rerun-used-out",
        "CLI",
        "rerun into a folder that holds files",
        "rerun {tmp}/runs/r --out {tmp}/used",
        r"^error: --out '.*used' already exists and is not an empty folder: a rerun goes into a "
        r"new folder; give another --out or remove it$",
        writes=("runs", "used"),
        setup=rerun_target_used,
    ),
    cli(
        "record-schedule-edited",
        "config file",
        "solve --schedule a best_schedule.json edited after its sweep wrote it",
        "solve quadratic --schedule {tmp}/sweep/best_schedule.json --quiet",
        r"^error: --schedule '.*best_schedule\.json': its sweep '.*sweep' does not match its "
        r"manifest \(output best_schedule\.json changed since it was written .*\): the schedule "
        r"is not the one the sweep wrote; restore it, or run the sweep again$",
        writes=("sweep",),
        setup=sweep_edited,
    ),
    api(
        "record-declare-no-path",
        "API",
        "br.declare_inputs(None)",
        lambda tmp: br.declare_inputs(None),
        r"^declare_inputs\(None\): give the path of a file or folder the factory reads$",
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case, tmp_path, request, no_compare_ray):
    run_case(case, tmp_path, request, CASES)
