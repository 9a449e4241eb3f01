"""The truth of a :class:`~panel_classes.Trial`, by outcome, and its JSON cache.

    phi(x) = f(x, y*(x)) on f's own rows (the full upper data), y*(x) = argmin_y g(x, y) on the
    full lower data by L-BFGS warm-started at the run's y, all in float64 (the truth is not held
    to the run's precision)

PBGD-Free runs ``steps`` steps (``br.solve``, the trial's settings and seed), the corrected
method (alt_pbgd, K = 5 inner steps, the same gamma, lr and optimizer) ``corrected_steps``
(default ``steps``) from the same start on the same batches; gap = phi(x_free) - phi(x_alt).
The tolerance is ``bilevel_ray.diagnostics.verdict.tolerance``: 5% of the achievable
improvement, phi(x0) less the better end, plus 1e-6 plus, on minibatch data, the run-to-run
spread |phi(x_free) - phi(x_free')| of a second PBGD-Free run on another batch order (seed +
7919, diagnose's replica offset). "worse" when gap > tolerance (or PBGD-Free diverged), else
"as good". The held-out loss (f on ``eval_data``'s upper rows at y*(x)) of both ends is kept
beside it, never used in it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

import bilevel_ray as br
from bilevel_ray.data import BilevelBatch
from bilevel_ray.diagnostics.responses import minimize
from bilevel_ray.diagnostics.verdict import tolerance

TRUTH_VERSION = 1
REPLICA = 7919  # the replica's batch-order offset (diagnose's own REPLICA_SEED)
RTOL, ATOL = 0.05, 1e-6


def _f64(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _f64(v) for k, v in value.items()}
    if isinstance(value, BilevelBatch):
        return BilevelBatch(_f64(value.upper), _f64(value.lower))
    if isinstance(value, (tuple, list)):
        return type(value)(_f64(v) for v in value)
    return value


def lower_solution(trial, x: dict, y: dict) -> dict:
    """y*(x) on the full lower data, in float64, by L-BFGS from y."""
    batch = _f64(trial.full) if trial.full is not None else BilevelBatch(None, None)
    x64, y64 = _f64(x), _f64(y)
    y_star, _ = minimize(
        lambda y_: trial.problem.lower_loss(x64, y_, batch.lower), y64, 1000, 0.1, "lbfgs", 1e-10
    )
    return y_star


def phi(trial, x: dict, y: dict) -> tuple[float, float]:
    """(phi on f's own rows, f on the held-out rows: NaN without eval_data) at x."""
    if not all(torch.isfinite(v).all() for v in (*x.values(), *y.values())):
        return math.inf, math.inf
    y_star = lower_solution(trial, x, y)
    x64 = _f64(x)
    upper = _f64(trial.full).upper if trial.full is not None else None
    with torch.no_grad():
        value = float(trial.problem.upper_loss(x64, y_star, upper))
        held = math.nan
        if trial.eval_data is not None:
            held = float(trial.problem.upper_loss(x64, y_star, _f64(trial.eval_data).upper))
    return (value if math.isfinite(value) else math.inf), held


def run(trial, method: str, seed: int, steps: int) -> tuple[float, float]:
    """(phi, held-out) at the end of ``steps`` steps of ``method``; inf if it diverges."""
    settings = dict(trial.settings)
    if method != "pbgd_free":
        settings.update(trial.corrected)
    data = trial.data(seed) if trial.data else None
    try:
        res = br.solve(
            trial.problem,
            trial.x0,
            trial.y0,
            method=method,
            steps=steps,
            data=data,
            seed=seed,
            report_every=100,
            **settings,
        )
    except br.DivergenceError:
        return math.inf, math.inf
    return phi(trial, res.x, res.y)


def _fingerprint(value: Any, depth: int = 0) -> Any:
    """A JSON-able summary of a value: tensors by shape, dtype and sums; containers and plain
    objects (a problem's attributes) item by item."""
    if isinstance(value, torch.Tensor):
        v = value.detach().to(torch.float64)
        return [
            list(value.shape),
            str(value.dtype),
            f"{float(v.sum()):.12g}",
            f"{float(v.abs().sum()):.12g}",
        ]
    if isinstance(value, dict):
        return {str(k): _fingerprint(v, depth + 1) for k, v in sorted(value.items())}
    if isinstance(value, (tuple, list)):
        return [_fingerprint(v, depth + 1) for v in value]
    if hasattr(value, "__dict__") and depth < 2:
        return [type(value).__name__, _fingerprint(vars(value), depth + 1)]
    return repr(value)


def signature(trial) -> str:
    """What the truth depends on besides the code: the settings, horizons and seed, the
    problem's attributes, the start and the data (a cache key's suffix)."""
    settings = {k: str(v) for k, v in sorted(trial.settings.items())}
    parts = [TRUTH_VERSION, settings, trial.steps, trial.corrected_steps, trial.corrected]
    parts += [trial.seed, _fingerprint(trial.problem), _fingerprint([trial.x0, trial.y0])]
    parts += [_fingerprint(list(trial.full) if trial.full is not None else None)]
    parts += [_fingerprint(list(trial.eval_data) if trial.eval_data is not None else None)]
    text = json.dumps(parts, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def compute(trial) -> dict[str, Any]:
    t0 = time.monotonic()
    free, held_free = run(trial, "pbgd_free", trial.seed, trial.steps)
    alt, held_alt = run(trial, "alt_pbgd", trial.seed, trial.corrected_steps or trial.steps)
    replica = math.nan
    noise = 0.0
    if trial.minibatch:
        replica, _ = run(trial, "pbgd_free", trial.seed + REPLICA, trial.steps)
        noise = abs(free - replica)
    ref, _ = phi(trial, trial.x0, trial.y0)
    gap = free - alt
    if not math.isfinite(free):
        label, tol = "worse", math.nan
    else:
        tol = tolerance(ref, free, gap, RTOL, ATOL, noise if math.isfinite(noise) else math.inf)
        label = "worse" if gap > tol else "as good"
    return {
        "truth": label,
        "phi_free": free,
        "phi_alt": alt,
        "phi_ref": ref,
        "phi_replica": replica,
        "noise": noise,
        "gap": gap,
        "tol": tol,
        "held_free": held_free,
        "held_alt": held_alt,
        "seconds": time.monotonic() - t0,
    }


class Cache:
    """Truths by trial key and signature in one JSON file (non-finite numbers as strings)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {}
        if self.path and self.path.exists():
            self.data = json.loads(self.path.read_text())

    def get(self, trial, refresh: bool = False) -> tuple[dict[str, Any], bool]:
        key = f"{trial.key}#{signature(trial)}"
        if key in self.data and not refresh:
            return {k: _load(v) for k, v in self.data[key].items()}, True
        value = compute(trial)
        self.data[key] = {k: _dump(v) for k, v in value.items()}
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        return value, False


def _dump(v: Any) -> Any:
    return repr(v) if isinstance(v, float) and not math.isfinite(v) else v


def _load(v: Any) -> Any:
    return float(v) if v in ("inf", "-inf", "nan") else v
