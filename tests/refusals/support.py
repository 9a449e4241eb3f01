"""Tiny, valid calls that the refusal tests vary, and the check that a call is refused before
its first step.

``br.solve`` must refuse bad input *before* any step runs, which :func:`assert_refused_before_start`
checks with a problem that counts its loss evaluations; ``br.train`` must refuse it before Ray
starts, which the ``no_ray`` fixture (tests/conftest.py) checks by making any start of Ray fail.
Everything runs in float64 on problems with one or two scalars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import bilevel_ray as br

F64 = torch.float64


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# --- br.solve with a problem that counts its loss evaluations ----------------------------------


class CountingProblem:
    """f = (x - 1)^2 + (y - x)^2, g = (y - x)^2, counting every loss evaluation.

    ``upper`` / ``lower`` replace a loss by ``fn(x, y)`` to build a broken problem.
    """

    def __init__(self, upper=None, lower=None):
        self.calls = {"upper": 0, "lower": 0}
        self._upper = upper or (lambda x, y: ((x["x"] - 1) ** 2 + (y["y"] - x["x"]) ** 2).sum())
        self._lower = lower or (lambda x, y: ((y["y"] - x["x"]) ** 2).sum())

    def upper_loss(self, x, y, batch):
        self.calls["upper"] += 1
        return self._upper(x, y)

    def lower_loss(self, x, y, batch):
        self.calls["lower"] += 1
        return self._lower(x, y)


NO_CALLS = {"upper": 0, "lower": 0}


def solve_args(**overrides):
    """Keyword arguments of a tiny, valid ``br.solve`` call, with ``overrides`` applied."""
    args = {
        "problem": CountingProblem(),
        "x0": {"x": t64(2.0)},
        "y0": {"y": t64(0.0)},
        "steps": 3,
        "report_every": 1,
    }
    args.update(overrides)
    return args


def _snapshot(group):
    if not isinstance(group, dict):
        return group
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in group.items()}


def assert_refused_before_start(match: str, **overrides) -> br.ConfigError:
    """``br.solve`` raises ConfigError matching ``match`` without evaluating a loss, and leaves
    x0 / y0 as they were."""
    args = solve_args(**overrides)
    before = {level: _snapshot(args[level]) for level in ("x0", "y0")}
    with pytest.raises(br.ConfigError, match=match) as info:
        br.solve(**args)
    if isinstance(args["problem"], CountingProblem):
        assert args["problem"].calls == NO_CALLS
    for level, group in before.items():
        if isinstance(group, dict):
            assert group.keys() == args[level].keys()
            for k, v in group.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, args[level][k])
    return info.value


def negative_toy():
    """The toy-negative problem, x0 and y0."""
    spec = br.problems.BUILTIN_PROBLEMS["toy-negative"]({})
    return spec.problem, spec.x0, spec.y0


# --- the same problem without counting, and a linear fit on (inputs, targets) batches ----------


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


def rows(n: int, features: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random (inputs, targets) rows of ``features`` inputs, fixed by (n, features)."""
    gen = torch.Generator().manual_seed(n * 10 + features)
    inputs = torch.randn(n, features, generator=gen, dtype=F64)
    return inputs, torch.randn(n, generator=gen, dtype=F64)


def solve(**overrides: Any) -> Any:
    """A tiny, valid ``br.solve`` call of :class:`Quad` with ``overrides`` applied."""
    args = {
        "problem": Quad(),
        "x0": {"x": t64(2.0)},
        "y0": {"y": t64(0.0)},
        "steps": 3,
        "report_every": 1,
    }
    args.update(overrides)
    return br.solve(**args)


# --- br.train in this process ------------------------------------------------------------------


def train_args(tmp_path: Path, **overrides):
    """Keyword arguments of a tiny, valid, in-process ``br.train`` call."""
    args = {
        "factory": "toy-negative",
        "steps": 3,
        "report_every": 1,
        "num_workers": 1,
        "storage_path": tmp_path / "runs",
        "name": "run",
    }
    args.update(overrides)
    return args


def spec_factory(**overrides):
    """A factory of the counting problem's ProblemSpec, with ``overrides`` applied."""
    spec = {"problem": CountingProblem(), "x0": {"x": t64(2.0)}, "y0": {"y": t64(0.0)}}
    spec.update(overrides)
    return lambda config: br.ProblemSpec(**spec)


DATASETS = {"upper": object(), "lower": object()}  # never read: refused before Ray starts


def assert_train_refused(tmp_path: Path, overrides: dict[str, Any], match: str) -> None:
    """``br.train`` refuses ``overrides`` (ConfigError matching ``match``) and runs or saves
    nothing (use with the ``no_ray`` fixture)."""
    with pytest.raises(br.ConfigError, match=match):
        br.train(**train_args(tmp_path, **overrides))
    assert not (tmp_path / "runs" / "run").exists()  # nothing was run or saved
