"""A finished run's folder (``solve`` or ``train`` with ``--out``), read back: its ``run.json``
(the run's record) and ``result.pt`` (its final x and y), checked before use: against the
folder's manifest (:func:`~bilevel_ray.records.folder_check.check_folder`: a file edited after
the run is refused), a size bound, JSON errors, tensors only (no code runs from the file), and
x and y of the shapes the run's problem has, all finite. What ``diagnose --at-end`` and
``export`` read."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from bilevel_ray.errors import ConfigError
from bilevel_ray.records.folder_check import check_folder
from bilevel_ray.runtime.local.checkpoint import read_tensor_file
from bilevel_ray.tree import Params

__all__ = ["MAX_RECORD_BYTES", "RUN_FILES", "read_result", "read_run"]

MAX_RECORD_BYTES = 1 << 20  # run.json holds settings and a few numbers: far below this
RUN_FILES = ("run.json", "result.pt")  # what export and diagnose --at-end read


def read_run(folder: Path, what: str) -> dict[str, Any]:
    """The run record ``folder/run.json``, once the folder verifies against its manifest (a
    folder from before manifests: a note on stderr); ``what`` (the command's label, e.g.
    ``--at-end``) starts the messages about the folder."""
    folder = Path(folder)
    path = folder / "run.json"
    if not folder.is_dir():
        raise ConfigError(
            f"{what} {str(folder)!r}: not a folder; give the --out folder of a finished run"
        )
    if not path.is_file():
        raise ConfigError(
            f"{what} {str(folder)!r} holds no run.json: give the folder a finished `solve` "
            "or `train` wrote with --out"
        )
    check_folder(folder, f"{what} {str(folder)!r}", RUN_FILES)
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise ConfigError(f"{str(path)!r} is over 1 MiB: not a run record bilevel_ray wrote")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({err}); rerun the run") from None
    if not isinstance(record, dict) or "problem" not in record or "settings" not in record:
        raise ConfigError(
            f"{str(path)!r} is not a run record (it needs 'problem', 'settings', 'method'); "
            "give the folder a finished `solve` or `train` wrote with --out"
        )
    return record


def read_result(
    folder: Path, x0: Params, y0: Params, what: str, *, then: str | None = None
) -> tuple[Params, Params]:
    """The run's final x and y from ``folder/result.pt``, on the device and in the dtype of
    ``x0``: refused unless their names and shapes are those of ``x0`` / ``y0`` (the problem
    rebuilt from run.json) and every value is finite. ``then``: what to do once a run that did
    not finish is resumed (the advice of that message)."""
    path = Path(folder) / "result.pt"
    saved = read_tensor_file(
        path,
        f"{what}: the run's result.pt",
        "the run did not finish: resume it" + (f", then {then}" if then else ""),
        "truncated, corrupted or not written by bilevel_ray",
    )
    ok = isinstance(saved, dict) and all(isinstance(saved.get(k), dict) for k in ("x", "y"))
    for level, start in (("x", x0), ("y", y0)):
        got = saved.get(level) if ok else None
        shapes = ok and set(got) == set(start)
        if not shapes or any(
            not isinstance(got[k], torch.Tensor) or got[k].shape != v.shape
            for k, v in start.items()
        ):
            raise ConfigError(
                f"{str(path)!r}: its {level} does not match the problem's ({level} names and "
                "shapes differ): the run folder and its run.json disagree"
            )
    device = next(iter(x0.values())).device
    dtype = next(iter(x0.values())).dtype
    x = {k: v.to(device, dtype) for k, v in saved["x"].items()}
    y = {k: v.to(device, dtype) for k, v in saved["y"].items()}
    values = [v for v in (*x.values(), *y.values()) if v.numel()]
    if not all(math.isfinite(float(v.abs().max())) for v in values):
        raise ConfigError(f"{str(path)!r} holds non-finite values: the run diverged")
    return x, y
