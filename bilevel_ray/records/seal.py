"""A manifest's seal: an HMAC-SHA256, under this account's key (:mod:`bilevel_ray.account_key`),
of the same canonical content its ``digest`` covers. The digest is a plain SHA-256 that anyone
can recompute after an edit; only the key's holder can make the seal, so a sealed record is one
this account wrote and nobody changed since. No torch, no runtime: ``show`` checks it."""

from __future__ import annotations

import hmac
from typing import Any

from bilevel_ray.account_key import account_key, keyed_digest, read_key

__all__ = ["make_seal", "sealed_by_this_account"]

# Names what is sealed, so that a seal of another kind of file never passes for a manifest's.
CONTEXT = b"bilevel_ray.manifest seal 1"


def make_seal(content: bytes) -> str | None:
    """The seal of ``content`` (a manifest's canonical JSON); None without a key (the record is
    then written unsealed, and reads as not sealed by this account)."""
    key = account_key()
    return None if key is None else keyed_digest(key, CONTEXT, content)


def sealed_by_this_account(content: bytes, seal: Any) -> bool:
    """Whether ``seal`` is this account's seal of ``content`` (never, without a key)."""
    key = read_key()
    if key is None or not isinstance(seal, str):
        return False
    return hmac.compare_digest(seal, keyed_digest(key, CONTEXT, content))
