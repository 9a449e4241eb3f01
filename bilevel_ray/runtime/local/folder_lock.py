"""One writer per output folder: a lock held for as long as the process that writes the folder
runs (an ``flock`` on ``.writer.lock`` in it, which the kernel releases when the process ends,
however it ends: a killed writer never blocks the next). A second writer, e.g. a ``tune`` into
a sweep folder another ``tune`` is writing, is refused with the holder's pid.

The holder removes the file as it releases the lock, so a folder is left as it was; a writer
that opened the file just before it was removed holds a lock on nothing, so each writer checks,
once it holds the lock, that the file it locked is still the one at the name (else it tries
again).

On this host only: an ``flock`` taken on another machine over a network file system may not be
seen here (the folder's own checks still refuse a finished or different sweep)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from bilevel_ray.errors import ConfigError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "FolderLock", "lock_folder"]

LOCK_FILE = ".writer.lock"


class FolderLock:
    """The lock this process holds on a folder; :meth:`release` ends it (and removes the
    folder if this process made it and left nothing else in it)."""

    def __init__(self, folder: Path, fd: int | None, created: bool):
        self.folder, self._fd, self._created = folder, fd, created

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            (self.folder / LOCK_FILE).unlink()  # while held: see the module's docstring
            if self._created and not any(self.folder.iterdir()):
                self.folder.rmdir()
        os.close(self._fd)  # closing releases the lock
        self._fd = None


def lock_folder(folder: Path, what: str) -> FolderLock:
    """Lock ``folder`` (made if missing) for this process, or raise ConfigError naming the
    process that holds it; ``what`` names the folder in the message (e.g. ``sweep folder``)."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        return FolderLock(folder, None, created)
    for _ in range(100):  # each retry follows a release between our open and our lock
        fd = _open(folder, what)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{what} {str(folder)!r} is being written by another process (pid {holder}): "
                "wait until it ends (then --resume, resume=True, continues it if it did not "
                "finish), or use a new --name (name=...)"
            ) from None
        if _same_file(fd, folder / LOCK_FILE):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return FolderLock(folder, fd, created)
        os.close(fd)
    raise ConfigError(f"{what} {str(folder)!r}: its lock keeps changing hands; try again")


def _open(folder: Path, what: str) -> int:
    try:  # O_NOFOLLOW: a link planted at the lock's name is refused, never followed
        return os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:  # a link, a folder or a FIFO planted at its name; no permission
        raise ConfigError(
            f"{what} {str(folder)!r}: its {LOCK_FILE} cannot be opened as a plain file "
            f"({err.strerror}): remove it, or use a new --name (name=...)"
        ) from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
