"""Range checks of the built-in problems' settings, made where a setting enters, before any
tensor is allocated: a size Python holds but memory does not (``--config n=10**12``), a seed
no generator takes, a number ``float()`` overflows on. Each is a ConfigError naming the setting,
its value, the allowed range and an example, not an out-of-memory kill or an overflow deep in
torch.

Two kinds of bound: a fixed cap per setting (documented where it is declared: a size no
problem of its kind needs) and, for settings that multiply, an estimate of the bytes the
problem allocates against this machine's physical memory (the problem is built on the CPU
first, so more than that can never fit).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bilevel_ray.errors import ConfigError

__all__ = [
    "MAX_SEED",
    "SEED_RANGE",
    "Limit",
    "check_limits",
    "finite_problem",
    "integer_problem",
    "memory_problem",
    "physical_memory",
    "shown",
]

# Every generator a problem seeds takes it (torch's takes 64 bits, NumPy's 32), and a factory
# that draws a second stream from seed + 1 cannot overflow either.
MAX_SEED = 2**32 - 1
SEED_RANGE = "a seed every random generator takes"


@dataclass(frozen=True)
class Limit:
    """An integer setting's range [low, high], an example value and why the cap is there."""

    low: int
    high: int
    example: Any
    why: str = ""


def shown(value: Any) -> str:
    """``value`` as a message shows it: a huge integer by its number of digits, not all of them
    (Python refuses to print one of more than 4300 digits, and nobody reads 400)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        try:
            return f"<an integer of {len(str(abs(value)))} digits>"
        except ValueError:  # past Python's 4300-digit limit on printing an int
            digits = math.floor(abs(value).bit_length() * math.log10(2)) + 1
            return f"<an integer of about {digits} digits>"
    return repr(value)


def integer_problem(problem: str, key: str, value: Any, limit: Limit) -> str | None:
    """One line saying what is wrong with ``value``, or None when it is an integer in range.
    Below the range (or not an integer) keeps the form ``must be an integer >= low``; above it
    names the whole range and the reason for the cap."""
    example = f"e.g. --config {key}={limit.example}"
    if isinstance(value, bool) or not isinstance(value, int) or value < limit.low:
        rule = f"must be an integer >= {limit.low}"
        return f"problem {problem!r}: {key}={shown(value)}: {rule}, {example}"
    if value > limit.high:
        why = f" ({limit.why})" if limit.why else ""
        return (
            f"problem {problem!r}: {key}={shown(value)}: too large; must be an integer in "
            f"[{limit.low}, {limit.high}]{why}, {example}"
        )
    return None


def check_limits(problem: str, config: Mapping[str, Any], limits: Mapping[str, Limit]) -> None:
    """Refuse every setting of ``config`` outside its limit, all named in one ConfigError."""
    problems = [integer_problem(problem, k, config[k], limit) for k, limit in limits.items()]
    problems = [p for p in problems if p is not None]
    if problems:
        raise ConfigError(problems)


def finite_problem(
    problem: str, key: str, value: Any, example: Any, low: float = -math.inf
) -> str | None:
    """One line unless ``value`` is a finite number >= ``low`` that ``float()`` can hold (an
    integer of 400 digits is a Python int, and an OverflowError in ``float()``)."""
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        with contextlib.suppress(OverflowError):  # too large for a float: not finite here
            if math.isfinite(float(value)) and value >= low:
                return None
    rule = "a finite number" if low == -math.inf else f"a finite number >= {low:g}"
    example = f"e.g. --config {key}={example}"
    return f"problem {problem!r}: {key}={shown(value)}: must be {rule}, {example}"


def physical_memory() -> int | None:
    """This machine's memory in bytes; None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def memory_problem(problem: str, need: float, what: str, fix: str) -> str | None:
    """One line when ``need`` bytes (``what`` says of what) exceed this machine's memory."""
    total = physical_memory()
    if total is None or need <= total:
        return None
    return (
        f"problem {problem!r}: {what} would take about {need / 2**30:,.1f} GiB, more than "
        f"this machine's {total / 2**30:,.1f} GiB of memory; {fix}"
    )
