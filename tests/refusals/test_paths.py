"""Refusals of output paths: folders, files, links and run names.

Every output a run will write (``history_path``, ``checkpoint_path``, ``--out`` and the files in
it, ``storage_path`` / ``--name``, a sweep's or a comparison's folder, ``report.png``) is checked
before the first step: a folder that is not writable, a name with a NUL byte, a component over
255 bytes or a name that is not UTF-8, a folder or a FIFO where a file goes, a file where a
folder goes, two outputs on one path, a disk too small for the run, a name that resolves outside
its folder through a link. Each case leaves no new or changed file behind, inside the folder or
through a link out of it. A link planted where a run writes a file is replaced by the new file,
never written through, and a planted ``.tmp`` of any kind does not break a save.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.runtime.local import checkpoint as checkpoint_module
from bilevel_ray.runtime.local.output_files import check_writable

from .catalogue import (
    CKPT,
    COMPARE,
    NOT_REGULAR,
    RUN_NOT_FILE,
    SOLVE,
    TRAIN,
    TUNE,
    api,
    cli,
    fifo_at,
    files_under,
    folder_at,
    outside,
    params,
    report_with,
    run_case,
    write_run_report,
)
from .support import solve, train_args

LONG = "n" * 300  # one path component longer than 255 bytes
LINK_OUT = (
    r"^error: name '.*out/r' resolves to '.*outside', outside '.*out' \(a symbolic link\): "
    r"remove the link or choose another name$"
)
NUL = r"contains a NUL byte; give a path without it$"
TOO_LONG = r"has a component of 300 bytes: at most 255 bytes per name; give a shorter name$"
NOT_UTF8 = r"is not valid UTF-8; give a path of UTF-8 characters$"


# --- setups ------------------------------------------------------------------------------------


def readonly_folder(tmp: Path) -> str | None:
    """tmp/locked with mode 0o500; a reason to skip where it stays writable (root)."""
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):
        locked.chmod(0o700)
        return "a 0o500 folder is writable here (running as root)"
    return None


def link_run_folder(tmp: Path) -> None:
    """out/r is a link to a folder outside out."""
    (tmp / "out").mkdir()
    os.symlink(outside(tmp), tmp / "out" / "r")


def file_at(relative: str) -> Callable[[Path], None]:
    """A regular file planted where a folder goes."""

    def setup(tmp: Path) -> None:
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp / relative).write_text("a file\n")

    return setup


def full_disk(run: Callable[[Path], Any], free: int = 2**20) -> Callable[[Path], Any]:
    """``run`` on a disk with ``free`` bytes free."""
    usage = shutil._ntuple_diskusage(total=10**12, used=10**12 - free, free=free)

    def patched(tmp: Path) -> Any:
        with mock.patch.object(checkpoint_module.shutil, "disk_usage", lambda path: usage):
            return run(tmp)

    return patched


CASES = [
    # --- folders that are not writable ------------------------------------------------------
    api(
        "api-history-path-not-writable",
        "API",
        "history_path inside a regular file",
        lambda tmp: solve(history_path=tmp / "blocker" / "history.parquet"),
        r"^history_path '.*' is not writable \(.+\); choose another (folder|path)",
        writes=(".",),
    ),
    api(
        "api-checkpoint-path-not-writable",
        "API",
        "checkpoint_path inside a regular file",
        lambda tmp: solve(checkpoint_path=tmp / "blocker" / "ckpt.pt", checkpoint_every=1),
        r"^checkpoint_path '.*' is not writable \(.+\); choose another (folder|path)",
        writes=(".",),
    ),
    cli(
        "cli-out-is-a-file",
        "CLI",
        "solve --out <a path inside a regular file>",
        "solve toy-negative --out {tmp}/blocker/run",
        match=r"^error: --out '.*blocker/run' is not writable \(Not a directory\); choose another "
        r"folder$",
        writes=(".",),
    ),
    cli(
        "cli-out-read-only",
        "CLI",
        "solve --out <a folder in a 0o500 folder>",
        "solve toy-negative --out {tmp}/locked/run",
        match=r"^error: --out '.*locked/run' is not writable \(Permission denied\); choose "
        r"another folder$",
        writes=("locked",),
        setup=readonly_folder,
    ),
    # --- run names that leave their folder --------------------------------------------------
    cli(
        "cli-run-name-escapes-out",
        "CLI",
        "train --out DIR --name ../escaped",
        "train toy-negative --workers 1 --steps 2 --out {tmp}/out --name ../escaped --quiet",
        match=r"^error: .*name='\.\./escaped': must be a plain folder name",
        writes=(".",),
    ),
    cli(
        "link-name-outside-out",
        "CLI",
        "train --name r where --out/r is a symlink to a folder outside --out",
        TRAIN + " --out {tmp}/out --name r",
        r"^error: --name '.*out/r' resolves to '.*outside', outside '.*out' \(a symbolic link\): "
        r"remove the link or choose another name$",
        writes=("outside", "out"),
        setup=link_run_folder,
    ),
    api(
        "api-link-name-outside-storage",
        "API",
        "br.train name='r' where storage_path/r is a symlink outside storage_path",
        lambda tmp: br.train("toy-negative", steps=2, storage_path=tmp / "out", name="r"),
        r"^name '.*out/r' resolves to '.*outside', outside .*remove the link or choose another",
        writes=("outside", "out"),
        setup=link_run_folder,
    ),
    # --- names with a NUL byte, a component over 255 bytes, or not UTF-8 --------------------
    api(
        "history-path-nul",
        "API",
        "history_path with a NUL byte",
        lambda tmp: solve(history_path=f"{tmp}/out/h\x00.parquet"),
        r"^history_path '.*' " + NUL,
        writes=(".",),
    ),
    api(
        "checkpoint-path-nul",
        "API",
        "checkpoint_path with a NUL byte",
        lambda tmp: solve(checkpoint_path=f"{tmp}/out/c\x00.pt", checkpoint_every=1),
        r"^checkpoint_path '.*' " + NUL,
        writes=(".",),
    ),
    api(
        "history-path-300-bytes",
        "API",
        "history_path with a 300-character file name",
        lambda tmp: solve(history_path=tmp / "out" / LONG),
        r"^history_path '.*' " + TOO_LONG,
        writes=(".",),
    ),
    api(
        "checkpoint-path-300-bytes",
        "API",
        "checkpoint_path with a 300-character file name",
        lambda tmp: solve(checkpoint_path=tmp / "out" / LONG, checkpoint_every=1),
        r"^checkpoint_path '.*' " + TOO_LONG,
        writes=(".",),
    ),
    api(
        "history-path-not-utf8",
        "API",
        "history_path whose name is not UTF-8 (a surrogate-escaped byte 0xff)",
        lambda tmp: solve(history_path=f"{tmp}/out/h\udcff.parquet"),
        r"^history_path '.*' " + NOT_UTF8,
        writes=(".",),
    ),
    api(
        "checkpoint-path-not-utf8",
        "API",
        "checkpoint_path whose folder is not UTF-8",
        lambda tmp: solve(checkpoint_path=f"{tmp}/o\udcffut/c.pt", checkpoint_every=1),
        r"^checkpoint_path '.*' " + NOT_UTF8,
        writes=(".",),
    ),
    cli(
        "out-nul",
        "CLI",
        "solve --out with a NUL byte",
        SOLVE + " --out {tmp}/o\x00ut",
        r"^error: --out '.*' " + NUL,
        writes=(".",),
    ),
    cli(
        "out-300-bytes",
        "CLI",
        "solve --out with a 300-character folder name",
        SOLVE + " --out {tmp}/" + LONG,
        r"^error: --out '.*' " + TOO_LONG,
        writes=(".",),
    ),
    cli(
        "out-not-utf8",
        "CLI",
        "solve --out whose name is not UTF-8",
        SOLVE + " --out {tmp}/o\udcffut",
        r"^error: --out '.*' " + NOT_UTF8,
        writes=(".",),
    ),
    cli(
        "name-nul",
        "CLI",
        "train --name with a NUL byte",
        TRAIN + " --out {tmp}/out --name r\x00un",
        r"^error: --name '.*' " + NUL,
        writes=(".",),
    ),
    cli(
        "name-300-bytes",
        "CLI",
        "train --name of 300 characters",
        TRAIN + " --out {tmp}/out --name " + LONG,
        r"^error: --name '.*' " + TOO_LONG,
        writes=(".",),
    ),
    api(
        "api-name-300-bytes",
        "API",
        "br.train name of 300 characters",
        lambda tmp: br.train("toy-negative", steps=2, storage_path=tmp / "out", name=LONG),
        r"^name '.*' " + TOO_LONG,
        writes=("out",),
    ),
    # --- a folder or a FIFO where a file goes -----------------------------------------------
    api(
        "checkpoint-prev-is-folder",
        "API",
        "<checkpoint_path>.prev is a folder",
        lambda tmp: solve(checkpoint_path=tmp / CKPT, checkpoint_every=1),
        r"^checkpoint_path '.*c\.pt\.prev' " + RUN_NOT_FILE,
        writes=("ck",),
        setup=folder_at(CKPT + ".prev"),
    ),
    cli(
        "train-checkpoint-prev-is-folder",
        "CLI",
        "train: --out/NAME/checkpoint.pt.prev is a folder",
        TRAIN + " --checkpoint-every 1 --out {tmp}/out --name r",
        r"^error: checkpoint_path '.*checkpoint\.pt\.prev' " + RUN_NOT_FILE,
        writes=("out",),
        setup=folder_at("out/r/checkpoint.pt.prev"),
    ),
    api(
        "checkpoint-path-is-fifo",
        "API",
        "checkpoint_path is a FIFO (no resume)",
        lambda tmp: solve(checkpoint_path=tmp / "ck" / "fifo", checkpoint_every=1),
        r"^checkpoint_path '.*fifo' " + NOT_REGULAR,
        writes=("ck",),
        setup=fifo_at("ck/fifo"),
    ),
    api(
        "history-path-is-fifo",
        "API",
        "history_path is a FIFO",
        lambda tmp: solve(history_path=tmp / "ck" / "fifo"),
        r"^history_path '.*fifo' " + NOT_REGULAR,
        writes=("ck",),
        setup=fifo_at("ck/fifo"),
    ),
    cli(
        "solve-run-json-is-folder",
        "CLI",
        "solve --out DIR where DIR/run.json is a folder",
        SOLVE + " --out {tmp}/out",
        r"^error: --out file '.*out/run\.json' " + RUN_NOT_FILE,
        writes=("out",),
        setup=folder_at("out/run.json"),
    ),
    cli(
        "solve-result-pt-is-folder",
        "CLI",
        "solve --out DIR where DIR/result.pt is a folder",
        SOLVE + " --out {tmp}/out",
        r"^error: --out file '.*out/result\.pt' " + RUN_NOT_FILE,
        writes=("out",),
        setup=folder_at("out/result.pt"),
    ),
    cli(
        "solve-history-is-folder",
        "CLI",
        "solve --out DIR where DIR/history.parquet is a folder",
        SOLVE + " --out {tmp}/out",
        r"^error: --out file '.*out/history\.parquet' " + RUN_NOT_FILE,
        writes=("out",),
        setup=folder_at("out/history.parquet"),
    ),
    cli(
        "solve-run-json-is-fifo",
        "CLI",
        "solve --out DIR where DIR/run.json is a FIFO",
        SOLVE + " --out {tmp}/out",
        r"^error: --out file '.*out/run\.json' " + NOT_REGULAR,
        writes=("out",),
        setup=fifo_at("out/run.json"),
    ),
    cli(
        "train-run-json-is-folder",
        "CLI",
        "train --out DIR --name r where DIR/r/run.json is a folder",
        TRAIN + " --out {tmp}/out --name r",
        r"^error: --out file '.*out/r/run\.json' " + RUN_NOT_FILE,
        writes=("out",),
        setup=folder_at("out/r/run.json"),
    ),
    cli(
        "train-result-pt-is-folder",
        "CLI",
        "train --out DIR --name r where DIR/r/result.pt is a folder",
        TRAIN + " --out {tmp}/out --name r",
        r"^error: --out file '.*out/r/result\.pt' " + RUN_NOT_FILE,
        writes=("out",),
        setup=folder_at("out/r/result.pt"),
    ),
    cli(
        "report-png-is-folder",
        "config file",
        "report where report.png is a folder",
        "report {tmp}/rep",
        r"^error: report\.png '.*report\.png' " + RUN_NOT_FILE,
        writes=("rep",),
        setup=report_with(lambda tmp: (tmp / "rep" / "report.png").mkdir()),
    ),
    # --- two outputs on one path, and a disk too small --------------------------------------
    api(
        "checkpoint-equals-history",
        "API",
        "checkpoint_path == history_path",
        lambda tmp: solve(
            history_path=tmp / "out" / "x", checkpoint_path=tmp / "out" / "x", checkpoint_every=1
        ),
        r"^checkpoint_path and history_path are the same file '.*x': one would overwrite the "
        r"other; give each its own path$",
        writes=(".",),
    ),
    api(
        "checkpoint-equals-history-spelled-apart",
        "API",
        "checkpoint_path out/./x and history_path out/sub/../x (the same file)",
        lambda tmp: solve(
            history_path=f"{tmp}/out/sub/../x",
            checkpoint_path=f"{tmp}/out/./x",
            checkpoint_every=1,
        ),
        r"^checkpoint_path and history_path are the same file '.*': one would overwrite the "
        r"other; give each its own path$",
        writes=("out",),
        setup=folder_at("out/sub"),
    ),
    api(
        "disk-space-history",
        "API",
        "a 1 MiB disk and a history of 20,000 logged rows (history_path only)",
        full_disk(lambda tmp: solve(steps=20_000, history_path=tmp / "out" / "h.parquet")),
        r"^history_path '.*' has 1\.0 MiB free and the run's checkpoints need about \d+\.\d MiB: "
        r"free some space or choose another folder \(the estimate counts the state and the "
        r"history",
        writes=(".",),
    ),
    api(
        "disk-space-checkpoint-history",
        "API",
        "a 1 MiB disk and checkpoints that carry 20,000 history rows",
        full_disk(lambda tmp: solve(steps=20_000, checkpoint_path=tmp / "out" / "c.pt")),
        r"^checkpoint_path '.*' has 1\.0 MiB free and the run's checkpoints need about "
        r"\d+\.\d MiB: free some space",
        writes=(".",),
    ),
    # --- tune's and compare's folders, checked as solve's and train's, before Ray -----------
    cli(
        "tune-link-name-outside-out",
        "CLI",
        "tune --name r where --out/r is a symlink to a folder outside --out",
        TUNE + " --out {tmp}/out --name r",
        LINK_OUT,
        writes=("outside", "out"),
        setup=link_run_folder,
    ),
    api(
        "api-tune-link-name-outside-storage",
        "API",
        "br.tune name='r' where storage_path/r is a symlink outside storage_path",
        lambda tmp: br.tune(
            "toy-negative", num_samples=2, steps=5, storage_path=tmp / "out", name="r"
        ),
        r"^name '.*out/r' resolves to '.*outside', outside .*remove the link or choose another",
        writes=("outside", "out"),
        setup=link_run_folder,
    ),
    cli(
        "tune-name-300-bytes",
        "CLI",
        "tune --name of 300 characters",
        TUNE + " --out {tmp}/out --name " + LONG,
        r"^error: name '.*' " + TOO_LONG,
        writes=(".",),
    ),
    cli(
        "tune-name-nul",
        "CLI",
        "tune --name with a NUL byte",
        TUNE + " --out {tmp}/out --name r\x00un",
        r"^error: name '.*' " + NUL,
        writes=(".",),
    ),
    cli(
        "tune-out-nul",
        "CLI",
        "tune --out with a NUL byte",
        TUNE + " --out {tmp}/o\x00ut",
        r"^error: --out '.*' " + NUL,
        writes=(".",),
    ),
    cli(
        "tune-out-not-utf8",
        "CLI",
        "tune --out whose name is not UTF-8",
        TUNE + " --out {tmp}/o\udcffut",
        r"^error: --out '.*' " + NOT_UTF8,
        writes=(".",),
    ),
    api(
        "api-tune-storage-nul",
        "API",
        "br.tune storage_path with a NUL byte",
        lambda tmp: br.tune("toy-negative", num_samples=2, steps=5, storage_path=f"{tmp}/o\x00"),
        r"^storage_path '.*' " + NUL,
        writes=(".",),
    ),
    cli(
        "tune-sweep-json-is-folder",
        "CLI",
        "tune --out DIR --name r where DIR/r/sweep.json is a folder",
        TUNE + " --out {tmp}/out --name r",
        r"^error: sweep file '.*out/r/sweep\.json' " + RUN_NOT_FILE,
        writes=("out",),
        setup=folder_at("out/r/sweep.json"),
    ),
    cli(
        "tune-trials-is-fifo",
        "CLI",
        "tune --out DIR --name r where DIR/r/trials.parquet is a FIFO",
        TUNE + " --out {tmp}/out --name r",
        r"^error: sweep file '.*out/r/trials\.parquet' " + NOT_REGULAR,
        writes=("out",),
        setup=fifo_at("out/r/trials.parquet"),
    ),
    cli(
        "tune-name-is-file",
        "CLI",
        "tune --out DIR --name r where DIR/r is a regular file",
        TUNE + " --out {tmp}/out --name r",
        r"^error: name '.*out/r' is a file, not a folder; remove it or choose another name$",
        writes=("out",),
        setup=file_at("out/r"),
    ),
    cli(
        "compare-link-name-outside-out",
        "CLI",
        "compare --name r where --out/r is a symlink to a folder outside --out",
        COMPARE + " --out {tmp}/out --name r",
        LINK_OUT,
        writes=("outside", "out"),
        setup=link_run_folder,
    ),
    cli(
        "compare-name-300-bytes",
        "CLI",
        "compare --name of 300 characters",
        COMPARE + " --out {tmp}/out --name " + LONG,
        r"^error: name '.*' " + TOO_LONG,
        writes=(".",),
    ),
    cli(
        "compare-out-nul",
        "CLI",
        "compare --out with a NUL byte",
        COMPARE + " --out {tmp}/o\x00ut",
        r"^error: --out '.*' " + NUL,
        writes=(".",),
    ),
    cli(
        "compare-name-is-file",
        "CLI",
        "compare --out DIR --name r where DIR/r is a regular file",
        COMPARE + " --out {tmp}/out --name r",
        r"^error: name '.*out/r' is a file, not a folder; remove it or choose another name$",
        writes=("out",),
        setup=file_at("out/r"),
    ),
    api(
        "api-compare-storage-not-utf8",
        "API",
        "br.compare storage_path whose name is not UTF-8",
        lambda tmp: br.compare(
            "toy-negative", budget_s=1, seeds=1, storage_path=f"{tmp}/o\udcffut", progress=False
        ),
        r"^storage_path '.*' " + NOT_UTF8,
        writes=(".",),
    ),
]


CONTROL = r"contains a control character; give a name of printable characters, e.g. name='run1'$"


def _deep_sweep_file(tmp: Path) -> None:
    """tmp/sweeps/sw4/sweep.json nesting deeper than Python's parser goes."""
    folder = tmp / "sweeps" / "sw4"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text("[" * 60000 + "]" * 60000)


