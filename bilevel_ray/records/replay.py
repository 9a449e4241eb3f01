"""What ``bilevel-ray rerun`` needs of a manifest: the runs it replays, checked, and the
comparison of two sets of final parameters (bitwise, else the largest difference)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bilevel_ray.errors import ConfigError

__all__ = ["compare_params", "load_params", "replay_runs"]

ENTRY_KEYS = ("label", "method", "steps", "solver", "run", "params")


def replay_runs(manifest: Mapping[str, Any], what: str) -> list[dict[str, Any]]:
    """The runs the manifest's ``replay`` lists, each with every field it needs."""
    replay = manifest.get("replay")
    runs = replay.get("runs") if isinstance(replay, Mapping) else None
    if not runs:
        kind = manifest.get("kind")
        why = {
            "diagnosis": "a diagnosis keeps no parameters",
            "sweep": "the sweep kept no best trial's parameters (no trial completed, or its "
            "trials ran on worker groups, which report no lineage)",
        }.get(kind, "it records no run to replay")
        raise ConfigError(f"{what}: nothing to rerun: {why}")
    for entry in runs:
        if not isinstance(entry, Mapping) or any(k not in entry for k in ENTRY_KEYS):
            raise ConfigError(
                f"{what}: a replay entry lacks {[k for k in ENTRY_KEYS if k not in entry]}; "
                "the manifest was not written by this bilevel_ray"
            )
        relative = Path(str(entry["params"]))
        if relative.is_absolute() or ".." in relative.parts:
            raise ConfigError(
                f"{what}: replay params {str(relative)!r} must be a path inside the folder"
            )
    return [dict(entry) for entry in runs]


def load_params(path: str | os.PathLike[str], what: str) -> dict[str, dict[str, Any]]:
    """A ``result.pt`` (``{"x": {...}, "y": {...}}``), read without running code."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, not only tensors
        raise ConfigError(
            f"{what} {str(path)!r} cannot be read ({type(err).__name__}); it is not a result.pt "
            "bilevel_ray wrote"
        ) from None
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict) for k in "xy"):
        raise ConfigError(f"{what} {str(path)!r} is not a result.pt ({{'x': ..., 'y': ...}})")
    return saved


def compare_params(
    then: Mapping[str, Mapping[str, Any]], now: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """``{"bitwise": bool, "max_abs_diff": float, "where": "y[v]" or None}`` over every tensor
    of x and y (another name, shape or dtype is a difference of infinity)."""
    import torch

    bitwise, largest, where = True, 0.0, None
    for level in ("x", "y"):
        a, b = then.get(level) or {}, now.get(level) or {}
        for name in sorted(set(a) | set(b)):
            left, right = a.get(name), b.get(name)
            same_kind = (
                isinstance(left, torch.Tensor)
                and isinstance(right, torch.Tensor)
                and left.shape == right.shape
                and left.dtype == right.dtype
            )
            if not same_kind:
                bitwise, largest, where = False, math.inf, f"{level}[{name}]"
                continue
            if torch.equal(left, right):
                continue
            bitwise = False
            diff = float((left.double() - right.double()).abs().max()) if left.numel() else 0.0
            if not diff <= largest:  # NaN counts as the largest
                largest, where = diff, f"{level}[{name}]"
    return {"bitwise": bitwise, "max_abs_diff": largest, "where": where}
