"""Bad input, round two (issue 15): paths and files, resume, numbers, user code, reports.

The cases use the format of :mod:`test_bad_input_catalogue` (its ``Case``, ``api`` / ``cli``
builders and its checks; the ``no_ray`` fixture is conftest's): each asserts the error type,
that the message names the fix, and, for each folder in ``writes`` (always including any
folder outside the requested one a link points to), that no file there is new or changed.
Every case is refused
before the run's first step, or (user code that misbehaves mid-run) with a message that names
the loss and the step.

``SAFE`` lists inputs that must now work rather than fail: a link planted where a run writes a
file is replaced by the new file, never written through, and a planted ``.tmp`` of any kind no
longer breaks a save.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_files import save_code_weights, save_truncated_weights
from test_bad_input_catalogue import (
    F64,
    Quad,
    _check,
    _files,
    _observe,
    _prepare,
    api,
    cli,
    solve,
    t64,
)

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.runtime.local import checkpoint as checkpoint_module
from bilevel_ray.runtime.local.history import HISTORY_SCHEMA

LONG = "n" * 300  # one path component longer than 255 bytes
CKPT = "ck/c.pt"  # the checkpoint the resume cases start from, in the case's folder


# --- setups --------------------------------------------------------------------------------------


def _outside(tmp: Path) -> Path:
    """A folder outside the requested one, with a file a link can point at."""
    outside = tmp / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "target.txt").write_text("not yours\n")
    return outside


def link_run_folder(tmp: Path) -> None:
    """out/r is a link to a folder outside out."""
    (tmp / "out").mkdir()
    os.symlink(_outside(tmp), tmp / "out" / "r")


def folder_at(relative: str) -> Callable[[Path], None]:
    """A folder planted where a file goes."""

    def setup(tmp: Path) -> None:
        (tmp / relative).mkdir(parents=True)

    return setup


def fifo_at(relative: str) -> Callable[[Path], str | None]:
    def setup(tmp: Path) -> str | None:
        if not hasattr(os, "mkfifo"):
            return "no FIFOs on this platform"
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(tmp / relative)
        return None

    return setup


def exiting_factory(tmp: Path) -> None:
    (tmp / "exits.py").write_text("import sys\n\ndef factory(config):\n    sys.exit(3)\n")


def trained(tmp: Path) -> None:
    """A two-step run of the catalogue's Quad with a checkpoint at tmp/ck/c.pt."""
    solve(checkpoint_path=tmp / CKPT, checkpoint_every=1, steps=2)


def crafted(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """A loadable checkpoint (a real one, then ``change``d)."""

    def setup(tmp: Path) -> None:
        trained(tmp)
        payload = torch.load(tmp / CKPT, weights_only=True)
        change(payload)
        torch.save(payload, tmp / CKPT)
        (tmp / (CKPT + ".prev")).unlink(missing_ok=True)

    return setup


def resume(**overrides: Any) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        args = {"checkpoint_path": tmp / CKPT, "checkpoint_every": 1, "resume": True, "steps": 4}
        return solve(**{**args, **overrides})

    return run


def trained_quadratic(tmp: Path) -> None:
    argv = ["train", "quadratic", "--config", "dim_x=2", "--config", "dim_y=2", "--workers", "1"]
    argv += [
        "--steps",
        "2",
        "--report-every",
        "1",
        "--checkpoint-every",
        "1",
        "--out",
        str(tmp / "runs"),
        "--name",
        "r",
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*argv, "--quiet"]) == 0


def full_disk(run: Callable[[Path], Any], free: int = 2**20) -> Callable[[Path], Any]:
    """``run`` on a disk with ``free`` bytes free."""
    usage = shutil._ntuple_diskusage(total=10**12, used=10**12 - free, free=free)

    def patched(tmp: Path) -> Any:
        with mock.patch.object(checkpoint_module.shutil, "disk_usage", lambda path: usage):
            return run(tmp)

    return patched


def late(bad: Any, after: int = 12) -> Callable[..., Any]:
    """A loss that is right for its first ``after`` calls (the checks at the initial point
    pass), then returns ``bad(x, y)``."""
    calls = {"n": 0}

    def loss(x, y):
        calls["n"] += 1
        if calls["n"] > after:
            return bad(x, y)
        return ((x["x"] - 1) ** 2 + (y["y"] - x["x"]) ** 2).sum()

    return loss


def late_solve(level: str, bad: Any, method: str = "pbgd_free", **kw: Any) -> Callable:
    def run(tmp: Path) -> Any:
        problem = Quad(**{level: late(bad)})
        return solve(problem=problem, method=method, steps=30, **kw)

    return run


def write_run_report(tmp: Path, rows: int = 3, drop: tuple[str, ...] = ()) -> Path:
    """tmp/rep: a solve-like output folder with a history of ``rows`` rows."""
    folder = tmp / "rep"
    folder.mkdir(exist_ok=True)
    data = {
        "step": list(range(1, rows + 1)),
        "method": ["pbgd_free"] * rows,
        **{
            k: [1.0 / (i + 1) for i in range(rows)]
            for k in HISTORY_SCHEMA.names
            if k not in ("step", "method")
        },
    }
    table = pa.table(data, schema=HISTORY_SCHEMA)
    table = table.drop_columns(list(drop)) if drop else table
    pq.write_table(table, folder / "history.parquet")
    return folder


def report_folder(**kw: Any) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        write_run_report(tmp, **kw)

    return setup


def sweep_folder(trials: dict[str, list], history: dict[str, list]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        folder = tmp / "rep"
        folder.mkdir()
        pq.write_table(pa.table(trials), folder / "trials.parquet")
        pq.write_table(pa.table(history), folder / "history.parquet")

    return setup


def report_with(extra: Callable[[Path], None], **kw: Any) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        write_run_report(tmp, **kw)
        extra(tmp)

    return setup


def _no_columns(tmp: Path) -> None:
    (tmp / "rep").mkdir()
    pq.write_table(pa.table({}), tmp / "rep" / "history.parquet")


def _foreign(tmp: Path) -> None:
    (tmp / "rep").mkdir()
    pq.write_table(pa.table({"a": [1, 2], "b": ["u", "v"]}), tmp / "rep" / "history.parquet")


def link_at(relative: str) -> Callable[[Path], None]:
    """tmp/<relative> is a link to a folder outside tmp/out."""

    def setup(tmp: Path) -> None:
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(_outside(tmp), tmp / relative)

    return setup


def file_at(relative: str) -> Callable[[Path], None]:
    """A regular file planted where a folder goes."""

    def setup(tmp: Path) -> None:
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp / relative).write_text("a file\n")

    return setup


