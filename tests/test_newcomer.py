"""What a newcomer follows: the README's set-up section, the scripts it names, and the extras they
install."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"]


def test_the_scripts_install_the_extras_the_readme_names():
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    test = (ROOT / "scripts" / "test.sh").read_text()
    assert "\nbash scripts/setup.sh demo " in demo
    assert "\nbash scripts/setup.sh test\n" in test
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()  # CI's one command


def test_the_demo_extra_is_part_of_the_test_extra():
    extras = _extras()
    names = {
        name: {canonicalize_name(Requirement(r).name) for r in reqs}
        for name, reqs in extras.items()
    }
    assert names["demo"] == {"matplotlib", "optuna"}
    assert names["demo"] <= names["test"]
    for one in ("plot", "optuna", "examples", "peft"):  # every example's extra is tested
        assert names[one] <= names["test"], one


def _requirement_closure(root: str, extras: set[str]) -> set[str]:
    """The installed distributions ``root[extras]`` pulls in, transitively."""
    seen: set[str] = set()
    todo = [(canonicalize_name(root), frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            environments = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(e) for e in environments):
                continue
            dep = canonicalize_name(req.name)
            if dep not in seen:
                seen.add(dep)
                todo.append((dep, frozenset(req.extras)))
    return seen


def _third_party_imports(folder: Path) -> set[str]:
    modules: set[str] = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module.split(".")[0])
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", "") == "importorskip"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                modules.add(str(node.args[0].value).split(".")[0])
    local = {p.stem for p in folder.glob("*.py")} | {"bilevel_ray", "isolated_runs"}
    return {m for m in modules if m not in sys.stdlib_module_names and m not in local}


def test_the_test_extra_holds_everything_the_tests_import():
    try:
        metadata.distribution("bilevel_ray")
    except metadata.PackageNotFoundError:
        pytest.skip("bilevel_ray is not installed (pip install -e '.[test]')")
    installed = _requirement_closure("bilevel_ray", {"test"})
    providers = metadata.packages_distributions()
    missing = {}
    for module in sorted(_third_party_imports(ROOT / "tests")):
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        if not dists & installed:
            missing[module] = sorted(dists) or "not installed"
    assert not missing, f"imported by tests/ but not in bilevel_ray[test]: {missing}"


def test_demo_refuses_an_unknown_argument_before_setting_anything_up(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh"), "--fast"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == "demo.sh: unknown argument '--fast' (the only option is --quiet)\n"
    assert "[setup]" not in done.stdout + done.stderr
