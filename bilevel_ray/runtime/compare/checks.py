"""``br.compare``'s refusals before anything is built or run: its arguments, all together in
one :class:`~bilevel_ray.errors.ConfigError` (its folder: :mod:`~bilevel_ray.runtime.compare.
claim`)."""

from __future__ import annotations

import math
from typing import Any

from bilevel_ray.counts import check_count
from bilevel_ray.errors import ConfigError
from bilevel_ray.runtime.compare.rank import POINTS
from bilevel_ray.solvers import SOLVERS

__all__ = ["check_arguments"]


# Bounds on the work a comparison sizes: each seed is a whole run of the budget per method.
MAX_SEEDS = 100
MAX_BUDGET_S = 86_400.0


def check_arguments(
    methods: list[str] | None,
    budget_s: Any,
    seeds: Any,
    num_workers: Any,
    gap_steps: Any,
    rank_by: str | None,
) -> list[str]:
    """The methods to run (default: every method); raises one ConfigError naming every
    argument that is wrong."""
    problems: list[str] = []
    check_count(problems, "seeds", seeds, 1)
    if not problems and seeds > MAX_SEEDS:
        problems.append(
            f"seeds={seeds}: at most {MAX_SEEDS} runs per method (each is a whole run of the "
            "budget); e.g. seeds=3"
        )
    check_count(problems, "gap_steps", gap_steps, 1)
    if (
        isinstance(budget_s, bool)
        or not isinstance(budget_s, (int, float))
        or not (0 < budget_s < math.inf)
    ):
        problems.append(f"budget_s={budget_s!r}: must be a finite number of seconds > 0")
    elif budget_s > MAX_BUDGET_S:
        problems.append(
            f"budget_s={budget_s:g}: at most {MAX_BUDGET_S:g} s (a day) per run: compare is a "
            "proof of concept; e.g. budget_s=60, then tune or train the method it recommends"
        )
    if num_workers != 1:
        problems.append(
            f"num_workers={num_workers!r}: compare runs each method in one process; scale the "
            "method it recommends with br.train(num_workers=N) (bilevel-ray train --workers N)"
        )
    if rank_by is not None and rank_by not in POINTS:
        problems.append(
            f"rank_by={rank_by!r}: choose 'best' (each run at its best held-out point) or "
            "'final' (where the budget ended it), or leave it out"
        )
    methods = list(SOLVERS) if methods is None else list(methods)
    unknown = [m for m in methods if m not in SOLVERS]
    if unknown or not methods:
        problems.append(f"methods={methods!r}: choose among {', '.join(SOLVERS)}")
    if problems:
        raise ConfigError(problems)
    return methods