def factory(name: str, **config: Any) -> Callable[[Path], Any]:
    """A built-in problem factory called with ``config`` (what br.solve / train / tune do)."""
    from bilevel_ray.problems import BUILTIN_PROBLEMS

    return lambda tmp: BUILTIN_PROBLEMS[name](config)


def small_memory(run: Callable[[Path], Any], total: int = 2**30) -> Callable[[Path], Any]:
    """``run`` on a machine with ``total`` bytes of memory."""
    from bilevel_ray.problems import limits

    def patched(tmp: Path) -> Any:
        with mock.patch.object(limits, "physical_memory", lambda: total):
            return run(tmp)

    return patched


def needs_peft() -> str | None:
    from importlib.util import find_spec

    if find_spec("peft") is None or find_spec("transformers") is None:
        return "needs pip install 'bilevel_ray[peft]'"
    return None


def malicious_model(tmp: Path) -> str | None:
    """tmp/model: a saved tiny Llama whose pytorch_model.bin is a pickle that names a function
    (``print``): torch.load(weights_only=True) refuses it, and it must stay refused."""
    if needs_peft():
        return needs_peft()
    save_code_weights(tmp / "model", "this ran code from the file")
    return None


def truncated_model(tmp: Path) -> str | None:
    """tmp/model: a saved config and a pytorch_model.bin cut in half (a copy cut short)."""
    if needs_peft():
        return needs_peft()
    save_truncated_weights(tmp / "model")
    return None


TINY_PEFT = {"vocab": 16, "n_pref": 8, "n_sft": 8, "n_eval": 4, "batch": 4}


GOOD_TRIALS = {
    "trial_id": ["a", "b"],
    "status": ["completed", "completed"],
    "eval/upper_loss": [1.0, 2.0],
    "eval/lower_gap": [0.01, 0.02],
}
GOOD_HISTORY = {
    "trial_id": ["a", "b"],
    "step": [1, 1],
    "eval/upper_loss": [1.0, 2.0],
    "time/elapsed_s": [0.1, 0.1],
}

SOLVE = "solve toy-negative --steps 2 --report-every 1"
TUNE = "tune toy-negative --samples 2 --max-steps 5"
COMPARE = "compare toy-negative --budget 1 --seeds 1 --quiet"
LINK_OUT = (
    r"^error: name '.*out/r' resolves to '.*outside', outside '.*out' \(a symbolic link\): "
    r"remove the link or choose another name$"
)
TOO_LARGE = r": too large; must be an integer in "
TRAIN = "train toy-negative --workers 1 --steps 2 --report-every 1 --quiet"
RUN_NOT_FILE = r"is a folder; give a file path in it \(or move the folder away\)$"
NOT_REGULAR = r"is not a regular file \(a FIFO, socket or device\); remove it or give another path"
NUL = r"contains a NUL byte; give a path without it$"
TOO_LONG = r"has a component of 300 bytes: at most 255 bytes per name; give a shorter name$"
NOT_UTF8 = r"is not valid UTF-8; give a path of UTF-8 characters$"
WRONG_RETURN = r"it must return a scalar \(0-d\) floating tensor at every step; reduce it with "


def _returned(loss: str, what: str) -> str:
    return rf"^{loss} returned {what} at step \d+: " + WRONG_RETURN


