"""The catalogue format: one :class:`Case` per bad input, its runner and its checks.

Each case names one bad input, the surface it enters through (``API``, ``CLI``, ``config file``,
``data``), the error expected and a regex the message must match: the regex names the argument
or file and the fix. An API case must raise ``br.ConfigError``. A CLI case must exit with code 2,
print one message on stderr (``error: ...`` or argparse's usage line; a ConfigError listing N
problems prints ``error: N problems:`` and N indented lines) and no traceback; the cases marked
``process`` run ``python -m bilevel_ray`` in a child process, which proves it where Python itself
would print the traceback. For each folder in ``writes`` (always including any folder outside
the requested one a link points to) no file may be new or changed after the call.

Nothing reaches Ray: connecting to it or starting a worker group fails the case (the
``no_compare_ray`` fixture), so a refusal that comes only after Ray starts counts as a gap. Every
case is refused before the run's first step, or (user code that misbehaves mid-run) with a
message that names the loss and the step.

Cases with ``fix=...`` are library gaps, strict xfails whose reason names the change that makes
them pass. The class files (``test_<class>.py``) each hold a ``CASES`` list and run it with
:func:`run_case`; ``test_whole_catalogue.py`` checks them together and writes the table.

Below the runner: the setups (files and folders a case needs) that cases of several classes
use.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bilevel_ray as br
from bilevel_ray.cli import main
from bilevel_ray.problems.representation import FEATURES
from bilevel_ray.runtime.local.history import HISTORY_SCHEMA

from .support import Quad, solve

ROOT = Path(__file__).resolve().parents[2]


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


# --- running a case ------------------------------------------------------------------------------


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


def argv(case: Case, tmp: Path) -> list[str]:
    return [arg.replace("{tmp}", str(tmp)) for arg in case.run]


def prepare(case: Case, tmp: Path) -> str | None:
    """The case's files in ``tmp``; a reason to skip, or None."""
    write_inputs(tmp)
    return case.setup(tmp) if case.setup is not None else None


def observe(case: Case, tmp: Path) -> Observed:
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
            code = main(argv(case, tmp))
    except Exception as error:
        return Observed(raised=error, out=out.getvalue(), err=err.getvalue())
    return Observed(code=code, out=out.getvalue(), err=err.getvalue())


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
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


def check(case: Case, seen: Observed) -> None:
    if not case.cli:
        assert isinstance(seen.raised, br.ConfigError), seen.text()
        assert re.search(case.match, str(seen.raised)), str(seen.raised)
        return
    assert seen.raised is None, f"main() raised {seen.text()}"
    assert "Traceback" not in seen.out + seen.err, seen.err
    assert seen.code == 2, f"exit {seen.code}: {seen.err}"
    _check_stderr(seen.err)
    assert re.search(case.match, seen.err, re.MULTILINE), seen.err


# What each case run in this session observed, by case id (test_whole_catalogue's table).
OBSERVED: dict[str, str] = {}


