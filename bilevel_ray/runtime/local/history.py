"""The metric history: one fixed Arrow schema for every method and runtime.

Solvers return metrics as 0-d tensors; :class:`HistoryRecorder` keeps them on the device and
turns a whole window into Python floats in one transfer every ``report_every`` steps (a
``.item()`` per metric per step would sync a GPU every step). The same flush checks that every
loss of the window is finite and names the first step that is not.

Columns (NaN where a method has no such quantity):

=====================  ==========================================================================
``step``               steps completed when the row was logged (1-based)
``method``             the solver's name
``upper/loss``         f(x_t, y) at the step's last upper-level evaluation
``lower/loss``         g(x_t, y) at the step's last lower-level evaluation
``value/loss``         g(x_t, y_g) of the value-function copy (pbgd, alt_pbgd, f2sa, bome)
``penalty/gamma``      gamma_t (the multiplier lam_t for f2sa)
``penalty/multiplier`` BOME's adaptive multiplier
``time/step_s``        mean wall time per step over the window since the previous row
``time/elapsed_s``     wall time since the run started (across resumes)
``time/tokens_per_s``  tokens this process's batches held per second of the window (padding left
                       out), for a problem that counts them (``batch_tokens``); else NaN
=====================  ==========================================================================

A run diverges (:class:`DivergenceError`, status ``diverged``) when a loss of a logged window is
not finite, or explodes (:func:`exploded`): its magnitude passes :data:`EXPLODE_FACTOR` times
max(1, |its first value|). The bound is far above anything a converging run reaches (the upper
loss may rise while y moves toward y*(x), by orders of magnitude at most), and far below where
float32 overflows, so a run that blows up stops with its step named instead of ending
"completed" at 1e32.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bilevel_ray.errors import DivergenceError
from bilevel_ray.runtime.local.output_files import atomic_write

__all__ = [
    "EXPLODE_FACTOR",
    "HISTORY_SCHEMA",
    "LOSS_KEYS",
    "METRIC_KEYS",
    "HistoryRecorder",
    "exploded",
    "write_parquet",
]

METRIC_KEYS = (
    "upper/loss",
    "lower/loss",
    "value/loss",
    "penalty/gamma",
    "penalty/multiplier",
)
LOSS_KEYS = ("upper/loss", "lower/loss", "value/loss")
HISTORY_SCHEMA = pa.schema(
    [pa.field("step", pa.int64()), pa.field("method", pa.string())]
    + [
        pa.field(k, pa.float64())
        for k in (*METRIC_KEYS, "time/step_s", "time/elapsed_s", "time/tokens_per_s")
    ]
)


EXPLODE_FACTOR = 1e12  # a loss past this many times max(1, |its first value|) has diverged


def exploded(start: float, value: float) -> bool:
    """Whether a loss that started at ``start`` has exploded at ``value`` (finite both)."""
    return abs(value) > EXPLODE_FACTOR * max(1.0, abs(start))


class HistoryRecorder:
    """Buffers per-step metrics and logs one row every ``report_every`` steps."""

    def __init__(
        self,
        method: str,
        report_every: int,
        rows: list[dict[str, Any]] | None = None,
        elapsed_before: float = 0.0,
        reduce_values: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """``reduce_values`` maps the window's (steps x metrics) float64 matrix to its mean over
        data-parallel ranks, so that every rank logs, checks and reports the same numbers."""
        self.method, self.report_every = method, report_every
        self.reduce_values = reduce_values
        self.rows: list[dict[str, Any]] = list(rows or [])
        self._window: list[tuple[int, Mapping[str, Any]]] = []
        self._tokens = 0
        self._elapsed_before = elapsed_before
        self._started = self._window_started = time.perf_counter()
        # Each loss's first logged value: what the explosion rule measures against (a resumed
        # run's first row stands in for its first step).
        first = self.rows[0] if self.rows else {}
        self._start = {
            k: float(first[k])
            for k in LOSS_KEYS
            if isinstance(first.get(k), (int, float)) and math.isfinite(first[k])
        }

    @property
    def elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._started

    @property
    def last(self) -> dict[str, Any] | None:
        return self.rows[-1] if self.rows else None

    def record(
        self, step: int, metrics: Mapping[str, Any], tokens: Any = 0
    ) -> dict[str, Any] | None:
        """Add the metrics of the step that completed ``step`` steps (and the ``tokens`` its
        batches held); returns a row when one is logged. Raises :class:`DivergenceError` when a
        logged window holds a non-finite or exploded loss."""
        self._window.append((step, metrics))
        self._tokens += tokens
        if step % self.report_every == 0:
            return self.flush()
        return None

    def flush(self) -> dict[str, Any] | None:
        if not self._window:
            return None
        window, self._window = self._window, []
        keys = [k for k in METRIC_KEYS if k in window[-1][1]]
        values = _to_floats([[m.get(k, math.nan) for k in keys] for _, m in window])
        if self.reduce_values is not None:
            values = self.reduce_values(torch.tensor(values, dtype=torch.float64)).tolist()
        last = self.last or {}
        last_finite = {
            k: v for k, v in last.items() if k == "step" or (k in METRIC_KEYS and math.isfinite(v))
        }
        for (step, _), row_values in zip(window, values):
            for k, v in zip(keys, row_values):
                if k not in LOSS_KEYS:
                    continue
                if not math.isfinite(v):
                    raise DivergenceError(step, k, last_finite)
                start = self._start.setdefault(k, v)
                if exploded(start, v):
                    raise DivergenceError(step, k, last_finite, grew=(start, v))
            last_finite = {"step": step}
            last_finite.update((k, v) for k, v in zip(keys, row_values) if math.isfinite(v))
        now = time.perf_counter()
        row = {"step": window[-1][0], "method": self.method}
        row.update({k: math.nan for k in METRIC_KEYS})
        row.update(zip(keys, values[-1]))
        row["time/step_s"] = (now - self._window_started) / len(window)
        row["time/elapsed_s"] = self.elapsed
        tokens = float(self._tokens)  # a device tensor's sum: read once a window, as the metrics
        row["time/tokens_per_s"] = tokens / (now - self._window_started) if tokens else math.nan
        self._window_started, self._tokens = now, 0
        self.rows.append(row)
        return row

    def restart_window(self) -> None:
        """Start timing the next window now: time spent since the last row outside the steps
        (reporting, checkpointing) is not charged to ``time/step_s``."""
        self._window_started = time.perf_counter()

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=HISTORY_SCHEMA)


def _to_floats(matrix: list[list[Any]]) -> list[list[float]]:
    """One device-to-host transfer for a window of 0-d tensors and floats."""
    tensors = [v for row in matrix for v in row if isinstance(v, torch.Tensor)]
    if tensors:
        # One stack and transfer per device (metrics of x and y may live on different ones);
        # float64 only on the host, since some accelerators have none.
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(tensors):
            by_device.setdefault(t.device, []).append(i)
        floats: list[float] = [0.0] * len(tensors)
        for indices in by_device.values():
            stacked = torch.stack([tensors[i].detach() for i in indices]).cpu().to(torch.float64)
            for i, value in zip(indices, stacked.tolist()):
                floats[i] = value
        host = iter(floats)
        return [
            [next(host) if isinstance(v, torch.Tensor) else float(v) for v in row] for row in matrix
        ]
    return [[float(v) for v in row] for row in matrix]


def write_parquet(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write atomically: a crash leaves no half-written file."""
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a history file written earlier (none when it does not exist)."""
    if not Path(path).is_file():
        return []
    return pq.read_table(path).to_pylist()