CASES = [
    # --- 1. links: a run folder resolved through a link out of --out ---------------------------
    cli(
        "r2-link-name-outside-out",
        "CLI",
        "train --name r where --out/r is a symlink to a folder outside --out",
        TRAIN + " --out {tmp}/out --name r",
        r"^error: --name '.*out/r' resolves to '.*outside', outside '.*out' \(a symbolic link\): "
        r"remove the link or choose another name$",
        writes=("outside", "out"),
        setup=link_run_folder,
    ),
    api(
        "r2-api-link-name-outside-storage",
        "API",
        "br.train name='r' where storage_path/r is a symlink outside storage_path",
        lambda tmp: br.train("toy-negative", steps=2, storage_path=tmp / "out", name="r"),
        r"^name '.*out/r' resolves to '.*outside', outside .*remove the link or choose another",
        writes=("outside", "out"),
        setup=link_run_folder,
    ),
    # --- 2. every output path checked before the first step -----------------------------------
    api(
        "r2-history-path-nul",
        "API",
        "history_path with a NUL byte",
        lambda tmp: solve(history_path=f"{tmp}/out/h\x00.parquet"),
        r"^history_path '.*' " + NUL,
        writes=(".",),
    ),
    api(
        "r2-checkpoint-path-nul",
        "API",
        "checkpoint_path with a NUL byte",
        lambda tmp: solve(checkpoint_path=f"{tmp}/out/c\x00.pt", checkpoint_every=1),
        r"^checkpoint_path '.*' " + NUL,
        writes=(".",),
    ),
    api(
        "r2-history-path-300-bytes",
        "API",
        "history_path with a 300-character file name",
        lambda tmp: solve(history_path=tmp / "out" / LONG),
        r"^history_path '.*' " + TOO_LONG,
        writes=(".",),
    ),
    api(
        "r2-checkpoint-path-300-bytes",
        "API",
        "checkpoint_path with a 300-character file name",
        lambda tmp: solve(checkpoint_path=tmp / "out" / LONG, checkpoint_every=1),
        r"^checkpoint_path '.*' " + TOO_LONG,
        writes=(".",),
    ),
    api(
        "r2-history-path-not-utf8",
        "API",
        "history_path whose name is not UTF-8 (a surrogate-escaped byte 0xff)",
        lambda tmp: solve(history_path=f"{tmp}/out/h\udcff.parquet"),
        r"^history_path '.*' " + NOT_UTF8,
        writes=(".",),
    ),
    api(
        "r2-checkpoint-path-not-utf8",
        "API",
        "checkpoint_path whose folder is not UTF-8",
        lambda tmp: solve(checkpoint_path=f"{tmp}/o\udcffut/c.pt", checkpoint_every=1),
        r"^checkpoint_path '.*' " + NOT_UTF8,
        writes=(".",),
    ),
    cli(
        "r2-out-nul",
        "CLI",
        "solve --out with a NUL byte",
        SOLVE + " --out {tmp}/o\x00ut",
        r"^error: --out '.*' " + NUL,
        writes=(".",),
    ),
    cli(
        "r2-out-300-bytes",
        "CLI",
        "solve --out with a 300-character folder name",
        SOLVE + " --out {tmp}/" + LONG,
        r"^error: --out '.*' " + TOO_LONG,
        writes=(".",),
    ),
    cli(
        "r2-out-not-utf8",
        "CLI",
        "solve --out whose name is not UTF-8",
        SOLVE + " --out {tmp}/o\udcffut",
        r"^error: --out '.*' " + NOT_UTF8,
        writes=(".",),
    ),
    cli(
        "r2-name-nul",
        "CLI",
        "train --name with a NUL byte",
        TRAIN + " --out {tmp}/out --name r\x00un",
        r"^error: --name '.*' " + NUL,
        writes=(".",),
    ),
    cli(
        "r2-name-300-bytes",
        "CLI",
        "train --name of 300 characters",
        TRAIN + " --out {tmp}/out --name " + LONG,
        r"^error: --name '.*' " + TOO_LONG,
        writes=(".",),
    ),
    api(
        "r2-api-name-300-bytes",
        "API",
        "br.train name of 300 characters",
        lambda tmp: br.train("toy-negative", steps=2, storage_path=tmp / "out", name=LONG),
        r"^name '.*' " + TOO_LONG,
        writes=("out",),
    ),
    api(
        "r2-checkpoint-prev-is-folder",
        "API",
        "<checkpoint_path>.prev is a folder",
        lambda tmp: solve(checkpoint_path=tmp / CKPT, checkpoint_every=1),
        r"^checkpoint_path '.*c\.pt\.prev' " + RUN_NOT_FILE,
        writes=("ck",),
        setup=folder_at(CKPT + ".prev"),
    ),
    cli(
        "r2-train-checkpoint-prev-is-folder",
        "CLI",
        "train: --out/NAME/checkpoint.pt.prev is a folder",
        TRAIN + " --checkpoint-every 1 --out {tmp}/out --name r",
        r"^error: checkpoint_path '.*checkpoint\.pt\.prev' " + RUN_NOT_FILE,
        writes=("out",),
        setup=folder_at("out/r/checkpoint.pt.prev"),
    ),
    api(
        "r2-checkpoint-path-is-fifo",
        "API",
        "checkpoint_path is a FIFO (no resume)",
        lambda tmp: solve(checkpoint_path=tmp / "ck" / "fifo", checkpoint_every=1),
        r"^checkpoint_path '.*fifo' " + NOT_REGULAR,
        writes=("ck",),
        setup=fifo_at("ck/fifo"),
    ),
    api(
        "r2-history-path-is-fifo",
        "API",
        "history_path is a FIFO",
        lambda tmp: solve(history_path=tmp / "ck" / "fifo"),
        r"^history_path '.*fifo' " + NOT_REGULAR,
        writes=("ck",),
        setup=fifo_at("ck/fifo"),
    ),
    api(
        "r2-checkpoint-equals-history",
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
        "r2-checkpoint-equals-history-spelled-apart",
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
        "r2-disk-space-history",
        "API",
        "a 1 MiB disk and a history of 20,000 logged rows (history_path only)",
        full_disk(lambda tmp: solve(steps=20_000, history_path=tmp / "out" / "h.parquet")),
        r"^history_path '.*' has 1\.0 MiB free and the run's checkpoints need about \d+\.\d MiB: "
        r"free some space or choose another folder \(the estimate counts the state and the "
        r"history",
        writes=(".",),
    ),
    api(
        "r2-disk-space-checkpoint-history",
        "API",
        "a 1 MiB disk and checkpoints that carry 20,000 history rows",
        full_disk(lambda tmp: solve(steps=20_000, checkpoint_path=tmp / "out" / "c.pt")),
        r"^checkpoint_path '.*' has 1\.0 MiB free and the run's checkpoints need about "
        r"\d+\.\d MiB: free some space",
        writes=(".",),
    ),
    cli(
        "r2-solve-run-json-is-folder",
        "CLI",
        "solve --out DIR where DIR/run.json is a folder",
        SOLVE + " --out {tmp}/out",
        r"^error: --out file '.*out/run\.json' " + RUN_NOT_FILE,
        writes=("out",),
        setup=folder_at("out/run.json"),
    ),
    cli(
        "r2-solve-result-pt-is-folder",
        "CLI",
        "solve --out DIR where DIR/result.pt is a folder",
        SOLVE + " --out {tmp}/out",
        r"^error: --out file '.*out/result\.pt' " + RUN_NOT_FILE,
        writes=("out",),
        setup=folder_at("out/result.pt"),
    ),
    cli(
        "r2-solve-history-is-folder",
        "CLI",
        "solve --out DIR where DIR/history.parquet is a folder",
        SOLVE + " --out {tmp}/out",
        r"^error: --out file '.*out/history\.parquet' " + RUN_NOT_FILE,
        writes=("out",),
        setup=folder_at("out/history.parquet"),
    ),
    cli(
        "r2-solve-run-json-is-fifo",
        "CLI",
        "solve --out DIR where DIR/run.json is a FIFO",
        SOLVE + " --out {tmp}/out",
        r"^error: --out file '.*out/run\.json' " + NOT_REGULAR,
        writes=("out",),
        setup=fifo_at("out/run.json"),
    ),
    cli(
        "r2-train-run-json-is-folder",
        "CLI",
        "train --out DIR --name r where DIR/r/run.json is a folder",
        TRAIN + " --out {tmp}/out --name r",
        r"^error: --out file '.*out/r/run\.json' " + RUN_NOT_FILE,
        writes=("out",),
        setup=folder_at("out/r/run.json"),
    ),
    cli(
        "r2-train-result-pt-is-folder",
        "CLI",
        "train --out DIR --name r where DIR/r/result.pt is a folder",
        TRAIN + " --out {tmp}/out --name r",
        r"^error: --out file '.*out/r/result\.pt' " + RUN_NOT_FILE,
        writes=("out",),
        setup=folder_at("out/r/result.pt"),
    ),
    # --- 3. resume that trusts too much -------------------------------------------------------
    api(
        "r2-resume-other-names",
        "config file",
        "resume with x0 named 'z' where the checkpoint's is 'x'",
        resume(
            problem=Quad(
                upper=lambda x, y: ((x["z"] - 1) ** 2).sum() + ((y["y"] - x["z"]) ** 2).sum(),
                lower=lambda x, y: ((y["y"] - x["z"]) ** 2).sum(),
            ),
            x0={"z": t64(2.0)},
        ),
        r"^checkpoint '.*c\.pt' belongs to another run: x names \['x'\] in the checkpoint, "
        r"\['z'\] now\. Resume with the same problem",
        writes=("ck",),
        setup=trained,
    ),
    api(
        "r2-resume-other-shape",
        "config file",
        "resume with x0['x'] of shape (2,) where the checkpoint's is (1,)",
        resume(x0={"x": t64(2.0, 1.0)}, y0={"y": t64(0.0, 0.0)}),
        r"^checkpoint '.*' belongs to another run: x\['x'\] is \(1,\) torch\.float64 in the "
        r"checkpoint, \(2,\) torch\.float64 now; y\['y'\] is \(1,\) .*\. Resume with the same "
        r"problem",
        writes=("ck",),
        setup=trained,
    ),
    api(
        "r2-resume-other-dtype",
        "config file",
        "resume with float32 x0 / y0 where the checkpoint's are float64",
        resume(x0={"x": torch.tensor([2.0])}, y0={"y": torch.tensor([0.0])}),
        r"^checkpoint '.*' belongs to another run: x\['x'\] is \(1,\) torch\.float64 in the "
        r"checkpoint, \(1,\) torch\.float32 now",
        writes=("ck",),
        setup=trained,
    ),
    api(
        "r2-resume-fewer-steps",
        "config file",
        "resume with steps=1 from a checkpoint at step 2",
        resume(steps=1),
        r"^checkpoint '.*' belongs to another run: it is at step 2, past steps=1\. Resume with "
        r"the same problem and steps >= the checkpoint's step",
        writes=("ck",),
        setup=trained,
    ),
    api(
        "r2-resume-fifo",
        "config file",
        "resume from a checkpoint that is a FIFO (hung forever)",
        resume(),
        r"^checkpoint_path '.*c\.pt' " + NOT_REGULAR,
        writes=("ck",),
        setup=fifo_at(CKPT),
    ),
    api(
        "r2-resume-history-not-rows",
        "config file",
        "resume from a loadable checkpoint whose history is [1, 2]",
        resume(),
        r"^checkpoint '.*' belongs to another run: its history is not a list of rows\. Resume "
        r"with the same problem",
        writes=("ck",),
        setup=crafted(lambda p: p.update(history=[1, 2])),
    ),
    api(
        "r2-resume-history-a-string",
        "config file",
        "resume from a loadable checkpoint whose history is a string",
        resume(),
        r"^checkpoint '.*' belongs to another run: its history is not a list of rows\.",
        writes=("ck",),
        setup=crafted(lambda p: p.update(history="rows")),
    ),
    api(
        "r2-resume-x-not-dict",
        "config file",
        "resume from a loadable checkpoint whose state x is a bare tensor",
        resume(),
        r"^checkpoint '.*' belongs to another run: its x is not a dict of tensors\.",
        writes=("ck",),
        setup=crafted(lambda p: p["state"].update(x=t64(1.0))),
    ),
    api(
        "r2-resume-extra-name",
        "config file",
        "resume with an extra tensor in y0",
        resume(y0={"y": t64(0.0), "y2": t64(0.0)}),
        r"^checkpoint '.*' belongs to another run: y names \['y'\] in the checkpoint, "
        r"\['y', 'y2'\] now",
        writes=("ck",),
        setup=trained,
    ),
    cli(
        "r2-train-resume-other-config",
        "CLI",
        "train resumes runs/r with another --config dim_x",
        "train quadratic --config dim_x=3 --config dim_y=2 --workers 1 --steps 4 --report-every 1 "
        "--checkpoint-every 1 --out {tmp}/runs --name r --quiet",
        r"^error: checkpoint '.*checkpoint\.pt' belongs to another run: x\['x'\] is \(2,\) "
        r"torch\.float64 in the checkpoint, \(3,\) torch\.float64 now",
        writes=("runs",),
        setup=trained_quadratic,
    ),
    # --- 4. numbers Python holds and torch does not -------------------------------------------
    api(
        "r2-lr-400-digits",
        "API",
        "lr_x=10**400 (an integer of 401 digits)",
        lambda tmp: solve(lr_x=10**400),
        r"^lr_x=<an integer of 401 digits>: too large; must be below 2\*\*63 \(for a rate or a "
        r"penalty, give a float such as 1e3\)$",
    ),
    api(
        "r2-gamma-400-digits",
        "API",
        "gamma=-10**400",
        lambda tmp: solve(gamma=-(10**400)),
        r"^gamma=<an integer of 401 digits>: too large; must be below 2\*\*63",
    ),
    cli(
        "r2-cli-set-lr-huge",
        "CLI",
        "solve --set lr_y=<a 400-digit integer>",
        SOLVE + " --set lr_y=" + "9" * 400,
        r"^error: lr_y=<an integer of 400 digits>: too large; must be below 2\*\*63",
    ),
    # --- 4b. sizes and seeds of the built-in problems, checked before any allocation ----------
    cli(
        "r2-config-n-10-to-12",
        "CLI",
        "solve regression --config n=1000000000000",
        "solve regression --config n=1000000000000",
        r"^error: problem 'regression': n=1000000000000" + TOO_LARGE + r"\[1, 100000000\] "
        r"\(rows per group; the data is held in memory\), e\.g\. --config n=2000$",
    ),
    cli(
        "r2-config-n-expression",
        "CLI",
        "solve regression --config n=10**12 (not JSON: a string)",
        "solve regression --config n=10**12",
        r"^error: problem 'regression': n='10\*\*12': must be an integer >= 1, e\.g\. "
        r"--config n=2000$",
    ),
    cli(
        "r2-config-n-float",
        "CLI",
        "solve regression --config n=2.5",
        "solve regression --config n=2.5",
        r"^error: problem 'regression': n=2\.5: must be an integer >= 1, e\.g\. --config n=2000$",
    ),
    api(
        "r2-regression-memory",
        "API",
        "regression n=2,000,000 x dim=100 on a machine of 1 GiB",
        small_memory(factory("regression", n=2_000_000, dim=100)),
        r"^problem 'regression': n=2000000 rows of dim=100 would take about 3\.6 GiB, more than "
        r"this machine's 1\.0 GiB of memory; lower n or dim$",
    ),
    api(
        "r2-regression-ridge-400-digits",
        "API",
        "regression ridge=10**400",
        factory("regression", ridge=10**400),
        r"^problem 'regression': ridge=<an integer of 401 digits>: must be a finite number >= 0, "
        r"e\.g\. --config ridge=0\.01$",
    ),
    cli(
        "r2-config-dim-x-huge",
        "CLI",
        "solve quadratic --config dim_x=10000000",
        "solve quadratic --config dim_x=10000000",
        r"^error: problem 'quadratic': dim_x=10000000" + TOO_LARGE + r"\[1, 4096\] \(the "
        r"closed forms solve dense dim x dim systems\), e\.g\. --config dim_x=3$",
    ),
    api(
        "r2-quadratic-seed-2-to-64",
        "API",
        "quadratic seed=2**64",
        factory("quadratic", seed=2**64),
        r"^problem 'quadratic': seed=18446744073709551616" + TOO_LARGE + r"\[0, 4294967295\] "
        r"\(a seed every random generator takes\), e\.g\. --config seed=0$",
    ),
    cli(
        "r2-config-quadratic-seed-negative",
        "CLI",
        "solve quadratic --config seed=-1",
        "solve quadratic --config seed=-1",
        r"^error: problem 'quadratic': seed=-1: must be an integer >= 0, e\.g\. --config seed=0$",
    ),
    api(
        "r2-quadratic-two-sizes",
        "API",
        "quadratic dim_x=10**12 and dim_y=-1 together",
        factory("quadratic", dim_x=10**12, dim_y=-1),
        r"^2 problems:\n  - problem 'quadratic': dim_x=1000000000000: too large.*\n  - problem "
        r"'quadratic': dim_y=-1: must be an integer >= 1, e\.g\. --config dim_y=4$",
    ),
    cli(
        "r2-config-representation-n-huge",
        "CLI",
        "solve representation --config n=1000000000000",
        "solve representation --config n=1000000000000",
        r"^error: problem 'representation': n=1000000000000" + TOO_LARGE + r"\[1, 100000000\]",
    ),
    api(
        "r2-representation-hidden-huge",
        "API",
        "representation hidden=10**6",
        factory("representation", hidden=10**6),
        r"^problem 'representation': hidden=1000000" + TOO_LARGE + r"\[1, 16384\] \(the "
        r"extractor's width; its middle layer is hidden x hidden\), e\.g\. --config hidden=200$",
    ),
    api(
        "r2-representation-memory",
        "API",
        "representation n=2,000,000 synthetic rows on a machine of 1 GiB",
        small_memory(factory("representation", n=2_000_000)),
        r"^problem 'representation': n=2000000 rows and hidden=200 would take about 1\.9 GiB, "
        r"more than this machine's 1\.0 GiB of memory; lower n or hidden$",
    ),
    api(
        "r2-representation-seed-2-to-64",
        "API",
        "representation seed=2**64",
        factory("representation", seed=2**64),
        r"^problem 'representation': seed=18446744073709551616" + TOO_LARGE,
    ),
    cli(
        "r2-config-hyperclean-hidden-huge",
        "CLI",
        "solve hyperclean --config hidden=1000000000000",
        "solve hyperclean --config hidden=1000000000000 --method alt_pbgd",
        r"^error: problem 'hyperclean': hidden=1000000000000" + TOO_LARGE + r"\[0, 65536\] "
        r"\(the classifier's hidden width; 0 for a linear one\), e\.g\. --config hidden=32$",
    ),
    api(
        "r2-hyperclean-seed-2-to-64",
        "API",
        "hyperclean seed=2**64",
        factory("hyperclean", seed=2**64),
        r"^problem 'hyperclean': seed=18446744073709551616" + TOO_LARGE + r"\[0, 4294967295\]",
    ),
    api(
        "r2-hyperclean-ridge-400-digits",
        "API",
        "hyperclean ridge=10**400 (float() overflows)",
        factory("hyperclean", ridge=10**400),
        r"^problem 'hyperclean': ridge=<an integer of 401 digits>: must be a finite number >= 0; "
        r"use a small ridge such as 1e-3",
    ),
    cli(
        "r2-config-toy-x0-400-digits",
        "CLI",
        "solve toy-negative --config x0=<a 400-digit integer>",
        "solve toy-negative --config x0=" + "9" * 400,
        r"^error: problem 'toy-negative': x0=<an integer of 400 digits>: too large; must be "
        r"below 2\*\*63 in size, e\.g\. --config x0=2\.0$",
    ),
    cli(
        "r2-config-peft-vocab-huge",
        "CLI",
        "solve peft-dpo-sft --config vocab=1000000000000",
        "solve peft-dpo-sft --config vocab=1000000000000",
        r"^error: problem 'peft-dpo-sft': vocab=1000000000000" + TOO_LARGE + r"\[2, 1048576\] "
        r"\(token ids; the largest tokenizers hold about 256k\), e\.g\. --config vocab=64$",
    ),
    api(
        "r2-peft-seed-2-to-64",
        "API",
        "peft-dpo-sft seed=2**64",
        factory("peft-dpo-sft", seed=2**64),
        r"^problem 'peft-dpo-sft': seed=18446744073709551616" + TOO_LARGE,
    ),
    api(
        "r2-peft-beta-400-digits",
        "API",
        "peft-dpo-sft beta=10**400",
        factory("peft-dpo-sft", beta=10**400),
        r"^problem 'peft-dpo-sft': beta=<an integer of 401 digits>: must be a finite number > 0$",
    ),
    api(
        "r2-peft-data-memory",
        "API",
        "peft-dpo-sft n_pref=10**8 of 32768-token prompts",
        factory("peft-dpo-sft", n_pref=10**8, prompt_len=2**15),
        r"^problem 'peft-dpo-sft': the generated data would take about [\d,]+\.\d GiB, more "
        r"than this machine's [\d,.]+ GiB of memory; lower n_pref, n_sft, n_eval, prompt_len, "
        r"response_len or vocab$",
    ),
    api(
        "r2-peft-built-model-memory",
        "API",
        "peft-dpo-sft hidden=65536, layers=1024 (a model of 7e13 parameters)",
        factory("peft-dpo-sft", hidden=2**16, layers=1024),
        r"^problem 'peft-dpo-sft': the built model \([\d,]+ parameters\) would take about "
        r"[\d,]+\.\d GiB, more than this machine's [\d,.]+ GiB of memory; choose a smaller "
        r"model \(fewer layers; a smaller hidden, vocab or MLP size\)$",
        setup=lambda tmp: needs_peft(),
    ),
    api(
        "r2-peft-dict-model-memory",
        "API",
        "peft-dpo-sft model={'vocab_size': 10**9} (LlamaConfig's other defaults)",
        factory("peft-dpo-sft", model={"vocab_size": 10**9}),
        r"^problem 'peft-dpo-sft': model=\{'vocab_size': 1000000000\} \([\d,]+ parameters\) "
        r"would take about [\d,]+\.\d GiB, more than this machine's",
        setup=lambda tmp: needs_peft(),
    ),
    # --- 7b. a weights file that is not only tensors ------------------------------------------
    api(
        "r2-peft-malicious-pytorch-model-bin",
        "data",
        "peft-dpo-sft model=DIR whose pytorch_model.bin pickles a function (print)",
        lambda tmp: factory("peft-dpo-sft", model=str(tmp / "model"), **TINY_PEFT)(tmp),
        r"^problem 'peft-dpo-sft': model='.*model': pytorch_model\.bin holds objects other than "
        r"tensors \(it names [\w.]*print\), so it was not loaded: unpickling it could run "
        r"code\. Give "
        r"a model saved as safetensors \(model\.save_pretrained\(dir\) writes "
        r"model\.safetensors\), or re-save the weights as a plain state dict: "
        r"torch\.save\(model\.state_dict\(\), 'pytorch_model\.bin'\)$",
        writes=("model",),
        setup=malicious_model,
    ),
    api(
        "r2-peft-truncated-pytorch-model-bin",
        "data",
        "peft-dpo-sft model=DIR whose pytorch_model.bin is cut short",
        lambda tmp: factory("peft-dpo-sft", model=str(tmp / "model"), **TINY_PEFT)(tmp),
        r"^problem 'peft-dpo-sft': cannot load model='.*model': pytorch_model\.bin cannot be "
        r"read \(.*\); it is truncated or corrupted: save the model again with "
        r"model\.save_pretrained\(dir\)$",
        writes=("model",),
        setup=truncated_model,
    ),
    # --- 1b / 2b. tune's and compare's folders, checked as solve's and train's, before Ray -----
    cli(
        "r2-tune-link-name-outside-out",
        "CLI",
        "tune --name r where --out/r is a symlink to a folder outside --out",
        TUNE + " --out {tmp}/out --name r",
        LINK_OUT,
        writes=("outside", "out"),
        setup=link_run_folder,
    ),
    api(
        "r2-api-tune-link-name-outside-storage",
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
        "r2-tune-name-300-bytes",
        "CLI",
        "tune --name of 300 characters",
        TUNE + " --out {tmp}/out --name " + LONG,
        r"^error: name '.*' " + TOO_LONG,
        writes=(".",),
    ),
    cli(
        "r2-tune-name-nul",
        "CLI",
        "tune --name with a NUL byte",
        TUNE + " --out {tmp}/out --name r\x00un",
        r"^error: name '.*' " + NUL,
        writes=(".",),
    ),
    cli(
        "r2-tune-out-nul",
        "CLI",
        "tune --out with a NUL byte",
        TUNE + " --out {tmp}/o\x00ut",
        r"^error: --out '.*' " + NUL,
        writes=(".",),
    ),
    cli(
        "r2-tune-out-not-utf8",
        "CLI",
        "tune --out whose name is not UTF-8",
        TUNE + " --out {tmp}/o\udcffut",
        r"^error: --out '.*' " + NOT_UTF8,
        writes=(".",),
    ),
    api(
        "r2-api-tune-storage-nul",
        "API",
        "br.tune storage_path with a NUL byte",
        lambda tmp: br.tune("toy-negative", num_samples=2, steps=5, storage_path=f"{tmp}/o\x00"),
        r"^storage_path '.*' " + NUL,
        writes=(".",),
    ),
    cli(
        "r2-tune-sweep-json-is-folder",
        "CLI",
        "tune --out DIR --name r where DIR/r/sweep.json is a folder",
        TUNE + " --out {tmp}/out --name r",
        r"^error: sweep file '.*out/r/sweep\.json' " + RUN_NOT_FILE,
        writes=("out",),
        setup=folder_at("out/r/sweep.json"),
    ),
    cli(
        "r2-tune-trials-is-fifo",
        "CLI",
        "tune --out DIR --name r where DIR/r/trials.parquet is a FIFO",
        TUNE + " --out {tmp}/out --name r",
        r"^error: sweep file '.*out/r/trials\.parquet' " + NOT_REGULAR,
        writes=("out",),
        setup=fifo_at("out/r/trials.parquet"),
    ),
    cli(
        "r2-tune-name-is-file",
        "CLI",
        "tune --out DIR --name r where DIR/r is a regular file",
        TUNE + " --out {tmp}/out --name r",
        r"^error: name '.*out/r' is a file, not a folder; remove it or choose another name$",
        writes=("out",),
        setup=file_at("out/r"),
    ),
    cli(
        "r2-compare-link-name-outside-out",
        "CLI",
        "compare --name r where --out/r is a symlink to a folder outside --out",
        COMPARE + " --out {tmp}/out --name r",
        LINK_OUT,
        writes=("outside", "out"),
        setup=link_run_folder,
    ),
    cli(
        "r2-compare-name-300-bytes",
        "CLI",
        "compare --name of 300 characters",
        COMPARE + " --out {tmp}/out --name " + LONG,
        r"^error: name '.*' " + TOO_LONG,
        writes=(".",),
    ),
    cli(
        "r2-compare-out-nul",
        "CLI",
        "compare --out with a NUL byte",
        COMPARE + " --out {tmp}/o\x00ut",
        r"^error: --out '.*' " + NUL,
        writes=(".",),
    ),
    cli(
        "r2-compare-name-is-file",
        "CLI",
        "compare --out DIR --name r where DIR/r is a regular file",
        COMPARE + " --out {tmp}/out --name r",
        r"^error: name '.*out/r' is a file, not a folder; remove it or choose another name$",
        writes=("out",),
        setup=file_at("out/r"),
    ),
    api(
        "r2-api-compare-storage-not-utf8",
        "API",
        "br.compare storage_path whose name is not UTF-8",
        lambda tmp: br.compare(
            "toy-negative", budget_s=1, seeds=1, storage_path=f"{tmp}/o\udcffut", progress=False
        ),
        r"^storage_path '.*' " + NOT_UTF8,
        writes=(".",),
    ),
    # --- 5. user code that misbehaves mid-run -------------------------------------------------
    api(
        "r2-upper-none-later",
        "API",
        "upper_loss returns None after its first calls",
        late_solve("upper", lambda x, y: None),
        _returned("upper_loss", "a NoneType"),
    ),
    api(
        "r2-lower-none-later",
        "API",
        "lower_loss returns None after its first calls",
        late_solve("lower", lambda x, y: None),
        _returned("lower_loss", "a NoneType"),
    ),
    api(
        "r2-upper-float-later",
        "API",
        "upper_loss returns a Python float (.item()) after its first calls",
        late_solve("upper", lambda x, y: 1.5),
        _returned("upper_loss", "a float"),
    ),
    api(
        "r2-lower-vector-later",
        "API",
        "lower_loss returns a vector of 2 after its first calls",
        late_solve("lower", lambda x, y: (y["y"] ** 2).repeat(2)),
        _returned("lower_loss", r"a tensor of shape \(2,\)"),
    ),
    api(
        "r2-upper-int-tensor-later",
        "API",
        "upper_loss returns an int64 0-d tensor after its first calls",
        late_solve("upper", lambda x, y: torch.tensor(1)),
        _returned("upper_loss", "a tensor of dtype torch.int64"),
    ),
    api(
        "r2-pbgd-lower-none-later",
        "API",
        "method='pbgd': lower_loss returns None after its first calls",
        late_solve("lower", lambda x, y: None, method="pbgd"),
        _returned("lower_loss", "a NoneType"),
    ),
    api(
        "r2-alt-pbgd-upper-float-later",
        "API",
        "method='alt_pbgd': upper_loss returns a float after its first calls",
        late_solve("upper", lambda x, y: 0.5, method="alt_pbgd"),
        _returned("upper_loss", "a float"),
    ),
    api(
        "r2-f2sa-lower-vector-later",
        "API",
        "method='f2sa': lower_loss returns a vector after its first calls",
        late_solve("lower", lambda x, y: (y["y"] ** 2).repeat(2), method="f2sa"),
        _returned("lower_loss", r"a tensor of shape \(2,\)"),
    ),
    api(
        "r2-bome-upper-none-later",
        "API",
        "method='bome': upper_loss returns None after its first calls",
        late_solve("upper", lambda x, y: None, method="bome"),
        _returned("upper_loss", "a NoneType"),
    ),
    api(
        "r2-implicit-cg-lower-float-later",
        "API",
        "method='implicit_cg': lower_loss returns a float after its first calls",
        late_solve("lower", lambda x, y: 2.0, method="implicit_cg"),
        _returned("lower_loss", "a float"),
    ),
    api(
        "r2-none-later-with-checkpoint",
        "API",
        "upper_loss returns None mid-run of a checkpointed run",
        lambda tmp: late_solve(
            "upper", lambda x, y: None, checkpoint_every=5, checkpoint_path=tmp / CKPT
        )(tmp),
        _returned("upper_loss", "a NoneType"),
    ),
    cli(
        "r2-factory-sys-exit",
        "config file",
        "a factory that calls sys.exit(3)",
        "solve {tmp}/exits.py:factory",
        r"^error: the factory '.*exits\.py:factory' called sys\.exit\(3\): a factory must "
        r"return br\.ProblemSpec\(\.\.\.\) or raise an exception, not exit$",
        setup=exiting_factory,
    ),
    cli(
        "r2-factory-stdlib",
        "config file",
        "the standard library's os:getcwd given as the factory",
        "solve os:getcwd",
        r"^error: factory='os:getcwd' is posix\.getcwd, a function of Python's standard "
        r"library, not a problem factory: give path/to/file\.py:factory",
    ),
    cli(
        "r2-factory-stdlib-one-argument",
        "config file",
        "the standard library's json:dumps given as the factory",
        "solve json:dumps",
        r"^error: factory='json:dumps' is json\.dumps, a function of Python's standard library",
    ),
    # --- 6. reading results -------------------------------------------------------------------
    cli(
        "r2-report-zero-rows",
        "config file",
        "report on a history.parquet with zero rows",
        "report {tmp}/rep",
        r"^error: '.*history\.parquet' holds no rows: the run logged nothing; rerun it with a "
        r"smaller --report-every$",
        writes=("rep",),
        setup=report_folder(rows=0),
    ),
    cli(
        "r2-report-no-columns",
        "config file",
        "report on a history.parquet with no columns",
        "report {tmp}/rep",
        r"^error: '.*history\.parquet' lacks the column\(s\) \['step', 'upper/loss', "
        r"'time/elapsed_s'\]: it was not written by bilevel-ray",
        writes=("rep",),
        setup=_no_columns,
    ),
    cli(
        "r2-report-foreign-parquet",
        "config file",
        "report on a foreign history.parquet (columns a, b)",
        "report {tmp}/rep",
        r"^error: '.*history\.parquet' lacks the column\(s\) \['step', 'upper/loss', "
        r"'time/elapsed_s'\]: .*give a folder written by 'bilevel-ray tune/solve/train --out'$",
        writes=("rep",),
        setup=_foreign,
    ),
    cli(
        "r2-report-no-elapsed",
        "config file",
        "report on a run's history without time/elapsed_s",
        "report {tmp}/rep",
        r"^error: '.*history\.parquet' lacks the column\(s\) \['time/elapsed_s'\]",
        writes=("rep",),
        setup=report_folder(drop=("time/elapsed_s",)),
    ),
    cli(
        "r2-report-trials-no-trial-id",
        "config file",
        "report on a sweep whose trials.parquet has no trial_id",
        "report {tmp}/rep",
        r"^error: '.*trials\.parquet' lacks the column\(s\) \['trial_id'\]",
        writes=("rep",),
        setup=sweep_folder({"status": ["completed"]}, GOOD_HISTORY),
    ),
    cli(
        "r2-report-history-no-trial-id",
        "config file",
        "report on a sweep whose history.parquet has no trial_id",
        "report {tmp}/rep",
        r"^error: '.*history\.parquet' lacks the column\(s\) \['trial_id'\]",
        writes=("rep",),
        setup=sweep_folder(GOOD_TRIALS, {"step": [1], "eval/upper_loss": [1.0]}),
    ),
    cli(
        "r2-report-trials-zero-rows",
        "config file",
        "report on a sweep whose trials.parquet has zero rows",
        "report {tmp}/rep",
        r"^error: '.*trials\.parquet' holds no rows",
        writes=("rep",),
        setup=sweep_folder({"trial_id": pa.array([], pa.string())}, GOOD_HISTORY),
    ),
    cli(
        "r2-report-other-sweeps",
        "config file",
        "report on trials.parquet and history.parquet of different sweeps",
        "report {tmp}/rep",
        r"^error: '.*trials\.parquet' names no trial of history\.parquet: the two files come "
        r"from different sweeps",
        writes=("rep",),
        setup=sweep_folder({**GOOD_TRIALS, "trial_id": ["c", "d"]}, GOOD_HISTORY),
    ),
    cli(
        "r2-report-png-is-folder",
        "config file",
        "report where report.png is a folder",
        "report {tmp}/rep",
        r"^error: report\.png '.*report\.png' " + RUN_NOT_FILE,
        writes=("rep",),
        setup=report_with(lambda tmp: (tmp / "rep" / "report.png").mkdir()),
    ),
    cli(
        "r2-report-gap-tol-nan",
        "CLI",
        "report --gap-tol nan",
        "report {tmp}/rep --gap-tol nan",
        r"^error: gap_tol=nan: must be a finite number >= 0, e\.g\. 0\.1$",
        writes=("rep",),
        setup=report_folder(),
    ),
    cli(
        "r2-report-gap-tol-inf",
        "CLI",
        "report --gap-tol inf",
        "report {tmp}/rep --gap-tol inf",
        r"^error: gap_tol=inf: must be a finite number >= 0",
        writes=("rep",),
        setup=report_folder(),
    ),
    cli(
        "r2-report-gap-tol-negative",
        "CLI",
        "report --gap-tol -1",
        "report {tmp}/rep --gap-tol -1",
        r"^error: gap_tol=-1\.0: must be a finite number >= 0",
        writes=("rep",),
        setup=report_folder(),
    ),
    # --- 7. misleading messages ---------------------------------------------------------------
    api(
        "r2-meta-tensors",
        "API",
        "x0 and y0 hold tensors on the meta device (reported as sharing memory)",
        lambda tmp: solve(
            x0={"x": torch.empty(2, dtype=F64, device="meta")},
            y0={"y": torch.empty(2, dtype=F64, device="meta")},
        ),
        r"^2 problems:\n  - x0\['x'\] is on the meta device: it holds no values; materialise it "
        r".*\n  - y0\['y'\] is on the meta device",
    ),
]


