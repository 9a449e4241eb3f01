"""Reading a JSON file someone handed over (a schedule, a sweep's or a run's record): it is read
only when it is a regular file of bounded size (a FIFO would block the read forever, a link to
/dev/zero would read until memory runs out), and nesting deeper than Python's parser allows is a
clear error, not a traceback."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from bilevel_ray.errors import ConfigError

__all__ = ["MAX_JSON_BYTES", "check_regular_file", "read_json"]

MAX_JSON_BYTES = 16 << 20  # a schedule or a record is kilobytes; 16 MiB is no such file


def check_regular_file(
    path: str | os.PathLike[str], what: str, fix: str, max_bytes: int, limit_name: str = ""
) -> int:
    """The size of ``path``, a regular file (links followed) of at most ``max_bytes``; anything
    else (missing, a folder, a FIFO, a device such as /dev/zero, too large) is a ConfigError
    naming ``what`` and ``fix``. ``limit_name``: where the limit is set, said when it is hit."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise ConfigError(f"{what} cannot be read ({err.strerror}); {fix}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what} is not a regular file (a folder, FIFO or device); {fix}")
    if info.st_size > max_bytes:
        where = f" ({limit_name})" if limit_name else ""
        raise ConfigError(
            f"{what} is {info.st_size:,} bytes, over the {max_bytes:,} such a file can be"
            f"{where}; {fix}"
        )
    return info.st_size


def read_json(path: str | os.PathLike[str], what: str, fix: str) -> Any:
    """The JSON document at ``path``; anything else is a ConfigError naming ``what`` (e.g.
    "schedule file 'x.json'") and ``fix`` (what to give instead)."""
    check_regular_file(path, what, fix, MAX_JSON_BYTES)
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{what} cannot be read ({err.__class__.__name__}: {err}); {fix}"
        ) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what} is not JSON ({err}); {fix}") from None
    except RecursionError:
        raise ConfigError(f"{what} nests deeper than any such file does; {fix}") from None
