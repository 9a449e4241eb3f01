"""The catalogue's cases of every input class, together: distinct, covering every surface, and
written as one Markdown table (input | expected error | observed).

This file sorts after the class files, so a full run has observed every case by the time the
table is written; a case not run in this session (e.g. with -k) is observed here, in this
process.
"""

from __future__ import annotations

from . import (
    test_cli,
    test_data,
    test_files,
    test_numbers,
    test_paths,
    test_records,
    test_settings,
    test_tracking,
    test_user_code,
)
from .catalogue import OBSERVED, catalogue_markdown, observe, prepare

CLASSES = {
    "paths": test_paths,
    "numbers": test_numbers,
    "settings": test_settings,
    "user code": test_user_code,
    "files": test_files,
    "data": test_data,
    "cli": test_cli,
    "records": test_records,
    "tracking": test_tracking,
}
ALL = [(kind, case) for kind, module in CLASSES.items() for case in module.CASES]
CASES = [case for _, case in ALL]


def test_case_ids_and_inputs_are_distinct():
    assert len({case.id for case in CASES}) == len(CASES)
    assert len({(case.surface, case.given) for case in CASES}) == len(CASES)


def test_the_catalogue_covers_every_surface_and_class():
    assert len(CASES) + len(test_paths.SAFE) >= 35 + 60
    assert {case.surface for case in CASES} == {"API", "CLI", "config file", "data"}
    assert all(module.CASES for module in CLASSES.values())
    assert len([case for case in CASES if case.process]) >= 3


def test_catalogue_table(tmp_path, no_compare_ray):
    """Writes the table; a case not run in this session (e.g. with -k) is observed here, in
    this process."""
    observed = dict(OBSERVED)
    for case in CASES:
        if case.id not in observed:
            tmp = tmp_path / case.id
            tmp.mkdir()
            skip = prepare(case, tmp)
            observed[case.id] = f"skipped: {skip}" if skip else observe(case, tmp).text(tmp)
    table = catalogue_markdown(ALL, observed)
    (tmp_path / "bad_input_catalogue.md").write_text(table)
    assert table.count("\n") == len(CASES) + 2
