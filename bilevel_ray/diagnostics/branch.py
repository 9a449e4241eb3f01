"""The side-by-side branch: PBGD-Free against alt_pbgd from the same point, on the same batches.

Where :func:`~bilevel_ray.diagnostics.diagnose.diagnose` cannot decide from the price of the
dropped term (minibatch data, and the run is still moving, or the price is a bound or straddles
the tolerance), PBGD-Free and alt_pbgd run ``branch_steps`` steps from the same (x, y) on the
same batches, and the shortfall is their held-out gap (paired over held-out parts, standard
error se). The precision a run can reach is measured, not assumed: a second PBGD-Free run from
the same start on another batch order, as many steps long, differs from the first by d ± se_d
(held out, over the branch's evaluations), and the noise floor |d| + z se_d (or the
evaluations' jitter, if larger) joins the tolerance. A shortfall within it is no more than what
two PBGD-Free runs differ by: suitable; one beyond it by z se: unsuitable. A replica sees only
batch-order noise, so a real bias still shows above it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from bilevel_ray.config import SolverConfig
from bilevel_ray.diagnostics.responses import as_batch, minimize, reference_upper
from bilevel_ray.diagnostics.verdict import Verdict, tolerance
from bilevel_ray.tree import Params

__all__ = ["EVALS", "PARTS", "REPLICA_SEED", "Branch", "paired_gap", "replica_noise"]

PARTS = 32  # the held-out data is split into this many strided parts for the paired spread
EVALS = 4  # held-out evaluations over the branch's second half, averaged
REPLICA_SEED = 7919  # offset of the replica's batch-order seed from diagnose's own


def replica_noise(
    free: Sequence[Sequence[float]], replica: Sequence[Sequence[float]], z: float
) -> tuple[float, float, float]:
    """What two PBGD-Free runs from the same start, on different batch orders, differ by: the
    noise floor |d| + z se, with d the time-averaged held-out difference of ``free`` and
    ``replica`` and se its standard error over the held-out parts (:func:`paired_gap`, values
    ``[e][k]`` as there), and d and se themselves. No evaluation gives 0 (no replica ran); a
    non-finite value gives inf; one part (no spread) gives |d|. A shortfall within the floor
    is one the run's own batch order could produce: within the precision a run can reach."""
    if not free or not replica:
        return 0.0, 0.0, 0.0
    diff, se, _ = paired_gap(free, replica)
    if not math.isfinite(diff):
        return math.inf, diff, se
    return abs(diff) + (z * se if math.isfinite(se) else 0.0), diff, se


def paired_gap(free: Sequence[Sequence[float]], alt: Sequence[Sequence[float]]) -> tuple:
    """The mean shortfall f(PBGD-Free) - f(alt_pbgd), its standard error and the runs' own
    jitter, from values ``free[e][k]`` and ``alt[e][k]`` at evaluation e on held-out part k
    (or held-back batch k). The gap of part k is averaged over the evaluations, so the
    standard error (over the parts: the paired differences of the same samples) is that of
    the time-averaged gap; one part gives NaN, never a falsely exact 0. The jitter is how far
    a single end value wanders: the standard deviation over the evaluations of each method's
    mean (pooled; 0 from one evaluation)."""
    parts = len(free[0])
    gaps = [statistics.fmean(f[k] - a[k] for f, a in zip(free, alt)) for k in range(parts)]
    if not all(math.isfinite(g) for g in gaps):
        return math.inf, math.inf, 0.0
    gap = statistics.fmean(gaps)
    se = statistics.stdev(gaps) / math.sqrt(parts) if parts > 1 else math.nan
    jitter = 0.0
    if len(free) > 1:
        spreads = [statistics.variance([statistics.fmean(v) for v in run]) for run in (free, alt)]
        jitter = math.sqrt(statistics.fmean(spreads))
    return gap, se, jitter


def _split(batch: Any, parts: int) -> list | None:
    """``batch`` cut into ``parts`` strided parts along its first dimension (every leaf a
    tensor with the same length, at least ``parts``), or None where it cannot be cut."""
    leaves: list[torch.Tensor] = []

    def walk(b: Any) -> bool:
        if isinstance(b, torch.Tensor):
            leaves.append(b)
            return b.dim() > 0
        if isinstance(b, (tuple, list)):
            return all(walk(v) for v in b)
        if isinstance(b, dict):
            return all(walk(v) for v in b.values())
        return False

    if not walk(batch) or not leaves or len({len(v) for v in leaves}) != 1:
        return None
    if len(leaves[0]) < parts:
        return None

    def cut(b: Any, k: int) -> Any:
        if isinstance(b, torch.Tensor):
            return b[k::parts]
        if isinstance(b, dict):
            return {n: cut(v, k) for n, v in b.items()}
        return type(b)(cut(v, k) for v in b)

    return [cut(batch, k) for k in range(parts)]


