"""A user's factory reaches the workers: a ``file.py:factory`` that imports a module beside it,
and a factory passed as a Python object from the user's own module. The workers are stood in for
by a fresh Python process that has neither file on its path (what a Ray worker on another node,
or in another folder, sees): it receives the factory as Ray ships it (cloudpickle) and builds
the problem."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

from bilevel_ray.problems import build_spec
from bilevel_ray.runtime.cluster.shipping import portable_factory

PROBLEM = """
import torch
import bilevel_ray as br
from mydata import load  # a module beside this file


class Quadratic:
    def upper_loss(self, x, y, batch):
        return ((x["x"] - 1) ** 2).sum() + ((y["y"] - x["x"]) ** 2).sum()

    def lower_loss(self, x, y, batch):
        return ((y["y"] - x["x"]) ** 2).sum()


def factory(config):
    start = load()
    return br.ProblemSpec(Quadratic(), {"x": start.clone()}, {"y": start.clone()})
"""
DATA = "import torch\n\n\ndef load():\n    return torch.tensor([3.0], dtype=torch.float64)\n"

WORKER = """
import pickle, sys
factory = pickle.loads(sys.stdin.buffer.read())
spec = factory({})
print(float(spec.x0["x"]))
"""


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "problem.py").write_text(textwrap.dedent(PROBLEM))
    (folder / "mydata.py").write_text(DATA)
    yield folder
    sys.modules.pop("mydata", None)
    sys.modules.pop("bilevel_ray_user_problem", None)
    if str(folder) in sys.path:
        sys.path.remove(str(folder))


def _in_a_fresh_worker(factory, tmp_path) -> str:
    from ray import cloudpickle

    out = subprocess.run(
        [sys.executable, "-c", WORKER],
        input=cloudpickle.dumps(factory),
        capture_output=True,
        cwd=tmp_path,  # neither user file is importable from here
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    return out.stdout.decode().strip()


def test_a_factory_file_that_imports_a_module_beside_it_loads_and_ships(user_files, tmp_path):
    ref = f"{user_files / 'problem.py'}:factory"
    spec = build_spec(ref, {})  # the driver: the file's folder is on the import path
    assert float(spec.x0["x"]) == 3.0
    assert _in_a_fresh_worker(portable_factory(ref), tmp_path) == "3.0"


def test_a_factory_object_from_the_users_own_module_ships_by_value(user_files, tmp_path):
    # ``from problem import factory`` in a notebook opened beside the files.
    sys.path.insert(0, str(user_files))
    try:
        factory = importlib.import_module("problem").factory
        assert _in_a_fresh_worker(portable_factory(factory), tmp_path) == "3.0"
    finally:
        sys.modules.pop("problem", None)


def test_a_built_in_or_installed_factory_goes_as_it_is():
    from bilevel_ray.problems.toys import negative_toy

    assert portable_factory("toy-negative") == "toy-negative"
    assert portable_factory(negative_toy) is negative_toy