# A name is printable and not empty; a resume needs a sweep to resume; a sweep's own file is
# read within bounds.
CASES += [
    cli(
        "train-name-control-character",
        "CLI",
        "train --name $'a\\x01b'",
        TRAIN + " --out {tmp}/out --name a\x01b",
        r"^error: name='a\\x01b': " + CONTROL,
        writes=(".",),
    ),
    cli(
        "train-name-empty",
        "CLI",
        'train --name ""',
        TRAIN + " --out {tmp}/out --name ''",
        r"^error: name='': must be a plain folder name, not empty",
        writes=(".",),
    ),
    api(
        "api-train-name-empty",
        "API",
        'br.train(name="")',
        lambda tmp: br.train("toy-negative", steps=2, storage_path=tmp / "out", name=""),
        r"^name='': must be a plain folder name, not empty",
        writes=(".",),
    ),
    cli(
        "tune-name-control-character",
        "CLI",
        "tune --name $'a\\x1bb' (an escape sequence)",
        TUNE + " --out {tmp}/sweeps --name a\x1bb",
        r"^error: name='a\\x1bb': " + CONTROL,
        writes=(".",),
    ),
    cli(
        "compare-name-control-character",
        "CLI",
        "compare --name $'a\\x01b'",
        COMPARE + " --out {tmp}/cmp --name a\x01b",
        r"^error: name='a\\x01b': " + CONTROL,
        writes=(".",),
    ),
    cli(
        "tune-resume-nothing-there",
        "CLI",
        "tune --resume on a sweep folder that does not exist",
        TUNE + " --out {tmp}/sweeps --name nosuch --resume",
        r"^error: sweep folder '.*sweeps/nosuch' does not exist: there is nothing to resume; run "
        r"without --resume \(resume=False\) to start the sweep",
        writes=(".",),
    ),
    cli(
        "tune-sweep-file-too-deep",
        "CLI",
        "tune --resume on a folder whose sweep.json nests 60000 levels",
        TUNE + " --out {tmp}/sweeps --name sw4 --resume",
        r"^error: sweep folder '.*sw4': sweep\.json nests deeper than any such file does; "
        r"delete the folder or choose a new --name$",
        writes=("sweeps",),
        setup=_deep_sweep_file,
    ),
]


