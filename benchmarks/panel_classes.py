"""Problem classes the flatness verdict was not designed on, for ``diagnose_panel.py --unseen``
(classes 1 to 5) and ``--sklearn`` (class 6). Each builder returns :class:`Trial` objects: one
problem, one start, one seed (the run's batch order; a network's initial weights too). Every
class holds cases where PBGD-Free is worse and positive controls where it is as good; which is
which is decided by running the methods (``panel_truth.py``: phi = f(x, y*(x)) on f's own rows
at the ends of pbgd_free and alt_pbgd, against ``verdict.tolerance``), never by the design:
``intent`` is the design's expectation, printed beside the truth, not used as the truth.

1. ``saddle`` (deterministic, SGD, lr_x 0.01, lr_y 0.2, 2000 steps): g = ||y - x 1||^2 / 2 with
   y in R^2, f = (x - 1)^2 / 2 + 0.5 |y1 - x|^alpha + c2 |y2 - x|^alpha, alpha 1.2 and 1.5,
   gamma 5 and 2. grad_y f is exactly 0 at y = y_g = (x, x), so y_g is a stationary point of
   f / gamma + g: its minimum for c2 = +0.5 (f Hölder-flat: the control) and a saddle for
   c2 = -1.5 (a max along y2). A solve of the penalty objective started at y_g stops at once
   (its gradient is 0 there), but a run leaves the saddle for y2 - x = +-u*, u* = (1.5 alpha /
   gamma)^(1 / (2 - alpha)), and PBGD-Free then ends at x = 1 -+ gamma u*, not x = 1: a gap
   (gamma u*)^2 / 2 (0.51 to 3.2 here). Started at y0 = y_g(x0) and at y0 = 0, x0 = 3. (With
   lr_x 0.05 the saddle runs cycle and the alpha = 1.2 kink at c = 1.5 makes x wander: no
   crisp truth, hence these settings.)
2. ``float32`` (deterministic, Adam on x, SGD on y, 2000 steps): f scaled by s = 1e-4 while g is
   O(1). Biased: f = s ((x - 1)^2 / 2 + 2 y), g = (y - x)^2 / 2 (PBGD-Free ends at x = 1, the
   bilevel solution is x = -1); control: f = s ((x - 1)^2 / 2 + (y - x)^2) (f and g share the
   lower solution: the dropped term is exactly 0). Each in float32 and float64 (y_gamma - y_g
   = 2 s / gamma = 2e-5, under a float32 solve's sqrt(eps) tolerance); and the biased shape at
   s = 1 in float32.
3. ``late`` (deterministic, Adam lr_x 1e-3, 5000 steps from x0 = 3): coupling that switches on
   only where the run arrives late. q(x) = 0.5 (x - a) + relu(a - x)^2 / 2 (a gentle slope for
   x > a = 0 that Adam descends at lr_x a step), sw(x) a smoothstep from 0 (x >= a) to 1
   (x <= a - 0.2). "late-f": f = q + sw(x) y, g = (y - x)^2 / 2: f ignores y until x < a.
   "late-g": f = q + y, g = (y - h(x))^2 / 2, h(x) = -ramp(a - x) (constant for x > a, slope 1
   below a - 0.2): y* ignores x until x < a. Control "late-flat": f = q + sw(x) (y - x)^2. The
   run crosses x = a after ~3000 of its 5000 steps; only then does the bias (1/2) appear.
4. ``highdim`` (x in R^640, Adam, 2000 steps). "hd-quadratic": g = ||y - B x||^2 / 2
   + 0.1 ||y||^2 / 2 (y in R^16), f = 0.1 ||x - x_t||^2 / 2 + ||y - t||^2 / 2: PBGD-Free's x
   step never sees t; control "hd-shared": f's y-term ||y - B x / 1.1||^2 / 2 is g's own
   solution. "hd-features": a 20 x 32 tanh feature map (640 weights) under a ridge-fitted linear
   head, full batch, f = MSE on rows whose targets come from another head (``shifted``), from
   the same head (``fresh`` rows: no design expectation) or on g's own rows (``same``: control).
5. ``ce-shift`` (minibatches of 32, Adam, 2000 steps, seeds 0 and 1): three overlapping
   Gaussian blobs (d = 6), a tanh layer of 8 (x) under a softmax head (y); g = cross-entropy +
   1e-3 ridge on 600 rows with equal priors; f = cross-entropy on 300 rows drawn with priors
   0.8 / 0.1 / 0.1 (``shifted``), on 300 fresh rows of g's distribution (``fresh``: no design
   expectation), or on g's own rows (``same``: control). "ce-weights": x also holds per-class
   weights of g's loss (importance weighting for the shift), which f reaches only through
   y*(x): PBGD-Free never moves them. Held-out rows come from f's distribution.
6. ``sklearn``: ``examples/sklearn_nets.py`` (an MLP under a linear head; f = validation loss,
   g = training loss + ridge; float32) on wine, breast_cancer, diabetes, digits at batch sizes
   16, 32, 64 (wine, whose f has 44 rows: 8, 16, 32) and seeds 0, 1, 2 (the network's initial
   weights and the batch order), at the example's settings (Adam, lr_x 0.01, lr_y 0.05,
   gamma 10) for a 1500-step horizon; and wine and breast_cancer at ridge 1 (a strongly shrunk
   head), batch 32. No design expectation: their truth is whatever the runs give.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import bilevel_ray as br
from bilevel_ray.data import BilevelBatch

F64 = torch.float64
F32 = torch.float32


@dataclass
class Trial:
    """One problem from one start with one seed: what the truth runs and diagnose judges.

    ``data(seed)`` gives the run's data (None: deterministic, the problem ignores its batch);
    ``full`` holds f's own rows and g's rows (phi's data; None for data-free problems);
    ``eval_data`` the held-out rows (reported beside the truth, never part of it).
    ``settings``: gamma, lr_x, lr_y, optimizer, inner_steps (PBGD-Free's and diagnose's);
    the corrected method runs ``corrected_steps`` steps with ``corrected`` settings on top."""

    family: str
    name: str
    problem: Any
    x0: dict
    y0: dict
    settings: dict[str, Any]
    steps: int
    seed: int = 0
    data: Any = None  # callable seed -> data, or None
    full: BilevelBatch | None = None
    eval_data: BilevelBatch | None = None
    corrected_steps: int | None = None
    corrected: dict[str, Any] = field(default_factory=lambda: {"inner_steps": 5})
    intent: str = "?"

    @property
    def minibatch(self) -> bool:
        return self.data is not None and isinstance(self.data(self.seed), br.data.Minibatches)

    @property
    def key(self) -> str:
        return f"{self.family}/{self.name}/seed={self.seed}"


def _t(*values: float, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# --------------------------------------------------------------------------- 1. saddle


class HolderSaddle:
    """g = ||y - x||^2 / 2 (y in R^2), f = (x - 1)^2 / 2 + c1 |y1 - x|^alpha
    + c2 |y2 - x|^alpha: y_g = (x, x) is the penalty objective's minimum (c2 > 0) or a saddle
    (c2 < 0: a max along y2); grad_y f = 0 there either way."""

    def __init__(self, alpha: float, c1: float, c2: float):
        self.alpha, self.c1, self.c2 = alpha, c1, c2

    def upper_loss(self, x, y, batch):
        u = (y["y"] - x["x"]).abs() ** self.alpha
        return (0.5 * (x["x"] - 1) ** 2).sum() + self.c1 * u[0] + self.c2 * u[1]

    def lower_loss(self, x, y, batch):
        return 0.5 * ((y["y"] - x["x"]) ** 2).sum()


def saddle() -> list[Trial]:
    out = []
    for alpha in (1.2, 1.5):
        for gamma in (5.0, 2.0):
            for c2, kind in ((-1.5, "saddle"), (0.5, "flat")):
                for where, y0 in (("y0=y_g", 3.0), ("y0=0", 0.0)):
                    out.append(
                        Trial(
                            "saddle",
                            f"{kind} alpha={alpha} gamma={gamma:g} {where}",
                            HolderSaddle(alpha, 0.5, c2),
                            {"x": _t(3.0)},
                            {"y": _t(y0, y0)},
                            {"gamma": gamma, "lr_x": 0.01, "lr_y": 0.2, "optimizer": "sgd"},
                            2000,
                            intent="worse" if c2 < 0 else "as good",
                        )
                    )
    return out


# --------------------------------------------------------------------------- 2. float32


class ScaledLipschitz:
    """g = (y - x)^2 / 2; f = s ((x - 1)^2 / 2 + l y), or with ``shared`` s ((x - 1)^2 / 2
    + (y - x)^2) (grad_y f = 0 at y_g: the dropped term is exactly 0)."""

    def __init__(self, scale: float, slope: float, shared: bool = False):
        self.scale, self.slope, self.shared = scale, slope, shared

    def upper_loss(self, x, y, batch):
        coupling = (y["y"] - x["x"]) ** 2 if self.shared else self.slope * y["y"]
        return self.scale * (0.5 * (x["x"] - 1) ** 2 + coupling).sum()

    def lower_loss(self, x, y, batch):
        return 0.5 * ((y["y"] - x["x"]) ** 2).sum()


def float32() -> list[Trial]:
    out = []
    settings = {"gamma": 10.0, "lr_x": 0.01, "lr_y": 0.2, "optimizer": ("adam", "sgd")}
    variants = [
        (1e-4, F32, False),
        (1e-4, F64, False),
        (1e-4, F32, True),
        (1e-4, F64, True),
        (1.0, F32, False),
    ]
    for scale, dtype, shared in variants:
        kind = "shared" if shared else "lipschitz l=2"
        name = f"{kind} f*{scale:g} {str(dtype).removeprefix('torch.')}"
        out.append(
            Trial(
                "float32",
                name,
                ScaledLipschitz(scale, 2.0, shared),
                {"x": _t(3.0, dtype=dtype)},
                {"y": _t(0.0, dtype=dtype)},
                settings,
                2000,
                intent="as good" if shared else "worse",
            )
        )
    return out


# --------------------------------------------------------------------------- 3. late


def _smoothstep(z: torch.Tensor) -> torch.Tensor:
    z = z.clamp(0.0, 1.0)
    return z * z * (3 - 2 * z)


def _ramp(z: torch.Tensor, w: float) -> torch.Tensor:
    """0 for z <= 0, z^2 / (2 w) up to w, then z - w / 2 (C^1, slope 0 to 1)."""
    inside = z.clamp(0.0, w)
    return inside**2 / (2 * w) + (z - w).clamp_min(0.0)


class LateCoupling:
    """q(x) = eps (x - a) + k relu(a - x)^2 / 2; variant "f": f = q + l sw(x) y, g = (y - x)^2/2;
    "flat": f = q + l sw(x) (y - x)^2, g as "f"; "g": f = q + l y, g = (y - h(x))^2 / 2 with
    h(x) = -ramp(a - x). sw: smoothstep from 0 at x = a to 1 at x = a - w."""

    def __init__(self, variant: str, eps=0.5, k=1.0, slope=1.0, a=0.0, w=0.2):
        self.variant, self.eps, self.k, self.slope, self.a, self.w = variant, eps, k, slope, a, w

    def _q(self, x):
        return self.eps * (x - self.a) + 0.5 * self.k * (self.a - x).clamp_min(0.0) ** 2

    def upper_loss(self, x, y, batch):
        x_, y_ = x["x"], y["y"]
        if self.variant == "g":
            return (self._q(x_) + self.slope * y_).sum()
        sw = _smoothstep((self.a - x_) / self.w)
        coupling = (y_ - x_) ** 2 if self.variant == "flat" else y_
        return (self._q(x_) + self.slope * sw * coupling).sum()

    def lower_loss(self, x, y, batch):
        x_, y_ = x["x"], y["y"]
        target = -_ramp(self.a - x_, self.w) if self.variant == "g" else x_
        return 0.5 * ((y_ - target) ** 2).sum()


def late() -> list[Trial]:
    out = []
    settings = {"gamma": 10.0, "lr_x": 1e-3, "lr_y": 0.2, "optimizer": ("adam", "sgd")}
    for variant, intent in (("f", "worse"), ("g", "worse"), ("flat", "as good")):
        out.append(
            Trial(
                "late",
                f"late-{variant} x0=3",
                LateCoupling(variant),
                {"x": _t(3.0)},
                {"y": _t(0.0)},
                settings,
                5000,
                intent=intent,
            )
        )
    return out


# --------------------------------------------------------------------------- 4. highdim


class HDQuadratic:
    """x in R^n, y in R^m: g = ||y - B x||^2 / 2 + lam ||y||^2 / 2; f = mu ||x - x_t||^2 / 2
    + ||y - t||^2 / 2, or with ``shared`` ||y - B x / (1 + lam)||^2 / 2 (g's own solution)."""

    def __init__(self, n=640, m=16, mu=0.1, lam=0.1, shared=False, seed=3):
        gen = torch.Generator().manual_seed(seed)
        self.B = torch.randn(m, n, generator=gen, dtype=F64) / math.sqrt(n) * 2
        self.x_t = 0.1 * torch.randn(n, generator=gen, dtype=F64)
        self.t = torch.randn(m, generator=gen, dtype=F64)
        self.mu, self.lam, self.shared = mu, lam, shared

    def upper_loss(self, x, y, batch):
        x_, y_ = x["x"], y["y"]
        target = self.B.to(x_.dtype) @ x_ / (1 + self.lam) if self.shared else self.t
        return 0.5 * self.mu * ((x_ - self.x_t) ** 2).sum() + 0.5 * ((y_ - target) ** 2).sum()

    def lower_loss(self, x, y, batch):
        x_, y_ = x["x"], y["y"]
        return 0.5 * ((y_ - self.B @ x_) ** 2).sum() + 0.5 * self.lam * (y_**2).sum()


class TanhFeatures:
    """x = {feat: d x h} (a tanh feature map), y = {w: h, b: 1} a linear head; f = MSE on the upper
    rows, g = MSE + ridge ||y.w||^2 on the lower rows."""

    def __init__(self, ridge: float):
        self.ridge = ridge

    @staticmethod
    def _mse(x, y, batch):
        inputs, targets = batch
        out = torch.tanh(inputs @ x["feat"]) @ y["w"] + y["b"]
        return ((out - targets) ** 2).mean()

    def upper_loss(self, x, y, batch):
        return self._mse(x, y, batch)

    def lower_loss(self, x, y, batch):
        return self._mse(x, y, batch) + self.ridge * (y["w"] ** 2).sum()


def _feature_data(rows: str, d=20, h=32, n=200, seed=5):
    """Targets tanh(a T) w + noise. g's rows use head w; f's rows (and the held-out rows) come
    from head w + other (``shifted``), from w (``fresh``), or are g's own rows (``same``)."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(d, h, generator=gen, dtype=F64) / math.sqrt(d)
    head = torch.randn(h, generator=gen, dtype=F64) / math.sqrt(h)
    other = torch.randn(h, generator=gen, dtype=F64) / math.sqrt(h)
    sets = []
    for level in ("lower", "upper", "held"):
        inputs = torch.randn(n, d, generator=gen, dtype=F64)
        w = head + (other if level != "lower" and rows == "shifted" else 0.0)
        targets = torch.tanh(inputs @ teacher) @ w + 0.05 * torch.randn(n, generator=gen, dtype=F64)
        sets.append((inputs, targets))
    lower, upper, held = sets
    return BilevelBatch(lower if rows == "same" else upper, lower), BilevelBatch(held, lower)


def highdim() -> list[Trial]:
    out = []
    settings = {"gamma": 10.0, "lr_x": 0.01, "lr_y": 0.2, "optimizer": ("adam", "sgd")}
    for shared in (False, True):
        out.append(
            Trial(
                "highdim",
                "hd-shared n=640" if shared else "hd-quadratic n=640",
                HDQuadratic(shared=shared),
                {"x": torch.zeros(640, dtype=F64)},
                {"y": torch.zeros(16, dtype=F64)},
                settings,
                2000,
                intent="as good" if shared else "worse",
            )
        )
    gen = torch.Generator().manual_seed(9)
    x0 = {"feat": torch.randn(20, 32, generator=gen, dtype=F64) / math.sqrt(20)}
    y0 = {"w": torch.zeros(32, dtype=F64), "b": torch.zeros(1, dtype=F64)}
    for rows, intent in (("shifted", "worse"), ("same", "as good"), ("fresh", "?")):
        full, held = _feature_data(rows)
        out.append(
            Trial(
                "highdim",
                f"hd-features n=640 f-rows={rows}",
                TanhFeatures(1e-2),
                x0,
                y0,
                {"gamma": 10.0, "lr_x": 0.01, "lr_y": 0.05, "optimizer": "adam"},
                2000,
                data=lambda seed, full=full: br.full_batch(full.upper, full.lower),
                full=full,
                eval_data=held,
                intent=intent,
            )
        )
    return out


# --------------------------------------------------------------------------- 5. ce-shift


class ShiftedCE:
    """x = {w1: d x h, b1: h} (+ {v: C}: g's per-class log-weights), y = {w: h x C, b: C};
    f = cross-entropy on the upper rows; g = (class-weighted) cross-entropy + ridge."""

    def __init__(self, ridge: float, weighted: bool):
        self.ridge, self.weighted = ridge, weighted

    @staticmethod
    def _logits(x, y, inputs):
        return torch.tanh(inputs @ x["w1"] + x["b1"]) @ y["w"] + y["b"]

    def upper_loss(self, x, y, batch):
        inputs, labels = batch
        return F.cross_entropy(self._logits(x, y, inputs), labels)

    def lower_loss(self, x, y, batch):
        inputs, labels = batch
        losses = F.cross_entropy(self._logits(x, y, inputs), labels, reduction="none")
        if self.weighted:
            w = torch.softmax(x["v"], 0)[labels]
            loss = (w * losses).sum() / w.sum()
        else:
            loss = losses.mean()
        return loss + self.ridge * (y["w"] ** 2).sum()


def _blobs(rows: str, d=6, n_low=600, n_up=300, seed=4):
    """g's rows from 3 overlapping Gaussian blobs with equal priors; f's rows ``shifted``
    (priors 0.8 / 0.1 / 0.1, the same blobs), ``fresh`` (new rows from g's distribution) or
    ``same`` (g's own rows); held-out rows from f's distribution."""
    gen = torch.Generator().manual_seed(seed)
    means = 0.7 * torch.randn(3, d, generator=gen, dtype=F64)

    def draw(n, priors):
        labels = torch.multinomial(torch.tensor(priors), n, replacement=True, generator=gen)
        return means[labels] + torch.randn(n, d, generator=gen, dtype=F64), labels

    even, shifted = (1 / 3, 1 / 3, 1 / 3), (0.8, 0.1, 0.1)
    lower = draw(n_low, even)
    priors = shifted if rows == "shifted" else even
    upper = lower if rows == "same" else draw(n_up, priors)
    return BilevelBatch(upper, lower), BilevelBatch(draw(n_up, priors), lower)


def ce_shift(seeds=(0, 1)) -> list[Trial]:
    out = []
    settings = {"gamma": 10.0, "lr_x": 0.01, "lr_y": 0.05, "optimizer": "adam"}
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(6, 8, generator=gen, dtype=F64) / math.sqrt(6)
    y0 = {"w": torch.zeros(8, 3, dtype=F64), "b": torch.zeros(3, dtype=F64)}
    variants = [
        (True, "shifted", "worse"),
        (False, "shifted", "worse"),
        (True, "same", "as good"),
        (False, "same", "as good"),
        (False, "fresh", "?"),
    ]
    for weighted, rows, intent in variants:
        full, held = _blobs(rows)
        x0 = {"w1": w0, "b1": torch.zeros(8, dtype=F64)}
        if weighted:
            x0["v"] = torch.zeros(3, dtype=F64)
        for seed in seeds:
            out.append(
                Trial(
                    "ce-shift",
                    f"{'ce-weights' if weighted else 'ce-features'} f-rows={rows} batch=32",
                    ShiftedCE(1e-3, weighted),
                    x0,
                    y0,
                    settings,
                    2000,
                    seed=seed,
                    data=lambda s, full=full: br.minibatches(full.upper, full.lower, 32),
                    full=full,
                    eval_data=held,
                    intent=intent,
                )
            )
    return out


# --------------------------------------------------------------------------- 6. sklearn


def _sklearn_module():
    path = Path(__file__).resolve().parent.parent / "examples" / "sklearn_nets.py"
    spec = importlib.util.spec_from_file_location("sklearn_nets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sklearn(
    names=("wine", "breast_cancer", "diabetes", "digits"),
    batches=(16, 32, 64),
    seeds=(0, 1, 2),
    steps=1500,
) -> list[Trial]:
    module = _sklearn_module()
    out = []
    # wine's f has 44 rows: its batch sizes are halved (8, 16, 32)
    sizes = {n: tuple(b // 2 for b in batches) if n == "wine" else batches for n in names}
    grid = [(n, b, s, None) for n in names for b in sizes[n] for s in seeds]
    grid += [(n, 32, s, 1.0) for n in ("wine", "breast_cancer") for s in seeds]
    for name, size, seed, ridge in grid:
        config = {"batch_size": size, "seed": seed}
        if ridge is not None:
            config["ridge"] = ridge
        spec = module.build(name, config)
        settings = {k: v for k, v in spec.defaults.items() if k != "steps"}
        data = spec.data
        out.append(
            Trial(
                "sklearn",
                f"{name} batch={size}" + (f" ridge={ridge:g}" if ridge is not None else ""),
                spec.problem,
                spec.x0,
                spec.y0,
                settings,
                steps,
                seed=seed,
                data=lambda s, data=data: data,
                full=BilevelBatch(data.upper, data.lower),
                eval_data=spec.eval_data,
            )
        )
    return out


UNSEEN = {
    "saddle": saddle,
    "float32": float32,
    "late": late,
    "highdim": highdim,
    "ce-shift": ce_shift,
}
