"""Checkpoint files: a plain dict of tensors and numbers, written atomically, read without
executing code (``torch.load(weights_only=True)``), and where a run keeps them.

Layout of a run folder ``{storage_path}/{name}``: an in-process run keeps ``checkpoint.pt``
(and ``checkpoint.pt.prev``, the one before); a worker group keeps Train's checkpoint folders
``checkpoint_step_<step>_<attempt>/state.pt`` (the newest ``KEEP_GROUP_CHECKPOINTS``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from bilevel_ray.errors import ConfigError
from bilevel_ray.runtime.local.output_files import atomic_write, previous_path
from bilevel_ray.solvers.base import state_to_dict
from bilevel_ray.tree import to_device

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_KEYS",
    "KEEP_GROUP_CHECKPOINTS",
    "LOCAL_CHECKPOINT",
    "check_resume_shapes",
    "checkpoint_payload",
    "group_checkpoint_name",
    "group_checkpoints",
    "history_bytes",
    "load_checkpoint",
    "load_latest",
    "load_resume",
    "prune_group_checkpoints",
    "read_tensor_file",
    "same_settings",
    "save_checkpoint",
    "tensor_bytes",
]

CHECKPOINT_KEYS = ("state", "rng", "history", "elapsed_s", "config", "seed")
LOCAL_CHECKPOINT = "checkpoint.pt"  # an in-process run's file in its run folder
CHECKPOINT_FILE = "state.pt"  # inside each Train checkpoint folder
KEEP_GROUP_CHECKPOINTS = 2  # Train's num_to_keep: the newest and one fallback


def group_checkpoint_name(step: int, attempt: str) -> str:
    """A worker group's checkpoint folder: unique per group start, so that a group that resumed
    from an older checkpoint (the newest was damaged) never writes into a folder Train tracks."""
    return f"checkpoint_step_{step:09d}_{attempt}"


def group_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """A run folder's worker-group checkpoint files, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [d / CHECKPOINT_FILE for d in sorted(folder.glob("checkpoint_step_*"))]


def prune_group_checkpoints(folder: str | os.PathLike[str]) -> None:
    """Keep the newest ``KEEP_GROUP_CHECKPOINTS`` folders: Train prunes the ones it tracks, but
    the folders of a failed attempt (a restarted group tracks afresh) would pile up."""
    for stale in group_checkpoints(folder)[:-KEEP_GROUP_CHECKPOINTS]:
        shutil.rmtree(stale.parent, ignore_errors=True)


def same_settings(saved: Any, config: dict[str, Any]) -> bool:
    """Whether a checkpoint's solver settings are ``config``: read through ``SolverConfig``, so
    that a setting added since the file was written counts at its default."""
    from bilevel_ray.config import SolverConfig

    try:
        return SolverConfig.from_dict(saved).to_dict() == config
    except ConfigError:
        return False


