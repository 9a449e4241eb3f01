"""``br.compare(resume=True)``: continue a comparison that did not finish, in its folder.

By the time this runs the folder is claimed (:mod:`~bilevel_ray.runtime.compare.claim`) and the
call is checked against the comparison's manifest (:func:`~bilevel_ray.records.continuation.
check_continuation`: the problem, its config, its data and every setting, each difference
named). Each (method, seed) run's checkpoint (:mod:`~bilevel_ray.runtime.compare.finished`) is
then read: a sound one is a finished run, its curve written back to ``curves/`` from the
checkpoint (the table is made from what was checked); a file that is not sound (cut short,
edited, another comparison's, its parameters gone) is not trusted: it is removed and the run
runs again, said on stderr. The runs without a checkpoint run, their leftovers (a curve or
parameters a killed run left) removed first, so that the table holds only what the runs now
produce.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from bilevel_ray.runtime.compare.finished import RUNS, read_finished, run_name, run_row
from bilevel_ray.runtime.compare.trial import CURVES, PARAMS_FOLDER
from bilevel_ray.runtime.local.history import write_parquet

__all__ = ["Resumed", "read_runs"]


@dataclass
class Resumed:
    """What a resume found: the rows of the runs read from the folder, the runs to run, and
    the checkpoints not trusted (run name -> why)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    todo: list[tuple[str, int]] = field(default_factory=list)
    untrusted: dict[str, str] = field(default_factory=dict)

    @property
    def read(self) -> list[str]:
        return [run_name(r["method"], r["seed"]) for r in self.rows]

    def line(self) -> str:
        """The progress line: how many runs were read, and which run now."""
        total = len(self.rows) + len(self.todo)
        todo = ", ".join(f"{m} seed {s}" for m, s in self.todo) or "none"
        return (
            f"resuming: {len(self.rows)} of {total} runs read from the folder (runs/); "
            f"running the other {len(self.todo)}: {todo}"
        )

    def to_dict(self) -> dict[str, Any]:
        """compare.json's record of the resume."""
        return {
            "runs_read": self.read,
            "runs_run": [run_name(m, s) for m, s in self.todo],
            "untrusted": dict(self.untrusted),
        }


def read_runs(folder: Path, key: str, methods: list[str], seeds: int) -> Resumed:
    """The runs of ``methods`` x ``seeds`` finished in ``folder`` (checkpoints of the
    comparison ``key``), and the others, their leftovers removed (module docstring)."""
    found = Resumed()
    for method in methods:
        for seed in range(seeds):
            record, why = read_finished(folder, key, method, seed)
            name = run_name(method, seed)
            if record is not None:
                found.rows.append(run_row(method, seed, record["report"]))
                table = pa.Table.from_pylist(record["curve"])
                write_parquet(table, folder / CURVES / f"{name}.parquet")
                continue
            if why is not None:
                found.untrusted[name] = why
                print(
                    f"warning: {RUNS}/{name}.json is not trusted ({why}): removed; "
                    f"{method} seed {seed} runs again",
                    file=sys.stderr,
                )
            for leftover in (
                folder / RUNS / f"{name}.json",
                folder / CURVES / f"{name}.parquet",
                folder / PARAMS_FOLDER / f"{name}.pt",
            ):
                _remove(leftover)
            found.todo.append((method, seed))
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
