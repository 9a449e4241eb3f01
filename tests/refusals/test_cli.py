"""Refusals of command-line usage: flags argparse refuses, ``KEY=VALUE`` arguments that are not,
JSON that does not parse, and a run setting given as a solver setting.

Each exits with code 2 and one message on stderr (``error: ...`` or argparse's usage line with
``(see --help)``), no traceback. A bad *value* given on the command line is in the class of the
value (``test_numbers``, ``test_settings``, ``test_paths``, ...).
"""

from __future__ import annotations

import pytest

from .catalogue import TUNE, cli, params, run_case

CASES = [
    cli(
        "cli-bad-gpu",
        "CLI",
        "train --gpu maybe",
        "train regression --workers 1 --gpu maybe",
        match=r"^bilevel-ray train: argument --gpu: invalid choice: 'maybe' \(choose from .*auto"
        r".*yes.*no.*\) \(see --help\)$",
    ),
    cli(
        "cli-steps-not-int",
        "CLI",
        "solve --steps 1e3",
        "solve toy-negative --steps 1e3",
        match=r"^bilevel-ray solve: argument --steps: invalid int value: '1e3' \(see --help\)$",
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
        "cli-space-malformed-json",
        "CLI",
        "tune --space 'gamma={\"loguniform\": [1,'",
        TUNE + """ --space 'gamma={"loguniform": [1,' --out {tmp}/sweeps""",
        match=r"^error: --space gamma=.*\bJSON\b",
        writes=("sweeps",),
    ),
    cli(
        "cli-space-no-equals",
        "CLI",
        "tune --space gamma",
        TUNE + " --space gamma",
        match=r"^error: --space 'gamma': expected KEY=VALUE, e\.g\. --space gamma=20$",
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case, tmp_path, request, no_compare_ray):
    run_case(case, tmp_path, request, CASES)
