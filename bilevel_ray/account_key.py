"""This account's secret key: what tells a file this account's runs wrote (a sweep's pickled
Tune state, a run's manifest) from one someone else wrote or edited, by an HMAC-SHA256 that
only the key's holder can make.

The key is 32 random bytes in ``$BILEVEL_RAY_STATE_KEY`` (a file's path), else
``$XDG_CONFIG_HOME/bilevel_ray/state.key``, else ``~/.config/bilevel_ray/state.key``; made on
first use with mode 0600. Without a writable place for it, nothing is keyed and whatever needs
the key says so."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

__all__ = ["account_key", "key_path", "keyed_digest", "read_key"]

KEY_BYTES = 32


def key_path() -> Path:
    """Where this account's key lives."""
    if os.environ.get("BILEVEL_RAY_STATE_KEY"):
        return Path(os.environ["BILEVEL_RAY_STATE_KEY"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "bilevel_ray" / "state.key"


def read_key() -> bytes | None:
    """The key, or None when there is none (or it is not one)."""
    try:
        key = key_path().read_bytes()
    except OSError:
        return None
    return key if len(key) == KEY_BYTES else None


def account_key() -> bytes | None:
    """The key, made on first use; None when its folder cannot be written."""
    key = read_key()
    if key is not None:
        return key
    path = key_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_key()  # another process made it first
    except OSError:
        return None
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_bytes(KEY_BYTES))
    return read_key()


def keyed_digest(key: bytes, *parts: bytes) -> str:
    """HMAC-SHA256 of ``parts`` (each followed by a NUL, so that no two splits collide)."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part + b"\0")
    return mac.hexdigest()