@pytest.mark.parametrize(("name", "problem"), [("a\x01b", "contains a control character"),
                                                ("", "is empty")])  # fmt: skip
def test_output_folder_refuses_an_empty_or_unprintable_name(tmp_path, name, problem):
    from bilevel_ray.runtime.local.output_files import check_output_folder

    match = rf"^name {re.escape(repr(name))} {problem}; give a folder name of printable characters"
    with pytest.raises(br.ConfigError, match=match):
        check_output_folder(tmp_path, name, "name")


def test_tune_resume_nothing_there_makes_no_folder(tmp_path, no_ray):
    """The refused resume leaves no sweep folder behind (it used to start a new sweep)."""
    argv = [*TUNE.split(), "--out", str(tmp_path / "sweeps"), "--name", "nosuch", "--resume"]
    assert main(argv) == 2
    assert not (tmp_path / "sweeps" / "nosuch").exists()


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case, tmp_path, request, no_compare_ray):
    run_case(case, tmp_path, request, CASES)


# --- br.train's storage_path -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("storage", "why"), [("a_file", "File exists"), ("a_file/sub", "Not a directory")]
)
def test_train_refuses_a_storage_path_that_is_not_writable(tmp_path, no_ray, storage, why):
    (tmp_path / "a_file").write_text("")
    match = rf"^storage_path '.*{storage}' is not writable \({why}\); choose another folder$"
    with pytest.raises(br.ConfigError, match=match):
        br.train(**train_args(tmp_path, storage_path=tmp_path / storage))
    with pytest.raises(br.ConfigError, match=match.replace("storage_path", "history folder")):
        check_writable(tmp_path / storage, "history folder")


