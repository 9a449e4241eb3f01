"""Writing a file atomically: the one writer every room uses for the files it leaves behind
(run folders, manifests, exports, sample data)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_text", "atomic_write"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a fresh temporary file in the same folder (created with O_EXCL, so
    never a planted file or link), then rename it into place: a crash mid-write leaves the
    previous file intact and no half-written one, and a link at ``path`` is replaced, never
    written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:80]}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_text(path: str | os.PathLike[str], text: str) -> Path:
    """``text`` (UTF-8) written to ``path`` with :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
