"""The tracking room's place in the house: every runtime may use it, so it imports none of
them (nor the CLI, nor argparse); and importing it loads neither Ray, MLflow nor tensorboardX,
so that ``br.solve`` without a tracker pays nothing for it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOM = Path(__file__).resolve().parents[2] / "bilevel_ray" / "tracking"
FORBIDDEN = ("bilevel_ray.runtime", "bilevel_ray.cli", "argparse")
HEAVY = ("ray", "mlflow", "tensorboardX", "tensorboard", "torch")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):  # nested imports included
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_room_imports_no_runtime_and_no_command_line():
    modules = sorted(ROOM.glob("*.py"))
    assert len(modules) >= 8
    bad = [
        f"{path.name} imports {name}"
        for path in modules
        for name in sorted(_imports(path))
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    ]
    assert bad == []


def test_importing_the_room_loads_no_tracker_and_no_ray():
    code = (
        f"import sys, bilevel_ray.tracking; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_module_stays_small():
    # One concept per file.
    sizes = {p.name: len(p.read_text().splitlines()) for p in ROOM.glob("*.py")}
    assert max(sizes.values()) <= 250, sizes