@pytest.fixture
def no_compare_ray(no_ray, monkeypatch):
    """conftest's ``no_ray``, and compare's own reference to ``connect`` refused too."""
    from bilevel_ray.runtime.compare import driver as compare

    def refuse(*args, **kwargs):
        raise no_ray("the input reached Ray before it was refused")

    monkeypatch.setattr(compare, "connect", refuse)
    return no_ray


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_round2(case, tmp_path, no_compare_ray):
    skip = _prepare(case, tmp_path)
    if skip:
        pytest.skip(skip)
    before = {w: _files(tmp_path / w) for w in case.writes}
    seen = _observe(case, tmp_path)
    _check(case, seen)
    for folder in case.writes:  # nothing written, inside the folder or through a link out of it
        assert _files(tmp_path / folder) == before[folder], f"{folder} changed"


def test_round2_is_distinct_and_large():
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({(c.surface, c.given) for c in CASES}) == len(CASES)
    assert len(CASES) + len(SAFE) >= 60


# --- links planted where a run writes: replaced, never written through ---------------------------


def _plant_link(tmp: Path, relative: str) -> Path:
    """tmp/<relative> is a link to outside/target.txt; returns the target."""
    target = _outside(tmp) / "target.txt"
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
    before = _files(tmp_path / "outside")
    run(tmp_path)
    assert target.read_text() == "not yours\n", "written through the link"
    assert _files(tmp_path / "outside") == before, "a file appeared outside the run's folder"
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


