"""TensorBoard event files of one run, written with tensorboardX (installed with Ray Tune).

A run's files go to ``{tensorboard}/{experiment}/{run name}``, so that ``tensorboard --logdir
{tensorboard}`` lists a sweep's trials side by side. The writer tells TensorBoard that this run
starts after ``first_step``: whatever an earlier run of the same name logged from there on (a
trial started again, a resumed run) is hidden, TensorBoard's own purge rule, instead of being
drawn over.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["open_writer", "run_folder"]


def run_folder(tensorboard: str, experiment: str, run_name: str) -> Path:
    return Path(tensorboard) / _safe(experiment) / _safe(run_name)


def open_writer(logdir: Path, first_step: int, flush_s: float, params: Mapping[str, str]) -> Any:
    """A ``tensorboardX.SummaryWriter`` in ``logdir``, with ``params`` as a text table."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(
        str(logdir),
        purge_step=first_step + 1,
        flush_secs=max(1, round(flush_s)),
        # The file name holds the second it was made: a restart within it would overwrite the
        # earlier file. The suffix tells them apart, in order.
        filename_suffix=f".{time.time_ns()}",
    )
    if params:
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        writer.add_text("params", "| setting | value |\n|---|---|\n" + table, 0)
    return writer


def _safe(name: str) -> str:
    """A folder name from a run's or an experiment's name."""
    return re.sub(r"[^\w.\-=]", "_", name).strip(".") or "_"
