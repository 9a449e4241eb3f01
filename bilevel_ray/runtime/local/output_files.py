"""Where a run's files go, checked before any work: a name that is one path component, a folder
that is writable and has room, no link that carries a file elsewhere, no folder or FIFO where a
file goes, and every write atomic (a temporary name, then a rename)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bilevel_ray.atomic_files import atomic_write
from bilevel_ray.errors import ConfigError

__all__ = [
    "MAX_NAME_BYTES",
    "atomic_write",
    "check_distinct",
    "check_free_space",
    "check_inside",
    "check_output_folder",
    "check_output_path",
    "check_writable",
    "previous_path",
]


def previous_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint before the latest one."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


MAX_NAME_BYTES = 255  # one path component, on every common file system


def check_output_path(path: Any, what: str, *, is_file: bool = True) -> Path:
    """Refuse, before any work, an output path the run could not write at its end: a NUL
    byte, a component longer than 255 bytes, a name that is not valid UTF-8, a folder or a
    special file (a FIFO, a device) where a file goes."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    if "\x00" in text:
        raise ConfigError(f"{what} {text!r} contains a NUL byte; give a path without it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f"{what} {text!r} is not valid UTF-8; give a path of UTF-8 characters"
        ) from None
    long = [p for p in Path(text).parts if len(os.fsencode(p)) > MAX_NAME_BYTES]
    if long:
        raise ConfigError(
            f"{what} {text!r} has a component of {len(os.fsencode(long[0]))} bytes: at most "
            f"{MAX_NAME_BYTES} bytes per name; give a shorter name"
        )
    path = Path(text).expanduser()
    if is_file:
        for candidate in (path, previous_path(path)):
            try:
                mode = os.lstat(candidate).st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode):
                raise ConfigError(
                    f"{what} {str(candidate)!r} is a folder; give a file path in it (or move "
                    "the folder away)"
                )
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                raise ConfigError(
                    f"{what} {str(candidate)!r} is not a regular file (a FIFO, socket or "
                    "device); remove it or give another path"
                )
    return path


def check_inside(path: Path, folder: Path, what: str) -> Path:
    """``path`` resolved (links followed) must stay inside ``folder`` resolved: a planted link
    must not carry a run's files out of the folder the user chose."""
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    if resolved != root and root not in resolved.parents:
        raise ConfigError(
            f"{what} {str(path)!r} resolves to {str(resolved)!r}, outside {str(root)!r} (a "
            "symbolic link): remove the link or choose another name"
        )
    return path


def check_output_folder(
    storage: str | os.PathLike[str],
    name: str,
    what: str,
    files: Sequence[str] = (),
    files_what: str = "output file",
) -> Path:
    """``{storage}/{name}``, the folder a sweep or a comparison writes, checked before any
    work: its name (not empty, no NUL or other control character, length, UTF-8), that it
    stays inside ``storage`` (a link planted at the name is refused, never followed out), that
    it is a folder if it exists, and that each of ``files`` can be written in it (no folder,
    FIFO or device in its place). The files are then written with :func:`atomic_write`: a
    link planted at one is replaced, never written through."""
    check_output_path(name, what, is_file=False)
    if not name or any(not ch.isprintable() for ch in name):
        # An empty name is the storage folder itself; a control character would reach the
        # terminal raw in every line that names the folder.
        problem = "is empty" if not name else "contains a control character"
        raise ConfigError(
            f"{what} {name!r} {problem}; give a folder name of printable characters, e.g. "
            f"{what}=run1"
        )
    folder = Path(storage).expanduser() / name
    check_inside(folder, Path(storage).expanduser(), what)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            f"{what} {str(folder)!r} is a file, not a folder; remove it or choose another name"
        )
    for file in files:
        check_output_path(folder / file, files_what)
    return folder


def check_distinct(paths: dict[str, Any]) -> None:
    """No two outputs on one path: one would overwrite the other."""
    seen: dict[Path, str] = {}
    for what, path in paths.items():
        if path is None:
            continue
        key = Path(path).expanduser().resolve()
        if key in seen:
            raise ConfigError(
                f"{what} and {seen[key]} are the same file {str(path)!r}: one would overwrite "
                "the other; give each its own path"
            )
        seen[key] = what


def check_free_space(folder: str | os.PathLike[str], need: int, what: str) -> None:
    """Refuse to start a run whose checkpoints and history cannot fit in ``folder`` (a full disk
    found at the first save, an hour in, loses the hour)."""
    free = shutil.disk_usage(Path(folder).expanduser()).free
    if free < need:
        raise ConfigError(
            f"{what} {str(folder)!r} has {free / 2**20:.1f} MiB free and the run's checkpoints "
            f"need about {need / 2**20:.1f} MiB: free some space or choose another folder (the "
            "estimate counts the state and the history the run will write)"
        )


def check_writable(folder: str | os.PathLike[str], what: str) -> Path:
    """Create ``folder`` and prove it writable now, so a run fails before it starts rather than
    at its first save; ``what`` names the argument in the message."""
    # A NUL byte, an over-long or a non-UTF-8 name: refused by name, not a raw ValueError from
    # mkdir (or a failure at the end of the run, when the results are written).
    folder = check_output_path(folder, what, is_file=False)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A fresh name, created exclusively: never a file (or a link) someone else put there.
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"{what} {str(folder)!r} is not writable ({err.strerror}); choose another folder"
        ) from None
    return folder.resolve()
