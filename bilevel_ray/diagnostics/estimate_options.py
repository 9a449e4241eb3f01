"""The rules of :func:`~bilevel_ray.diagnostics.flatness.estimate`'s options, one message each.

:func:`estimate_problems` lists every rule the options break (gamma > 0, at least one solve
step, 0 < solve_rtol < 1, a known optimizer, gamma_factor > 1, (c, alpha) pairs with c >= 0
and alpha > 0 for delta_hat, ...), so that a caller (``estimate`` itself, the run's watch, the
diagnose command) refuses them all at once, before any solve; :func:`count_problem` is the
integer rule, shared with the callers' own counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bilevel_ray.updates import OPTIMIZERS

__all__ = ["count_problem", "estimate_problems"]


# The estimator's own sizes: L-BFGS iterations per lower-level solve, and probe directions.
MAX_SOLVE_STEPS = 100_000
MAX_DIRECTIONS = 1_000


def count_problem(
    problems: list[str], name: str, value: Any, minimum: int, maximum: int | None = None
) -> None:
    """Add a message to ``problems`` unless ``value`` is an integer >= ``minimum`` (not a bool)
    and at most ``maximum`` (when given)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append(f"{name}={value!r}: must be an integer >= {minimum}")
    elif maximum is not None and value > maximum:
        digits = int(value.bit_length() * 0.30103) + 1  # str() refuses over 4300 digits
        shown = repr(value) if value < 10**30 else f"<an integer of about {digits} digits>"
        problems.append(
            f"{name}={shown}: too large; must be an integer in [{minimum}, {maximum:,}]"
        )


def _number(problems: list[str], name: str, value: Any, low: float, high: float, hint: str) -> None:
    """A finite number in (low, high); ``hint`` says what to use instead."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        bounds = f"> {low:g}" if high == math.inf else f"in ({low:g}, {high:g})"
        problems.append(f"{name}={value!r}: must be a finite number {bounds}; {hint}")


def _is_pair(p: Any) -> bool:
    numbers = isinstance(p, Sequence) and len(p) == 2
    numbers = numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
    return numbers and 0 <= p[0] < math.inf and 0 < p[1] < math.inf


def estimate_problems(
    *,
    gamma: Any,
    solve_steps: Any,
    solve_lr: Any,
    solve_rtol: Any,
    optimizer: Any,
    gamma_factor: Any,
    directions: Any,
    delta_pairs: Any,
    cost: Any = True,
    probe: Any = 1e-2,
    optimizer_name: str = "optimizer",
) -> list[str]:
    """Every rule the options of :func:`estimate` break, one message each (empty if none);
    ``optimizer_name`` is what the caller calls the solves' optimizer."""
    problems: list[str] = []
    _number(problems, "gamma", gamma, 0, math.inf, "the penalty to diagnose at, e.g. 10.0")
    count_problem(problems, "solve_steps", solve_steps, 1, MAX_SOLVE_STEPS)
    _number(problems, "solve_lr", solve_lr, 0, math.inf, "e.g. solve_lr=0.05 with Adam")
    _number(problems, "solve_rtol", solve_rtol, 0, 1, "e.g. solve_rtol=1e-6")
    if not isinstance(optimizer, str) or optimizer not in (*OPTIMIZERS, "lbfgs"):
        problems.append(
            f"{optimizer_name}={optimizer!r}: unknown; choose one of "
            f"{sorted([*OPTIMIZERS, 'lbfgs'])}"
        )
    _number(problems, "gamma_factor", gamma_factor, 1, math.inf, "the second gamma, e.g. 4.0")
    count_problem(problems, "directions", directions, 0, MAX_DIRECTIONS)
    if not isinstance(delta_pairs, Sequence) or not all(_is_pair(p) for p in delta_pairs):
        problems.append(
            f"delta_pairs={delta_pairs!r}: must be (c, alpha) pairs with c >= 0 and alpha > 0, "
            "e.g. ((0.5, 1.5),)"
        )
    if not isinstance(cost, bool):
        problems.append(f"cost={cost!r}: must be True (price the dropped term) or False")
    _number(problems, "probe", probe, 0, math.inf, "the curvature probe's relative step, e.g. 1e-2")
    return problems
