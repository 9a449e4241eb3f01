"""``bilevel-ray rerun DIR``: execute a result's manifest again, from scratch, into a new folder,
and say whether the final parameters match (bitwise, else the largest difference).

A rerun runs what the manifest names (a problem's file or module is imported, its factory
called), so it runs only a manifest this account sealed (:mod:`~bilevel_ray.records.seal`), or
any with ``--trust-record``; either way each recorded run passes the checks the same settings
would pass given on the command line (its steps, seed, solver settings, workers, threads) before
anything is imported or built."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bilevel_ray.cli import common
from bilevel_ray.errors import ConfigError

ORDER = 10  # its place in ``bilevel-ray --help``
PLACEMENT_KEYS = ("num_workers", "use_gpu", "resources_per_worker", "max_failures")

EXAMPLES = """examples:
  bilevel-ray solve quadratic --out runs/q && bilevel-ray rerun runs/q
  bilevel-ray rerun runs/sweep --out runs/sweep-again     # the sweep's best trial, replayed
  bilevel-ray rerun from-alice/run --trust-record          # a folder another account wrote
"""

HELP = "execute a result's manifest again and compare the final parameters"

DESCRIPTION = (
    "Run again, from scratch, what DIR/manifest.json records: a run (solve, train), a sweep's "
    "best trial (its schedule) or each method a comparison kept; write the parameters, "
    "rerun.json and a manifest to NEW (default DIR-rerun) and report whether the final "
    "parameters match the recorded ones bitwise (expected on CPU in float64 for the built-in "
    "problems), or the largest difference. Exit 0 when every run matches bitwise, 1 otherwise. "
    "A manifest this account did not seal (a colleague's folder, or an edited one) is refused "
    "before anything runs: a rerun imports the problem's code it names; pass --trust-record if "
    "you trust who wrote it."
)

SHOWN = 200  # characters of a recorded name or command shown in a message


def add_parser(commands: Any) -> None:
    """``rerun``: reproduce a result from its manifest."""
    rerun_cmd = common.new_command(commands, "rerun", HELP, DESCRIPTION, EXAMPLES)
    rerun_cmd.add_argument("folder", type=Path, metavar="DIR")
    common.out_option(rerun_cmd, "the new folder (default: DIR-rerun); new or empty")
    rerun_cmd.add_argument(
        "--trust-record",
        action="store_true",
        help="rerun a manifest this account did not seal (written by another account or "
        "machine): it runs the problem code the record names, so only for a folder whose "
        "writer you trust",
    )
    common.output_options(rerun_cmd)


def run(args: argparse.Namespace) -> int:
    from bilevel_ray.records.manifest import (
        RESTORE_FIX,
        finish,
        new_manifest,
        now,
        plain,
        read_manifest,
        sealed,
        verify,
    )
    from bilevel_ray.records.replay import compare_params, load_params, replay_runs
    from bilevel_ray.runtime.local.output_files import atomic_write

    started = now()
    folder = args.folder
    what = f"rerun {str(folder)!r}"
    manifest = read_manifest(folder, what, RESTORE_FIX) if folder.is_dir() else None
    if manifest is None:
        raise ConfigError(
            f"{what}: no manifest.json there; give the folder of a result written with one (a "
            "solve or train --out folder, a sweep's or a comparison's folder)"
        )
    problems = verify(folder, manifest)
    if problems:
        raise ConfigError(
            f"{what}: the folder does not match its manifest ({'; '.join(problems)}): there is "
            "no trustworthy record to reproduce; bilevel-ray show says more"
        )
    if not (args.trust_record or sealed(manifest)):
        raise ConfigError(_untrusted(manifest, what))
    runs = replay_runs(manifest, what)
    _check_entries(manifest, runs, what)
    for entry in runs:
        if not (folder / entry["params"]).is_file():
            raise ConfigError(f"{what}: {entry['params']} is gone: nothing to compare with")
    out = _new_folder(args.out or folder.with_name(folder.name + "-rerun"))
    fingerprint = _check_data(manifest, what)
    checks = []
    for entry in runs:
        _execute(manifest, entry, out, common.progress_enabled(args))
        match = compare_params(
            load_params(folder / entry["params"], "the recorded parameters"),
            load_params(out / entry["params"], "the rerun's parameters"),
        )
        checks.append({"label": entry["label"], "params": entry["params"], **match})
        print(f"{entry['label']}: {_verdict(match)}")
    same = all(c["bitwise"] for c in checks)
    text = json.dumps(plain({"of": str(folder), "runs": checks}), indent=1) + "\n"
    atomic_write(out / "rerun.json", lambda tmp: tmp.write_text(text))
    files = ["rerun.json", *(e["params"] for e in runs)]
    if manifest["entry_point"] == "train":  # the rerun is a run of its own, with its manifest
        from bilevel_ray.records.manifest import update_outputs

        update_outputs(out, files)
    else:
        record = new_manifest(
            "rerun",
            problem=manifest["problem"]["name"],
            problem_config=manifest["problem"]["config"],
            data=fingerprint,
            settings={"of": str(folder), "of_digest": manifest["digest"], "runs": runs},
            seeds=manifest.get("seeds") or {},
            started=started,
        )
        record["replay"] = {"runs": runs}
        outcome = {"status": "reproduced" if same else "differs", "runs": checks}
        finish(record, out, outcome, files)
    print(f"  wrote {out}: {', '.join(files)}, manifest.json")
    return 0 if same else 1


def _untrusted(manifest: dict[str, Any], what: str) -> str:
    """The refusal of a record this account did not seal, naming what it would run."""
    invocation = manifest["invocation"]
    asked = invocation.get("command") or f"{invocation.get('api')}(...)"
    return (
        f"{what}: its manifest is not sealed by this account (written elsewhere, or edited and "
        "its digest recomputed), and a rerun runs what it names: the problem "
        f"{_shown(manifest['problem'].get('name'))}, as {_shown(asked)}; nothing was imported "
        "or run. If you trust who wrote the folder, pass --trust-record"
    )


def _shown(value: Any) -> str:
    """A recorded value in a one-line message: quoted (no raw newline or control character
    from the file reaches the terminal), cut at ``SHOWN`` characters."""
    text = repr(str(value))
    return text if len(text) <= SHOWN else text[: SHOWN - 4] + "...'"


def _check_entries(manifest: dict[str, Any], runs: list[dict[str, Any]], what: str) -> None:
    """Each recorded run passes the checks its settings would pass from a command line or
    ``br.solve`` / ``br.train`` (steps, seed, the solver settings, the workers, the threads),
    before the problem is built: a record is no way around them."""
    from bilevel_ray.runtime.local.run_spec import Placement, build_run, take_run_options
    from bilevel_ray.runtime.local.solve import solver_config
    from bilevel_ray.runtime.local.threads import MAX_THREADS

    placement = manifest["settings"].get("placement") or {}
    for entry in runs:
        method, options = entry["method"], take_run_options(dict(entry["run"]))
        problems = _refusals(build_run, method, entry["steps"], options)
        problems += _refusals(solver_config, method, dict(entry["solver"]))
        if manifest["entry_point"] == "train":
            problems += _refusals(
                Placement, **{k: placement[k] for k in PLACEMENT_KEYS if k in placement}
            )
        threads = entry.get("threads")
        whole = isinstance(threads, int) and not isinstance(threads, bool)
        if threads is not None and not (whole and 1 <= threads <= MAX_THREADS):
            problems.append(f"threads={threads!r}: must be a whole number in [1, {MAX_THREADS}]")
        if problems:
            raise ConfigError(
                [
                    f"{what}: its recorded run {_shown(entry['label'])} would be refused from a "
                    f"command line: {p}; the record was edited or written by another bilevel_ray"
                    for p in problems
                ]
            )


def _refusals(check: Any, *args: Any, **kwargs: Any) -> list[str]:
    """What ``check(*args, **kwargs)`` refuses (a keyword it does not take, too), one line each."""
    try:
        check(*args, **kwargs)
    except ConfigError as err:
        return list(err.problems)
    except TypeError as err:
        return [str(err)]
    return []


def _verdict(match: dict[str, Any]) -> str:
    if match["bitwise"]:
        return "reproduced: the final parameters are bitwise identical"
    return f"differs: the largest difference is {match['max_abs_diff']:.3g} (in {match['where']})"


def _new_folder(out: Path) -> Path:
    from bilevel_ray.runtime.local.output_files import check_output_path, check_writable

    check_output_path(out, "--out", is_file=False)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"--out {str(out)!r} already exists and is not an empty folder: a rerun goes into a "
            "new folder; give another --out or remove it"
        )
    return check_writable(out, "--out")


def _check_data(manifest: dict[str, Any], what: str) -> dict[str, Any]:
    """The problem built again: refused when its data no longer has the recorded fingerprint
    (a rerun on other data says nothing about reproducibility)."""
    from bilevel_ray.records.continuation import data_difference
    from bilevel_ray.records.fingerprint import fingerprinted_spec

    problem = manifest["problem"]
    _, fingerprint = fingerprinted_spec(problem["name"], dict(problem["config"]))
    recorded = manifest.get("data") or {}
    if recorded.get("sha256") != fingerprint["sha256"]:
        raise ConfigError(
            f"{what}: the problem's data changed since the result was made "
            f"({data_difference(recorded, fingerprint)}); restore the data it recorded to "
            "reproduce it"
        )
    return fingerprint


def _execute(manifest: dict[str, Any], entry: dict[str, Any], out: Path, progress: bool) -> None:
    """One replay entry, from scratch, its final x and y in ``out / entry["params"]``."""
    import torch

    from bilevel_ray.cli.solve import solve_problem
    from bilevel_ray.runtime.local.output_files import atomic_write

    problem = manifest["problem"]
    threads = entry.get("threads") or (manifest["environment"].get("device") or {}).get(
        "torch_threads"
    )
    run = {**entry["run"], "progress": progress}
    if manifest["entry_point"] == "train":
        from bilevel_ray.runtime.train.driver import train

        placement = manifest["settings"].get("placement") or {}
        if threads:
            torch.set_num_threads(int(threads))
        train(
            problem["name"],
            problem_config=dict(problem["config"]),
            method=entry["method"],
            steps=entry["steps"],
            num_workers=placement.get("num_workers", 1),
            use_gpu=placement.get("use_gpu", "auto"),
            resources_per_worker=placement.get("resources_per_worker"),
            max_failures=placement.get("max_failures", 0),
            storage_path=out.parent,
            name=out.name,
            **run,
            **entry["solver"],
        )
        return
    result = solve_problem(
        problem["name"],
        dict(problem["config"]),
        entry["method"],
        threads,
        steps=entry["steps"],
        **run,
        **entry["solver"],
    )
    params = {"x": result.x, "y": result.y}
    atomic_write(out / entry["params"], lambda tmp: torch.save(params, tmp))
