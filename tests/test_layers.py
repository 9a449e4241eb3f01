"""The house's rules, read from the imports of every module (nested imports included):

* the core (problem, data, tree, schedules, ...), the solvers, the diagnostics, the built-in
  problems and the records (manifests) import neither Ray nor the runtimes;
* the local room (the in-process run) imports no Ray and no other runtime room;
* Ray Train's room does not import Ray Tune's, nor compare's or report's;
* only the CLI parses a command line (argparse);
* ``import bilevel_ray`` loads no Ray.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bilevel_ray"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _modules(*parts: str) -> list[Path]:
    root = PACKAGE.joinpath(*parts)
    return sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]


def _offending(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in paths:
        for name in sorted(_imports(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.name} ({path.parent.name}) imports {name}")
    return bad


CORE = [p for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
RULES = {
    "core": (CORE, ("ray", "bilevel_ray.runtime", "bilevel_ray.cli")),
    "solvers": (_modules("solvers"), ("ray", "bilevel_ray.runtime", "bilevel_ray.cli")),
    "diagnostics": (_modules("diagnostics"), ("ray", "bilevel_ray.runtime", "bilevel_ray.cli")),
    "problems": (_modules("problems"), ("ray", "bilevel_ray.runtime", "bilevel_ray.cli")),
    # The records (manifests, fingerprints, continuation): on the floor, so that every room
    # and the command line can use them.
    "records": (_modules("records"), ("ray", "bilevel_ray.runtime", "bilevel_ray.cli")),
    "local": (
        _modules("runtime", "local"),
        (
            "ray",
            "bilevel_ray.runtime.cluster",
            "bilevel_ray.runtime.train",
            "bilevel_ray.runtime.tune",
            "bilevel_ray.runtime.compare",
            "bilevel_ray.runtime.report",
            "bilevel_ray.cli",
        ),
    ),
    "train": (
        _modules("runtime", "train"),
        (
            "bilevel_ray.runtime.tune",
            "bilevel_ray.runtime.compare",
            "bilevel_ray.runtime.report",
            "bilevel_ray.cli",
        ),
    ),
    # Tracking (MLflow, TensorBoard, Ray's callbacks): every runtime uses it, so it imports
    # none of them, nor the command line; Ray only lazily, where Ray work runs.
    "tracking": (_modules("tracking"), ("bilevel_ray.runtime", "bilevel_ray.cli")),
    "tune": (
        _modules("runtime", "tune"),
        ("bilevel_ray.runtime.compare", "bilevel_ray.runtime.report", "bilevel_ray.cli"),
    ),
}


@pytest.mark.parametrize("room", sorted(RULES))
def test_a_room_imports_only_what_lies_below_it(room):
    paths, forbidden = RULES[room]
    assert paths, f"no modules found for {room}"
    assert _offending(paths, forbidden) == []


def test_only_the_cli_parses_a_command_line():
    outside = [p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts[:1]]
    outside = [p for p in outside if p.name != "cli.py"]
    assert _offending(outside, ("argparse",)) == []


def test_importing_the_package_loads_no_ray():
    code = "import sys, bilevel_ray; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_rules_catch_a_forbidden_import(tmp_path):
    # The checker itself: a nested import of Tune inside a function is found.
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from bilevel_ray.runtime.tune.driver import run_sweep\n")
    assert _offending([module], ("bilevel_ray.runtime.tune",)) != []
