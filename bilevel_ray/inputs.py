"""The files a problem factory reads, declared by the factory itself.

A run's manifest fingerprints the data it ran on: the tensors a factory returns are hashed, and
the files it read are hashed by content, but only the factory knows which files those are. A
factory says so with :func:`declare_inputs`::

    def make(config):
        bilevel_ray.declare_inputs(config["train_csv"])
        table = read_csv(config["train_csv"])
        ...

Outside a run that keeps a manifest (a plain ``br.solve``, a Ray worker rebuilding the problem)
the call does nothing but return its paths.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from bilevel_ray.errors import ConfigError

__all__ = ["DeclaredInput", "collect_inputs", "declare_inputs"]


@dataclass(frozen=True)
class DeclaredInput:
    """A file or folder a factory read; ``by_content`` False: described by name, size and
    modification time only (a model checkpoint of many GB is not read again to be hashed)."""

    path: Path
    by_content: bool = True


# The collectors of the factory calls running now (innermost last); a context variable, so that
# two threads building problems at once do not see each other's files.
_COLLECTORS: ContextVar[tuple[list[DeclaredInput], ...]] = ContextVar("_COLLECTORS", default=())


def declare_inputs(*paths: str | os.PathLike[str], by_content: bool = True) -> tuple[Path, ...]:
    """Declare files (or folders: every file under them) that the factory running now reads,
    so that the run's manifest fingerprints them; returns the paths. ``by_content=False``
    describes them by name, size and modification time instead of hashing their bytes."""
    declared = []
    for path in paths:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ConfigError(
                f"declare_inputs({path!r}): give the path of a file or folder the factory reads"
            )
        declared.append(Path(os.fspath(path)).expanduser())
    for collector in _COLLECTORS.get():
        collector.extend(DeclaredInput(p, by_content) for p in declared)
    return tuple(declared)


@contextlib.contextmanager
def collect_inputs() -> Iterator[list[DeclaredInput]]:
    """The files declared with :func:`declare_inputs` while the block runs (a factory call)."""
    collected: list[DeclaredInput] = []
    token = _COLLECTORS.set((*_COLLECTORS.get(), collected))
    try:
        yield collected
    finally:
        _COLLECTORS.reset(token)