def test_report_shows_no_control_characters(tmp_path):
    folder = tmp_path / "rep"
    folder.mkdir()
    trials = {**GOOD_TRIALS, "trial_id": ["\x1b[2J\x1b]0;owned\x07a", "b"]}
    history = {**GOOD_HISTORY, "trial_id": trials["trial_id"]}
    pq.write_table(pa.table(trials), folder / "trials.parquet")
    pq.write_table(pa.table(history), folder / "history.parquet")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", str(folder)]) == 0
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue()
    assert "?[2J" in out.getvalue()


def test_a_wrong_return_keeps_the_history_written(tmp_path):
    """The history up to the failing step is still written (a finished part is not lost)."""
    history = tmp_path / "h.parquet"
    with pytest.raises(br.ConfigError, match=r"upper_loss returned a NoneType at step \d+"):
        late_solve("upper", lambda x, y: None, history_path=history)(tmp_path)
    assert pq.read_table(history).num_rows >= 1
    assert math.isfinite(pq.read_table(history).column("upper/loss")[0].as_py())


def test_an_unreachable_ray_address_from_the_environment_is_named(monkeypatch):
    """Without --address Ray reads RAY_ADDRESS: the message names it, not 'address=None'."""
    import ray

    from bilevel_ray.runtime.cluster import session as ray_session

    monkeypatch.setattr(os, "environ", {**os.environ, "RAY_ADDRESS": "10.255.0.1:6379"})
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def unreachable(**kwargs):
        raise ConnectionError("timed out")

    monkeypatch.setattr(ray, "init", unreachable)
    with pytest.raises(
        br.ConfigError,
        match=r"^RAY_ADDRESS='10\.255\.0\.1:6379' \(from the environment\): cannot connect to a "
        r"Ray cluster \(timed out\); start it with .*, or unset RAY_ADDRESS for a local Ray$",
    ):
        ray_session.connect()


class Mine(Exception):
    """The user's own exception."""


def test_the_users_own_exceptions_propagate_as_they_are():
    from bilevel_ray.problems import build_spec

    def factory(config):
        raise Mine("from the factory")

    with pytest.raises(Mine, match="from the factory"):
        build_spec(factory, {})

    def raises(x, y):
        raise Mine("from the loss")

    with pytest.raises(Mine, match="from the loss"):
        late_solve("upper", raises)(Path("."))