# --- links planted where a run writes: replaced, never written through ---------------------------


def _plant_link(tmp: Path, relative: str) -> Path:
    """tmp/<relative> is a link to outside/target.txt; returns the target."""
    target = outside(tmp) / "target.txt"
    (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, tmp / relative)
    return target


def _solve_cli(tmp: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*SOLVE.split(), "--out", str(tmp / "out")]) == 0


def _train_cli(tmp: Path) -> None:
    argv = [*TRAIN.split(), "--checkpoint-every", "1", "--out", str(tmp / "out"), "--name", "r"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0


def _report_cli(tmp: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(tmp / "rep")]) == 0


def _api_history(tmp: Path) -> None:
    solve(history_path=tmp / "out" / "h.parquet")


def _api_checkpoint(tmp: Path) -> None:
    solve(checkpoint_path=tmp / CKPT, checkpoint_every=1)


SAFE = {  # a link planted at the path (relative to the case's folder), and the run that writes it
    "solve-run-json-link": ("out/run.json", _solve_cli),
    "solve-result-pt-link": ("out/result.pt", _solve_cli),
    "solve-history-link": ("out/history.parquet", _solve_cli),
    "solve-history-tmp-link": ("out/history.parquet.tmp", _solve_cli),
    "train-run-json-link": ("out/r/run.json", _train_cli),
    "train-result-pt-link": ("out/r/result.pt", _train_cli),
    "train-checkpoint-tmp-link": ("out/r/checkpoint.pt.tmp", _train_cli),
    "api-history-path-link": ("out/h.parquet", _api_history),
    "api-checkpoint-path-link": (CKPT, _api_checkpoint),
    "api-checkpoint-tmp-link": (CKPT + ".tmp", _api_checkpoint),
    "report-png-link": ("rep/report.png", _report_cli),
}


