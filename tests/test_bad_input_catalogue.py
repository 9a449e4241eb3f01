"""A catalogue of bad input across the API, the CLI, config files and data.

Each :class:`Case` names one bad input, the surface it enters through (``API``, ``CLI``,
``config file``, ``data``), the error expected and a regex the message must match: the regex
names the argument or file and the fix. An API case must raise ``br.ConfigError``. A CLI case
must exit with code 2, print one message on stderr (``error: ...`` or argparse's usage line; a
ConfigError listing N problems prints ``error: N problems:`` and N indented lines) and no
traceback; the cases marked ``process`` run ``python -m bilevel_ray`` in a child process, which
proves it where Python itself would print the traceback. A case that names an output (``--out``,
``history_path``, ``checkpoint_path``, a run name) must leave no new or changed file behind.

Nothing here reaches Ray: connecting to it or starting a worker group fails the case, so a
refusal that comes only after Ray starts counts as a gap. Every case is refused before a solver
step runs, so the file takes seconds.

Cases with ``fix=...`` are library gaps, strict xfails whose reason names the change that makes
them pass. ``test_catalogue_table`` writes the catalogue as a Markdown table (input | expected
error | observed).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.problems.representation import FEATURES

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# --- the problems and files the cases use -----------------------------------------------------


class Quad:
    """f = (x - 1)^2 + (y - x)^2, g = (y - x)^2; ``upper`` / ``lower`` replace a loss."""

    def __init__(self, upper=None, lower=None):
        self._upper = upper or (lambda x, y: ((x["x"] - 1) ** 2 + (y["y"] - x["x"]) ** 2).sum())
        self._lower = lower or (lambda x, y: ((y["y"] - x["x"]) ** 2).sum())

    def upper_loss(self, x, y, batch):
        return self._upper(x, y)

    def lower_loss(self, x, y, batch):
        return self._lower(x, y)


class LinearFit:
    """Both levels fit ``inputs @ w + b`` to targets; x = {w}, y = {b}; batches are
    (inputs, targets)."""

    def upper_loss(self, x, y, batch):
        inputs, targets = batch
        return ((inputs @ x["w"] + y["b"] - targets) ** 2).mean()

    def lower_loss(self, x, y, batch):
        inputs, targets = batch
        return ((inputs @ x["w"] + y["b"] - targets) ** 2).mean() + (y["b"] ** 2).sum()


LINEAR_X0 = {"w": torch.zeros(3, dtype=F64)}
LINEAR_Y0 = {"b": torch.zeros(1, dtype=F64)}


def _rows(n: int, features: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n * 10 + features)
    inputs = torch.randn(n, features, generator=gen, dtype=F64)
    return inputs, torch.randn(n, generator=gen, dtype=F64)


def solve(**overrides: Any) -> Any:
    """A tiny, valid ``br.solve`` call with ``overrides`` applied."""
    args = {
        "problem": Quad(),
        "x0": {"x": t64(2.0)},
        "y0": {"y": t64(0.0)},
        "steps": 3,
        "report_every": 1,
    }
    args.update(overrides)
    return br.solve(**args)


def _nlsy_csv(path: Path, rows: int = 40, cell: Callable[[int, str], str] | None = None) -> None:
    """A CSV in the representation problem's format; ``cell(row, column)`` overrides values."""
    columns = ["income", "gender", *FEATURES]
    lines = [",".join(columns)]
    for i in range(rows):
        values = {c: "1.5" for c in columns}
        values["gender"] = str(i % 2)
        if cell is not None:
            values.update({c: cell(i, c) for c in columns if cell(i, c) is not None})
        lines.append(",".join(values[c] for c in columns))
    path.write_text("\n".join(lines) + "\n")


def write_inputs(tmp: Path) -> None:
    """Every small bad file the cases name, written into the case's own folder."""
    (tmp / "broken.py").write_text("def factory(config)\n    return None\n")
    (tmp / "nofactory.py").write_text("def build(config):\n    return None\n")
    (tmp / "returns_none.py").write_text("def factory(config):\n    return None\n")
    (tmp / "blocker").write_text("a file where a folder is expected")
    (tmp / "not_parquet.parquet").write_text("name,value\nu,1\n")
    pq.write_table(pa.table({"a": [1.0, math.nan, 3.0]}), tmp / "nan.parquet")
    pq.write_table(pa.table({"a": pa.array([], pa.float64())}), tmp / "empty.parquet")
    pq.write_table(pa.table({"a": [1.0, 2.0], "label": ["u", "v"]}), tmp / "labels.parquet")
    pq.write_table(pa.table({"income": [1.0], "gender": [0]}), tmp / "table.parquet")
    (tmp / "short.csv").write_text("income,gender\n1.0,0\n2.0,1\n")
    _nlsy_csv(tmp / "header_only.csv", rows=0)
    _nlsy_csv(tmp / "text_cell.csv", cell=lambda i, c: "high" if (i, c) == (0, "income") else None)
    _nlsy_csv(tmp / "blank_cells.csv", cell=lambda i, c: "" if (i, c) == (3, "age") else None)
    run = tmp / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(random.Random(0).randbytes(256))
    (tmp / "empty_dir").mkdir()
    (tmp / "bad_report").mkdir()
    (tmp / "bad_report" / "history.parquet").write_bytes(random.Random(1).randbytes(64))


