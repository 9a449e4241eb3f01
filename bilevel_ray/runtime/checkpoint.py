"""Checkpoint files: a plain dict of tensors and numbers, written atomically, read without
executing code (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bilevel_ray.errors import ConfigError
from bilevel_ray.solvers.base import state_to_dict
from bilevel_ray.tree import to_device

__all__ = [
    "CHECKPOINT_KEYS",
    "atomic_write",
    "check_free_space",
    "check_writable",
    "checkpoint_payload",
    "load_checkpoint",
    "load_latest",
    "previous_path",
    "save_checkpoint",
    "tensor_bytes",
]

CHECKPOINT_KEYS = ("state", "rng", "history", "elapsed_s", "config", "seed")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a temporary file, then rename it into place: a crash mid-write leaves
    the previous file intact and no half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def checkpoint_payload(state: Any, recorder: Any, config: Any, seed: int) -> dict[str, Any]:
    """What a checkpoint holds: the solver state (on the CPU), the RNG, the history so far, the
    elapsed time, the solver settings and the seed of the data stream."""
    return {
        "state": to_device(state_to_dict(state), "cpu"),
        "rng": torch.get_rng_state(),
        "history": recorder.rows,
        "elapsed_s": recorder.elapsed,
        "config": config.to_dict(),
        "seed": seed,
    }


def previous_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint before the latest one."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def save_checkpoint(
    payload: dict[str, Any], path: str | os.PathLike[str], keep_previous: bool = False
) -> Path:
    """Write atomically; with ``keep_previous`` the file it replaces becomes ``<path>.prev``, a
    fallback should the new one be damaged later (a bad disk, a copy cut short)."""

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)
        # Only once the new file is complete: a crash during the write leaves ``path`` intact.
        if keep_previous and Path(path).exists():
            os.replace(path, previous_path(path))

    return atomic_write(path, write)


def load_latest(path: str | os.PathLike[str], older: Sequence[Path] = ()) -> dict[str, Any]:
    """The checkpoint at ``path``, or, if that one cannot be read, the newest readable of the
    older ones (``older``, newest last; by default ``<path>.prev``), saying so on stderr; a
    ConfigError naming the damaged file when none can be read."""
    try:
        return load_checkpoint(path)
    except ConfigError as err:
        existing = [p for p in list(older) or [previous_path(path)] if Path(p).exists()]
        for previous in reversed(existing):
            try:
                payload = load_checkpoint(previous)
            except ConfigError:
                continue
            state = payload["state"]
            step = state.get("step") if isinstance(state, dict) else None
            print(
                f"warning: {err.problems[0]} Resuming from the previous checkpoint "
                f"{str(previous)!r} (step {step}) instead.",
                file=sys.stderr,
                flush=True,
            )
            return payload
        if not existing:
            raise
        raise ConfigError(
            f"{err.problems[0]} The previous checkpoint {str(existing[-1])!r} cannot be read "
            "either: delete both to start afresh."
        ) from None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint; a truncated, corrupted or foreign file is a clear ConfigError."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file; report them all alike
        # torch's own text may advise weights_only=False, which would run code from the file.
        raise ConfigError(
            f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}): it is truncated, "
            "corrupted or not a bilevel_ray checkpoint. Delete it to start afresh."
        ) from None
    missing = sorted(set(CHECKPOINT_KEYS) - set(payload)) if isinstance(payload, dict) else None
    if missing is None or missing:
        raise ConfigError(
            f"checkpoint {str(path)!r} is not a bilevel_ray checkpoint (missing "
            f"{missing if missing else 'everything: not a dict'}); delete it to start afresh"
        )
    return payload


def tensor_bytes(tree: Any) -> int:
    """Bytes of every tensor in a nest of dicts, lists and tuples (a state, a checkpoint)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def check_free_space(folder: str | os.PathLike[str], need: int, what: str) -> None:
    """Refuse to start a run whose checkpoints cannot fit in ``folder`` (a full disk found at the
    first save, an hour in, loses the hour)."""
    free = shutil.disk_usage(Path(folder).expanduser()).free
    if free < need:
        raise ConfigError(
            f"{what} {str(folder)!r} has {free / 2**20:.1f} MiB free and the run's checkpoints "
            f"need about {need / 2**20:.1f} MiB: free some space or choose another folder"
        )


def check_writable(folder: str | os.PathLike[str], what: str) -> Path:
    """Create ``folder`` and prove it writable now, so a run fails before it starts rather than
    at its first save; ``what`` names the argument in the message."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"{what} {str(folder)!r} is not writable ({err.strerror}); choose another folder"
        ) from None
    return folder.resolve()
