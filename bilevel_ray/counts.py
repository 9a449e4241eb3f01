"""Counts that size work (steps, replicas, workers, ...): each is checked where it enters, with
its bound and the fix in the message; on the floor, so that every room checks the same way."""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_STEPS", "check_count", "shown_count"]

# Bounds on the work a run's counts size, checked where they enter (a run of 10**12 steps
# would run for years while its in-memory history grew without limit). 10**8 steps is days of
# the fastest step there is.
MAX_STEPS = 100_000_000


def shown_count(value: Any) -> str:
    """``value`` as a message shows it: a huge integer by its number of digits (Python refuses
    to print one of more than 4300 digits, and nobody reads 400)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"<an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits>"
    return repr(value)


def check_count(
    problems: list[str],
    name: str,
    value: Any,
    minimum: int,
    maximum: int | None = None,
    why: str = "",
) -> None:
    """Add a problem unless ``value`` is an integer >= ``minimum`` and below 2**63 (torch and
    Arrow hold 64-bit integers: a larger one would overflow deep inside a run), and at most
    ``maximum`` when given (``why``: the reason for the cap and what to do instead)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append(f"{name}={shown_count(value)}: must be an integer >= {minimum}")
    elif maximum is not None and value >= 2**63:
        problems.append(
            f"{name}={shown_count(value)}: must be below 2**63 (a 64-bit integer), and at most "
            f"{maximum:,}" + (f" ({why})" if why else "")
        )
    elif maximum is not None and value > maximum:
        problems.append(
            f"{name}={shown_count(value)}: too large; must be an integer in [{minimum}, "
            f"{maximum:,}]" + (f" ({why})" if why else "")
        )
    elif value >= 2**63:
        problems.append(f"{name}={shown_count(value)}: must be below 2**63 (a 64-bit integer)")
