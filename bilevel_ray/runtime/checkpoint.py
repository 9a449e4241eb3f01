"""Checkpoint files: a plain dict of tensors and numbers, written atomically, read without
executing code (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bilevel_ray.errors import ConfigError

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``payload`` via a temporary file, so that a crash mid-write keeps the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint; a truncated, corrupted or foreign file is a clear ConfigError."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file; report them all alike
        raise ConfigError(
            f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {err}); it is "
            "truncated, corrupted or not a bilevel_ray checkpoint. Delete it to start afresh."
        ) from None
    if not isinstance(payload, dict) or "state" not in payload:
        raise ConfigError(
            f"checkpoint {str(path)!r} is not a bilevel_ray checkpoint (no 'state' entry)"
        )
    return payload
