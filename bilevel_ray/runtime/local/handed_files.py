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

__all__ = ["MAX_JSON_BYTES", "read_json"]

MAX_JSON_BYTES = 16 << 20  # a schedule or a record is kilobytes; 16 MiB is no such file


def read_json(path: str | os.PathLike[str], what: str, fix: str) -> Any:
    """The JSON document at ``path``; anything else is a ConfigError naming ``what`` (e.g.
    "schedule file 'x.json'") and ``fix`` (what to give instead)."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise ConfigError(f"{what} cannot be read ({err.strerror}); {fix}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what} is not a regular file (a folder, FIFO or device); {fix}")
    if info.st_size > MAX_JSON_BYTES:
        raise ConfigError(
            f"{what} is {info.st_size:,} bytes, over the {MAX_JSON_BYTES:,} such a file can be; "
            f"{fix}"
        )
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