class Branch:
    """PBGD-Free against alt_pbgd from the same (x, y), on the same batches, for a fixed number
    of steps: the verdict on a minibatch run whose price of the dropped term cannot decide (it
    is still moving at the trajectory's end, or the price is a bound or straddles the
    tolerance). A fixed step count, not a time budget: the verdict does not depend on load."""

    def __init__(self, problem, solver, lr_x, lr_y, gamma, optimizer, state, step, ratio, held):
        self.problem, self.step, self.ratio, self.eval_data = problem, step, ratio, held
        self.reference: tuple[Params, Params] = (state.x, state.y)  # diagnose sets its own
        self.settled, self.priced = False, None
        self.gamma = gamma
        alt = SolverConfig(
            method="alt_pbgd", lr_x=lr_x, lr_y=lr_y, gamma=gamma, optimizer=optimizer
        ).build(problem)
        # Both branches start afresh (optimizer states too), so neither has a head start.
        self.free = (solver, solver.init(state.x, state.y)._replace(step=state.step))
        # The replica's own state (diagnose sets a second run's), made before any branch step
        # (a step may update in place).
        self.again = solver.init(state.x, state.y)._replace(step=state.step)
        self.alt = (alt, alt.init(state.x, state.y)._replace(step=state.step))
        self.parts = None if held is None else _split(as_batch(held).upper, PARTS)

    def _upper(self, x: Params, y: Params, held: list) -> list[float]:
        """f at (x, .) on each held-out part (or held-back batch)."""
        if self.eval_data is not None:
            # The outcome the user judges: phi(x) = f(x, y_g(x)) on the held-out data, y_g(x)
            # solved there (warm-started at the branch's y).
            batch = as_batch(self.eval_data)
            floor = torch.finfo(next(iter(x.values())).dtype).eps ** 0.5
            y, _ = minimize(
                lambda y_: self.problem.lower_loss(x, y_, batch.lower), y, 300, 0.05, "lbfgs", floor
            )
            with torch.no_grad():
                return [
                    float(self.problem.upper_loss(x, y, part))
                    for part in (self.parts or [batch.upper])
                ]
        with torch.no_grad():
            return [float(self.problem.upper_loss(x, y, as_batch(b).upper)) for b in held]

    def _side_by_side(
        self, states: tuple, stream: Any, replica: Any, steps: int, held: list, report: Any
    ) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
        """PBGD-Free, alt_pbgd (on ``stream``'s batches) and the replica if any (on
        ``replica``'s) from ``states`` for ``steps`` steps; f on ``held`` at EVALS steps of the
        second half, per run (the replica's list is empty without one)."""
        (free, _), (alt, _) = self.free, self.alt
        a, c, r = states
        at = sorted({steps - (steps // 2) * e // EVALS for e in range(EVALS)} - {0})
        ends_free: list[list[float]] = []
        ends_alt: list[list[float]] = []
        ends_rep: list[list[float]] = []
        for m in range(1, steps + 1):
            batch = next(stream)
            (a, _), (c, _) = free.step(a, batch), alt.step(c, batch)
            if r is not None:
                r, _ = free.step(r, next(replica))
            if m in at:
                ends_free.append(self._upper(a.x, a.y, held))
                ends_alt.append(self._upper(c.x, c.y, held))
                if r is not None:
                    ends_rep.append(self._upper(r.x, r.y, held))
            if m % 25 == 0:
                report.show(f"step {self.step}, comparing with alt_pbgd, step {m} of {steps}")
        return ends_free, ends_alt, ends_rep

    def verdict(
        self,
        stream: Any,
        batches: int,
        steps: int,
        report: Any,
        judge: dict,
        replica: Any = None,
    ) -> Verdict:
        """``steps`` steps of each; f at both ends evaluated EVALS times over the second half
        (on the held-out data's PARTS parts, or on 2 ``batches`` held-back batches) and
        :func:`paired_gap`'s shortfall against :func:`tolerance` plus the runs' noise: the
        larger of their jitter and, with a ``replica`` batch stream (minibatch data), what a
        second PBGD-Free run (diagnose's: from the same start) on those batches differs by
        (:func:`replica_noise`)."""
        rtol, atol, z = judge["rtol"], judge["atol"], judge["z"]
        held = [self.eval_data] if self.eval_data is not None else []
        held = held or [next(stream) for _ in range(2 * batches)]
        if self.eval_data is None:
            where = f"{len(held)} held-back batches"
        elif self.parts:
            where = f"the held-out data, paired over {len(self.parts)} parts"
        else:
            where = "the held-out data (one part: no spread)"
        a, c = self.free[1], self.alt[1]
        r = self.again if replica is not None else None  # the replica: PBGD-Free's start
        start = self._upper(a.x, a.y, held)
        ref_x, ref_y = self.reference
        if self.eval_data is None:  # f(reference, y_gamma(reference)) on the held-back batches
            loose = {"solve_steps": 50, "solve_lr": 0.05, "solve_rtol": 1e-2, "optimizer": "lbfgs"}
            f_ref = statistics.fmean(
                reference_upper(self.problem, ref_x, ref_y, b, self.gamma, loose)[0] for b in held
            )
        else:
            f_ref = statistics.fmean(self._upper(ref_x, ref_y, held))
        ends_free, ends_alt, ends_rep = self._side_by_side(
            (a, c, r), stream, replica, steps, held, report
        )
        if not ends_free:  # steps = 0: the start alone
            ends_free, ends_alt = [start], [start]
        gap, se, jitter = paired_gap(ends_free, ends_alt)
        runs, r_diff, r_se = replica_noise(ends_free, ends_rep, z)
        noise = max(jitter, runs)
        f_free = statistics.fmean(statistics.fmean(v) for v in ends_free)
        f_alt = statistics.fmean(statistics.fmean(v) for v in ends_alt)
        tol = tolerance(f_ref, f_free, gap, rtol, atol, noise)
        f_start = statistics.fmean(start)
        out = {
            "flatness/cost": gap,
            "flatness/cost_se": se,
            "flatness/tolerance": tol,
            "flatness/noise_floor": noise,
            "flatness/jitter": jitter,
            "flatness/replica_gap": r_diff if replica is not None else math.nan,
            "flatness/replica_se": r_se if replica is not None else math.nan,
            "flatness/upper": f_free,
            "flatness/alt_upper": f_alt,
            "flatness/start_upper": f_ref,
            "flatness/branch_start_upper": f_start,
            "flatness/progress": f_ref - f_free,
            "flatness/branch_steps": float(steps),
            "flatness/step": float(self.step),
            "flatness/settled": float(self.settled),
            "flatness/settle_ratio": self.ratio,
        }
        if self.priced is not None:
            out["flatness/priced_cost"] = self.priced.stats.get("flatness/cost", math.nan)
        if not math.isfinite(f_free) or not math.isfinite(f_alt):
            name = "unsuitable" if math.isfinite(f_alt) else "uncertain"
        elif math.isnan(se):  # one value: its spread is unknown, so only a clear gap decides
            name = "uncertain"
        else:
            # With a replica the floor already holds the spread of a difference between two
            # runs (its z se), so the shortfall itself is held to the tolerance: a shortfall
            # within what two PBGD-Free runs differ by is as good to the run's precision.
            # (A replica that repeated the run exactly measured no spread: the usual rule.)
            measured_floor = bool(ends_rep) and runs > 0 and math.isfinite(r_se)
            low, high = gap - z * se, gap if measured_floor else gap + z * se
            name = "suitable" if high <= tol else "unsuitable" if low > tol else "uncertain"
        confidence = (
            (1.0 if gap <= tol else 0.0)
            if not se > 0 or not math.isfinite(gap)
            else 0.5 * (1 + math.erf((tol - gap) / (se * math.sqrt(2))))
        )
        out["flatness/confidence"] = confidence
        why = (
            f"PBGD-Free was still moving at step {self.step} (its own direction {self.ratio:.3g} "
            "times the dropped term)"
            if not self.settled
            else f"the price of PBGD-Free's dropped term at step {self.step} could not decide"
        )
        spread = f"{se:.2g}" if math.isfinite(se) else "an unknown spread"
        replicated = bool(ends_rep) and runs >= jitter
        if replicated:
            r_spread = f" + {z:g} x {r_se:.2g}" if math.isfinite(r_se) else ""
            jitters = (
                f" plus the {runs:.2g} two PBGD-Free runs from the start on different batch orders "
                f"differ by: {abs(r_diff):.2g}{r_spread}"
            )
        else:
            jitters = f" plus the runs' own jitter {jitter:.2g}" if jitter > 0 else ""
        measured = (
            f"{why}, so it was compared with alt_pbgd from there over {steps} steps on the same "
            f"batches: averaged over the last {len(ends_free)} evaluation(s), PBGD-Free ended at "
            f"f = {f_free:.4g} and alt_pbgd at {f_alt:.4g} (shortfall {gap:.3g} ± {spread} on "
            f"{where}, from f = {f_start:.4g}), against a tolerance of {tol:.3g} "
            f"({100 * rtol:g}% of the achievable improvement from f = {f_ref:.4g} at the "
            f"problem's reference point{jitters})"
        )
        if name == "suitable" and replicated:
            within = (
                f"within the {runs:.2g} two PBGD-Free runs differ by"
                if gap <= runs
                else f"within the tolerance {tol:.3g}"
            )
            reason = (
                f"{measured}: the shortfall {gap:.3g} is {within} ({100 * confidence:.3g}% "
                "confidence), as good to the precision a run can reach, so keep pbgd_free."
            )
            return Verdict(True, "suitable", reason, out, "keep pbgd_free")
        if name == "suitable":
            reason = f"{measured}, with {100 * confidence:.3g}% confidence, so keep pbgd_free."
            return Verdict(True, "suitable", reason, out, "keep pbgd_free")
        if name == "unsuitable":
            reason = f"PBGD-Free falls behind: {measured}, so switch to alt_pbgd."
            return Verdict(False, "unsuitable", reason, out, "switch to alt_pbgd", "alt_pbgd")
        reason = (
            f"PBGD-Free may or may not do as well: {measured}; the difference is within its "
            f"spread, so diagnose with a larger branch_steps (now {steps}) or compare with "
            "alt_pbgd on a longer run."
        )
        return Verdict(False, "uncertain", reason, out, "compare with alt_pbgd")
