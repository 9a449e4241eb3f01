"""Files hashed: by content (SHA-256, read in chunks), or, past ``LARGE_FILE_BYTES`` or where
asked, by name, size and modification time (a model checkpoint of many GB is not read again at
every start). A folder is every file under it. No torch here: ``bilevel-ray show`` checks
outputs without loading it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

__all__ = ["BY_METADATA", "LARGE_FILE_BYTES", "file_record", "sha256_file"]

LARGE_FILE_BYTES = 2 << 30  # past this, a file is described, not read again
READ_CHUNK = 1 << 20
BY_METADATA = "name, size and modification time"


def file_record(path: str | os.PathLike[str], by_content: bool = True) -> dict[str, Any]:
    """A declared file or folder: its path, bytes, how it was described and its SHA-256 (of
    the content, or of name, size and modification time)."""
    path = Path(path)
    if not path.exists():
        return {"path": str(path), "bytes": None, "by": "missing", "sha256": "missing"}
    files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    content = by_content and all(p.stat().st_size <= LARGE_FILE_BYTES for p in files)
    whole = hashlib.sha256()
    for file in files:
        name = file.relative_to(path).as_posix() if path.is_dir() else file.name
        whole.update(name.encode() + b"\0")
        if content:
            whole.update(bytes.fromhex(sha256_file(file)))
        else:
            stat = file.stat()
            whole.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    if content:
        by = "content"
    elif by_content:
        by = f"{BY_METADATA} (a file over {LARGE_FILE_BYTES >> 30} GiB)"
    else:
        by = f"{BY_METADATA} (declared so)"
    return {"path": str(path), "bytes": size, "by": by, "sha256": whole.hexdigest()}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(READ_CHUNK):
            digest.update(block)
    return digest.hexdigest()
