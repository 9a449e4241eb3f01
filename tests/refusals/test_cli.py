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


DEEP_LIST = "[" * 60000 + "]" * 60000  # 120,000 characters: over the size bound
DEEP_OBJECT = '{"a":' * 2000 + "1" + "}" * 2000  # under the size bound, past the parser's depth
NESTED_70 = "[" * 70 + "]" * 70  # parses, but deeper than any setting
TOO_LONG_VALUE = (
    r": the value is [\d,]+ characters, over the 65,536 a setting can be; give a "
    r"shorter value$"
)
TOO_DEEP = r": the value nests deeper than 64 levels of lists or objects; give a flatter value$"

# JSON values are bounded in size and depth; a key given twice is refused, not overridden.
CASES += [
    cli(
        "cli-config-huge-nested-json",
        "CLI",
        "solve --config seed=<60000 nested lists>",
        "solve quadratic --steps 20 --config seed=" + DEEP_LIST + " --out {tmp}/out",
        r"^error: --config seed" + TOO_LONG_VALUE,
        writes=("out",),
    ),
    cli(
        "cli-set-deep-json",
        "CLI",
        "solve --set gamma=<2000 nested objects> (a RecursionError in the parser)",
        "solve quadratic --steps 20 --set gamma=" + DEEP_OBJECT.replace('"', '\\"'),
        r"^error: --set gamma" + TOO_DEEP,
    ),
    cli(
        "cli-set-nested-70",
        "CLI",
        "solve --set gamma=<70 nested lists>",
        "solve quadratic --steps 20 --set gamma=" + NESTED_70,
        r"^error: --set gamma" + TOO_DEEP,
    ),
    cli(
        "cli-space-deep-json",
        "CLI",
        "tune --space gamma=<2000 nested objects>",
        TUNE + " --space gamma=" + DEEP_OBJECT.replace('"', '\\"') + " --out {tmp}/sweeps",
        r"^error: --space gamma" + TOO_DEEP,
        writes=("sweeps",),
    ),
    cli(
        "cli-config-key-twice",
        "CLI",
        "--config seed=1 --config seed=2",
        "solve quadratic --steps 20 --config seed=1 --config seed=2",
        r"^error: --config seed=\.\.\.: given twice \(seed='1' and seed='2'\); give each key "
        r"once$",
    ),
    cli(
        "cli-set-key-twice",
        "CLI",
        "--set gamma=1 --set gamma=2",
        "solve quadratic --steps 20 --set gamma=1 --set gamma=2",
        r"^error: --set gamma=\.\.\.: given twice \(gamma='1' and gamma='2'\); give each key "
        r"once$",
    ),
    cli(
        "cli-set-json-key-twice",
        "CLI",
        """--set 'lr_x={"kind":"constant","value":0.1,"value":5}'""",
        """solve quadratic --steps 20 --set 'lr_x={"kind":"constant","value":0.1,"value":5}'""",
        r"^error: --set lr_x: the JSON object names the key 'value' twice \(only the last would "
        r"count\); give each key once$",
    ),
    cli(
        "cli-space-key-twice",
        "CLI",
        "tune --space gamma=... --space gamma=...",
        TUNE + """ --space 'gamma={"loguniform": [1, 10]}' --space 'gamma=[1, 2]'"""
        " --out {tmp}/sweeps",
        r"^error: --space gamma=\.\.\.: given twice",
        writes=("sweeps",),
    ),
    cli(
        "cli-diagnose-no-problem",
        "CLI",
        "diagnose without PROBLEM or --at-end",
        "diagnose --quiet",
        r"^error: diagnose needs PROBLEM \(a built-in name or file\.py:factory\), or --at-end "
        r"RUN_DIR",
    ),
]


def test_json_values_that_are_fine_still_parse():
    """Nesting and length within the bounds, and plain strings, read as before."""
    from bilevel_ray.cli.common import key_values

    got = key_values(["a=[[1, 2]]", 'b={"kind": "constant", "value": 0.1}', "c=adam"], "--set")
    assert got == {"a": [[1, 2]], "b": {"kind": "constant", "value": 0.1}, "c": "adam"}
    assert key_values(["d=" + "[" * 64 + "]" * 64], "--set")["d"] is not None


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case, tmp_path, request, no_compare_ray):
    run_case(case, tmp_path, request, CASES)
