"""``bilevel-ray rerun DIR``: execute a result's manifest again, from scratch, into a new folder,
and say whether the final parameters match (bitwise, else the largest difference)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bilevel_ray.cli import common
from bilevel_ray.errors import ConfigError

ORDER = 10  # its place in ``bilevel-ray --help``

EXAMPLES = """examples:
  bilevel-ray solve quadratic --out runs/q && bilevel-ray rerun runs/q
  bilevel-ray rerun runs/sweep --out runs/sweep-again     # the sweep's best trial, replayed
"""

HELP = "execute a result's manifest again and compare the final parameters"

DESCRIPTION = (
    "Run again, from scratch, what DIR/manifest.json records: a run (solve, train), a sweep's "
    "best trial (its schedule) or each method a comparison kept; write the parameters, "
    "rerun.json and a manifest to NEW (default DIR-rerun) and report whether the final "
    "parameters match the recorded ones bitwise (expected on CPU in float64 for the built-in "
    "problems), or the largest difference. Exit 0 when every run matches bitwise, 1 otherwise."
)


def add_parser(commands: Any) -> None:
    """``rerun``: reproduce a result from its manifest."""
    rerun_cmd = common.new_command(commands, "rerun", HELP, DESCRIPTION, EXAMPLES)
    rerun_cmd.add_argument("folder", type=Path, metavar="DIR")
    common.out_option(rerun_cmd, "the new folder (default: DIR-rerun); new or empty")
    common.output_options(rerun_cmd)


def run(args: argparse.Namespace) -> int:
    from bilevel_ray.records.manifest import finish, new_manifest, now, plain, read_manifest, verify
    from bilevel_ray.records.replay import compare_params, load_params, replay_runs
    from bilevel_ray.runtime.local.output_files import atomic_write

    started = now()
    folder = args.folder
    what = f"rerun {str(folder)!r}"
    manifest = read_manifest(folder, what) if folder.is_dir() else None
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
    runs = replay_runs(manifest, what)
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