def load_resume(
    path: str | os.PathLike[str] | None, config: dict[str, Any], seed: int
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` to resume from (None when there is none yet), refused when it
    was written with another seed or other solver settings."""
    if path is None or (not Path(path).exists() and not previous_path(path).exists()):
        return None
    saved = load_latest(path)  # falls back to <path>.prev (a crash between its two renames)
    if saved["seed"] != seed:
        raise ConfigError(
            f"checkpoint {str(path)!r} was written with seed={saved['seed']}, not seed={seed}: "
            "the data stream would differ; resume with the same seed, or start a new run"
        )
    if not same_settings(saved["config"], config):
        raise ConfigError(
            f"checkpoint {str(path)!r} was written with other solver settings "
            f"({saved.get('config')}); resume with the same settings, or start a new run (another "
            "checkpoint_path, or another name with br.train)"
        )
    return saved


def check_resume_shapes(path: Any, saved: dict[str, Any], x0: Any, y0: Any, steps: int) -> None:
    """A checkpoint resumes only the run it was written by: the same parameter names, shapes
    and dtypes, and no more steps done than the run asks for; every difference named."""
    state = saved.get("state")
    problems = []
    if not isinstance(state, dict):
        problems.append("it holds no solver state")
    else:
        for level, start in (("x", x0), ("y", y0)):
            kept = state.get(level)
            if not isinstance(kept, dict) or not isinstance(start, dict):
                problems.append(f"its {level} is not a dict of tensors")
                continue
            if set(kept) != set(start):
                problems.append(
                    f"{level} names {sorted(kept)} in the checkpoint, {sorted(start)} now"
                )
                continue
            for key, value in start.items():
                old = kept[key]
                if not isinstance(old, torch.Tensor):
                    problems.append(f"{level}[{key!r}] is not a tensor in the checkpoint")
                elif tuple(old.shape) != tuple(value.shape) or old.dtype != value.dtype:
                    problems.append(
                        f"{level}[{key!r}] is {tuple(old.shape)} {old.dtype} in the checkpoint, "
                        f"{tuple(value.shape)} {value.dtype} now"
                    )
        step = state.get("step")
        if isinstance(step, int) and not isinstance(step, bool) and step > steps:
            problems.append(f"it is at step {step}, past steps={steps}")
        history = saved.get("history")
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            problems.append("its history is not a list of rows")
    if problems:
        raise ConfigError(
            f"checkpoint {str(path)!r} belongs to another run: {'; '.join(problems)}. Resume "
            "with the same problem and steps >= the checkpoint's step, or start a new run "
            "(another checkpoint_path, or another name)"
        )


def checkpoint_payload(
    state: Any, recorder: Any, config: Any, seed: int, flatness: Any, **extra: Any
) -> dict[str, Any]:
    """What a checkpoint holds: the solver state (on the CPU), the RNG, the history so far, the
    elapsed time, the solver settings the run started with, the seed of the data stream, the
    flatness watch's outcome (``ActiveSolver.saved()``) and the runtime's own ``extra`` keys
    (a worker group's ``status`` and ``num_workers``)."""
    return {
        "state": to_device(state_to_dict(state), "cpu"),
        "rng": torch.get_rng_state(),
        "history": recorder.rows,
        "elapsed_s": recorder.elapsed,
        "config": config.to_dict(),
        "seed": seed,
        "flatness": flatness,
        **extra,
    }


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
        said = err.problems[0] if err.problems[0].endswith(".") else f"{err.problems[0]}."
        existing = [p for p in list(older) or [previous_path(path)] if Path(p).exists()]
        for previous in reversed(existing):
            try:
                payload = load_checkpoint(previous)
            except ConfigError:
                continue
            state = payload["state"]
            step = state.get("step") if isinstance(state, dict) else None
            print(
                f"warning: {said} Resuming from the previous checkpoint "
                f"{str(previous)!r} (step {step}) instead.",
                file=sys.stderr,
                flush=True,
            )
            return payload
        if not existing:
            raise
        raise ConfigError(
            f"{said} The previous checkpoint {str(existing[-1])!r} cannot be read "
            "either: delete both to start afresh."
        ) from None


def read_tensor_file(
    path: str | os.PathLike[str], what: str, irregular: str, unreadable: str
) -> Any:
    """``torch.load(path, weights_only=True)`` (no code runs from the file); a missing path, one
    that is not a regular file (a FIFO would block the read forever) and a truncated, corrupted
    or foreign file are ConfigErrors naming ``what`` and the fix (``irregular``,
    ``unreadable``)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise ConfigError(f"{what} {str(path)!r} cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(
            f"{what} {str(path)!r} is not a regular file (a folder, FIFO or device): {irregular}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file; report them all alike
        # torch's own text may advise weights_only=False, which would run code from the file.
        raise ConfigError(
            f"{what} {str(path)!r} cannot be read ({type(err).__name__}): {unreadable}"
        ) from None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint; a truncated, corrupted or foreign file is a clear ConfigError."""
    payload = read_tensor_file(
        path,
        "checkpoint",
        "remove it or give another checkpoint_path",
        "it is truncated, corrupted or not a bilevel_ray checkpoint. Delete it to start afresh.",
    )
    missing = sorted(set(CHECKPOINT_KEYS) - set(payload)) if isinstance(payload, dict) else None
    if missing is None or missing:
        raise ConfigError(
            f"checkpoint {str(path)!r} is not a bilevel_ray checkpoint (missing "
            f"{missing if missing else 'everything: not a dict'}); delete it to start afresh"
        )
    wrong = _wrong_fields(payload)
    if wrong:
        raise ConfigError(
            f"checkpoint {str(path)!r} is not a bilevel_ray checkpoint ({'; '.join(wrong)}): it "
            "was written by something else or altered; delete it to start afresh"
        )
    return payload


def _wrong_fields(payload: dict[str, Any]) -> list[str]:
    """The fields of a checkpoint whose type is not the one this module writes: found at load,
    not after a resumed run's last step (the history is a table only when the run ends)."""
    from bilevel_ray.runtime.local.history import HISTORY_SCHEMA

    wrong = []
    rng = payload["rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        wrong.append(f"rng is a {type(rng).__name__}, not torch's RNG state (a uint8 tensor)")
    elapsed = payload["elapsed_s"]
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not elapsed >= 0:
        wrong.append(f"elapsed_s={elapsed!r} is not a number of seconds >= 0")
    seed = payload["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        wrong.append(f"seed={seed!r} is not an integer")
    for key in ("state", "config"):
        if not isinstance(payload[key], dict):
            wrong.append(f"{key} is a {type(payload[key]).__name__}, not a dict")
    history = payload["history"]
    rows = isinstance(history, list) and all(isinstance(row, dict) for row in history)
    try:  # a history that is no list of rows is check_resume_shapes' to name
        if rows:
            pa.Table.from_pylist(history, schema=HISTORY_SCHEMA)
    except (TypeError, ValueError, pa.ArrowException) as err:
        wrong.append(f"history does not fit the metric history's schema ({err})")
    return wrong + _wrong_solver_state(payload)


STATE_KEYS = {"step", "x", "y", "opt", "extra"}
FLATNESS_STATUSES = ("completed", "unsuitable")  # ActiveSolver's own statuses
SHOWN_MISMATCHES = 3


def _wrong_solver_state(payload: dict[str, Any]) -> list[str]:
    """The solver state's optimizer states and extra variables against what the method in force
    (the flatness fallback's, where the run switched) keeps for the state's own x and y: a
    checkpoint altered or written by another version fails here, at load, not as a KeyError or
    TypeError at its first step. A state whose keys, step, x or y are wrong is left to
    ``state_from_dict`` and :func:`check_resume_shapes`, which name those."""
    from bilevel_ray.config import METHOD_OPTIONS, SolverConfig

    state, flatness = payload["state"], payload.get("flatness")
    wrong = []
    if flatness:
        if not isinstance(flatness, dict) or not {"method", "verdict", "status"} <= set(flatness):
            return [f"flatness={flatness!r} is not the flatness watch's outcome"]
        if flatness["method"] not in METHOD_OPTIONS:
            wrong.append(f"flatness.method={flatness['method']!r} is no method")
        if flatness["status"] not in FLATNESS_STATUSES:
            wrong.append(f"flatness.status={flatness['status']!r} is not one of the watch's")
        if flatness["verdict"] is not None and not isinstance(flatness["verdict"], dict):
            wrong.append(f"flatness.verdict is a {type(flatness['verdict']).__name__}, no dict")
    if wrong or not isinstance(state, dict) or set(state) != STATE_KEYS:
        return wrong
    if not all(_tensors(state[level]) for level in ("x", "y")):
        return wrong
    try:
        settings = SolverConfig.from_dict(payload["config"])
    except (ConfigError, TypeError, ValueError) as err:
        return [f"config is not a solver's settings ({err})"]
    method = flatness["method"] if flatness else settings.method
    if method != settings.method:
        from bilevel_ray.runtime.local.active_solver import fallback_config

        settings = fallback_config(settings, method)
    # The state a fresh run of the method starts from, on the meta device: shapes, no memory.
    # Its precision is fp32 there (autocast refuses the meta device); fp16 adds its loss scale.
    meta = [{k: torch.empty_like(v, device="meta") for k, v in state[lv].items()} for lv in "xy"]
    expected = dataclasses.replace(settings, precision="fp32").build(None).init(*meta)
    if settings.precision == "fp16":
        expected.extra.update(loss_scale=1.0, loss_scale_streak=0)  # solvers/compute.py's
    mismatches = _mismatches(state["opt"], expected.opt, "state.opt")
    mismatches += _mismatches(state["extra"], expected.extra, "state.extra")
    if mismatches:
        shown = "; ".join(mismatches[:SHOWN_MISMATCHES])
        more = len(mismatches) - SHOWN_MISMATCHES
        wrong.append(
            f"its solver state is not what {method} keeps: {shown}"
            + (f" (and {more} more)" if more > 0 else "")
        )
    return wrong


def _tensors(group: Any) -> bool:
    return isinstance(group, dict) and all(isinstance(v, torch.Tensor) for v in group.values())


def _mismatches(saved: Any, expected: Any, where: str) -> list[str]:
    """Where ``saved`` differs from ``expected`` in structure: the keys of each dict, the length
    of each list, each tensor's shape and dtype, each number's kind."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            return [f"{where} is a {type(saved).__name__}, not a tensor"]
        if saved.shape != expected.shape or saved.dtype != expected.dtype:
            return [
                f"{where} is {tuple(saved.shape)} {saved.dtype}, not "
                f"{tuple(expected.shape)} {expected.dtype}"
            ]
        return []
    if isinstance(expected, dict):
        if not isinstance(saved, dict):
            return [f"{where} is a {type(saved).__name__}, not a dict"]
        if set(saved) != set(expected):
            have, want = sorted(map(repr, saved)), sorted(map(repr, expected))
            return [f"{where} holds [{', '.join(have)}], not [{', '.join(want)}]"]
        return [m for k in expected for m in _mismatches(saved[k], expected[k], f"{where}[{k!r}]")]
    if isinstance(expected, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(expected):
            return [f"{where} is {type(saved).__name__}, not a sequence of {len(expected)}"]
        pairs = zip(saved, expected)
        return [m for i, (s, e) in enumerate(pairs) for m in _mismatches(s, e, f"{where}[{i}]")]
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        kinds = (int,) if isinstance(expected, int) else (int, float)
        if isinstance(saved, bool) or not isinstance(saved, kinds):
            return [f"{where}={saved!r} is not a {type(expected).__name__}"]
        return []
    if type(saved) is not type(expected):
        return [f"{where} is a {type(saved).__name__}, not a {type(expected).__name__}"]
    return []


HISTORY_ROW_BYTES = 256  # about one logged row in a checkpoint or a Parquet file


def history_bytes(steps: int, report_every: int) -> int:
    """About how large the history of a ``steps``-step run grows."""
    return (steps // max(report_every, 1) + 2) * HISTORY_ROW_BYTES


def tensor_bytes(tree: Any) -> int:
    """Bytes of every tensor in a nest of dicts, lists and tuples (a state, a checkpoint)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0