def trained_run(tmp: Path) -> None:
    """A one-worker run (in this process) with a checkpoint in tmp/runs/r."""
    argv = ["train", "regression", "--workers", "1", "--steps", "2", "--report-every", "1"]
    argv += ["--checkpoint-every", "1", "--out", str(tmp / "runs"), "--name", "r", "--quiet"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0


def readonly_folder(tmp: Path) -> str | None:
    """tmp/locked with mode 0o500; a reason to skip where it stays writable (root)."""
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):
        locked.chmod(0o700)
        return "a 0o500 folder is writable here (running as root)"
    return None


def no_eval_factory(config: dict[str, Any]) -> br.ProblemSpec:
    return br.ProblemSpec(Quad(), {"x": t64(2.0)}, {"y": t64(0.0)})


# --- the catalogue ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    surface: str  # API, CLI, config file, data
    given: str  # the bad input, in words
    run: Callable[[Path], Any] | tuple[str, ...]  # API: run(tmp); CLI: argv, {tmp} = case folder
    match: str  # the message must match this (re.search)
    writes: tuple[str, ...] = ()  # folders under tmp that must hold no new or changed file
    setup: Callable[[Path], str | None] | None = None  # returns a reason to skip, or None
    process: bool = False  # CLI: run `python -m bilevel_ray` in a child process
    fix: str | None = None  # a library gap: the change that makes the case pass

    @property
    def cli(self) -> bool:
        return isinstance(self.run, tuple)

    @property
    def expected(self) -> str:
        return "exit 2, one line, no traceback" if self.cli else "ConfigError"


def api(case_id, surface, given, run, match, **kw) -> Case:
    return Case(case_id, surface, given, run, match, **kw)


def cli(case_id, surface, given, command, match, **kw) -> Case:
    """``command``: the arguments of ``bilevel-ray`` as a shell would split them."""
    return Case(case_id, surface, given, tuple(shlex.split(command)), match, **kw)


TUNE = "tune toy-negative --samples 2 --max-steps 5"
RESUME_R = "train regression --workers 1 --steps 4 --report-every 1 --checkpoint-every 1 "
RESUME_R += "--out {tmp}/runs --name r"