def params(cases: list[Case]) -> list[Any]:
    """The cases as pytest parameters, by id; a case with ``fix`` is a strict xfail."""
    out = []
    for case in cases:
        marks = []
        if case.fix is not None:
            marks.append(pytest.mark.xfail(strict=True, reason=f"needs fix: {case.fix}"))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def start_children(cases: list[Case], tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The ``process`` cases of ``cases`` as ``python -m bilevel_ray`` children, started
    together (each takes seconds to import torch); yields case id -> (folder, files before,
    child) and kills what is still running at the end."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = {}
    for case in cases:
        if not case.process:
            continue
        tmp = tmp_path_factory.mktemp(case.id)
        assert prepare(case, tmp) is None
        before = {w: files_under(tmp / w) for w in case.writes}
        child = subprocess.Popen(
            [sys.executable, "-m", "bilevel_ray", *argv(case, tmp)],
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


def _children_wanted(request, cases: list[Case]) -> bool:
    """Whether this session runs a ``process`` case of this module."""
    ids = {
        item.callspec.id
        for item in request.session.items
        if item.path == request.node.path and hasattr(item, "callspec")
    }
    return any(case.id in ids for case in cases if case.process)


def run_case(case: Case, tmp_path: Path, request, cases: list[Case]) -> None:
    """Run ``case`` (one of the module's ``cases``) and check it: the error, the message and
    that no folder in ``writes`` changed. Needs the ``no_compare_ray`` fixture."""
    # The children start with the module's first case, so they import torch while others run.
    children = request.getfixturevalue("children") if _children_wanted(request, cases) else {}
    if case.process:
        tmp, before, child = children[case.id]
        out, err = child.communicate(timeout=120)
        seen = Observed(code=child.returncode, out=out, err=err)
    else:
        tmp = tmp_path
        skip = prepare(case, tmp)
        if skip:
            OBSERVED[case.id] = f"skipped: {skip}"
            pytest.skip(skip)
        before = {w: files_under(tmp / w) for w in case.writes}
        seen = observe(case, tmp)
    OBSERVED[case.id] = seen.text(tmp)
    check(case, seen)
    for folder in case.writes:  # nothing written, inside the folder or through a link out of it
        assert files_under(tmp / folder) == before[folder], f"{folder} changed"


# --- the catalogue as a table --------------------------------------------------------------------


def _cell(text: str, limit: int = 150) -> str:
    text = " ".join("".join(ch if ch.isprintable() else "?" for ch in text).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|")


def catalogue_markdown(cases: list[tuple[str, Case]], observed: dict[str, str]) -> str:
    """The catalogue as a Markdown table: input | expected error | observed; ``cases`` are
    (input class, case) pairs."""
    lines = [
        "| # | id | class | surface | input | expected error | observed |",
        "|---|---|---|---|---|---|---|",
    ]
    for number, (kind, case) in enumerate(cases, 1):
        expected = f"{case.expected}; `{case.match}`"
        seen = observed.get(case.id, "(not run)")
        if case.fix is not None:
            seen = f"GAP (xfail): {seen}"
        lines.append(
            f"| {number} | {case.id} | {kind} | {case.surface} | {_cell(case.given)} | "
            f"{_cell(expected, 120)} | {_cell(seen)} |"
        )
    return "\n".join(lines) + "\n"


# --- the small bad files every case's folder holds ---------------------------------------------


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


# --- commands and setups that cases of several classes use -------------------------------------

SOLVE = "solve toy-negative --steps 2 --report-every 1"
TUNE = "tune toy-negative --samples 2 --max-steps 5"
COMPARE = "compare toy-negative --budget 1 --seeds 1 --quiet"
TRAIN = "train toy-negative --workers 1 --steps 2 --report-every 1 --quiet"
CKPT = "ck/c.pt"  # the checkpoint the resume cases start from, in the case's folder
RUN_NOT_FILE = r"is a folder; give a file path in it \(or move the folder away\)$"
NOT_REGULAR = r"is not a regular file \(a FIFO, socket or device\); remove it or give another path"


def trained(tmp: Path) -> None:
    """A two-step run of :class:`~.support.Quad` with a checkpoint at tmp/ck/c.pt."""
    solve(checkpoint_path=tmp / CKPT, checkpoint_every=1, steps=2)


def folder_at(relative: str) -> Callable[[Path], None]:
    """A folder planted where a file goes."""

    def setup(tmp: Path) -> None:
        (tmp / relative).mkdir(parents=True)

    return setup


def fifo_at(relative: str) -> Callable[[Path], str | None]:
    """A FIFO planted where a file goes (a read of it would hang)."""

    def setup(tmp: Path) -> str | None:
        if not hasattr(os, "mkfifo"):
            return "no FIFOs on this platform"
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(tmp / relative)
        return None

    return setup


def outside(tmp: Path) -> Path:
    """A folder outside the requested one, with a file a link can point at."""
    folder = tmp / "outside"
    folder.mkdir(exist_ok=True)
    (folder / "target.txt").write_text("not yours\n")
    return folder


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


def report_with(extra: Callable[[Path], None], **kw: Any) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        write_run_report(tmp, **kw)
        extra(tmp)

    return setup


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


def factory(name: str, **config: Any) -> Callable[[Path], Any]:
    """A built-in problem factory called with ``config`` (what br.solve / train / tune do)."""
    from bilevel_ray.problems import BUILTIN_PROBLEMS

    return lambda tmp: BUILTIN_PROBLEMS[name](config)


def needs_peft() -> str | None:
    from importlib.util import find_spec

    if find_spec("peft") is None or find_spec("transformers") is None:
        return "needs pip install 'bilevel_ray[peft]'"
    return None


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
    """A 30-step run whose ``level`` loss turns into ``bad`` after its first calls."""

    def run(tmp: Path) -> Any:
        problem = Quad(**{level: late(bad)})
        return solve(problem=problem, method=method, steps=30, **kw)

    return run
