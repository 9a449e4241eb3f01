"""The bilevel objective phi(x) = f(x, y*(x)) on the data f is defined on.

phi is what the paper's question is about: does dropping the correction cost PBGD-Free the
bilevel objective? It is measured on f's own rows (the run's upper-level data, all of it) with
y*(x) = argmin_y g(x, y) on g's rows (all of them), solved by L-BFGS from a given y (the run's
own: never a stationary point of another objective, where a solver would stop at once).

The rows: deterministic data is one batch; ``br.full_batch`` / ``br.minibatches`` data is its
whole tensors (at most ``max_rows`` rows per level, strided, so that a large set costs a bounded
pass); a pair of batch sources is its first ``source_batches`` batches per level, averaged.
A float32 problem with at most ``max_promote`` parameters is evaluated in float64 where the
problem accepts float64 inputs (its losses are tried once): differences of phi at the 1e-6
level would otherwise sit at float32's rounding of the solve; one that is not is solved to at
least sqrt(eps) (the price's floor), a tolerance its rounding allows.

The solve takes at most ``solve_steps`` (:data:`SOLVE_STEPS`) L-BFGS iterations, each one
evaluation of g on its rows (of the head alone, for a
:class:`~bilevel_ray.problem.FeatureProblem`). A solve that spends them all still descending
has not found y*(x) and is reported as such (``solved`` = 0): on a lower level without a
minimiser (an output head that memorises g's rows) f at the iterate moves with the budget, so
the value is not phi, and the end check stops there instead of paying the budget at every point.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel_ray.data import BilevelBatch, FullBatch, Minibatches, _sample_count, _take
from bilevel_ray.diagnostics.responses import lbfgs_solve, level_losses, norm
from bilevel_ray.problem import BilevelProblem
from bilevel_ray.solvers.base import grads_of, identity_reduce
from bilevel_ray.tree import Params

__all__ = ["SOLVE_STEPS", "Objective"]

# L-BFGS iterations y*(x) may take. A lower level with a minimiser near the run's y is solved to
# 1e-7 in tens of iterations (at most 150 in the test suite, on a float64 network); one that
# uses them all without meeting the tolerance or stalling at rounding has not found y*(x), and
# iterating on only moves phi (a head that memorises g's rows: its weights grow without bound).
SOLVE_STEPS = 250


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor in it cast to ``dtype`` (tuples, lists, dicts)."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_cast(v, dtype) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _strided(value: Any, max_rows: int) -> Any:
    n = _sample_count(value)
    if n <= max_rows:
        return value
    return _take(value, torch.arange(0, n, math.ceil(n / max_rows)))


def level_rows(data: Any, max_rows: int = 20000, source_batches: int = 8) -> list[BilevelBatch]:
    """f's and g's rows as a list of batches whose losses are averaged (module docstring)."""
    if data is None:
        return [BilevelBatch(None, None)]
    if isinstance(data, (FullBatch, Minibatches)):
        return [BilevelBatch(_strided(data.upper, max_rows), _strided(data.lower, max_rows))]
    upper, lower = data
    ups = list(itertools.islice(iter(upper), source_batches))
    lows = list(itertools.islice(iter(lower), source_batches))
    return [BilevelBatch(u, v) for u, v in zip(ups, lows)]


class Objective:
    """phi(x) on f's rows and, where ``eval_data`` is given, f(x, y*(x)) on its held-out rows."""

    def __init__(
        self,
        problem: BilevelProblem,
        data: Any,
        eval_data: Any = None,
        *,
        solve_steps: int = SOLVE_STEPS,
        solve_rtol: float = 1e-7,
        max_promote: int = 2_000_000,
    ):
        self.problem, self.solve_steps, self.solve_rtol = problem, solve_steps, solve_rtol
        self.rows = level_rows(data)
        self.held = None if eval_data is None else eval_data.upper
        self.max_promote = max_promote
        self.dtype: torch.dtype | None = None  # decided at the first evaluation

    def _promote(self, x: Params, y: Params) -> torch.dtype | None:
        """float64 where the problem is float32, small, and accepts float64 inputs."""
        first = next(iter(x.values()))
        size = sum(v.numel() for v in itertools.chain(x.values(), y.values()))
        if first.dtype != torch.float32 or size > self.max_promote:
            return None
        x64, y64 = _cast(x, torch.float64), _cast(y, torch.float64)
        batch = _cast(self.rows[0], torch.float64)
        try:
            with torch.no_grad():
                up = self.problem.upper_loss(x64, y64, batch.upper)
                low = self.problem.lower_loss(x64, y64, batch.lower)
        except (RuntimeError, TypeError, ValueError):
            return None  # the problem holds float32 tensors of its own: stay in float32
        if up.dtype != torch.float64 or low.dtype != torch.float64:
            return None
        return torch.float64

    def _losses(self, x: Params, rows: list) -> tuple[Callable, Callable]:
        """y -> mean f over f's rows, y -> mean g over g's rows (features computed once)."""
        pairs = [level_losses(self.problem, x, b) for b in rows]
        count = len(pairs)

        def f_of(y: Params) -> Tensor:
            return sum(f(y) for f, _ in pairs) / count

        def g_of(y: Params) -> Tensor:
            return sum(g(y) for _, g in pairs) / count

        return f_of, g_of

    def at(self, x: Params, y: Params) -> dict[str, float]:
        """``{"phi", "held", "residual", "solved", "iterations", "y_start", "y_end"}`` at x,
        y*(x) solved from ``y``: phi on f's rows, f on the held-out rows (NaN without them), the
        solve's relative gradient residual, whether it found y*(x) (1.0; 0.0 where it ran out of
        its ``solve_steps`` iterations still descending: phi is then f where the budget ended,
        and the held-out value is not computed), the iterations it took, ||y|| and ||y*||."""
        if self.dtype is None:
            self.dtype = self._promote(x, y) or next(iter(x.values())).dtype
        if next(iter(x.values())).dtype != self.dtype:
            x, y = _cast(x, self.dtype), _cast(y, self.dtype)
            rows, held = _cast(self.rows, self.dtype), _cast(self.held, self.dtype)
        else:
            rows, held = self.rows, self.held
        f_of, g_of = self._losses(x, rows)
        _, _, (grad,) = grads_of(lambda y_: (g_of(y_), {}), [y], identity_reduce)
        floor = torch.finfo(self.dtype).eps ** 0.5
        scale = max(norm(grad), floor)
        # A tolerance below the dtype's rounding cannot be met (a float32 problem that is not
        # promoted): floored at sqrt(eps), as the price's solves are (diagnose).
        rtol = max(self.solve_rtol, floor)
        solve = lbfgs_solve(g_of, y, self.solve_steps, rtol * scale)
        y_star = solve.y
        with torch.no_grad():
            phi = float(f_of(y_star))
            out = (
                math.nan
                if held is None or solve.exhausted
                else float(self.problem.upper_loss(x, y_star, held))
            )
        return {
            "phi": phi,
            "held": out,
            "residual": solve.residual / scale,
            "solved": 0.0 if solve.exhausted else 1.0,
            "iterations": float(solve.iterations),
            "y_start": norm(y),
            "y_end": norm(y_star),
        }

    def rounding(self, value: float) -> float:
        """The smallest difference of phi this evaluation resolves near ``value``."""
        eps = torch.finfo(self.dtype or torch.float64).eps
        return 64 * eps * max(abs(value), 1.0)