CASES = [
    # --- API: br.solve, br.tune, br.train --------------------------------------------------------
    api(
        "api-int-x0",
        "API",
        "x0 holds an int64 tensor",
        lambda tmp: solve(x0={"x": torch.tensor([2])}),
        r"^x0\['x'\] has dtype torch\.int64: must be floating point; use \.float\(\) or "
        r"\.double\(\)$",
    ),
    api(
        "api-nan-x0",
        "API",
        "x0 holds NaN",
        lambda tmp: solve(x0={"x": t64(math.nan)}),
        r"upper_loss is nan at the initial point: fix x0 / y0 or the data",
    ),
    api(
        "api-inf-y0",
        "API",
        "y0 holds +Inf",
        lambda tmp: solve(y0={"y": t64(math.inf)}),
        r"lower_loss is inf at the initial point: fix x0 / y0 or the data",
    ),
    api(
        "api-zero-lr",
        "API",
        "lr_y=0",
        lambda tmp: solve(lr_y=0.0),
        r"^lr_y=0\.0: must stay > 0 at every step; e\.g\. lr_y=0\.01$",
    ),
    api(
        "api-negative-gamma",
        "API",
        "gamma=-1",
        lambda tmp: solve(gamma=-1.0),
        r"^gamma=-1\.0: must stay > 0 at every step; e\.g\. gamma=\d",
    ),
    api(
        "api-negative-ramp",
        "API",
        "a gamma schedule that crosses zero (linear 10 -> -1)",
        lambda tmp: solve(gamma=br.schedules.linear(10.0, -1.0, 2)),
        r"^gamma=linear\(.*end_value=-1\.0.*\): must stay > 0 at every step; e\.g\. gamma=",
    ),
    api(
        "api-negative-steps",
        "API",
        "steps=-5",
        lambda tmp: solve(steps=-5),
        r"^steps=-5: must be an integer >= 1$",
    ),
    api(
        "api-negative-inner-steps",
        "API",
        "inner_steps=-1",
        lambda tmp: solve(inner_steps=-1),
        r"^inner_steps=-1: must be an integer >= 1",
    ),
    api(
        "api-unknown-key",
        "API",
        "unknown keyword learning_rate=0.1",
        lambda tmp: solve(learning_rate=0.1),
        r"^unknown keyword\(s\) \['learning_rate'\]; solver settings are: .*\blr_x\b.*; run "
        r"settings are: steps, ",
    ),
    api(
        "api-method-typo",
        "API",
        "method='pbgd-free' (hyphen)",
        lambda tmp: solve(method="pbgd-free"),
        r"^method='pbgd-free': unknown; choose one of pbgd_free, pbgd, alt_pbgd, ",
    ),
    api(
        "api-option-of-other-method",
        "API",
        "cg_steps=5 with method='pbgd_free'",
        lambda tmp: solve(cg_steps=5),
        r"^cg_steps=5 does not apply to method='pbgd_free' \(only to implicit_cg\); remove it$",
    ),
    api(
        "api-vector-loss",
        "API",
        "upper_loss returns a per-element vector",
        lambda tmp: solve(
            problem=Quad(upper=lambda x, y: (y["y"] - x["x"]) ** 2 + x["x"]),
            x0={"x": t64(1.0, 2.0, 3.0)},
            y0={"y": t64(0.0, 0.0, 0.0)},
        ),
        r"^upper_loss returned a tensor of shape \(3,\): must be a scalar \(0-d\) tensor; reduce "
        r"it with \.mean\(\) or \.sum\(\)$",
    ),
    api(
        "api-loss-ignores-y",
        "API",
        "lower_loss reads y through .detach()",
        lambda tmp: solve(problem=Quad(lower=lambda x, y: ((y["y"].detach() - x["x"]) ** 2).sum())),
        r"^lower_loss does not depend on y: its gradient is undefined; compute it from the x and "
        r"y it receives \(not from copies or \.detach\(\)ed tensors\)",
    ),
    api(
        "api-shared-tensor",
        "API",
        "x0 and y0 hold the same tensor",
        lambda tmp: solve(x0={"x": (w := torch.zeros(2, dtype=F64))}, y0={"y": w}),
        r"^x0\['x'\] and y0\['y'\] share a memory range .*: each level needs its own; pass a "
        r"\.clone\(\) or untie the weights$",
    ),
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
    api(
        "api-tune-unknown-space-key",
        "API",
        "br.tune search_space={'gama': 5.0}",
        lambda tmp: br.tune(
            "toy-negative", search_space={"gama": 5.0}, storage_path=tmp / "sweeps", steps=5
        ),
        r"^search_space has unknown key\(s\) \['gama'\]; the allowed ones are: .*\bgamma\b",
        writes=("sweeps",),
    ),
    api(
        "api-tune-no-eval-data",
        "API",
        "br.tune on a factory without eval_data",
        lambda tmp: br.tune(no_eval_factory, storage_path=tmp / "sweeps", steps=5),
        r"^tune scores trials on held-out data: the factory must return eval_data="
        r"br\.BilevelBatch\(upper_heldout, lower_sample\)",
        writes=("sweeps",),
    ),
    api(
        "api-tune-unknown-scheduler",
        "API",
        "br.tune scheduler='hyperband'",
        lambda tmp: br.tune(
            "toy-negative",
            scheduler="hyperband",
            search_space={"gamma": 5.0},
            storage_path=tmp / "sweeps",
            steps=5,
        ),
        r"^scheduler='hyperband': use .*'asha', None or a ray\.tune scheduler$",
        writes=("sweeps",),
    ),
    api(
        "api-train-negative-cpus",
        "API",
        "br.train resources_per_worker={'CPU': -1} with 2 workers",
        lambda tmp: br.train(
            "toy-negative",
            num_workers=2,
            resources_per_worker={"CPU": -1},
            steps=3,
            storage_path=tmp / "runs",
            name="r",
        ),
        r"^resources_per_worker=\{'CPU': -1\}: .*(> ?0|>= ?0|positive)",
        writes=("runs",),
    ),
    # --- data: in-memory tensors, Arrow / Parquet, the representation problem's CSV -------------
    api(
        "data-nan-full-batch",
        "data",
        "NaN in an upper-level feature tensor (br.full_batch)",
        lambda tmp: br.full_batch((t64(1.0, math.nan).unsqueeze(1), t64(1.0, 2.0)), _rows(2)),
        r"^upper: item 0 holds 1 NaN/Inf values; clean or impute them before solving$",
    ),
    api(
        "data-inf-minibatches",
        "data",
        "+Inf in a lower-level target tensor (br.minibatches)",
        lambda tmp: br.minibatches(_rows(4), (_rows(4)[0], t64(1.0, 2.0, math.inf, 4.0)), 2),
        r"^lower: item 1 holds 1 NaN/Inf values; clean or impute them before solving$",
    ),
    api(
        "data-nan-parquet",
        "data",
        "NaN in a Parquet column (br.table_minibatches)",
        lambda tmp: br.table_minibatches(tmp / "nan.parquet", pa.table({"a": [1.0, 2.0]}), 1),
        r"^upper: item 0 holds 1 NaN/Inf values; clean or impute them before solving$",
    ),
    api(
        "data-parquet-missing-column",
        "data",
        "columns=['a', 'b'] where the lower table has only 'a'",
        lambda tmp: br.table_minibatches(
            pa.table({"a": [1.0, 2.0], "b": [3.0, 4.0]}),
            pa.table({"a": [1.0, 2.0]}),
            1,
            columns=["a", "b"],
        ),
        r"^columns \['b'\] are not in the table; it has: a$",
    ),
    api(
        "data-parquet-absent",
        "data",
        "a Parquet path that does not exist",
        lambda tmp: br.table_minibatches(tmp / "absent.parquet", tmp / "nan.parquet", 1),
        r"^Parquet source '.*absent\.parquet' does not exist$",
    ),
    api(
        "data-not-parquet",
        "data",
        "a CSV text file named .parquet",
        lambda tmp: br.table_minibatches(tmp / "not_parquet.parquet", tmp / "nan.parquet", 1),
        r"^cannot read Parquet '.*not_parquet\.parquet': .*Parquet",
    ),
    api(
        "data-parquet-string-column",
        "data",
        "a Parquet file with a string column",
        lambda tmp: br.table_minibatches(tmp / "labels.parquet", pa.table({"a": [1.0]}), 1),
        r"^column 'label' has type string: only numeric, boolean and fixed-size list columns can "
        r"become tensors; select other columns with columns=\[\.\.\.\]$",
    ),
    api(
        "data-empty-parquet",
        "data",
        "a Parquet file with 0 rows",
        lambda tmp: br.table_minibatches(tmp / "empty.parquet", pa.table({"a": [1.0]}), 1),
        r"^upper: item 0 is empty \(0 samples\); give at least one sample$",
    ),
    api(
        "data-empty-tensor",
        "data",
        "lower-level tensors with 0 rows (br.minibatches)",
        lambda tmp: br.minibatches(_rows(4), (torch.zeros(0, 3), torch.zeros(0)), 2),
        r"^2 problems:\n  - lower: item 0 is empty \(0 samples\); give at least one sample\n  - "
        r"lower: item 1 is empty",
    ),
    api(
        "data-ul-ll-shape-mismatch",
        "data",
        "upper inputs have 3 features, lower inputs 4",
        lambda tmp: br.solve(
            LinearFit(), LINEAR_X0, LINEAR_Y0, data=br.full_batch(_rows(8, 3), _rows(8, 4)), steps=2
        ),
        r"^lower_loss raised RuntimeError at the initial point: .*\(check the parameter names in "
        r"x0 / y0 and the batch format the loss expects\)$",
    ),
    api(
        "data-rows-mismatch-in-level",
        "data",
        "8 lower-level inputs but 7 targets",
        lambda tmp: br.minibatches(_rows(8), (_rows(8)[0], _rows(7)[1]), 2),
        r"^lower: tensors have different numbers of samples \[8, 7\]; every tensor of a level "
        r"must have the same leading dimension$",
    ),
    api(
        "data-int-features",
        "data",
        "int64 inputs fed to a float64 model",
        lambda tmp: br.solve(
            LinearFit(),
            LINEAR_X0,
            LINEAR_Y0,
            data=br.full_batch((torch.ones(8, 3, dtype=torch.int64), _rows(8)[1]), _rows(8)),
            steps=2,
        ),
        r"^upper_loss raised RuntimeError at the initial point: .*(dtype|Long).*\(check the "
        r"parameter names in x0 / y0 and the batch format the loss expects\)$",
    ),
    api(
        "data-batch-larger-than-data",
        "data",
        "batch_size=10 for 8 lower-level rows",
        lambda tmp: br.minibatches(_rows(16), _rows(8), 10),
        r"^batch_size for lower=10: must be an integer in \[1, 8\] \(the lower-level data has 8 "
        r"samples\)$",
    ),
    cli(
        "data-csv-absent",
        "data",
        "representation --config data=<a CSV that does not exist>",
        "solve representation --config data={tmp}/absent.csv --out {tmp}/out",
        match=r"^error: representation data '.*absent\.csv' does not exist$",
        writes=("out",),
    ),
    cli(
        "data-csv-missing-columns",
        "data",
        "representation CSV with only income and gender",
        "solve representation --config data={tmp}/short.csv",
        match=r"^error: representation data '.*short\.csv' lacks the columns \['afqt89', 'age', ",
    ),
    cli(
        "data-csv-blank-cells",
        "data",
        "representation CSV with an empty cell",
        "solve representation --config data={tmp}/blank_cells.csv",
        match=r"^error: upper: item 0 holds \d+ NaN/Inf values; clean or impute them before "
        r"solving$",
    ),
    cli(
        "data-csv-is-parquet",
        "data",
        "representation --config data=<a Parquet file>",
        "solve representation --config data={tmp}/table.parquet",
        match=r"^error: .*representation data '.*table\.parquet'.*CSV",
    ),
    cli(
        "data-csv-text-cell",
        "data",
        "representation CSV with the word 'high' in the income column",
        "solve representation --config data={tmp}/text_cell.csv",
        match=r"^error: representation data '.*text_cell\.csv': column 'income' .*(number|numeric)",
    ),
    cli(
        "data-csv-header-only",
        "data",
        "representation CSV with a header and no rows",
        "solve representation --config data={tmp}/header_only.csv",
        match=r"^error: representation data '.*header_only\.csv' has no rows",
    ),
    # --- config files: problem factory files, checkpoints, run folders --------------------------
    cli(
        "file-factory-syntax-error",
        "config file",
        "a factory file with a syntax error",
        "solve {tmp}/broken.py:factory",
        match=r"^error: problem '.*broken\.py:factory': importing '.*broken\.py' failed "
        r"\(SyntaxError: ",
        process=True,
    ),
    cli(
        "file-factory-missing",
        "config file",
        "file.py:make where the file defines no make",
        "train {tmp}/nofactory.py:make --workers 1 --out {tmp}/out",
        match=r"^error: problem '.*nofactory\.py:make': '.*nofactory\.py' has no callable named "
        r"'make'$",
        writes=("out",),
    ),
    cli(
        "file-factory-returns-none",
        "config file",
        "a factory that returns None",
        "solve {tmp}/returns_none.py:factory",
        match=r"^error: the factory returned a NoneType: it must return br\.ProblemSpec\(",
    ),
    api(
        "file-corrupt-checkpoint",
        "config file",
        "resume from a checkpoint of 256 random bytes",
        lambda tmp: solve(checkpoint_path=tmp / "run" / "ckpt.pt", checkpoint_every=1, resume=True),
        r"^checkpoint '.*ckpt\.pt' cannot be read \(\w+\): it is truncated, corrupted or not a "
        r"bilevel_ray checkpoint\. Delete it to start afresh\.$",
        writes=("run",),
    ),
    cli(
        "file-checkpoint-other-settings",
        "config file",
        "train resumes a run with another --set lr_x",
        RESUME_R + " --set lr_x=0.5",
        match=r"^error: checkpoint '.*checkpoint\.pt' was written with other solver settings "
        r"\(\{.*'lr_x': 0\.02.*\}\); resume with the same settings, or start a new run",
        writes=("runs",),
        setup=trained_run,
    ),
    cli(
        "file-checkpoint-other-seed",
        "config file",
        "train resumes a run with another --seed",
        RESUME_R + " --seed 3",
        match=r"^error: checkpoint '.*checkpoint\.pt' was written with seed=0, not seed=3: the "
        r"data stream would differ; resume with the same seed, or start a new run$",
        writes=("runs",),
        setup=trained_run,
    ),
    cli(
        "file-report-no-runs",
        "config file",
        "report on a folder without runs",
        "report {tmp}/empty_dir",
        match=r"^error: '.*empty_dir' holds no history\.parquet: give a folder written by "
        r"'bilevel-ray tune --out', 'solve --out' or 'train --out'$",
        writes=("empty_dir",),
    ),
    cli(
        "file-report-corrupt-history",
        "config file",
        "report on a folder whose history.parquet is random bytes",
        "report {tmp}/bad_report",
        match=r"^error: .*history\.parquet.*(cannot be read|cannot read|corrupted|not a Parquet)",
        writes=("bad_report",),
    ),
    # --- CLI: flags, --set / --config / --space values, folders ---------------------------------
    cli(
        "cli-zero-workers",
        "CLI",
        "train --workers 0",
        "train regression --workers 0 --out {tmp}/out",
        match=r"^error: num_workers=0: must be an integer >= 1$",
        writes=("out",),
        process=True,
    ),
    cli(
        "cli-bad-gpu",
        "CLI",
        "train --gpu maybe",
        "train regression --workers 1 --gpu maybe",
        match=r"^bilevel-ray train: argument --gpu: invalid choice: 'maybe' \(choose from .*auto"
        r".*yes.*no.*\) \(see --help\)$",
    ),
    cli(
        "cli-negative-max-failures",
        "CLI",
        "train --max-failures -1",
        "train regression --workers 1 --max-failures -1 --out {tmp}/out",
        match=r"^error: max_failures=-1: must be an integer >= 0$",
        writes=("out",),
    ),
    cli(
        "cli-unknown-set-key",
        "CLI",
        "solve --set lr=0.1",
        "solve toy-negative --set lr=0.1 --out {tmp}/out",
        match=r"^error: unknown keyword\(s\) \['lr'\]; solver settings are: .*\blr_x\b",
        writes=("out",),
    ),
    cli(
        "cli-run-setting-in-set",
        "CLI",
        "solve --set steps=5",
        "solve toy-negative --set steps=5",
        match=r"^error: --set steps=\.\.\.: a run setting, not a solver setting; use --steps "
        r"instead$",
    ),
    cli(
        "cli-zero-gamma",
        "CLI",
        "solve --set gamma=0",
        "solve toy-negative --set gamma=0 --out {tmp}/out",
        match=r"^error: gamma=0: must stay > 0 at every step; e\.g\. gamma=\d",
        writes=("out",),
        process=True,
    ),
    cli(
        "cli-nan-gamma",
        "CLI",
        "solve --set gamma=NaN",
        "solve toy-negative --set gamma=NaN",
        match=r"^error: gamma=nan: must be a finite number$",
    ),
    cli(
        "cli-zero-inner-steps",
        "CLI",
        "solve --method alt_pbgd --set inner_steps=0",
        "solve toy-negative --method alt_pbgd --set inner_steps=0",
        match=r"^error: inner_steps=0: must be an integer >= 1",
    ),
    cli(
        "cli-zero-report-every",
        "CLI",
        "solve --report-every 0",
        "solve toy-negative --report-every 0 --out {tmp}/out",
        match=r"^error: report_every=0: must be an integer >= 1$",
        writes=("out",),
    ),
    cli(
        "cli-steps-not-int",
        "CLI",
        "solve --steps 1e3",
        "solve toy-negative --steps 1e3",
        match=r"^bilevel-ray solve: argument --steps: invalid int value: '1e3' \(see --help\)$",
    ),
    cli(
        "cli-zero-diagnose-window",
        "CLI",
        "solve --on-unsuitable stop --diagnose-window 0",
        "solve toy-negative --on-unsuitable stop --diagnose-window 0",
        match=r"^error: diagnose_window=0: must be an integer >= 1$",
    ),
    cli(
        "cli-unknown-problem",
        "CLI",
        "solve toy_negative (underscore)",
        "solve toy_negative",
        match=r"^error: problem 'toy_negative': not a built-in \(toy-negative, toy-positive, .*\) "
        r"and not of the form path/to/file\.py:factory or package\.module:factory$",
    ),
    cli(
        "cli-unknown-config-key",
        "CLI",
        "solve quadratic --config dimx=3",
        "solve quadratic --config dimx=3",
        match=r"^error: problem 'quadratic' has no setting\(s\) \['dimx'\]; its settings are: "
        r"dim_x, dim_y, ",
    ),
    cli(
        "cli-int-dtype",
        "CLI",
        "solve quadratic --config dtype=int64",
        "solve quadratic --config dtype=int64",
        match=r"^error: problem 'quadratic': dtype='int64' is not a floating torch dtype; use "
        r"float64 or float32$",
    ),
    cli(
        "cli-nan-x0",
        "CLI",
        "solve toy-negative --config x0=NaN",
        "solve toy-negative --config x0=NaN",
        match=r"^error: 2 problems:\n  - upper_loss is nan at the initial point: fix x0 / y0 or "
        r"the data",
    ),
    cli(
        "cli-text-x0",
        "CLI",
        "solve toy-negative --config x0='\"abc\"'",
        "solve toy-negative --config 'x0=\"abc\"'",
        match=r"^error: problem 'toy-negative': x0='abc'.*number",
    ),
    cli(
        "cli-zero-dim",
        "CLI",
        "solve quadratic --config dim_x=0",
        "solve quadratic --config dim_x=0",
        match=r"^error: problem 'quadratic': dim_x=0: must be an integer >= 1",
    ),
    cli(
        "cli-zero-hidden",
        "CLI",
        "solve representation --config hidden=0",
        "solve representation --config hidden=0 --config n=200 --config batch_size=20 --steps 1",
        match=r"^error: problem 'representation': hidden=0: must be an integer >= 1",
    ),
    cli(
        "cli-test-fraction",
        "CLI",
        "solve representation --config test_fraction=1.5",
        "solve representation --config test_fraction=1.5 --config n=200",
        match=r"^error: problem 'representation': test_fraction=1\.5: must be",
    ),
    cli(
        "cli-space-malformed-json",
        "CLI",
        "tune --space 'gamma={\"loguniform\": [1,'",
        TUNE + """ --space 'gamma={"loguniform": [1,' --out {tmp}/sweeps""",
        match=r"^error: --space gamma=.*\bJSON\b",
        writes=("sweeps",),
    ),
    cli(
        "cli-space-empty-range",
        "CLI",
        "tune --space 'gamma={\"loguniform\": [10, 1]}'",
        TUNE + """ --space 'gamma={"loguniform": [10, 1]}' --out {tmp}/sweeps""",
        match=r"^error: --space gamma=\{'loguniform': \[10, 1\]\}: .*(low|lower|bound)",
        writes=("sweeps",),
    ),
    cli(
        "cli-space-no-equals",
        "CLI",
        "tune --space gamma",
        TUNE + " --space gamma",
        match=r"^error: --space 'gamma': expected KEY=VALUE, e\.g\. --space gamma=20$",
    ),
    cli(
        "cli-negative-gap-tol",
        "CLI",
        "tune --gap-tol -1",
        TUNE + """ --space 'gamma={"loguniform": [1, 10]}' --gap-tol -1 --out {tmp}/sweeps""",
        match=r"^error: gap_tol=-1\.0: must be a number >= 0$",
        writes=("sweeps",),
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
    cli(
        "cli-run-name-escapes-out",
        "CLI",
        "train --out DIR --name ../escaped",
        "train toy-negative --workers 1 --steps 2 --out {tmp}/out --name ../escaped --quiet",
        match=r"^error: .*name='\.\./escaped': must be a plain folder name",
        writes=(".",),
    ),
    cli(
        "cli-diagnose-negative-gamma",
        "CLI",
        "diagnose --gamma -1",
        "diagnose toy-negative --gamma -1",
        match=r"^error: gamma=-1\.0: must be a finite number > 0; the penalty to diagnose at, "
        r"e\.g\. 10\.0$",
    ),
    cli(
        "cli-diagnose-unknown-option",
        "CLI",
        "diagnose --set foo=1",
        "diagnose toy-negative --set foo=1",
        match=r"^error: unknown (keyword|option)\(s\) \['foo'\]; .*\bsolve_steps\b",
    ),
]


# --- running a case -----------------------------------------------------------------------------


@dataclass
class Observed:
    raised: BaseException | None = None  # what the API call or main() raised
    code: int | None = None  # the CLI's exit code
    out: str = ""
    err: str = ""

    def text(self, tmp: Path | None = None) -> str:
        """One line: the error's type and message, or the exit code and stderr; the case's
        folder shows as <tmp>."""
        if self.raised is not None:
            text = f"{type(self.raised).__name__}: {self.raised}"
        elif self.code is None:
            text = "no error"
        else:
            text = f"exit {self.code}: {self.err.strip() or '(nothing on stderr)'}"
        if tmp is not None:
            text = text.replace(str(tmp), "<tmp>")
        return " ".join(text.split())


def _argv(case: Case, tmp: Path) -> list[str]:
    return [arg.replace("{tmp}", str(tmp)) for arg in case.run]


def _prepare(case: Case, tmp: Path) -> str | None:
    write_inputs(tmp)
    return case.setup(tmp) if case.setup is not None else None


def _observe(case: Case, tmp: Path) -> Observed:
    """Run the case in this process."""
    if not case.cli:
        try:
            case.run(tmp)
        except Exception as err:
            return Observed(raised=err)
        return Observed()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(_argv(case, tmp))
    except Exception as error:
        return Observed(raised=error, out=out.getvalue(), err=err.getvalue())
    return Observed(code=code, out=out.getvalue(), err=err.getvalue())


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def _check_stderr(err: str) -> None:
    """One message: one line, or ``error: N problems:`` and N indented lines."""
    lines = err.rstrip("\n").splitlines()
    assert lines, "nothing on stderr"
    assert lines[0].startswith(("error: ", "bilevel-ray")), lines[0]
    several = re.fullmatch(r"error: (\d+) problems:", lines[0])
    if several:
        assert len(lines) == 1 + int(several.group(1)), err
        assert all(line.startswith("  - ") for line in lines[1:]), err
    else:
        assert len(lines) == 1, err


def _check(case: Case, seen: Observed) -> None:
    if not case.cli:
        assert isinstance(seen.raised, br.ConfigError), seen.text()
        assert re.search(case.match, str(seen.raised)), str(seen.raised)
        return
    assert seen.raised is None, f"main() raised {seen.text()}"
    assert "Traceback" not in seen.out + seen.err, seen.err
    assert seen.code == 2, f"exit {seen.code}: {seen.err}"
    _check_stderr(seen.err)
    assert re.search(case.match, seen.err, re.MULTILINE), seen.err


_OBSERVED: dict[str, str] = {}
PROCESS_CASES = [case for case in CASES if case.process]


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """The ``process`` cases as ``python -m bilevel_ray`` children, started together (each
    takes seconds to import torch); case id -> (folder, files before, child)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = {}
    for case in PROCESS_CASES:
        tmp = tmp_path_factory.mktemp(case.id)
        assert _prepare(case, tmp) is None
        before = {w: _files(tmp / w) for w in case.writes}
        child = subprocess.Popen(
            [sys.executable, "-m", "bilevel_ray", *_argv(case, tmp)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp,
        )
        started[case.id] = (tmp, before, child)
    yield started
    for _, _, child in started.values():
        if child.poll() is None:
            child.kill()
            child.wait()


def _param(case: Case) -> Any:
    marks = []
    if case.fix is not None:
        marks.append(pytest.mark.xfail(strict=True, reason=f"needs fix: {case.fix}"))
    return pytest.param(case, id=case.id, marks=marks)


def _children_wanted(request) -> bool:
    """Whether this session runs a ``process`` case."""
    ids = {
        item.callspec.id
        for item in request.session.items
        if item.path == request.node.path and hasattr(item, "callspec")
    }
    return any(case.id in ids for case in PROCESS_CASES)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_bad_input(case, tmp_path, request, no_ray):
    # The children start with the first case, so they import torch while the others run.
    children = request.getfixturevalue("children") if _children_wanted(request) else {}
    if case.process:
        tmp, before, child = children[case.id]
        out, err = child.communicate(timeout=120)
        seen = Observed(code=child.returncode, out=out, err=err)
    else:
        tmp = tmp_path
        skip = _prepare(case, tmp)
        if skip:
            _OBSERVED[case.id] = f"skipped: {skip}"
            pytest.skip(skip)
        before = {w: _files(tmp / w) for w in case.writes}
        seen = _observe(case, tmp)
    _OBSERVED[case.id] = seen.text(tmp)
    _check(case, seen)
    for folder in case.writes:  # no partial output: every file as it was before the call
        assert _files(tmp / folder) == before[folder], f"{folder} changed"


# --- the catalogue as a table -------------------------------------------------------------------


def _cell(text: str, limit: int = 150) -> str:
    text = " ".join("".join(ch if ch.isprintable() else "?" for ch in text).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|")


def catalogue_markdown(observed: dict[str, str]) -> str:
    """The catalogue as a Markdown table: input | expected error | observed."""
    lines = [
        "| # | id | surface | input | expected error | observed |",
        "|---|---|---|---|---|---|",
    ]
    for number, case in enumerate(CASES, 1):
        expected = f"{case.expected}; `{case.match}`"
        seen = observed.get(case.id, "(not run)")
        if case.fix is not None:
            seen = f"GAP (xfail): {seen}"
        lines.append(
            f"| {number} | {case.id} | {case.surface} | {_cell(case.given)} | "
            f"{_cell(expected, 120)} | {_cell(seen)} |"
        )
    return "\n".join(lines) + "\n"


def test_catalogue_is_distinct_and_covers_every_surface():
    assert len(CASES) >= 35
    assert len({case.id for case in CASES}) == len(CASES)
    assert len({(case.surface, case.given) for case in CASES}) == len(CASES)
    assert {case.surface for case in CASES} == {"API", "CLI", "config file", "data"}
    assert len(PROCESS_CASES) >= 3


def test_catalogue_table(tmp_path, no_ray):
    """Writes the table; a case not run in this session (e.g. with -k) is observed here, in
    this process."""
    observed = dict(_OBSERVED)
    for case in CASES:
        if case.id not in observed:
            tmp = tmp_path / case.id
            tmp.mkdir()
            skip = _prepare(case, tmp)
            observed[case.id] = f"skipped: {skip}" if skip else _observe(case, tmp).text(tmp)
    table = catalogue_markdown(observed)
    (tmp_path / "bad_input_catalogue.md").write_text(table)
    assert table.count("\n") == len(CASES) + 2
