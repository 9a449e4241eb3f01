"""How a result was asked for: the command line when the ``bilevel-ray`` command runs (it says
so with :func:`command_line`), else the Python call (``br.train``, ``br.tune``, ...) and the
keywords it was given."""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

__all__ = ["command_line", "invocation"]

_ARGV: ContextVar[tuple[str, ...] | None] = ContextVar("_ARGV", default=None)


@contextlib.contextmanager
def command_line(argv: Sequence[str] | None) -> Iterator[None]:
    """While the block runs, manifests record ``bilevel-ray ARGV`` as their invocation."""
    words = tuple(sys.argv[1:] if argv is None else argv)
    token = _ARGV.set(words)
    try:
        yield
    finally:
        _ARGV.reset(token)


def invocation(api: str, keywords: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"command": "bilevel-ray ..."}`` inside :func:`command_line`, else ``{"api": api,
    "keywords": [...]}`` (the names of the keywords given; their values are the manifest's
    settings)."""
    argv = _ARGV.get()
    if argv is not None:
        return {"command": shlex.join(["bilevel-ray", *argv])}
    return {"api": api, "keywords": sorted(keywords or {})}