@pytest.mark.parametrize("key", list(SAFE))
def test_a_planted_link_is_replaced_not_written_through(key, tmp_path, no_ray):
    relative, run = SAFE[key]
    if key.startswith("report"):
        write_run_report(tmp_path)
    target = _plant_link(tmp_path, relative)
    before = files_under(tmp_path / "outside")
    run(tmp_path)
    assert target.read_text() == "not yours\n", "written through the link"
    assert files_under(tmp_path / "outside") == before, "a file appeared outside the run's folder"
    link = tmp_path / relative
    if not relative.endswith(".tmp"):
        assert link.is_file() and not link.is_symlink(), "the link was not replaced"


def test_a_planted_tmp_folder_does_not_break_a_save(tmp_path):
    (tmp_path / "ck" / "c.pt.tmp").mkdir(parents=True)
    (tmp_path / "out" / "h.parquet.tmp").mkdir(parents=True)
    solve(
        checkpoint_path=tmp_path / CKPT, checkpoint_every=1, history_path=tmp_path / "out/h.parquet"
    )
    assert (tmp_path / CKPT).is_file() and (tmp_path / "out" / "h.parquet").is_file()


# --- round three (a hidden catalogue's classes, closed) -------------------------------


def test_resuming_a_finished_sweep_whose_tune_state_is_gone_is_refused(tmp_path):
    # Tune cannot restore it and would start over, rewriting the finished sweep's tables.
    from bilevel_ray.runtime.tune.folder import claim_sweep_folder
    from bilevel_ray.runtime.tune.state_seal import seal_files

    folder = tmp_path / "sweep"
    claim_sweep_folder(folder, {"method": "pbgd_free"}, resume=False).release()
    (folder / "trials.parquet").write_bytes(b"the finished sweep's table")
    with pytest.raises(br.ConfigError, match=r"whose Tune state .* is gone: there is nothing"):
        claim_sweep_folder(folder, {"method": "pbgd_free"}, resume=True)
    assert (folder / "trials.parquet").read_bytes() == b"the finished sweep's table"
    (folder / "tuner.pkl").write_bytes(b"")
    (folder / "experiment_state-2026.json").write_text("{}")
    seal_files(folder)  # as the sweep seals the state it saves
    claim_sweep_folder(folder, {"method": "pbgd_free"}, resume=True).release()  # accepted
